"""Block masks for block-sparse attention: static builders, adaptive (content-aware) masks, spec strings.

A block mask is a boolean tensor ``[B or 1, H or 1, nq, nk]`` with ``nq = nk = ceil(T / block_size)``: entry
``(b, h, i, j)`` says that query block ``i`` attends key block ``j``. The kernels consume it in a compressed form,
:class:`BlockIndex`: per (batch, head) and query block the sorted list of kept key blocks (and the transposed
lists per key block, which the dK/dV pass walks).

:func:`parse_mask_spec` is torch-free so configs and the CLI can validate ``--sparse-attention`` strings cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from distillkit.errors import ConfigError

if TYPE_CHECKING:
    import torch

MASK_KINDS = ("dense", "causal", "window", "strided", "tiles", "topk", "cdf")
_SPEC_HINT = "use one of: dense, causal, window:TOKENS, strided:STRIDE[,GLOBAL], tiles:F,H,W[:TF,TH,TW], topk:FRACTION, cdf:THRESHOLD"


def num_blocks(seq_len: int, block_size: int) -> int:
    """``ceil(seq_len / block_size)``: the last block may be ragged."""
    return -(-seq_len // block_size)


# --------------------------------------------------------------------------------------------------- spec strings


@dataclass(frozen=True)
class MaskSpec:
    """A parsed ``--sparse-attention`` spec. ``build`` turns it into a block mask for concrete q/k."""

    kind: str
    value: float | int | None = None
    extra: tuple[int, ...] = ()
    tile: tuple[int, int, int] | None = None

    @property
    def adaptive(self) -> bool:
        """Adaptive masks depend on q/k content and are rebuilt on every call."""
        return self.kind in ("topk", "cdf")

    def build(self, q: torch.Tensor, k: torch.Tensor, block_size: int, causal: bool = False) -> torch.Tensor:
        """The block mask for ``q [B, H, T, D]`` and ``k [B, Hkv, T, D]``: ``[B or 1, H or 1, nb, nb]`` bool."""
        T = q.shape[-2]
        dev = q.device
        if self.kind == "dense":
            nb = num_blocks(T, block_size)
            return _on(dense_block_mask(nb), dev)
        if self.kind == "causal":
            return _on(causal_block_mask(T, block_size), dev)
        if self.kind == "window":
            return _on(sliding_window_block_mask(T, block_size, int(self.value)), dev)
        if self.kind == "strided":
            glob = self.extra[0] if self.extra else 0
            return _on(strided_block_mask(T, block_size, int(self.value), global_blocks=glob), dev)
        if self.kind == "tiles":
            f, h, w = self.extra
            return _on(video_tile_block_mask(f, h, w, tile=self.tile, block_size=block_size, seq_len=T), dev)
        if self.kind == "topk":
            return adaptive_block_mask(q, k, block_size, topk=self.value, causal=causal)
        return adaptive_block_mask(q, k, block_size, cdf=self.value, causal=causal)


def _on(mask: torch.Tensor, device) -> torch.Tensor:
    return mask.to(device)[None, None]


def _ints(text: str, spec: str, n: tuple[int, ...]) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"sparse attention spec {spec!r}: {text!r} is not a list of integers", _SPEC_HINT) from None
    if len(vals) not in n or any(v < 1 for v in vals):
        raise ConfigError(
            f"sparse attention spec {spec!r}: expected {' or '.join(map(str, n))} positive integers", _SPEC_HINT
        )
    return vals


def parse_mask_spec(spec: str) -> MaskSpec:
    """Parse a mask spec string (torch-free).

    ``dense`` | ``causal`` | ``window:TOKENS`` | ``strided:STRIDE[,GLOBAL_BLOCKS]`` |
    ``tiles:F,H,W[:TF,TH,TW]`` (a video token grid; default tile is one frame) | ``topk:FRACTION`` (or a whole
    number of key blocks per query block) | ``cdf:THRESHOLD`` (smallest set of key blocks whose estimated attention
    mass reaches the threshold).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("sparse attention spec is empty", _SPEC_HINT)
    kind, _, arg = spec.strip().partition(":")
    kind = kind.lower()
    if kind not in MASK_KINDS:
        raise ConfigError(f"unknown sparse attention mask {kind!r} in {spec!r}", _SPEC_HINT)
    if kind in ("dense", "causal"):
        if arg:
            raise ConfigError(f"sparse attention spec {spec!r}: {kind} takes no argument", _SPEC_HINT)
        return MaskSpec(kind)
    if not arg:
        raise ConfigError(f"sparse attention spec {spec!r}: {kind} needs an argument", _SPEC_HINT)
    if kind == "window":
        return MaskSpec(kind, _ints(arg, spec, (1,))[0])
    if kind == "strided":
        vals = _ints(arg, spec, (1, 2))
        return MaskSpec(kind, vals[0], vals[1:])
    if kind == "tiles":
        grid, _, tile = arg.partition(":")
        fhw = _ints(grid, spec, (3,))
        tiles = _ints(tile, spec, (3,)) if tile else (1, fhw[1], fhw[2])
        return MaskSpec(kind, None, fhw, tiles)
    try:
        value = float(arg)
    except ValueError:
        raise ConfigError(f"sparse attention spec {spec!r}: {arg!r} is not a number", _SPEC_HINT) from None
    if kind == "topk":
        if value >= 1:
            if not value.is_integer():
                raise ConfigError(f"topk {value} must be a fraction in (0, 1) or a whole number of blocks", _SPEC_HINT)
            return MaskSpec(kind, int(value))
        if not 0 < value < 1:
            raise ConfigError(f"topk must be a fraction in (0, 1) or a block count >= 1 (got {value})", _SPEC_HINT)
        return MaskSpec(kind, value)
    if not 0 < value <= 1:
        raise ConfigError(f"cdf threshold must be in (0, 1] (got {value})", "pass e.g. cdf:0.9")
    return MaskSpec(kind, value)


