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
matrix is updated with one matrix product per sub-block / block ("lazy batch" updates). Only the rounding of one
column and its rank-1 feedback are per column (a handful of in-place operations on preallocated rows); codes are
converted per sub-block. Rows are independent given ``H``, so Linears that read the same input (q/k/v) can be
quantized as one stacked weight (see ``gptq_states`` in the engine).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from distillkit.quantize import functional as qf
from distillkit.quantize.functional import QuantState

# range shrink factors tried by clip_search (1.0 = round-to-nearest's min..max)
CLIP_GRID = tuple(1.0 - 0.025 * k for k in range(13))  # 1.0 .. 0.7
_SUB = 32
_CLIP_CHUNK = 1 << 18  # elements per row chunk of the clip search: its temporaries stay in cache


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


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the enclosed small operations on one intra-op thread.

    The per-column work is thousands of tiny operations; those above torch's parallel grain (the rank-1 update of
    a stacked q/k/v weight) would each start a parallel region, and when another process holds a core each region
    waits for the descheduled thread (on a busy 2-core machine, GPTQ of a 1152x384 weight took several times longer
    with 2 threads than with 1). The matrix products and factorisations between sub-blocks keep all threads.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``H^-1`` (``H`` symmetric positive definite), from one Cholesky
    factorisation and one triangular inverse.

    With ``P`` the reversal permutation and ``P H P = L L^T``, ``H^-1 = (P L^-1 P)^T (P L^-1 P)`` and ``P L^-1 P``
    is upper triangular with a positive diagonal, so it is ``U``. This skips forming ``H^-1`` (a matrix product)
    and factorising it again.
    """
    L = torch.linalg.cholesky(H.flip(0, 1))
    return _lower_triangular_inverse(L).flip(0, 1)


def _lower_triangular_inverse(L: torch.Tensor, leaf: int = 128) -> torch.Tensor:
    """``L^-1`` of a lower-triangular ``L`` by halves: ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``.

    About half the work of a triangular solve against the identity, which does not know that the right-hand side
    and the result are triangular.
    """
    n = L.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
    h = n // 2
    Ai = _lower_triangular_inverse(L[:h, :h], leaf)
    Ci = _lower_triangular_inverse(L[h:, h:], leaf)
    out = torch.zeros_like(L)
    out[:h, :h] = Ai
    out[h:, h:] = Ci
    torch.mm(Ci, L[h:, :h] @ Ai, out=out[h:, :h])
    out[h:, :h].neg_()
    return out


def group_params(
    w: torch.Tensor, bits: int, symmetric: bool, weight: torch.Tensor | None = None, clip_search: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales ``[O, G]`` and zero-points (or None) of ``w [O, G, g]`` grouped along the last dim.

    Round-to-nearest's min..max range, or with ``clip_search`` the range scaled by the factor of :data:`CLIP_GRID`
    that minimises ``sum(weight * (w - q)^2)`` per group (``weight [G, g]``, e.g. the Hessian diagonal; 1 if None);
    the first factor wins a tie.
    """
    o, ng, g = w.shape
    s, z = qf.uniform_params(w.reshape(o, ng * g), bits, g, symmetric)
    if not clip_search:
        return s, z
    wt = None if weight is None else weight.reshape(ng, g).to(w.dtype)
    best_err = torch.full((o, ng), float("inf"), dtype=w.dtype, device=w.device)
    best_s, best_z = s.clone(), None if z is None else z.clone()
    rows = max(1, _CLIP_CHUNK // max(ng * g, 1))
    for r0 in range(0, o, rows):
        r1 = min(r0 + rows, o)
        _clip_rows(w[r0:r1], wt, bits, symmetric, best_err[r0:r1], best_s[r0:r1], None if z is None else best_z[r0:r1])
    return best_s, best_z


def _clip_rows(
    w: torch.Tensor,
    wt: torch.Tensor | None,
    bits: int,
    symmetric: bool,
    best_err: torch.Tensor,
    best_s: torch.Tensor,
    best_z: torch.Tensor | None,
) -> None:
    """The clip search of :func:`group_params` on rows ``w [r, G, g]``, updating the ``best_*`` views in place.

    Computes what the direct form ``q = (clamp(round(w / s) + z, 0, qmax) - z) * s``,
    ``err = sum(wt * (w - q)^2)`` computes, bit for bit: ``round(w / s)`` is an integer, so clamping it to
    ``[-z, qmax - z]`` instead and multiplying by ``s`` gives the same ``q``, and ``(q - w)^2 = (w - q)^2``.
    """
    qmax = 2**bits - 1
    if symmetric:
        amax = w.abs().amax(-1)
        mid = float(2 ** (bits - 1))
        lo_b, hi_b = -mid, qmax - mid
    else:
        wlo = w.amin(-1).clamp(max=0)
        whi = w.amax(-1).clamp(min=0)
    t = torch.empty_like(w)
    for p in CLIP_GRID:
        if symmetric:
            cs = qf.round_scale(amax * p / (2 ** (bits - 1) - 1))
        else:
            lo = wlo * p
            cs = qf.round_scale((whi * p - lo) / qmax)
            cz = torch.round(-lo / cs).clamp(0, qmax)
            lo_b, hi_b = cz.neg().unsqueeze(-1), (qmax - cz).unsqueeze(-1)
        s3 = cs.unsqueeze(-1)
        torch.div(w, s3, out=t)
        t.round_().clamp_(lo_b, hi_b).mul_(s3).sub_(w).square_()
        if wt is not None:
            t.mul_(wt)
        err = t.sum(-1)
        better = err < best_err
        best_err.copy_(torch.where(better, err, best_err))
        best_s.copy_(torch.where(better, cs, best_s))
        if best_z is not None:
            best_z.copy_(torch.where(better, cz, best_z))


def rtn_state(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip_search: bool = False) -> QuantState:
    """Round-to-nearest codes of ``w [O, I]``, on the min..max grid or, with ``clip_search``, on the unweighted
    clip-searched one of :func:`group_params`."""
    if not clip_search:
        return qf.quantize_rtn(w, bits, group_size, symmetric)
    o, i = w.shape
    g = qf.effective_group(i, group_size)
    s, z = group_params(w.float().reshape(o, i // g, g), bits, symmetric, None, True)
    return QuantState(
        codes=qf.quantize_codes(w, s, z, bits, g).to(torch.uint8),
        scales=s.to(qf.SCALE_DTYPE),
        zeros=None if z is None else z.to(torch.uint8),
        bits=bits,
        group_size=g,
        symmetric=symmetric,
    )


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
    return_latent: bool = False,
) -> QuantState | tuple[QuantState, torch.Tensor]:
    """GPTQ codes for ``w [O, I]`` given the input Hessian ``H [I, I]``.

    With ``return_latent``, also the error-compensated weight ``[O, I]`` each column had when it was rounded: the
    codes are its round-to-nearest on the returned grid, so it is the float weight a straight-through trainer
    starts from to continue where GPTQ stopped (the dequantized weight sits exactly on the grid, where the step
    sizes' gradient ``round(w / s) - w / s`` vanishes)."""
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32  # float64: for exact comparisons in tests
    W = w.detach().to(dt, copy=True)
    o, n = W.shape
    g = qf.effective_group(n, group_size)
    ng = n // g
    H = H.detach().to(dt, copy=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    diag = torch.diag(H).clone()
    H.diagonal().add_(damp * torch.mean(diag))

    scales = torch.zeros(o, ng, dtype=dt, device=W.device)
    zeros = None if symmetric else torch.zeros(o, ng, dtype=dt, device=W.device)
    static = act_order or g == n  # the grid of every group is fixed before the first column
    if static:
        s, z = group_params(W.reshape(o, ng, g), bits, symmetric, diag, clip_search)
        scales.copy_(s)
        if zeros is not None:
            zeros.copy_(z)

    perm = torch.argsort(diag, descending=True, stable=True) if act_order else None
    # column-contiguous working copy: row c of Wt is column c (in processing order)
    if perm is not None:
        Wt = W.t().index_select(0, perm)
        H = H.index_select(0, perm).index_select(1, perm)
    else:
        Wt = W.t().contiguous()
    del W
    Hinv = _inverse_cholesky_upper(H)
    del H
    col_group = (perm if perm is not None else torch.arange(n, device=Wt.device)) // g

    U = torch.empty_like(Wt)  # each column's code minus its zero-point, as a float
    Err = torch.empty_like(Wt)  # each column's scaled rounding error
    codes_t = torch.empty(n, o, dtype=torch.uint8, device=Wt.device)
    qmax = 2**bits - 1
    mid = float(2 ** (bits - 1))
    if not static:  # a group must not straddle two blocks, and starts at a sub-block
        block_size = max(g, (block_size // g) * g)
    sub = min(_SUB, g)
    # minus the diagonal of Hinv: err = (w - q) / d is computed as (q - w) / -d, in place
    neg_d = Hinv.diagonal().neg().tolist()

    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        with _one_thread():  # the sub-blocks: small operations (see _one_thread)
            for j1 in range(i1, i2, sub):
                j2 = min(j1 + sub, i2)
                if not static and j1 % g == 0:
                    grp = j1 // g
                    gs, gz = group_params(
                        Wt[j1 : j1 + g].t().reshape(o, 1, g), bits, symmetric, diag[j1 : j1 + g], clip_search
                    )
                    scales[:, grp] = gs[:, 0]
                    if zeros is not None:
                        zeros[:, grp] = gz[:, 0]
                cg = col_group[j1:j2]
                S = scales.t()[cg]  # [m, O]: every column's scale and zero-point
                if zeros is not None:
                    Z = zeros.t()[cg]
                    lows, highs = Z.neg().unbind(0), (qmax - Z).unbind(0)
                else:
                    lows = highs = None
                Wb, Ub, Eb = Wt[j1:j2], U[j1:j2], Err[j1:j2]
                Hb = Hinv[j1:j2, j1:j2]
                m = j2 - j1
                for k, (wk, uk, ek, sk) in enumerate(
                    zip(Wb.unbind(0), Ub.unbind(0), Eb.unbind(0), S.unbind(0), strict=True)
                ):
                    # u - z = clamp(round(w / s), -z, qmax - z): the integers clamp(round(w / s) + z, 0, qmax) - z
                    torch.div(wk, sk, out=uk)
                    if lows is None:
                        uk.round_().clamp_(-mid, qmax - mid)
                    else:
                        uk.round_().clamp_(lows[k], highs[k])
                    torch.mul(uk, sk, out=ek)
                    ek.sub_(wk).div_(neg_d[j1 + k])
                    if k + 1 < m:
                        Wb[k + 1 :].addr_(Hb[k, k + 1 :], ek, alpha=-1.0)
                codes_t[j1:j2] = Ub.add(Z if zeros is not None else mid).to(torch.uint8)
                if j2 < i2:
                    Wt[j2:i2].addmm_(Hinv[j1:j2, j2:i2].t(), Eb, alpha=-1.0)
        if i2 < n:
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err[i1:i2], alpha=-1.0)

    if perm is not None:
        inv = torch.argsort(perm)
        codes_t = codes_t.index_select(0, inv)
        if return_latent:
            Wt = Wt.index_select(0, inv)
    state = QuantState(
        codes=codes_t.t().contiguous(),
        scales=scales.to(qf.SCALE_DTYPE),
        zeros=None if zeros is None else zeros.to(torch.uint8),
        bits=bits,
        group_size=g,
        symmetric=symmetric,
    )
    return (state, Wt.t().to(w.dtype)) if return_latent else state
