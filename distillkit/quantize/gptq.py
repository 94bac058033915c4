"""GPTQ (Frantar et al. 2023): quantize a weight column by column, compensating each column's rounding error on the
columns not yet quantized through the inverse Hessian of the layer's reconstruction error ``||XW^T - XQ^T||^2``.

``H = 2 X^T X / n`` is accumulated from calibration inputs of the layer. The result is an ordinary
:class:`QuantState`: codes on the same grid as round-to-nearest, in the weight's own column order, so the packed
format and loader are shared.

Options beyond the paper's defaults:

- ``act_order``: columns are quantized in order of decreasing Hessian diagonal (the inputs with the most energy
  first, while the most columns are left to absorb their error). The groups stay the stored groups of consecutive
  input features ("static groups"): their scales are fixed up front from the weight, so the order changes which
  error is compensated where, not the layout.
- ``clip_search``: a group's range is shrunk by the factor (of a small grid) that minimises the group's
  quantization error weighted by the Hessian diagonal, instead of always spanning min..max.

Without them, group scales are computed when a group's first column is reached, from the weights as already
updated by the earlier columns' compensation (as the paper's implementation does).

The column loop works in sub-blocks of 32 columns on a transposed (column-contiguous) copy of the weight: the
error feedback inside a sub-block is a rank-1 update of at most 32 rows, and the rest of the block and of the
matrix is updated with one matrix product per sub-block / block ("lazy batch" updates).
"""

from __future__ import annotations

import torch

from distillkit.quantize import functional as qf
from distillkit.quantize.functional import QuantState

# range shrink factors tried by clip_search (1.0 = round-to-nearest's min..max)
CLIP_GRID = tuple(1.0 - 0.025 * k for k in range(13))  # 1.0 .. 0.7
_SUB = 32


class HessianAccumulator:
    """Running ``2 X^T X / n`` of a Linear layer's inputs ``[..., I]`` (padding positions left out when a mask of
    the leading dimensions is given)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self._xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
            x = x[mask.to(x.device).bool()]
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return
        self.n += x.shape[0]
        self._xtx.addmm_(x.t(), x)

    @property
    def H(self) -> torch.Tensor:
        return self._xtx * (2.0 / max(self.n, 1))


def _inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of ``H^-1`` (``H`` symmetric positive definite).

    ``H^-1 = L^-T L^-1`` with ``L`` the lower factor of ``H``; a triangular solve is far faster on CPU than
    ``torch.cholesky_inverse``.
    """
    n = H.shape[0]
    L = torch.linalg.cholesky(H)
    Linv = torch.linalg.solve_triangular(L, torch.eye(n, dtype=H.dtype, device=H.device), upper=False)
    Hinv = Linv.t() @ Linv
    return torch.linalg.cholesky(Hinv, upper=True)


