"""Triton kernels for block-sparse attention: forward (online softmax, saves the log-sum-exp) and backward.

One program handles one query block (forward, dQ) or one key block (dK/dV) of one (batch, head) and walks only
the kept blocks from the compressed lists in :class:`~.masks.BlockIndex`: the row lists for forward and dQ, the
transposed column lists for dK/dV. Under GQA a dK/dV program owns a kv head and sums over the query heads of its
group itself, so no atomics and no per-query-head dK/dV buffers are needed. Math is fp32 with inputs in their own
dtype for ``tl.dot``, except under ``TRITON_INTERPRET=1`` where the interpreter's bf16/fp16 dots are wrong and the
operands are upcast to fp32 first.

A program's tile (``BLOCK_M`` queries, ``BLOCK_N`` keys) may be smaller than the mask block (``BLOCK``): it then
walks the sub-tiles of each kept block, which lets the GPU path autotune tile sizes and warps independently of the
mask granularity. Under causal masking, sub-tiles entirely above the diagonal are skipped.

The log-sum-exp is kept in base 2 (``lse2 = log2(sum(exp2(s * log2e)))``) because the kernels use ``exp2``.
Rows with no kept key store ``lse2 = +inf`` so the backward recomputes ``p = 0`` for them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, LSE, ROW_IDX, ROW_CNT,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    s_lb, s_lh, s_ib, s_ih, s_im, s_cb, s_ch,
    H, T, qk_scale,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    row_block = (pid_m * BLOCK_M) // BLOCK
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    m_ok = offs_m < T
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    cnt = tl.load(ROW_CNT + b * s_cb + h * s_ch + row_block)
    idx_base = ROW_IDX + b * s_ib + h * s_ih + row_block * s_im
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    last_m = pid_m * BLOCK_M + BLOCK_M - 1
    for i in range(0, cnt):
        kb = tl.load(idx_base + i)
        for j in range(0, BLOCK // BLOCK_N):
            start_n = kb * BLOCK + j * BLOCK_N
            # Skip key tiles past the sequence, or (causal) entirely after every query of this tile.
            live = start_n < T
            if CAUSAL:
                live = live & (start_n <= last_m)
            if live:
                offs_n = start_n + offs_n0
                n_ok = offs_n < T
                k = tl.load(k_base + offs_n[None, :] * skt + offs_d[:, None], mask=n_ok[None, :], other=0.0)
                v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                s = tl.dot(q, k) * qk_scale
                keep = n_ok[None, :]
                if CAUSAL:
                    keep = keep & (offs_m[:, None] >= offs_n[None, :])
                s = tl.where(keep, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # A row may have every key of this tile masked: keep exp2 away from (-inf) - (-inf).
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None]
                if UPCAST:
                    acc += tl.dot(p, v)
                else:
                    acc += tl.dot(p.to(v.dtype), v)
                m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("inf"))
    tl.store(
        Out + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=m_ok[:, None],
    )
    tl.store(LSE + b * s_lb + h * s_lh + offs_m, lse2, mask=m_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, ROW_IDX, ROW_CNT,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdqb, sdqh, sdqt,
    s_lb, s_lh, s_ib, s_ih, s_im, s_cb, s_ch,
    H, T, qk_scale, sm_scale,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    row_block = (pid_m * BLOCK_M) // BLOCK
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    m_ok = offs_m < T
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + b * s_lb + h * s_lh + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + b * s_lb + h * s_lh + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    cnt = tl.load(ROW_CNT + b * s_cb + h * s_ch + row_block)
    idx_base = ROW_IDX + b * s_ib + h * s_ih + row_block * s_im
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    last_m = pid_m * BLOCK_M + BLOCK_M - 1
    for i in range(0, cnt):
        kb = tl.load(idx_base + i)
        for j in range(0, BLOCK // BLOCK_N):
            start_n = kb * BLOCK + j * BLOCK_N
            live = start_n < T
            if CAUSAL:
                live = live & (start_n <= last_m)
            if live:
                offs_n = start_n + offs_n0
                n_ok = offs_n < T
                k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
                v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                s = tl.dot(q, tl.trans(k)) * qk_scale
                keep = n_ok[None, :]
                if CAUSAL:
                    keep = keep & (offs_m[:, None] >= offs_n[None, :])
                p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v))
                ds = p * (dp - delta[:, None])
                if UPCAST:
                    dq += tl.dot(ds, k)
                else:
                    dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * sm_scale
    tl.store(
        DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=m_ok[:, None],
    )


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, COL_IDX, COL_CNT,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
    s_lb, s_lh, s_ib, s_ih, s_im, s_cb, s_ch,
    HKV, T, qk_scale, sm_scale,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    col_block = (pid_n * BLOCK_N) // BLOCK
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    n_ok = offs_n < T
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    first_n = pid_n * BLOCK_N
    for g in range(GROUP):
        h = hk * GROUP + g
        cnt = tl.load(COL_CNT + b * s_cb + h * s_ch + col_block)
        idx_base = COL_IDX + b * s_ib + h * s_ih + col_block * s_im
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        l_base = LSE + b * s_lb + h * s_lh
        d_base = DELTA + b * s_lb + h * s_lh
        for i in range(0, cnt):
            qb = tl.load(idx_base + i)
            for j in range(0, BLOCK // BLOCK_M):
                start_m = qb * BLOCK + j * BLOCK_M
                # Skip query tiles past the sequence, or (causal) entirely before every key of this tile.
                live = start_m < T
                if CAUSAL:
                    live = live & (start_m + BLOCK_M - 1 >= first_n)
                if live:
                    offs_m = start_m + offs_m0
                    m_ok = offs_m < T
                    q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
                    do = tl.load(do_base + offs_m[:, None] * sdot + offs_d[None, :], mask=m_ok[:, None], other=0.0)
                    if UPCAST:
                        q = q.to(tl.float32)
                        do = do.to(tl.float32)
                    lse2 = tl.load(l_base + offs_m, mask=m_ok, other=float("inf"))
                    delta = tl.load(d_base + offs_m, mask=m_ok, other=0.0)
                    # Transposed scores [keys, queries], so the accumulations below are plain dots.
                    st = tl.dot(k, tl.trans(q)) * qk_scale
                    keep = n_ok[:, None] & m_ok[None, :]
                    if CAUSAL:
                        keep = keep & (offs_m[None, :] >= offs_n[:, None])
                    pt = tl.where(keep, tl.exp2(st - lse2[None, :]), 0.0)
                    dpt = tl.dot(v, tl.trans(do))
                    dst = pt * (dpt - delta[None, :])
                    if UPCAST:
                        dv += tl.dot(pt, do)
                        dk += tl.dot(dst, q)
                    else:
                        dv += tl.dot(pt.to(do.dtype), do)
                        dk += tl.dot(dst.to(q.dtype), q)
    dk = dk * sm_scale
    tl.store(
        DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkt + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=n_ok[:, None],
    )
    tl.store(
        DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvt + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=n_ok[:, None],
    )


def _configs(fwd: bool) -> list:
    # Tiles and pipelining for the GPU; pruned to tiles that divide the mask block (see _prune).
    out = []
    for bm, bn in ((128, 128), (128, 64), (64, 128), (64, 64), (128, 32), (64, 32), (32, 32), (16, 16)):
        for warps, stages in ((4, 2), (4, 3), (8, 2), (8, 3)) if fwd else ((4, 2), (8, 2), (4, 1), (8, 1)):
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages))
    return out


def _prune(configs, named_args, **kwargs):
    block = kwargs.get("BLOCK", named_args.get("BLOCK"))
    # Configs that run out of shared memory or registers are skipped by the autotuner itself.
    kept = [c for c in configs if block % c.kwargs["BLOCK_M"] == 0 and block % c.kwargs["BLOCK_N"] == 0]
    return kept or [triton.Config({"BLOCK_M": min(block, 16), "BLOCK_N": min(block, 16)}, num_warps=4)]


_AUTOTUNE_KEY = ["BLOCK", "D", "GROUP", "CAUSAL"]
_fwd_tuned = triton.autotune(_configs(True), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune})(
    _fwd_kernel
)
_dq_tuned = triton.autotune(_configs(False), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune})(
    _bwd_dq_kernel
)
_dkdv_tuned = triton.autotune(_configs(False), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune})(
    _bwd_dkdv_kernel
)


def _launch(kernel, tuned, grid_dim: int, block_size: int, args: tuple, meta: dict) -> None:
    """Run ``tuned`` (autotuned tiles) on a GPU; under the interpreter, ``kernel`` with fixed 16 x 16 sub-tiles,
    so block sizes above 16 exercise the sub-tile loops in CPU tests."""
    if _interpreting():
        kernel[(triton.cdiv(meta["T"], 16), grid_dim)](*args, BLOCK_M=16, BLOCK_N=16, **meta["const"])
        return

    def grid(cfg):
        tile = cfg["BLOCK_N"] if tuned is _dkdv_tuned else cfg["BLOCK_M"]
        return (triton.cdiv(meta["T"], tile), grid_dim)

    tuned[grid](*args, **meta["const"])


def _idx_strides(idx: torch.Tensor, cnt: torch.Tensor) -> tuple[int, ...]:
    # Broadcast (size-1) batch/head dims of the mask read with stride 0.
    sb = idx.stride(0) if idx.shape[0] > 1 else 0
    sh = idx.stride(1) if idx.shape[1] > 1 else 0
    cb = cnt.stride(0) if cnt.shape[0] > 1 else 0
    ch = cnt.stride(1) if cnt.shape[1] > 1 else 0
    return sb, sh, idx.stride(2), cb, ch


def bsa_forward(q, k, v, row_idx, row_cnt, block_size: int, causal: bool, scale: float):
    """``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]`` contiguous on one device -> ``(out [B, H, T, D], lse2 [B, H, T]
    fp32)``."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    args = (
        q, k, v, out, lse, row_idx, row_cnt,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        lse.stride(0), lse.stride(1), *_idx_strides(row_idx, row_cnt),
        H, T, scale * LOG2E,
    )  # fmt: skip
    const = dict(GROUP=H // Hkv, BLOCK=block_size, D=D, CAUSAL=causal, UPCAST=_interpreting())
    _launch(_fwd_kernel, _fwd_tuned, B * H, block_size, args, {"T": T, "const": const})
    return out, lse


def bsa_backward(
    do, q, k, v, out, lse, row_idx, row_cnt, col_idx, col_cnt, block_size: int, causal: bool, scale: float
):
    """Gradients ``(dq, dk, dv)`` shaped like ``q, k, v``; ``lse`` is the forward's base-2 log-sum-exp."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    do = do.contiguous()
    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij: the softmax backward's row term, cheap enough in torch.
    delta = (do.float() * out.float()).sum(-1).contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    const = dict(GROUP=H // Hkv, BLOCK=block_size, D=D, CAUSAL=causal, UPCAST=_interpreting())
    dq_args = (
        q, k, v, do, dq, lse, delta, row_idx, row_cnt,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        lse.stride(0), lse.stride(1), *_idx_strides(row_idx, row_cnt),
        H, T, scale * LOG2E, scale,
    )  # fmt: skip
    _launch(_bwd_dq_kernel, _dq_tuned, B * H, block_size, dq_args, {"T": T, "const": const})
    dkdv_args = (
        q, k, v, do, dk, dv, lse, delta, col_idx, col_cnt,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        lse.stride(0), lse.stride(1), *_idx_strides(col_idx, col_cnt),
        Hkv, T, scale * LOG2E, scale,
    )  # fmt: skip
    _launch(_bwd_dkdv_kernel, _dkdv_tuned, B * Hkv, block_size, dkdv_args, {"T": T, "const": const})
    return dq, dk, dv
