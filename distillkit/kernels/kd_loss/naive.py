"""The specification of the fused linear + distillation loss: full logits in float32, plain torch.

Everything here materialises ``[N, V]`` logits for student and teacher, so it is only for tests and
small inputs. The divergences are :mod:`distillkit.kernels.kd_loss.divergences`, the functions ``distill`` trains with, so the
fused op agrees with the unfused ``distill`` path by construction of its tests:

- logits ``z = hidden @ head.T (+ bias)``; the divergence softens both sides by ``temperature`` and
  is multiplied by ``temperature**2``;
- ``kd`` is the mean of the per-token divergence over the counted tokens (``mask``; by default the
  tokens whose label is not ``ignore_index``, all tokens without labels);
- ``ce`` is the hard-label cross-entropy on the raw (unsoftened) student logits, mean over the
  tokens whose label is not ``ignore_index``;
- ``loss = (1 - alpha) * kd + alpha * ce``, as the distill engine mixes its hard-label loss.
"""

from __future__ import annotations

from typing import Any

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl")


def kd_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str,
    temperature: float,
    beta: float,
    skew: float,
) -> torch.Tensor:
    """Per-token divergence (times ``temperature**2``): logits [N, V] x2 -> [N], via the functional reference."""
    from distillkit.kernels.kd_loss import divergences as F

    args: dict[str, Any] = {"temperature": temperature, "reduction": "none"}
    if divergence == "forward_kl":
        return F.forward_kl(student_logits, teacher_logits, **args)
    if divergence == "reverse_kl":
        return F.reverse_kl(student_logits, teacher_logits, **args)
    if divergence == "jsd":
        return F.jsd(student_logits, teacher_logits, beta=beta, **args)
    if divergence == "tvd":
        return F.tvd(student_logits, teacher_logits, **args)
    if divergence == "skew_kl":
        return F.skew_kl(student_logits, teacher_logits, skew=skew, **args)
    if divergence == "skew_reverse_kl":
        return F.skew_reverse_kl(student_logits, teacher_logits, skew=skew, **args)
    raise ValueError(f"unknown divergence {divergence!r}; choose from {', '.join(DIVERGENCES)}")


def counted_rows(labels: torch.Tensor | None, mask: torch.Tensor | None, n: int, ignore_index: int, device: Any):
    """(kd rows [N] bool, ce rows [N] bool or None): which tokens each term averages over."""
    ce = None if labels is None else labels != ignore_index
    if mask is not None:
        kd = mask.to(device=device).bool()
    elif ce is not None:
        kd = ce
    else:
        kd = torch.ones(n, dtype=torch.bool, device=device)
    return kd, ce


def naive_kd_loss(
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
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference loss from student hidden [N, Hs] / head [V, Hs] and teacher hidden [N, Ht] / head [V, Ht].

    ``labels`` [N] (int, ``ignore_index`` for tokens without a target), ``mask`` [N] (bool; the tokens
    the divergence counts, default: labelled tokens). Returns the scalar loss, or with
    ``return_parts`` ``(loss, kd, ce)`` where ``ce`` is 0 without labels. Differentiable in every
    student input; the teacher is treated as a constant.
    """
    s = student_hidden.float() @ student_head.float().T
    if student_bias is not None:
        s = s + student_bias.float()
    with torch.no_grad():
        t = teacher_hidden.float() @ teacher_head.float().T
        if teacher_bias is not None:
            t = t + teacher_bias.float()
    n = s.shape[0]
    kd_mask, ce_mask = counted_rows(labels, mask, n, ignore_index, s.device)
    rows = kd_rows(s, t, divergence, temperature, beta, skew)
    # where(), not multiplication: an uncounted row must not bring a NaN into the sum.
    kd = torch.where(kd_mask, rows, rows.new_zeros(())).sum() / kd_mask.sum().clamp_min(1)
    ce = s.new_zeros(())
    if labels is not None and alpha > 0:
        ce = torch.nn.functional.cross_entropy(s, labels.long(), ignore_index=ignore_index, reduction="sum")
        ce = ce / ce_mask.sum().clamp_min(1)
    loss = (1.0 - alpha) * kd + alpha * ce if alpha > 0 else kd
    if return_parts:
        return loss, kd.detach(), ce.detach()
    return loss


def naive_kd_loss_topk(
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
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for the top-k teacher variant: ``teacher_values`` [N, k] logits at ``teacher_indices`` [N, k].

    The teacher logits are ``-inf`` outside the top-k, so its softened distribution is the softmax
    renormalised over its top-k, and the student keeps its full-vocabulary log-probabilities.
    """
    v = student_head.shape[0]
    full = torch.full(
        (teacher_values.shape[0], v), float("-inf"), dtype=torch.float32, device=teacher_values.device
    ).scatter(1, teacher_indices.long(), teacher_values.float())
    s = student_hidden.float() @ student_head.float().T
    if student_bias is not None:
        s = s + student_bias.float()
    n = s.shape[0]
    kd_mask, ce_mask = counted_rows(labels, mask, n, ignore_index, s.device)
    rows = kd_rows(s, full, divergence, temperature, beta, skew)
    kd = torch.where(kd_mask, rows, rows.new_zeros(())).sum() / kd_mask.sum().clamp_min(1)
    ce = s.new_zeros(())
    if labels is not None and alpha > 0:
        ce = torch.nn.functional.cross_entropy(s, labels.long(), ignore_index=ignore_index, reduction="sum")
        ce = ce / ce_mask.sum().clamp_min(1)
    loss = (1.0 - alpha) * kd + alpha * ce if alpha > 0 else kd
    if return_parts:
        return loss, kd.detach(), ce.detach()
    return loss
