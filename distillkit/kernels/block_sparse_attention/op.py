"""``torch.library`` registration of the Triton block-sparse attention, and the public op.

``distillkit::block_sparse_attention_fwd`` returns ``(out, lse2)`` and ``distillkit::block_sparse_attention_bwd``
returns ``(dq, dk, dv)``; both have fake implementations, and autograd is registered on the forward, so
``torch.compile`` and ``torch.export`` trace through them as single nodes. The compressed block lists are plain
tensor inputs, built outside the op from the bool block mask (:func:`~.masks.block_index`).
"""

from __future__ import annotations

import torch

from .masks import BlockIndex, MaskSpec, block_index, check_block_mask, parse_mask_spec


@torch.library.custom_op("distillkit::block_sparse_attention_fwd", mutates_args=())
def block_sparse_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    row_idx: torch.Tensor,
    row_cnt: torch.Tensor,
    col_idx: torch.Tensor,
    col_cnt: torch.Tensor,
    block_size: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward op alone (what the benchmarks time): ``(out [B, H, T, D], lse [B, H, T] float32)``."""
    # The column lists are unused here; they are inputs so that autograd saves them for the dK/dV pass.
    from .triton_ops import bsa_forward

    return bsa_forward(q, k, v, row_idx, row_cnt, block_size, causal, scale)


@block_sparse_attention_forward.register_fake
def _(q, k, v, row_idx, row_cnt, col_idx, col_cnt, block_size, causal, scale):
    B, H, T, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("distillkit::block_sparse_attention_bwd", mutates_args=())
def _bsa_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    row_idx: torch.Tensor,
    row_cnt: torch.Tensor,
    col_idx: torch.Tensor,
    col_cnt: torch.Tensor,
    block_size: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_ops import bsa_backward

    return bsa_backward(do, q, k, v, out, lse, row_idx, row_cnt, col_idx, col_cnt, block_size, causal, scale)


@_bsa_bwd.register_fake
def _(do, q, k, v, out, lse, row_idx, row_cnt, col_idx, col_cnt, block_size, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, row_idx, row_cnt, col_idx, col_cnt, block_size, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, row_idx, row_cnt, col_idx, col_cnt)
    ctx.meta = (block_size, causal, scale)


def _backward(ctx, dout, dlse):
    # lse is an internal by-product (the public op returns only out), so its gradient is ignored.
    q, k, v, out, lse, row_idx, row_cnt, col_idx, col_cnt = ctx.saved_tensors
    block_size, causal, scale = ctx.meta
    dq, dk, dv = _bsa_bwd(
        dout.contiguous(), q, k, v, out, lse, row_idx, row_cnt, col_idx, col_cnt, block_size, causal, scale
    )
    return dq, dk, dv, None, None, None, None, None, None, None


block_sparse_attention_forward.register_autograd(_backward, setup_context=_setup_context)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | MaskSpec | str | BlockIndex,
    *,
    block_size: int,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Block-sparse attention with the Triton kernels (forward and backward).

    ``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]`` (``H % Hkv == 0``) in bf16, fp16 or fp32, D a power of two >= 16;
    ``mask`` a bool block mask ``[B or 1, H or 1, ceil(T / block_size), ceil(T / block_size)]``, a
    :class:`~.masks.MaskSpec` or a spec string (``"topk:0.1"``; adaptive specs are built from q/k on the fly), or
    a :class:`~.masks.BlockIndex` already built with the same ``causal``.
    Any T (the last block may be ragged); ``block_size`` a power of two >= 16. Query rows whose mask keeps no key
    give zeros. Returns ``[B, H, T, D]`` in q's dtype.
    """
    from distillkit.errors import ConfigError

    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D or H % k.shape[1]:
        raise ConfigError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit [B, H, T, D] / [B, Hkv, T, D]",
            "k and v need q's batch, length and head dim, and a number of heads dividing q's",
        )
    if block_size < 16 or block_size & (block_size - 1) or D < 16 or D & (D - 1):
        raise ConfigError(
            f"block size {block_size} and head dim {D} must be powers of two >= 16", "use e.g. block_size=64"
        )
    if isinstance(mask, BlockIndex):  # already compressed (e.g. cached for a static mask); built with ``causal``
        idx = mask
    else:
        if isinstance(mask, str):
            mask = parse_mask_spec(mask)
        if isinstance(mask, MaskSpec):
            mask = mask.build(q, k, block_size, causal=causal)
        mask = check_block_mask(mask, B, H, T, block_size).to(q.device)
        idx = block_index(mask, causal=causal)
    scale = D**-0.5 if scale is None else float(scale)
    out, _ = block_sparse_attention_forward(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        idx.row_idx,
        idx.row_cnt,
        idx.col_idx,
        idx.col_cnt,
        block_size,
        causal,
        scale,
    )
    return out
