"""The specification of block-sparse attention in plain torch (fp32 math); the CPU fallback and the test oracle."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def expand_block_mask(mask: torch.Tensor, seq_len: int, block_size: int, causal: bool = False) -> torch.Tensor:
    """Token-level mask ``[B or 1, H or 1, T, T]`` from a block mask ``[B or 1, H or 1, nb, nb]``."""
    import torch

    tok = mask.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :seq_len, :seq_len]
    if causal:
        tok = tok & torch.ones(seq_len, seq_len, dtype=torch.bool, device=mask.device).tril()
    return tok


def naive_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    block_size: int,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention restricted to the kept blocks, computed densely in fp32 and cast back to q's dtype.

    ``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]`` with ``H % Hkv == 0`` (GQA: query head ``h`` reads kv head
    ``h // (H // Hkv)``); ``mask [B or 1, H or 1, nb, nb]`` bool with ``nb = ceil(T / block_size)``. With ``causal``
    a query token also never sees later tokens. Rows with no kept key give zeros (not NaN). Returns ``[B, H, T, D]``.
    """
    import torch

    from .masks import check_block_mask

    B, H, T, D = q.shape
    Hkv = k.shape[1]
    mask = check_block_mask(mask, B, H, T, block_size)
    scale = D**-0.5 if scale is None else scale
    kf, vf = k.float(), v.float()
    if Hkv != H:
        kf = kf.repeat_interleave(H // Hkv, dim=1)
        vf = vf.repeat_interleave(H // Hkv, dim=1)
    tok = expand_block_mask(mask, T, block_size, causal)
    scores = (q.float() @ kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~tok, float("-inf"))
    # A fully masked row is all -inf; give it a finite max so softmax yields 0/0 -> replaced by zeros below.
    any_kept = tok.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~any_kept, 0.0), dim=-1) * any_kept
    return (probs @ vf).to(q.dtype)
