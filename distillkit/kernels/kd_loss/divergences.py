"""Logit divergences as plain torch functions: the losses ``distill`` trains with and the specification the fused
KD kernel is tested against (they live here, below both, so the kernel's reference needs nothing above it).

They take student and teacher logits of any leading shape ``[..., V]`` (``[B, T, V]``
for token tasks, ``[B, C]`` for classification) and an optional mask of the leading shape
``[...]`` (bool or 0/1; 0 marks padding). They

- compute in float32 (float64 stays float64) even when the logits are bf16/fp16, because a
  softmax over a large vocabulary in bf16 loses most of the small probabilities the divergence
  is made of;
- soften both sides by ``temperature`` and multiply the result by ``temperature**2`` (Hinton et
  al., 2015): the gradient of a softened divergence shrinks like ``1/temperature**2``, so the
  factor keeps its magnitude comparable across temperatures and against other loss terms;
- reduce with ``reduction="mean"`` (average over counted positions), ``"sum"`` (sum over counted
  positions) or ``"none"`` (per-position values ``[...]``, 0 at padding). Padding never reaches the
  value or the gradient, and a fully masked batch gives 0, not NaN;
- give a zero contribution for a probability of exactly 0 (a ``-inf`` logit) instead of
  ``0 * log 0 = NaN``.
"""

from __future__ import annotations

import math

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or as it is when already float32/float64: the precision every divergence computes in."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def as_bool_mask(mask: torch.Tensor | None, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """``mask`` (bool or 0/1, of the values' leading ``shape``) as a bool tensor on ``device``; None stays None."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the values have leading shape {tuple(shape)}")
    mask = mask.to(device)
    return mask if mask.dtype == torch.bool else mask != 0


def zero_padding(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` [..., D] with the vectors at padded positions (``mask`` [...] False) set to 0.

    Dropping padding only at the reduction keeps it out of the value, but a NaN/inf there would
    still turn 0 * NaN into a NaN gradient in the backward of the elementwise math.
    """
    if mask is None:
        return x
    return torch.where(mask[..., None], x, x.new_zeros(()))


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` [...] over positions where ``mask`` [...] is set; 0 when none is."""
    return reduce_masked(values, as_bool_mask(mask, values.shape, values.device), "mean")


def reduce_masked(values: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """``values`` [...] reduced over the positions where the bool ``mask`` is set: "mean", "sum" or "none" (0 where
    masked); a mean over no position is 0."""
    if mask is not None:
        values = torch.where(mask, values, values.new_zeros(()))
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    if mask is None:
        return total / max(values.numel(), 1)
    return total / mask.sum().clamp_min(1).to(total.dtype)


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last dim: [..., V] x2 -> [...].

    Entries with p_v == 0 contribute exactly 0 (also to the gradient), whatever log q_v is; p_v > 0
    with q_v == 0 gives +inf, which is the true value.
    """
    p = log_p.exp()
    keep = p > 0
    zero = log_p.new_zeros(())
    # Both logs are zeroed where p == 0 so that neither the product nor its backward sees -inf.
    diff = torch.where(keep, log_p, zero) - torch.where(keep, log_q, zero)
    return (p * diff).sum(-1)


def log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight * a + (1 - weight) * b), computed from log a and log b without leaving log space."""
    if weight <= 0.0:
        return log_b
    if weight >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def prepare_logits(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Checks shapes; returns float32/64 logits with padded rows zeroed, and the mask as bool [...]."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    mask = as_bool_mask(mask, student_logits.shape[:-1], student_logits.device)
    return zero_padding(upcast(student_logits), mask), zero_padding(upcast(teacher_logits), mask), mask


def softened_log_probs(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log p_S, log p_T) [..., V] at ``temperature`` and the bool mask [...]."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, not {temperature}")
    student_logits, teacher_logits, mask = prepare_logits(student_logits, teacher_logits, mask)
    log_s = torch.log_softmax(student_logits / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits / temperature, dim=-1)
    return log_s, log_t, mask


def finish_divergence(
    per_position: torch.Tensor, mask: torch.Tensor | None, temperature: float, reduction: str
) -> torch.Tensor:
    return reduce_masked(per_position, mask, reduction) * (temperature**2)


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(p_T || p_S) with p = softmax(logits / temperature), times ``temperature**2``.

    Mode-covering: the student pays wherever the teacher has mass. Logits [..., V], mask [...].
    """
    log_s, log_t, mask = softened_log_probs(student_logits, teacher_logits, mask, temperature)
    return finish_divergence(kl_from_log_probs(log_t, log_s), mask, temperature, reduction)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(p_S || p_T), times ``temperature**2``; mode-seeking. Logits [..., V], mask [...]."""
    log_s, log_t, mask = softened_log_probs(student_logits, teacher_logits, mask, temperature)
    return finish_divergence(kl_from_log_probs(log_s, log_t), mask, temperature, reduction)


def jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence, times ``temperature**2``. Logits [..., V], mask [...].

    For 0 < beta < 1: ``beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)`` with
    ``M = beta * p_T + (1 - beta) * p_S``; beta = 0.5 is the symmetric JSD (at most log 2).

    Taken literally the expression vanishes at both ends (M becomes p_S resp. p_T), which would be
    a silent no-op loss. Its leading term is ``beta * KL(p_T || p_S)`` as beta -> 0 and
    ``(1 - beta) * KL(p_S || p_T)`` as beta -> 1, so the endpoints are defined by that direction
    (as in GKD/TRL): beta = 0 gives :func:`forward_kl` and beta = 1 gives :func:`reverse_kl`.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], not {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, temperature, reduction)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, mask, temperature, reduction)
    log_s, log_t, mask = softened_log_probs(student_logits, teacher_logits, mask, temperature)
    log_m = log_mixture(log_t, log_s, beta)
    per_position = beta * kl_from_log_probs(log_t, log_m) + (1.0 - beta) * kl_from_log_probs(log_s, log_m)
    return finish_divergence(per_position, mask, temperature, reduction)


def tvd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Total variation distance ``0.5 * sum_v |p_T - p_S|`` (in [0, 1] per position), times ``temperature**2``.

    Logits [..., V], mask [...].
    """
    log_s, log_t, mask = softened_log_probs(student_logits, teacher_logits, mask, temperature)
    per_position = 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)
    return finish_divergence(per_position, mask, temperature, reduction)


def skew_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    skew: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Skew KL (DistiLLM, Ko et al., 2024): ``KL(p_T || skew * p_T + (1 - skew) * p_S)``, times ``temperature**2``.

    Mixing some teacher into the student side keeps the log bounded where the student puts ~0
    mass, which stabilises early training; skew = 0 is :func:`forward_kl`. The gradient flows
    through the student part of the mixture. Logits [..., V], mask [...].
    """
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew must be in [0, 1], not {skew}")
    log_s, log_t, mask = softened_log_probs(student_logits, teacher_logits, mask, temperature)
    log_m = log_mixture(log_t, log_s, skew)
    return finish_divergence(kl_from_log_probs(log_t, log_m), mask, temperature, reduction)


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    skew: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Skew reverse KL (DistiLLM): ``KL(p_S || skew * p_S + (1 - skew) * p_T)``, times ``temperature**2``.

    skew = 0 is :func:`reverse_kl`. Logits [..., V], mask [...].
    """
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew must be in [0, 1], not {skew}")
    log_s, log_t, mask = softened_log_probs(student_logits, teacher_logits, mask, temperature)
    log_m = log_mixture(log_s, log_t, skew)
    return finish_divergence(kl_from_log_probs(log_s, log_m), mask, temperature, reduction)
