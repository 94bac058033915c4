"""Fused linear + distillation loss: logits chunk by chunk, gradients computed during the forward.

For LLM distillation the ``[N, V]`` logits of student and teacher dominate memory (8192 tokens x
128,256 vocabulary is 2 GiB per bf16 copy, more in float32 and for the softmax intermediates).
:class:`FusedKDLossFunction` never holds them: it walks the tokens in chunks of ``C`` rows, and for
each chunk

1. computes student logits ``[C, V]`` and teacher logits ``[C, V]`` with two torch matmuls;
2. turns them into per-row losses and ``d(loss)/d(student logits)`` in one kernel that writes the
   gradient over the student logits (Triton; or torch math per chunk on CPU without Triton);
3. folds that gradient into ``grad_hidden[chunk] = G @ W`` and ``grad_head += G.T @ h`` (and
   ``grad_bias += G.sum(0)``) right away.

The backward is then only a scale by the incoming gradient (the Liger-Kernel recipe), so the
extra memory is two ``[C, V]`` buffers plus the gradients themselves. The semantics are those of
:func:`distillkit.kernels.kd_loss.naive.naive_kd_loss`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from distillkit.kernels.kd_loss.naive import DIVERGENCES, counted_rows, kd_rows

BACKENDS = ("auto", "triton", "torch")

# Bytes for the two [C, V] logit buffers of one chunk. 384 MiB keeps the whole op under ~1 GiB of
# extra memory at 8192 x 128,256 in bf16 (the bf16 head gradient alone is 0.5 GiB) while a chunk
# of ~768 rows still keeps the matmuls efficient and the number of head-gradient updates small.
CHUNK_BYTES = 384 << 20


@dataclass(frozen=True)
class KDSettings:
    """What the chunk loop needs besides tensors (hashable, so it can ride through autograd)."""

    divergence: str
    param: float  # beta for jsd, lambda for the skew divergences, unused otherwise
    temperature: float
    kd_scale: float
    ce_scale: float
    ignore_index: int
    chunk_size: int | None
    backend: str  # "triton" or "torch", already resolved


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` -> Triton on CUDA (or on CPU under the interpreter), torch math otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "torch":
        return "torch"
    usable = triton_available() and (device.type == "cuda" or (device.type == "cpu" and interpreting()))
    if backend == "triton":
        if not usable:
            raise RuntimeError(
                f"the Triton kd-loss kernel cannot run on {device.type} here: it needs CUDA and triton, "
                "or TRITON_INTERPRET=1 set before import on CPU; use backend='torch'"
            )
        return "triton"
    return "triton" if usable else "torch"


def normalize_divergence(divergence: str, beta: float, skew: float) -> tuple[str, float]:
    """(kernel divergence, its parameter), mapping the endpoints the reference defines as plain KLs."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose from {', '.join(DIVERGENCES)}")
    if divergence == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], not {beta}")
        if beta == 0.0:
            return "forward_kl", 0.0
        if beta == 1.0:
            return "reverse_kl", 0.0
        return "jsd", float(beta)
    if divergence in ("skew_kl", "skew_reverse_kl"):
        if not 0.0 <= skew < 1.0:
            raise ValueError(f"skew must be in [0, 1), not {skew}")
        if skew == 0.0:
            return ("forward_kl" if divergence == "skew_kl" else "reverse_kl"), 0.0
        return divergence, float(skew)
    return divergence, 0.0


