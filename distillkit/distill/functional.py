"""Distillation losses as plain torch functions: the exact reference the loss classes call.

Logit divergences take student and teacher logits of any leading shape ``[..., V]`` (``[B, T, V]``
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

A fused Triton kernel is tested against these functions, so they favour clarity over memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "as_bool_mask",
    "contrastive_kd",
    "embedding_cosine",
    "forward_kl",
    "hidden_cosine",
    "hidden_mse",
    "jsd",
    "kl_from_log_probs",
    "masked_mean",
    "minilm_relation",
    "reduce_masked",
    "relation_log_probs",
    "reverse_kl",
    "similarity_kd",
    "skew_kl",
    "skew_reverse_kl",
    "taid",
    "taid_interpolation",
    "tvd",
    "upcast",
    "zero_padding",
]


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


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight * a + (1 - weight) * b), computed from log a and log b without leaving log space."""
    if weight <= 0.0:
        return log_b
    if weight >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def _prepare_logits(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Checks shapes; returns float32/64 logits with padded rows zeroed, and the mask as bool [...]."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    mask = as_bool_mask(mask, student_logits.shape[:-1], student_logits.device)
    return zero_padding(upcast(student_logits), mask), zero_padding(upcast(teacher_logits), mask), mask


def _softened_log_probs(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log p_S, log p_T) [..., V] at ``temperature`` and the bool mask [...]."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, not {temperature}")
    student_logits, teacher_logits, mask = _prepare_logits(student_logits, teacher_logits, mask)
    log_s = torch.log_softmax(student_logits / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits / temperature, dim=-1)
    return log_s, log_t, mask


def _finish(per_position: torch.Tensor, mask: torch.Tensor | None, temperature: float, reduction: str) -> torch.Tensor:
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
    log_s, log_t, mask = _softened_log_probs(student_logits, teacher_logits, mask, temperature)
    return _finish(kl_from_log_probs(log_t, log_s), mask, temperature, reduction)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(p_S || p_T), times ``temperature**2``; mode-seeking. Logits [..., V], mask [...]."""
    log_s, log_t, mask = _softened_log_probs(student_logits, teacher_logits, mask, temperature)
    return _finish(kl_from_log_probs(log_s, log_t), mask, temperature, reduction)


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
    log_s, log_t, mask = _softened_log_probs(student_logits, teacher_logits, mask, temperature)
    log_m = _log_mixture(log_t, log_s, beta)
    per_position = beta * kl_from_log_probs(log_t, log_m) + (1.0 - beta) * kl_from_log_probs(log_s, log_m)
    return _finish(per_position, mask, temperature, reduction)


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
    log_s, log_t, mask = _softened_log_probs(student_logits, teacher_logits, mask, temperature)
    per_position = 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)
    return _finish(per_position, mask, temperature, reduction)


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
    log_s, log_t, mask = _softened_log_probs(student_logits, teacher_logits, mask, temperature)
    log_m = _log_mixture(log_t, log_s, skew)
    return _finish(kl_from_log_probs(log_t, log_m), mask, temperature, reduction)


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
    log_s, log_t, mask = _softened_log_probs(student_logits, teacher_logits, mask, temperature)
    log_m = _log_mixture(log_s, log_t, skew)
    return _finish(kl_from_log_probs(log_s, log_m), mask, temperature, reduction)


def taid_interpolation(progress: float, t_start: float, t_end: float) -> float:
    """TAID interpolation weight at ``progress`` in [0, 1]: linear from ``t_start`` to ``t_end``.

    Progress outside [0, 1] is clamped, so a run that overshoots its step budget keeps ``t_end``.
    """
    progress = min(max(float(progress), 0.0), 1.0)
    return t_start + (t_end - t_start) * progress


def taid(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    t: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """TAID (Shing et al., 2025): ``KL(p_t || p_S)`` with an intermediate target, times ``temperature**2``.

    ``p_t = softmax(((1 - t) * stopgrad(z_S) + t * z_T) / temperature)`` interpolates in logit
    space from the student itself (t = 0, loss 0) to the teacher (t = 1, :func:`forward_kl`), so a
    small student is first pulled towards a target it can reach. Logits [..., V], mask [...].
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], not {t}")
    student_logits, teacher_logits, mask = _prepare_logits(student_logits, teacher_logits, mask)
    target_logits = (1.0 - t) * student_logits.detach() + t * teacher_logits
    log_s, log_target, _ = _softened_log_probs(student_logits, target_logits, None, temperature)
    return _finish(kl_from_log_probs(log_target, log_s), mask, temperature, reduction)


def hidden_mse(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error per element, averaged over counted positions: [B, T, H] x2, mask [B, T] -> scalar.

    The student states must already be projected to the teacher width.
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden states {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)} differ")
    mask = as_bool_mask(mask, student_hidden.shape[:-1], student_hidden.device)
    student_hidden, teacher_hidden = zero_padding(student_hidden, mask), zero_padding(teacher_hidden, mask)
    per_position = (upcast(student_hidden) - upcast(teacher_hidden)).pow(2).mean(-1)
    return reduce_masked(per_position, mask, "mean")