def group_params(
    w: torch.Tensor, bits: int, symmetric: bool, weight: torch.Tensor | None = None, clip_search: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales ``[O, G]`` and zero-points (or None) of ``w [O, G, g]`` grouped along the last dim.

    Round-to-nearest's min..max range, or with ``clip_search`` the range scaled by the factor of :data:`CLIP_GRID`
    that minimises ``sum(weight * (w - q)^2)`` per group (``weight [G, g]``, e.g. the Hessian diagonal; 1 if None).
    """
    o, ng, g = w.shape
    flat = w.reshape(o, ng * g)
    s, z = qf.uniform_params(flat, bits, g, symmetric)
    if not clip_search:
        return s, z
    wt = torch.ones(ng, g, dtype=w.dtype, device=w.device) if weight is None else weight.reshape(ng, g).to(w.dtype)
    qmax = 2**bits - 1
    best_err = torch.full((o, ng), float("inf"), dtype=w.dtype, device=w.device)
    best_s, best_z = s, z
    for p in CLIP_GRID:
        if symmetric:
            cs = qf.round_scale(w.abs().amax(-1) * p / (2 ** (bits - 1) - 1))
            cz = None
            zz = torch.full_like(cs, 2 ** (bits - 1))
        else:
            lo = w.amin(-1).clamp(max=0) * p
            hi = w.amax(-1).clamp(min=0) * p
            cs = qf.round_scale((hi - lo) / qmax)
            cz = torch.round(-lo / cs).clamp(0, qmax)
            zz = cz
        u = (torch.round(w / cs.unsqueeze(-1)) + zz.unsqueeze(-1)).clamp(0, qmax)
        q = (u - zz.unsqueeze(-1)) * cs.unsqueeze(-1)
        err = ((w - q) ** 2 * wt).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, cs, best_s)
        if not symmetric:
            best_z = torch.where(better, cz, best_z)
    return best_s, best_z


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    clip_search: bool = False,
) -> QuantState:
    """GPTQ codes for ``w [O, I]`` given the input Hessian ``H [I, I]``."""
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32  # float64: for exact comparisons in tests
    W = w.detach().to(dt).clone()
    o, n = W.shape
    g = qf.effective_group(n, group_size)
    ng = n // g
    H = H.detach().to(dt).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    diag = torch.diag(H).clone()
    H += torch.eye(n, dtype=dt, device=H.device) * (damp * torch.mean(torch.diag(H)))

    scales = torch.zeros(o, ng, dtype=dt, device=W.device)
    zeros = None if symmetric else torch.zeros(o, ng, dtype=dt, device=W.device)
    static = act_order or g == n  # the grid of every group is fixed before the first column
    if static:
        s, z = group_params(W.reshape(o, ng, g), bits, symmetric, diag, clip_search)
        scales.copy_(s)
        if zeros is not None:
            zeros.copy_(z)

    perm = torch.argsort(diag, descending=True, stable=True) if act_order else None
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]
    Hinv = _inverse_cholesky_upper(H)
    col_group = (perm if perm is not None else torch.arange(n, device=W.device)) // g

    # column-contiguous working copies: row c of Wt is column c (in processing order)
    Wt = W.t().contiguous()
    codes_t = torch.zeros(n, o, dtype=torch.uint8, device=W.device)
    qmax = 2**bits - 1
    mid = float(2 ** (bits - 1))
    if not static:  # a group must not straddle two blocks, and starts at a sub-block
        block_size = max(g, (block_size // g) * g)
    sub = min(_SUB, g)

    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = Wt[i1:i2]  # a view: updated in place
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            if not static and (i1 + j1) % g == 0:
                grp = (i1 + j1) // g
                gs, gz = group_params(
                    W1[j1 : j1 + g].t().reshape(o, 1, g), bits, symmetric, diag[i1 + j1 : i1 + j1 + g], clip_search
                )
                scales[:, grp] = gs[:, 0]
                if zeros is not None:
                    zeros[:, grp] = gz[:, 0]
            cg = col_group[i1 + j1 : i1 + j2]
            S = scales.t()[cg]  # [sub, O]: every column's scale and zero-point
            Z = zeros.t()[cg] if zeros is not None else torch.full_like(S, mid)
            for i in range(j1, j2):
                k = i - j1
                wcol = W1[i]
                u = torch.round(wcol / S[k]).add_(Z[k]).clamp_(0, qmax)
                codes_t[i1 + i] = u.to(torch.uint8)
                err = (wcol - (u - Z[k]) * S[k]).div_(Hinv1[i, i])
                Err1[i] = err
                if i + 1 < j2:
                    W1[i + 1 : j2].addr_(Hinv1[i, i + 1 : j2], err, alpha=-1.0)
            if j2 < i2 - i1:
                W1[j2:].sub_(Hinv1[j1:j2, j2:].t() @ Err1[j1:j2])
        if i2 < n:
            Wt[i2:].sub_(Hinv[i1:i2, i2:].t() @ Err1)

    codes = codes_t.t()
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return QuantState(
        codes=codes.contiguous(),
        scales=scales.to(qf.SCALE_DTYPE),
        zeros=None if zeros is None else zeros.to(torch.uint8),
        bits=bits,
        group_size=g,
        symmetric=symmetric,
    )