# ------------------------------------------------------------------------------------------------ static builders


def dense_block_mask(nb: int) -> torch.Tensor:
    """All blocks kept: ``[nb, nb]`` bool."""
    import torch

    return torch.ones(nb, nb, dtype=torch.bool)


def causal_block_mask(seq_len: int, block_size: int) -> torch.Tensor:
    """Key blocks at or before the query block: ``[nb, nb]`` bool (lower triangle with diagonal).

    Within the diagonal block the token-level causal mask comes from the op's ``causal=True``.
    """
    import torch

    nb = num_blocks(seq_len, block_size)
    return torch.ones(nb, nb, dtype=torch.bool).tril()


def sliding_window_block_mask(seq_len: int, block_size: int, window: int) -> torch.Tensor:
    """Blocks holding any token pair with ``|q - k| <= window``: ``[nb, nb]`` bool (symmetric; causal via the op)."""
    import torch

    if window < 0:
        raise ConfigError(f"window must be >= 0 (got {window})", "pass e.g. window:256")
    nb = num_blocks(seq_len, block_size)
    d = (torch.arange(nb)[:, None] - torch.arange(nb)[None, :]).abs()
    # The nearest tokens of blocks i != j are (|i - j| - 1) * block_size + 1 apart.
    min_dist = ((d - 1).clamp(min=0) * block_size + 1) * (d > 0)
    return min_dist <= window


def strided_block_mask(seq_len: int, block_size: int, stride: int, global_blocks: int = 0) -> torch.Tensor:
    """Strided pattern (Sparse Transformer): key block ``j`` kept for query block ``i`` when ``(i - j) % stride ==
    0``; the first ``global_blocks`` blocks are global (they attend everything and everything attends them).
    ``[nb, nb]`` bool."""
    import torch

    if stride < 1 or global_blocks < 0:
        raise ConfigError(f"stride must be >= 1 and global blocks >= 0 (got {stride}, {global_blocks})", _SPEC_HINT)
    nb = num_blocks(seq_len, block_size)
    i = torch.arange(nb)
    mask = ((i[:, None] - i[None, :]) % stride) == 0
    mask[:global_blocks, :] = True
    mask[:, :global_blocks] = True
    return mask


