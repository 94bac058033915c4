"""Distillation losses as plain torch functions: the exact reference the loss classes call.

The logit divergences (``forward_kl``, ``reverse_kl``, ``jsd``, ``tvd``, ``skew_kl``, ``skew_reverse_kl``) and the
masking helpers live in :mod:`distillkit.kernels.kd_loss.divergences` (their conventions are written there) and are
imported here; this module adds TAID, the hidden-state, embedding and relation losses.

The fused Triton kernel is tested against the divergences, so they favour clarity over memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distillkit.kernels.kd_loss.divergences import (
    as_bool_mask,
    finish_divergence,
    forward_kl,
    jsd,
    kl_from_log_probs,
    masked_mean,
    prepare_logits,
    reduce_masked,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    softened_log_probs,
    tvd,
    upcast,
    zero_padding,
)

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
    student_logits, teacher_logits, mask = prepare_logits(student_logits, teacher_logits, mask)
    target_logits = (1.0 - t) * student_logits.detach() + t * teacher_logits
    log_s, log_target, _ = softened_log_probs(student_logits, target_logits, None, temperature)
    return finish_divergence(kl_from_log_probs(log_target, log_s), mask, temperature, reduction)


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