def default_chunk_size(n: int, vocab: int, element_size: int) -> int:
    """Rows per chunk so that the two [C, V] logit buffers fit :data:`CHUNK_BYTES`; a multiple of 64 when large."""
    rows = max(1, CHUNK_BYTES // max(1, 2 * vocab * element_size))
    if rows >= 128:
        rows -= rows % 64
    return max(1, min(n, rows))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmul dtype: the autocast dtype inside autocast (as the unfused model's lm_head), else the input's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _torch_rows(
    logits: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    kd_weight: torch.Tensor,
    ce_weight: torch.Tensor | None,
    settings: KDSettings,
    write_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Torch counterpart of the Triton kernel for one chunk: (kd rows [C], ce rows [C], grad [C, V] or None)."""
    with torch.enable_grad():
        s = logits.detach().float().requires_grad_(write_grad)
        rows = kd_rows(s, teacher.float(), settings.divergence, settings.temperature, settings.param, settings.param)
        ce = torch.zeros_like(rows)
        if labels is not None:
            in_range = (labels >= 0) & (labels < s.shape[1])
            picked = s.gather(1, torch.where(in_range, labels, 0).long()[:, None])[:, 0]
            ce = torch.where(in_range, torch.logsumexp(s, dim=1) - picked, 0.0)
        grad = None
        if write_grad:
            total = torch.where(kd_weight != 0, rows * kd_weight, 0.0).sum()
            if labels is not None:
                total = total + torch.where(ce_weight != 0, ce * ce_weight, 0.0).sum()
            (grad,) = torch.autograd.grad(total, s)
    return rows.detach(), ce.detach(), grad


def _chunk_rows(
    logits: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    kd_weight: torch.Tensor,
    ce_weight: torch.Tensor | None,
    settings: KDSettings,
    write_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (kd, ce) of one chunk; with ``write_grad`` the gradient replaces ``logits`` in place."""
    if settings.backend == "torch":
        kd, ce, grad = _torch_rows(logits, teacher, labels, kd_weight, ce_weight, settings, write_grad)
        if grad is not None:
            logits.copy_(grad)
        return kd, ce
    from distillkit.kernels.kd_loss.triton_kernels import kd_loss_rows_

    return kd_loss_rows_(
        logits,
        teacher,
        labels,
        kd_weight,
        ce_weight,
        divergence=settings.divergence,
        temperature=settings.temperature,
        param=settings.param,
        write_grad=write_grad,
    )


def chunked_kd_forward(
    settings: KDSettings,
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_logits_fn: Any,
    labels: torch.Tensor | None,
    kd_mask: torch.Tensor,
    need_grads: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[Any, Any, Any]]:
    """The chunk loop shared by the full-teacher and top-k variants.

    ``teacher_logits_fn(start, end, dtype)`` returns the teacher logits [end - start, V] of those
    rows. Returns ``(loss, kd, ce, (grad_hidden, grad_head, grad_bias))``, the gradients being
    d(loss)/d(input) (None where not needed).
    """
    n, hidden = student_hidden.shape
    vocab = student_head.shape[0]
    device = student_hidden.device
    dtype = _compute_dtype(student_hidden)
    if settings.backend == "triton" and device.type == "cpu":
        # The interpreter works in numpy; float32 keeps its results comparable to a GPU's fp32 math.
        dtype = torch.float32
    need_hidden, need_head, need_bias = need_grads
    write_grad = need_hidden or need_head or need_bias

    kd_count = kd_mask.sum().clamp_min(1).float()
    kd_weight_all = torch.where(kd_mask, settings.kd_scale / kd_count, 0.0).float()
    ce_mask = None
    ce_weight_all = None
    # Without a hard-label weight the kernel skips the cross-entropy entirely (and reports it as 0).
    labels = labels if settings.ce_scale > 0 else None
    if labels is not None:
        ce_mask = labels != settings.ignore_index
        ce_weight_all = torch.where(ce_mask, settings.ce_scale / ce_mask.sum().clamp_min(1).float(), 0.0).float()

    chunk = settings.chunk_size or default_chunk_size(n, vocab, torch.finfo(dtype).bits // 8)
    kd_rows_all = torch.zeros(n, dtype=torch.float32, device=device)
    ce_rows_all = torch.zeros(n, dtype=torch.float32, device=device)
    grad_hidden = torch.empty_like(student_hidden) if need_hidden else None
    grad_head = torch.zeros_like(student_head) if need_head else None
    grad_bias = torch.zeros(vocab, dtype=student_bias.dtype, device=device) if need_bias else None

    with torch.autocast(device.type, enabled=False):
        head = student_head.to(dtype)
        bias = None if student_bias is None else student_bias.to(dtype)
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            h = student_hidden[start:end].to(dtype)
            logits = torch.addmm(bias, h, head.T) if bias is not None else h @ head.T
            teacher = teacher_logits_fn(start, end, dtype)
            kd, ce = _chunk_rows(
                logits,
                teacher,
                None if labels is None else labels[start:end],
                kd_weight_all[start:end],
                None if ce_weight_all is None else ce_weight_all[start:end],
                settings,
                write_grad,
            )
            kd_rows_all[start:end] = kd
            ce_rows_all[start:end] = ce
            del teacher
            if not write_grad:
                continue
            grad = logits  # the kernel overwrote the logits with d(loss)/d(logits)
            if need_hidden:
                if grad_hidden.dtype == dtype:
                    torch.mm(grad, head, out=grad_hidden[start:end])
                else:
                    grad_hidden[start:end] = (grad @ head).to(grad_hidden.dtype)
            if need_head:
                if grad_head.dtype == dtype:
                    grad_head.addmm_(grad.T, h)
                else:  # float32 master weights under autocast
                    grad_head += (grad.T @ h).to(grad_head.dtype)
            if need_bias:
                grad_bias += grad.sum(0).to(grad_bias.dtype)

    kd = torch.where(kd_mask, kd_rows_all, 0.0).sum() / kd_count
    ce = kd.new_zeros(())
    if ce_mask is not None:
        ce = torch.where(ce_mask, ce_rows_all, 0.0).sum() / ce_mask.sum().clamp_min(1).float()
    loss = settings.kd_scale * kd + settings.ce_scale * ce
    return loss, kd, ce, (grad_hidden, grad_head, grad_bias)


class FusedKDLossFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`chunked_kd_forward` with a full teacher head.

    Outputs ``(loss, kd, ce)``; only ``loss`` is differentiable (``kd``/``ce`` are for logging). The
    gradients are computed in the forward and scaled by the incoming gradient in the backward, in
    place, so the graph must not be backpropagated twice.
    """

    @staticmethod
    def forward(
        ctx: Any,
        student_hidden: torch.Tensor,
        student_head: torch.Tensor,
        student_bias: torch.Tensor | None,
        teacher_hidden: torch.Tensor,
        teacher_head: torch.Tensor,
        teacher_bias: torch.Tensor | None,
        labels: torch.Tensor | None,
        kd_mask: torch.Tensor,
        settings: KDSettings,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def teacher_logits(start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
            t = teacher_hidden[start:end].to(dtype)
            head = teacher_head.to(dtype)
            if teacher_bias is not None:
                return torch.addmm(teacher_bias.to(dtype), t, head.T)
            return t @ head.T

        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        loss, kd, ce, grads = chunked_kd_forward(
            settings, student_hidden, student_head, student_bias, teacher_logits, labels, kd_mask, need
        )
        ctx.grads = grads
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        return (*scale_grads(ctx.grads, grad_loss), None, None, None, None, None, None)


def scale_grads(grads: tuple[Any, Any, Any], grad_loss: torch.Tensor) -> tuple[Any, Any, Any]:
    """d(out)/d(input) = d(out)/d(loss) * d(loss)/d(input), in place on the precomputed gradients."""
    out = []
    for g in grads:
        if g is not None:
            g.mul_(grad_loss.to(g.dtype))
        out.append(g)
    return tuple(out)


def check_inputs(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    student_bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    temperature: float,
    alpha: float,
    ignore_index: int,
    chunk_size: int | None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Shape and value checks shared by both variants; returns (labels or None, kd mask [N] bool)."""
    if student_hidden.ndim != 2 or student_head.ndim != 2 or student_hidden.shape[1] != student_head.shape[1]:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)} and head {tuple(student_head.shape)} must be [N, H] and [V, H]"
        )
    n, vocab = student_hidden.shape[0], student_head.shape[0]
    if student_bias is not None and tuple(student_bias.shape) != (vocab,):
        raise ValueError(f"student bias {tuple(student_bias.shape)} must be [{vocab}]")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be > 0, not {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], not {alpha}")
    if alpha > 0 and labels is None:
        raise ValueError("alpha > 0 mixes in the hard-label cross-entropy and needs labels")
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, not {chunk_size!r}")
    if labels is not None:
        if tuple(labels.shape) != (n,) or labels.dtype.is_floating_point:
            raise ValueError(f"labels must be integer [N={n}], got {labels.dtype} {tuple(labels.shape)}")
        labels = labels.to(student_hidden.device)
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}")
    if mask is not None and tuple(mask.shape) != (n,):
        raise ValueError(f"mask must be [N={n}], got {tuple(mask.shape)}")
    kd_mask, _ = counted_rows(labels, mask, n, ignore_index, student_hidden.device)
    return labels, kd_mask