def video_tile_block_mask(
    frames: int,
    height: int,
    width: int,
    tile: tuple[int, int, int] | None = None,
    *,
    block_size: int,
    radius: int = 1,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Local 3D attention over a video token grid (tokens in ``[frames, height, width]`` raster order).

    The grid is cut into tiles of ``tile = (tf, th, tw)`` tokens (default one whole frame); a token attends the
    tokens of tiles within ``radius`` tiles along every axis (Chebyshev distance). A block pair is kept if any of
    its token pairs is. Tokens past ``frames * height * width`` (e.g. text tokens appended by an MM-DiT) are
    global. Computed through tile incidence matrices, never at token x token size. ``[nb, nb]`` bool.
    """
    import torch

    tf, th, tw = tile or (1, height, width)
    if min(frames, height, width, tf, th, tw, block_size) < 1 or radius < 0:
        raise ConfigError("video grid, tile and block size must be positive", "pass e.g. tiles:16,32,32:4,8,8")
    n_video = frames * height * width
    T = seq_len if seq_len is not None else n_video
    if T < n_video:
        raise ConfigError(
            f"sequence of {T} tokens is shorter than the {frames}x{height}x{width} video grid", _SPEC_HINT
        )
    nb = num_blocks(T, block_size)
    f, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    gf, gh, gw = -(-frames // tf), -(-height // th), -(-width // tw)
    tile_of_token = ((f // tf) * gh + h // th) * gw + (w // tw)  # [F, H, W]
    n_tiles = gf * gh * gw
    token_block = torch.arange(n_video) // block_size
    incidence = torch.zeros(nb, n_tiles, dtype=torch.float32)
    incidence[token_block, tile_of_token.reshape(-1)] = 1.0
    tc = torch.stack(torch.meshgrid(torch.arange(gf), torch.arange(gh), torch.arange(gw), indexing="ij"), -1)
    tc = tc.reshape(-1, 3)
    near = ((tc[:, None, :] - tc[None, :, :]).abs().amax(-1) <= radius).float()  # [n_tiles, n_tiles]
    mask = (incidence @ near @ incidence.T) > 0
    if T > n_video:
        first_global = n_video // block_size
        mask[first_global:, :] = True
        mask[:, first_global:] = True
    return mask


# ----------------------------------------------------------------------------------------------- adaptive masks


def block_mean(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean over each block of tokens, ragged last block averaged over its real tokens: ``[B, H, T, D]`` ->
    ``[B, H, nb, D]`` (fp32)."""
    import torch

    B, H, T, D = x.shape
    nb = num_blocks(T, block_size)
    pad = nb * block_size - T
    xs = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).view(B, H, nb, block_size, D).sum(3)
    counts = torch.full((nb,), float(block_size), device=x.device)
    counts[-1] = block_size - pad
    return xs / counts[:, None]


