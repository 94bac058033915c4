"""The fused distillation loss against a cached teacher top-k instead of a teacher head.

Offline teacher caches keep, per token, only the teacher's ``k`` largest logits (``values`` [N, k])
and their vocabulary ids (``indices`` [N, k]). How the mass outside the top-k is treated:

- **teacher**: its distribution is the softmax of ``values / temperature`` *renormalised over its
  top-k*; every other token has probability exactly 0 (its logit is taken as ``-inf``). Because the
  softmax is shift-invariant per row, ``values`` may be raw logits or log-probabilities
  (``log_softmax`` at temperature 1, e.g. with the full-vocabulary normaliser already subtracted):
  both give the same softened teacher distribution.
- **student**: keeps its log-probabilities over the *full* vocabulary, so mass it puts outside the
  teacher's top-k is what forward KL ignores and what JSD, TVD and the skew divergences penalise.
- reverse KL (also ``jsd`` with beta = 1 and ``skew_reverse_kl`` with lambda = 0) is infinite as
  soon as the student gives any mass to a token outside the teacher's top-k, so it is refused.

With ``k == V`` this is exactly :func:`distillkit.kernels.kd_loss.fused.fused_kd_loss` with the
full teacher logits. The chunk loop and kernel are the same; only the teacher logits of a chunk
are built by scattering the cached values into a ``-inf`` row instead of a matmul.
"""

from __future__ import annotations

from typing import Any

import torch

from distillkit.kernels.kd_loss.fused import (
    KDSettings,
    chunked_kd_forward,
    prepare_call,
    scale_grads,
)


class FusedKDLossTopKFunction(torch.autograd.Function):
    """Autograd wrapper of the chunk loop with a top-k teacher; outputs ``(loss, kd, ce)``."""

    @staticmethod
    def forward(
        ctx: Any,
        student_hidden: torch.Tensor,
        student_head: torch.Tensor,
        student_bias: torch.Tensor | None,
        teacher_values: torch.Tensor,
        teacher_indices: torch.Tensor,
        labels: torch.Tensor | None,
        kd_mask: torch.Tensor,
        settings: KDSettings,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vocab = student_head.shape[0]

        def teacher_logits(start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
            values = teacher_values[start:end].to(dtype)
            full = torch.full((end - start, vocab), float("-inf"), dtype=dtype, device=values.device)
            return full.scatter_(1, teacher_indices[start:end].long(), values)

        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        loss, kd, ce, grads = chunked_kd_forward(
            settings, student_hidden, student_head, student_bias, teacher_logits, labels, kd_mask, need
        )
        ctx.grads = grads
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        return (*scale_grads(ctx.grads, grad_loss), None, None, None, None, None)


def fused_kd_loss_topk_terms(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    kd_scale: float = 1.0,
    ce_scale: float = 0.0,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kd_scale * kd + ce_scale * ce, kd, ce)`` against a teacher top-k (see :func:`fused_kd_loss_topk`)."""
    n, vocab = student_hidden.shape[0], student_head.shape[0]
    if teacher_values.ndim != 2 or teacher_values.shape != teacher_indices.shape or teacher_values.shape[0] != n:
        raise ValueError(
            f"teacher values {tuple(teacher_values.shape)} and indices {tuple(teacher_indices.shape)} "
            f"must both be [N={n}, k]"
        )
    if teacher_indices.dtype.is_floating_point:
        raise ValueError(f"teacher indices must be integers, not {teacher_indices.dtype}")
    k = teacher_values.shape[1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k must keep between 1 and V={vocab} tokens, got k={k}")
    if bool(((teacher_indices < 0) | (teacher_indices >= vocab)).any()):
        raise ValueError(f"teacher indices must be in [0, {vocab})")
    labels, kd_mask, settings = prepare_call(
        student_hidden, student_head, student_bias, labels, mask,
        divergence=divergence, beta=beta, skew=skew, temperature=temperature, kd_scale=kd_scale,
        ce_scale=ce_scale, ignore_index=ignore_index, chunk_size=chunk_size, backend=backend,
    )  # fmt: skip
    if settings.divergence == "reverse_kl" and k < vocab:
        raise ValueError(
            f"{divergence} is infinite against a teacher top-k (the teacher has probability 0 outside its "
            "top-k wherever the student has mass); use forward_kl, jsd with beta < 1, tvd or the skew divergences"
        )
    return FusedKDLossTopKFunction.apply(
        student_hidden,
        student_head,
        student_bias,
        teacher_values.detach().to(student_hidden.device),
        teacher_indices.to(student_hidden.device),
        labels,
        kd_mask,
        settings,
    )


def fused_kd_loss_topk(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    alpha: float = 0.0,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused distillation loss against cached teacher top-k logits; the logits are never held whole.

    ``student_hidden`` [N, Hs], ``student_head`` [V, Hs] (+ ``student_bias`` [V]); ``teacher_values``
    [N, k] float (logits or log-probs) at the distinct vocabulary ids ``teacher_indices`` [N, k] int.
    The teacher distribution is renormalised over its top-k (see the module docstring); all other
    arguments and the result are those of :func:`distillkit.kernels.kd_loss.fused.fused_kd_loss`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], not {alpha}")
    loss, kd, ce = fused_kd_loss_topk_terms(
        student_hidden,
        student_head,
        teacher_values,
        teacher_indices,
        labels,
        student_bias=student_bias,
        divergence=divergence,
        beta=beta,
        skew=skew,
        temperature=temperature,
        kd_scale=1.0 - alpha,
        ce_scale=alpha,
        ignore_index=ignore_index,
        mask=mask,
        chunk_size=chunk_size,
        backend=backend,
    )
    return (loss, kd, ce) if return_parts else loss
