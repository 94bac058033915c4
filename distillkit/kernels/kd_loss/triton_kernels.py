"""Triton kernel for one chunk of the fused distillation loss: per-row loss and d(loss)/d(student logits).

One program handles one token row of a chunk: ``s`` (student logits [C, V]) and ``t`` (teacher
logits [C, V]) come from torch matmuls, and the kernel overwrites ``s`` with the gradient of the
weighted loss with respect to those logits, so the chunk needs no third [C, V] buffer.

Notation per row: ``a = s / T``, ``b = t / T``, ``p = softmax(a)`` (student), ``q = softmax(b)``
(teacher). For a divergence ``L(p, q)`` with ``g = dL/dp`` the softmax Jacobian gives
``dL/da = p * (g - sum(p * g))``, and the loss the engine uses is ``T**2 * L``, so
``d(T**2 L)/ds = T * p * (g - sum(p * g))``:

- forward KL ``sum q (log q - log p)``: the gradient is ``p - q``; the loss comes out of the
  first, online-softmax pass (``sum q (b - a) - lse(b) + lse(a)``), so only two passes over V;
- reverse KL ``sum p (log p - log q)``: ``g = log p - log q`` (+1, which cancels);
- generalized JSD(beta) with ``m = beta q + (1 - beta) p``: ``g = (1 - beta)(log p - log m)``;
- TVD ``0.5 sum |q - p|``: ``g = 0.5 sign(p - q)`` (0 where equal, as torch's ``abs``);
- skew KL ``KL(q || lam q + (1 - lam) p)``: ``g = -(1 - lam) q / m``;
- skew reverse KL ``KL(p || lam p + (1 - lam) q)``: ``g = log p - log m - lam p / m`` (+1).

Mixtures are formed in log space (``log m`` by a two-term logsumexp), so tiny probabilities never
turn into ``0 * log 0``. The hard-label term adds ``softmax(s) - onehot(label)`` (at temperature
1) with its own row weight. All math is float32 whatever the logits' dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Divergence codes (constexpr in the kernel). JSD at beta 0/1 and the skews at 0 are mapped to
# forward/reverse KL on the host, as the functional reference defines those endpoints.
FORWARD_KL = 0
REVERSE_KL = 1
JSD = 2
TVD = 3
SKEW_KL = 4
SKEW_REVERSE_KL = 5

CODES = {
    "forward_kl": FORWARD_KL,
    "reverse_kl": REVERSE_KL,
    "jsd": JSD,
    "tvd": TVD,
    "skew_kl": SKEW_KL,
    "skew_reverse_kl": SKEW_REVERSE_KL,
}


@triton.jit
def _log_mix(log_x, log_y, log_w, log_1mw):
    """log(w x + (1 - w) y) from log x and log y (both finite)."""
    u = log_x + log_w
    v = log_y + log_1mw
    hi = tl.maximum(u, v)
    return hi + tl.log(tl.exp(u - hi) + tl.exp(v - hi))


@triton.jit
def _kd_loss_rows_kernel(
    s_ptr,  # [C, V] student logits in, gradient out (in place)
    t_ptr,  # [C, V] teacher logits
    labels_ptr,  # [C] int: hard-label targets (only read when HAS_CE)
    kd_weight_ptr,  # [C] float32: d(total)/d(kd row); 0 for rows that do not count
    ce_weight_ptr,  # [C] float32: d(total)/d(ce row); 0 for rows that do not count
    kd_out_ptr,  # [C] float32: T**2 * L per row
    ce_out_ptr,  # [C] float32: cross-entropy per row (0 without a target)
    stride_s,
    stride_t,
    V,
    inv_temperature,
    temperature,
    param,  # beta (JSD) or lambda (skew divergences)
    log_param,
    log_1m_param,
    DIVERGENCE: tl.constexpr,
    HAS_CE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    offsets = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")

    # Pass 1: online log-sum-exp of a = s/T and b = t/T (and of s itself for the hard-label
    # term), plus the forward-KL sum q (b - a) carried along with the teacher's running max.
    m_a = tl.full((), neg_inf, tl.float32)
    d_a = tl.zeros((), tl.float32)
    m_b = tl.full((), neg_inf, tl.float32)
    d_b = tl.zeros((), tl.float32)
    fkl = tl.zeros((), tl.float32)
    m_z = tl.full((), neg_inf, tl.float32)
    d_z = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        valid = cols < V
        # Lanes past V load 0 and are then set to -inf, so that (b - a) below never meets -inf - -inf.
        z_raw = tl.load(s_row + cols, mask=valid, other=0.0).to(tl.float32)
        a_raw = z_raw * inv_temperature
        b_raw = tl.load(t_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_temperature
        z = tl.where(valid, z_raw, neg_inf)
        a = tl.where(valid, a_raw, neg_inf)
        b = tl.where(valid, b_raw, neg_inf)
        new_m_a = tl.maximum(m_a, tl.max(a, 0))
        d_a = d_a * tl.exp(m_a - new_m_a) + tl.sum(tl.exp(a - new_m_a), 0)
        m_a = new_m_a
        # -inf teacher logits (outside a top-k) have q = 0 and add nothing; a block holding only
        # those keeps the running max at -inf, so exponents are taken against a finite stand-in.
        new_m_b = tl.maximum(m_b, tl.max(b, 0))
        safe_m_b = tl.where(new_m_b == neg_inf, 0.0, new_m_b)
        e_b = tl.exp(b - safe_m_b)
        scale_b = tl.exp(m_b - safe_m_b)
        d_b = d_b * scale_b + tl.sum(e_b, 0)
        if DIVERGENCE == 0:
            fkl = fkl * scale_b + tl.sum(e_b * tl.where(e_b > 0, b_raw - a_raw, 0.0), 0)
        m_b = new_m_b
        if HAS_CE:
            new_m_z = tl.maximum(m_z, tl.max(z, 0))
            d_z = d_z * tl.exp(m_z - new_m_z) + tl.sum(tl.exp(z - new_m_z), 0)
            m_z = new_m_z
    lse_a = m_a + tl.log(d_a)
    lse_b = m_b + tl.log(d_b)
    lse_z = tl.zeros((), tl.float32)
    if HAS_CE:
        lse_z = m_z + tl.log(d_z)

    # Pass 2 (all but forward KL): the loss and sum(p * g).
    loss = tl.zeros((), tl.float32)
    pg = tl.zeros((), tl.float32)
    if DIVERGENCE == 0:
        loss = fkl / d_b - lse_b + lse_a
    else:
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            valid = cols < V
            a = tl.load(s_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_temperature
            b = tl.load(t_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_temperature
            log_p = a - lse_a
            log_q = b - lse_b
            p = tl.exp(log_p)
            q = tl.exp(log_q)
            has_q = q > 0
            # q = 0 (outside a teacher top-k) must give 0 * finite, not 0 * -inf.
            safe_log_q = tl.where(has_q, log_q, 0.0)
            if DIVERGENCE == 1:
                term = p * (log_p - log_q)
                g = log_p - log_q
            elif DIVERGENCE == 2:
                log_m = _log_mix(log_q, log_p, log_param, log_1m_param)
                term = param * q * (safe_log_q - log_m) + (1.0 - param) * p * (log_p - log_m)
                g = (1.0 - param) * (log_p - log_m)
            elif DIVERGENCE == 3:
                term = 0.5 * tl.abs(q - p)
                g = tl.where(p > q, 0.5, tl.where(p < q, -0.5, 0.0))
            elif DIVERGENCE == 4:
                log_m = _log_mix(log_q, log_p, log_param, log_1m_param)
                term = q * (safe_log_q - log_m)
                g = tl.where(has_q, -(1.0 - param) * tl.exp(log_q - log_m), 0.0)
            else:
                log_m = _log_mix(log_p, log_q, log_param, log_1m_param)
                term = p * (log_p - log_m)
                g = log_p - log_m - param * tl.exp(log_p - log_m)
            loss += tl.sum(tl.where(valid, term, 0.0), 0)
            pg += tl.sum(tl.where(valid, p * g, 0.0), 0)
    kd_row = loss * temperature * temperature
    tl.store(kd_out_ptr + row, kd_row)

    kd_w = tl.load(kd_weight_ptr + row)
    ce_w = tl.zeros((), tl.float32)
    target = tl.zeros((), tl.int64)
    if HAS_CE:
        ce_w = tl.load(ce_weight_ptr + row)
        target = tl.load(labels_ptr + row).to(tl.int64)
        in_range = (target >= 0) & (target < V)
        z_target = tl.load(s_row + target, mask=in_range, other=0.0).to(tl.float32)
        tl.store(ce_out_ptr + row, tl.where(in_range, lse_z - z_target, 0.0))

    # Pass 3: the gradient of the weighted row loss, written over the student logits.
    if WRITE_GRAD:
        kd_scale = kd_w * temperature
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            valid = cols < V
            z = tl.load(s_row + cols, mask=valid, other=0.0).to(tl.float32)
            a = z * inv_temperature
            b = tl.load(t_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_temperature
            log_p = a - lse_a
            log_q = b - lse_b
            p = tl.exp(log_p)
            q = tl.exp(log_q)
            if DIVERGENCE == 0:
                grad = p - q
            else:
                has_q = q > 0
                if DIVERGENCE == 1:
                    g = log_p - log_q
                elif DIVERGENCE == 2:
                    g = (1.0 - param) * (log_p - _log_mix(log_q, log_p, log_param, log_1m_param))
                elif DIVERGENCE == 3:
                    g = tl.where(p > q, 0.5, tl.where(p < q, -0.5, 0.0))
                elif DIVERGENCE == 4:
                    log_m = _log_mix(log_q, log_p, log_param, log_1m_param)
                    g = tl.where(has_q, -(1.0 - param) * tl.exp(log_q - log_m), 0.0)
                else:
                    log_m = _log_mix(log_p, log_q, log_param, log_1m_param)
                    g = log_p - log_m - param * tl.exp(log_p - log_m)
                grad = p * (g - pg)
            # A row that does not count gets an exact 0, not 0 * (something non-finite).
            grad = tl.where(kd_w != 0.0, kd_scale * grad, 0.0)
            if HAS_CE:
                ce_grad = tl.exp(z - lse_z) - tl.where(cols == target, 1.0, 0.0)
                grad += tl.where(ce_w != 0.0, ce_w * ce_grad, 0.0)
            tl.store(s_row + cols, grad.to(s_ptr.dtype.element_ty), mask=valid)


def kd_loss_rows_(
    student_logits,
    teacher_logits,
    labels,
    kd_weight,
    ce_weight,
    *,
    divergence: str,
    temperature: float,
    param: float,
    write_grad: bool,
    block_v: int | None = None,
):
    """Per-row loss of one chunk; overwrites ``student_logits`` [C, V] with d(weighted loss)/d(logits).

    ``teacher_logits`` [C, V] (may hold ``-inf`` outside a teacher top-k), ``labels`` [C] int or None,
    ``kd_weight``/``ce_weight`` [C] float32 (the derivative of the total loss by each row's term; 0 for
    rows that do not count). ``param`` is beta for ``jsd`` and lambda for the skew divergences; the
    endpoints that equal forward/reverse KL must already be mapped to those. Returns
    ``(kd [C], ce [C])`` float32, ``kd`` including ``temperature**2``. With ``write_grad=False`` the
    logits are left untouched.
    """
    import math

    import torch

    rows, vocab = student_logits.shape
    kd = torch.empty(rows, dtype=torch.float32, device=student_logits.device)
    ce = torch.zeros(rows, dtype=torch.float32, device=student_logits.device)
    if rows == 0:
        return kd, ce
    if student_logits.stride(1) != 1 or teacher_logits.stride(1) != 1:
        raise ValueError("the kd-loss kernel needs logits contiguous along the vocabulary")
    code = CODES[divergence]
    if block_v is None:
        block_v = min(triton.next_power_of_2(vocab), 4096 if student_logits.is_cuda else 128)
    log_param = math.log(param) if 0.0 < param < 1.0 else 0.0
    log_1m_param = math.log1p(-param) if 0.0 < param < 1.0 else 0.0
    has_ce = labels is not None
    _kd_loss_rows_kernel[(rows,)](
        student_logits,
        teacher_logits,
        labels if has_ce else kd,  # never read without HAS_CE
        kd_weight,
        ce_weight if has_ce else kd_weight,
        kd,
        ce,
        student_logits.stride(0),
        teacher_logits.stride(0),
        vocab,
        1.0 / temperature,
        float(temperature),
        float(param),
        log_param,
        log_1m_param,
        DIVERGENCE=code,
        HAS_CE=has_ce,
        WRITE_GRAD=write_grad,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return kd, ce