def block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float | None = None, causal: bool = False):
    """Estimated attention mass between blocks from mean-pooled q and k: ``[B, H, nb, nb]`` fp32, rows sum to 1.

    ``softmax_j(mean(q_i) . mean(k_j) * scale + log(len_j))``: the log of the key block's length makes a ragged
    last block count for the tokens it really has. Costs ``O(nb^2 D)``, never ``T x T``.
    """
    import torch

    B, H, T, D = q.shape
    Hkv = k.shape[1]
    scale = D**-0.5 if scale is None else scale
    qb = block_mean(q, block_size)
    kb = block_mean(k, block_size)
    if Hkv != H:
        kb = kb.repeat_interleave(H // Hkv, dim=1)
    nb = qb.shape[2]
    logits = (qb @ kb.transpose(-1, -2)) * scale
    lens = torch.full((nb,), float(block_size), device=q.device)
    lens[-1] = T - (nb - 1) * block_size
    logits = logits + lens.log()
    if causal:
        logits = logits.masked_fill(~torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return logits.softmax(-1)


def adaptive_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    *,
    topk: float | int | None = None,
    cdf: float | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Content-aware block mask (Video-BLADE style) from mean-pooled block scores, on q's device.

    Exactly one of ``topk`` (a fraction of the key blocks, or a whole count, per query block) or ``cdf`` (keep the
    highest-scoring key blocks until their estimated attention mass reaches the threshold) is given. The diagonal
    block is always kept, so no query row is left without keys. ``q [B, H, T, D]``, ``k [B, Hkv, T, D]`` ->
    ``[B, H, nb, nb]`` bool.
    """
    import torch

    if (topk is None) == (cdf is None):
        raise ConfigError("adaptive_block_mask needs exactly one of topk= or cdf=", _SPEC_HINT)
    probs = block_scores(q, k, block_size, scale=scale, causal=causal)
    nb = probs.shape[-1]
    sorted_p, order = probs.sort(-1, descending=True)
    if topk is not None:
        n_keep = int(topk) if topk >= 1 else max(1, math.ceil(topk * nb))
        keep_sorted = torch.arange(nb, device=q.device) < min(n_keep, nb)
        keep_sorted = keep_sorted.expand_as(sorted_p)
    else:
        if not 0 < cdf <= 1:
            raise ConfigError(f"cdf threshold must be in (0, 1] (got {cdf})", "pass e.g. cdf:0.9")
        # Keep a block if the mass before it has not yet reached the threshold (so the set reaching it is kept).
        # cdf >= 1 keeps every block with mass (a float cumsum may stop just short of 1).
        before = sorted_p.cumsum(-1) - sorted_p
        keep_sorted = before < cdf if cdf < 1 else torch.ones_like(sorted_p, dtype=torch.bool)
    keep_sorted = keep_sorted & (sorted_p > 0)  # never a causally excluded block
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, keep_sorted)
    eye = torch.eye(nb, dtype=torch.bool, device=q.device)
    return mask | eye


# ------------------------------------------------------------------------------------------------ compressed form


@dataclass
class BlockIndex:
    """Compressed block mask for the kernels (all int32, on the mask's device; B/H are the mask's, 1 = broadcast).

    ``row_idx [B, H, nq, max_row]``: kept key blocks of each query block, ascending, padded; ``row_cnt [B, H, nq]``.
    ``col_idx [B, H, nk, max_col]``: query blocks attending each key block, ascending; ``col_cnt [B, H, nk]``.
    """

    row_idx: torch.Tensor
    row_cnt: torch.Tensor
    col_idx: torch.Tensor
    col_cnt: torch.Tensor


def _lists(mask: torch.Tensor):
    import torch

    cnt = mask.sum(-1, dtype=torch.int32)
    width = max(int(cnt.max().item()) if cnt.numel() else 0, 1)
    # A stable descending sort of the 0/1 mask puts the kept columns first, in ascending order.
    idx = torch.sort(mask.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :width]
    return idx.to(torch.int32).contiguous(), cnt.contiguous()


def block_index(mask: torch.Tensor, causal: bool = False) -> BlockIndex:
    """Row and column lists of a ``[B or 1, H or 1, nb, nb]`` bool block mask (with ``causal``, blocks above the
    diagonal are dropped first)."""
    import torch

    if causal:
        nb = mask.shape[-1]
        mask = mask & torch.ones(nb, nb, dtype=torch.bool, device=mask.device).tril()
    row_idx, row_cnt = _lists(mask)
    col_idx, col_cnt = _lists(mask.transpose(-1, -2))
    return BlockIndex(row_idx, row_cnt, col_idx, col_cnt)


def check_block_mask(mask: torch.Tensor, batch: int, heads: int, seq_len: int, block_size: int) -> torch.Tensor:
    """Validate a block mask against q's shape and return it as 4-d bool (a 2-d ``[nb, nb]`` mask is broadcast)."""
    import torch

    nb = num_blocks(seq_len, block_size)
    if not isinstance(mask, torch.Tensor):
        raise ConfigError(f"block mask must be a bool tensor, got {type(mask).__name__}", "build one with masks.*")
    if mask.dim() == 2:
        mask = mask[None, None]
    ok = mask.dim() == 4 and mask.shape[-2:] == (nb, nb) and mask.shape[0] in (1, batch) and mask.shape[1] in (1, heads)
    if not ok:
        raise ConfigError(
            f"block mask of shape {tuple(mask.shape)} does not fit q (B={batch}, H={heads}, T={seq_len}, "
            f"block {block_size}): expected [{batch} or 1, {heads} or 1, {nb}, {nb}]",
            "build the mask with the same block_size as the op",
        )
    return mask.to(torch.bool)


def flex_block_mask(mask: torch.Tensor, seq_len: int, block_size: int, causal: bool = False):
    """A FlexAttention ``BlockMask`` that keeps exactly the blocks of ``mask [B or 1, H or 1, nb, nb]``.

    Kept blocks off the diagonal (all of them without ``causal``) are passed as full blocks, so FlexAttention
    skips ``mask_mod`` there; with ``causal`` the diagonal blocks are partial with a causal ``mask_mod``.
    """
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    nb = mask.shape[-1]
    if causal:
        tri = torch.ones(nb, nb, dtype=torch.bool, device=mask.device)
        mask = mask & tri.tril()
        partial = mask & torch.eye(nb, dtype=torch.bool, device=mask.device)
        full = mask & ~partial
    else:
        partial, full = torch.zeros_like(mask), mask

    def lists(m):
        cnt = m.sum(-1, dtype=torch.int32)
        idx = torch.sort(m.to(torch.uint8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
        return cnt.contiguous(), idx.contiguous()

    p_cnt, p_idx = lists(partial)
    f_cnt, f_idx = lists(full)

    # mask_mod must agree with the block lists: the fused kernels skip it on full blocks, but the unfused
    # (eager, CPU) path applies only mask_mod, over every position.
    B_, H_ = mask.shape[:2]

    def block_mod(b, h, q_idx, kv_idx):
        keep = mask[b if B_ > 1 else 0, h if H_ > 1 else 0, q_idx // block_size, kv_idx // block_size]
        return keep & (q_idx >= kv_idx) if causal else keep

    return BlockMask.from_kv_blocks(
        p_cnt,
        p_idx,
        f_cnt,
        f_idx,
        BLOCK_SIZE=block_size,
        mask_mod=block_mod,
        seq_lengths=(seq_len, seq_len),
    )