def prepare_call(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    student_bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    *,
    divergence: str,
    beta: float,
    skew: float,
    temperature: float,
    kd_scale: float,
    ce_scale: float,
    ignore_index: int,
    chunk_size: int | None,
    backend: str,
) -> tuple[torch.Tensor | None, torch.Tensor, KDSettings]:
    """Checked labels, the counted-row mask [N] and the kernel settings, shared by the full and top-k variants."""
    alpha = ce_scale / (kd_scale + ce_scale) if kd_scale + ce_scale > 0 else 0.0
    labels, kd_mask = check_inputs(
        student_hidden, student_head, student_bias, labels, mask, temperature, alpha, ignore_index, chunk_size
    )
    kernel_divergence, param = normalize_divergence(divergence, beta, skew)
    settings = KDSettings(
        divergence=kernel_divergence,
        param=param,
        temperature=float(temperature),
        kd_scale=float(kd_scale),
        ce_scale=float(ce_scale) if labels is not None else 0.0,
        ignore_index=int(ignore_index),
        chunk_size=None if chunk_size is None else int(chunk_size),
        backend=resolve_backend(backend, student_hidden.device),
    )
    return labels, kd_mask, settings


def fused_kd_loss_terms(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
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
    """``(kd_scale * kd + ce_scale * ce, kd, ce)``: :func:`fused_kd_loss` with free weights (for the engine)."""
    if teacher_hidden.ndim != 2 or teacher_head.ndim != 2 or teacher_hidden.shape[1] != teacher_head.shape[1]:
        raise ValueError(
            f"teacher hidden {tuple(teacher_hidden.shape)} and head {tuple(teacher_head.shape)} must be [N, H] and [V, H]"
        )
    if teacher_hidden.shape[0] != student_hidden.shape[0] or teacher_head.shape[0] != student_head.shape[0]:
        raise ValueError(
            f"student ({student_hidden.shape[0]} tokens, vocabulary {student_head.shape[0]}) and teacher "
            f"({teacher_hidden.shape[0]} tokens, vocabulary {teacher_head.shape[0]}) must match"
        )
    if teacher_bias is not None and tuple(teacher_bias.shape) != (teacher_head.shape[0],):
        raise ValueError(f"teacher bias {tuple(teacher_bias.shape)} must be [{teacher_head.shape[0]}]")
    labels, kd_mask, settings = prepare_call(
        student_hidden, student_head, student_bias, labels, mask,
        divergence=divergence, beta=beta, skew=skew, temperature=temperature, kd_scale=kd_scale,
        ce_scale=ce_scale, ignore_index=ignore_index, chunk_size=chunk_size, backend=backend,
    )  # fmt: skip
    return FusedKDLossFunction.apply(
        student_hidden,
        student_head,
        student_bias,
        teacher_hidden.detach(),
        teacher_head.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        labels,
        kd_mask,
        settings,
    )


def fused_kd_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
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
    """Distillation loss from hidden states and output heads, never holding the [N, V] logits.

    ``student_hidden`` [N, Hs], ``student_head`` [V, Hs] (+ ``student_bias`` [V]); ``teacher_hidden``
    [N, Ht], ``teacher_head`` [V, Ht] (+ ``teacher_bias`` [V]), treated as constants. ``labels`` [N]
    int with ``ignore_index`` for tokens without a target; ``mask`` [N] bool picks the tokens the
    divergence averages over (default: the labelled tokens, or all without labels).

    ``divergence``: forward_kl, reverse_kl, jsd (generalized, ``beta``; 0 = forward KL, 1 = reverse
    KL), tvd, skew_kl or skew_reverse_kl (``skew`` = lambda), on ``temperature``-softened logits and
    times ``temperature**2``, as :mod:`distillkit.distill.functional`. The result is
    ``(1 - alpha) * kd + alpha * ce``, ``ce`` being the hard-label cross-entropy on the raw logits.
    ``chunk_size`` rows per chunk (default: ~384 MiB of logit buffers); ``backend`` "auto" (Triton
    on CUDA or under ``TRITON_INTERPRET=1``, torch math otherwise), "triton" or "torch".

    Returns the scalar float32 loss, or ``(loss, kd, ce)`` with ``return_parts`` (``kd``/``ce``
    detached). Gradients flow to the student hidden states, head and bias.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], not {alpha}")
    loss, kd, ce = fused_kd_loss_terms(
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_head,
        labels,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
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
