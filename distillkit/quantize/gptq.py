"""GPTQ (Frantar et al. 2023): quantize a weight column by column, compensating each column's rounding error on the
columns not yet quantized through the inverse Hessian of the layer's reconstruction error ``||XW^T - XQ^T||^2``.

``H = 2 X^T X / n`` is accumulated from calibration inputs of the layer. Group scales are computed when a group's
first column is reached, from the weights as already updated by the earlier columns' compensation (as the paper's
implementation does). The result is an ordinary :class:`QuantState`: codes on the same grid as round-to-nearest,
so the packed format and loader are shared.
"""

from __future__ import annotations

import torch

from distillkit.quantize import functional as qf
from distillkit.quantize.functional import QuantState


class HessianAccumulator:
    """Running ``2 X^T X / n`` of a Linear layer's inputs ``[..., I]``."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        if mask is not None:
            x = x[mask.reshape(-1).bool()]
        m = x.shape[0]
        if m == 0:
            return
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.t(), x)


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
) -> QuantState:
    """GPTQ codes for ``w [O, I]`` given the input Hessian ``H [I, I]``."""
    W = w.detach().float().clone()
    o, n = W.shape
    g = qf.effective_group(n, group_size)
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += torch.eye(n, device=H.device) * (damp * torch.mean(torch.diag(H)))
    # the upper Cholesky factor of H^-1 gives every column's update row directly
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    codes = torch.zeros(o, n, dtype=torch.uint8, device=W.device)
    n_groups = n // g
    scales = torch.zeros(o, n_groups, device=W.device)
    zeros = None if symmetric else torch.zeros(o, n_groups, device=W.device)
    if g == n:  # per channel: one grid from the whole row, fixed up front
        s, z = qf.uniform_params(W, bits, 0, symmetric)
        scales[:, 0] = s[:, 0]
        if zeros is not None:
            zeros[:, 0] = z[:, 0]
    if g < n:  # a group must not straddle two blocks
        block_size = max(g, (block_size // g) * g)

    qmax = 2**bits - 1
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            grp = col // g
            if g < n and col % g == 0:
                s, z = qf.uniform_params(W1[:, i : i + g], bits, 0, symmetric)
                scales[:, grp] = s[:, 0]
                if zeros is not None:
                    zeros[:, grp] = z[:, 0]
            s = scales[:, grp]
            z = zeros[:, grp] if zeros is not None else torch.full_like(s, 2 ** (bits - 1))
            wcol = W1[:, i]
            u = torch.clamp(torch.round(wcol / s) + z, 0, qmax)
            codes[:, col] = u.to(torch.uint8)
            q = (u - z) * s
            err = (wcol - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    return QuantState(
        codes=codes,
        scales=scales.to(qf.SCALE_DTYPE),
        zeros=None if zeros is None else zeros.to(torch.uint8),
        bits=bits,
        group_size=g,
        symmetric=symmetric,
    )