def _cosine(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    a, b = upcast(a), upcast(b)
    # Clamping each norm (not the product) keeps a zero vector, e.g. an all-zero padding state,
    # at cosine 0 with a finite gradient.
    norms = a.norm(dim=-1).clamp_min(eps) * b.norm(dim=-1).clamp_min(eps)
    return (a * b).sum(-1) / norms


def hidden_cosine(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """``1 - cosine`` per position, averaged over counted positions: [B, T, H] x2, mask [B, T] -> scalar."""
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden states {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)} differ")
    mask = as_bool_mask(mask, student_hidden.shape[:-1], student_hidden.device)
    student_hidden, teacher_hidden = zero_padding(student_hidden, mask), zero_padding(teacher_hidden, mask)
    return reduce_masked(1.0 - _cosine(student_hidden, teacher_hidden, eps), mask, "mean")


def embedding_cosine(
    student_embedding: torch.Tensor, teacher_embedding: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """``1 - cosine`` between pooled embeddings, mean over the batch: [B, H] x2 -> scalar."""
    if student_embedding.shape != teacher_embedding.shape:
        raise ValueError(f"embeddings {tuple(student_embedding.shape)} and {tuple(teacher_embedding.shape)} differ")
    return (1.0 - _cosine(student_embedding, teacher_embedding, eps)).mean()


def similarity_kd(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Relational KD on the embedding space: mean squared difference of the in-batch cosine-similarity matrices.

    ``S = norm(e_S) norm(e_S)^T`` and ``T = norm(e_T) norm(e_T)^T`` ([B, B]); the loss is ``mean((S - T)^2)`` over the
    ``B * (B - 1)`` off-diagonal pairs (the diagonal is 1 on both sides). Widths may differ: only each model's own
    similarities are compared. Needs ``B >= 2``.
    """
    if student_embedding.shape[0] != teacher_embedding.shape[0] or student_embedding.shape[0] < 2:
        raise ValueError(
            f"similarity_kd needs the same batch of >= 2 embeddings, got {student_embedding.shape[0]} and "
            f"{teacher_embedding.shape[0]}"
        )
    s = F.normalize(student_embedding, dim=-1, eps=eps)
    t = F.normalize(teacher_embedding.to(s.dtype), dim=-1, eps=eps)
    n = s.shape[0]
    diff = (s @ s.T - t @ t.T).pow(2)
    return (diff.sum() - diff.diagonal().sum()) / (n * (n - 1))


def contrastive_kd(
    student_embedding: torch.Tensor, teacher_embedding: torch.Tensor, temperature: float = 0.05, eps: float = 1e-8
) -> torch.Tensor:
    """In-batch contrastive KD: each student embedding must pick its own teacher embedding among the batch's.

    ``logits = norm(e_S) norm(e_T)^T / temperature`` ([B, B]); cross-entropy with target ``i`` for row ``i``, mean
    over the batch. The same width on both sides (project first otherwise).
    """
    if student_embedding.shape != teacher_embedding.shape:
        raise ValueError(f"embeddings {tuple(student_embedding.shape)} and {tuple(teacher_embedding.shape)} differ")
    s = F.normalize(student_embedding, dim=-1, eps=eps)
    t = F.normalize(teacher_embedding.to(s.dtype), dim=-1, eps=eps)
    logits = s @ t.T / temperature
    return F.cross_entropy(logits, torch.arange(s.shape[0], device=s.device))


def relation_log_probs(a: torch.Tensor, b: torch.Tensor, heads: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MiniLM self-attention relation: ``log_softmax(a_r b_r^T / sqrt(d_r))`` over keys.

    ``a``, ``b``: [B, T, W] split into ``heads`` relation heads of width ``d_r = W / heads``.
    ``mask`` [B, T] marks real keys; padded keys get probability 0. Returns [B, heads, T, T]
    (query, key).
    """
    batch, length, width = a.shape
    if b.shape != a.shape:
        raise ValueError(f"relation inputs {tuple(a.shape)} and {tuple(b.shape)} differ")
    if width % heads:
        raise ValueError(f"relation heads {heads} do not divide the width {width}")
    d = width // heads
    keys = as_bool_mask(mask, torch.Size((batch, length)), a.device)
    a = zero_padding(upcast(a), keys).reshape(batch, length, heads, d).transpose(1, 2)
    b = zero_padding(upcast(b), keys).reshape(batch, length, heads, d).transpose(1, 2)
    scores = a @ b.transpose(-1, -2) / math.sqrt(d)
    if keys is not None:
        # The most negative finite value rather than -inf: a row with no real key (a fully padded
        # sample) then stays a finite uniform distribution instead of NaN; it is not counted.
        scores = scores.masked_fill(~keys[:, None, None, :], torch.finfo(scores.dtype).min)
    return torch.log_softmax(scores, dim=-1)


def minilm_relation(
    student_a: torch.Tensor,
    student_b: torch.Tensor,
    teacher_a: torch.Tensor,
    teacher_b: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MiniLM(v2) relation loss: KL(teacher relation || student relation), width-agnostic.

    Student inputs [B, T, Ws], teacher inputs [B, T, Wt], both split into ``heads`` relation
    heads; use (q, k) for the attention relation and (v, v) for the value relation. The KL over
    keys is averaged over relation heads and counted query positions (``mask`` [B, T]).
    """
    log_s = relation_log_probs(student_a, student_b, heads, mask)
    log_t = relation_log_probs(teacher_a, teacher_b, heads, mask)
    if log_s.shape != log_t.shape:
        raise ValueError(f"student relations {tuple(log_s.shape)} and teacher relations {tuple(log_t.shape)} differ")
    per_query = kl_from_log_probs(log_t, log_s)  # [B, R, T]
    if mask is None:
        return per_query.mean()
    batch, _, length = per_query.shape
    queries = as_bool_mask(mask, torch.Size((batch, length)), per_query.device)
    return masked_mean(per_query, queries[:, None, :].expand_as(per_query))
