"""Quantization math: scales, codes, SQNR, straight-through rounding.

The stored layout (codes, scales, packing, dequantization) lives in :mod:`distillkit.models.packed.codes`, below the
stages, because the loader reads it; its names are imported here so the quantizers use one namespace. Conventions,
shared by round-to-nearest, GPTQ, fake-quant and the real quantized modules so that they agree
bit for bit:

- A weight ``w [O, I]`` is cut into groups of ``g`` consecutive input features (``g = I`` per channel), so scales
  and zero-points are ``[O, I // g]``.
- Codes ``u`` are unsigned integers in ``[0, 2**bits - 1]``. Uniform dequantization is ``(u - z) * s``; symmetric
  schemes have the implicit ``z = 2**(bits - 1)`` and ``s = absmax / (2**(bits - 1) - 1)``, asymmetric ones a
  stored uint8 ``z`` and ``s = (max - min) / (2**bits - 1)`` over a range that includes 0.
- A codebook scheme (learned quantization points) dequantizes as ``codebook[u] * s + offset``.
- Scales are stored in float16; every path rounds them to float16 before use, so fake-quant during training and the
  packed model after conversion compute the same numbers.
"""

from __future__ import annotations

import torch

from distillkit.models.packed.codes import (  # noqa: F401  (the quantizers' namespace, see above)
    SCALE_DTYPE,
    QuantState,
    dequantize,
    dequantize_codes,
    effective_group,
    fake_quant_activations,
    grouped,
    pack,
    packed_width,
    round_scale,
    ste,
    unpack,
)


def uniform_params(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest scales ``[O, G]`` (float32, already fp16-rounded) and zero-points (float32 integers or None)."""
    g = effective_group(w.shape[1], group_size)
    x = grouped(w.float(), g)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return round_scale(x.abs().amax(-1) / qmax), None
    lo = x.amin(-1).clamp(max=0)
    hi = x.amax(-1).clamp(min=0)
    s = round_scale((hi - lo) / (2**bits - 1))
    z = torch.round(-lo / s).clamp(0, 2**bits - 1)
    return s, z


def quantize_codes(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """Codes ``[O, I]`` (float32 integers) of ``w`` under given scales/zero-points (uniform grid)."""
    g = effective_group(w.shape[1], group_size)
    x = grouped(w.float(), g)
    z = zeros if zeros is not None else torch.full_like(scales, 2 ** (bits - 1))
    u = torch.round(x / scales.unsqueeze(-1)) + z.unsqueeze(-1)
    return u.clamp(0, 2**bits - 1).reshape(w.shape)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> QuantState:
    """Round-to-nearest quantization of ``w [O, I]``."""
    s, z = uniform_params(w, bits, group_size, symmetric)
    u = quantize_codes(w, s, z, bits, group_size)
    return QuantState(
        codes=u.to(torch.uint8),
        scales=s.to(SCALE_DTYPE),
        zeros=None if z is None else z.to(torch.uint8),
        bits=bits,
        group_size=effective_group(w.shape[1], group_size),
        symmetric=symmetric,
    )


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(||w||^2 / ||w - w_hat||^2)."""
    w, w_hat = w.double(), w_hat.double()
    noise = (w - w_hat).pow(2).sum().item()
    signal = w.pow(2).sum().item()
    if noise == 0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` whose gradient is the identity."""
    return ste(torch.round(x), x)
