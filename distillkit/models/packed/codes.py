"""The packed codes' layout and arithmetic: what a saved low-bit weight means and how it is read back.

This is the part of quantization a loader needs (the quantize stage builds on it to produce codes):

- A weight ``w [O, I]`` is cut into groups of ``g`` consecutive input features (``g = I`` per channel), so scales
  and zero-points are ``[O, I // g]``.
- Codes ``u`` are unsigned integers in ``[0, 2**bits - 1]``. Uniform dequantization is ``(u - z) * s``; symmetric
  schemes have the implicit ``z = 2**(bits - 1)``, asymmetric ones a stored uint8 ``z``.
- A codebook scheme (learned quantization points) dequantizes as ``codebook[u] * s + offset``.
- Scales are stored in float16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16


@dataclass
class QuantState:
    """One quantized weight: codes ``[O, I]`` (uint8, unpacked), scales ``[O, G]``, zero-points or offsets."""

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int  # the effective group: I for per-channel
    symmetric: bool
    zeros: torch.Tensor | None = None  # uint8 [O, G], asymmetric uniform only
    offsets: torch.Tensor | None = None  # fp16 [O, G], codebook only
    codebook: torch.Tensor | None = None  # fp32 [2**bits]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)


def effective_group(in_features: int, group_size: int) -> int:
    return in_features if group_size in (0, None) else group_size


def grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    o, i = w.shape
    return w.reshape(o, i // g, g)


def round_scale(s: torch.Tensor) -> torch.Tensor:
    """Scales as they will be stored (float16), back in float32; never zero."""
    tiny = torch.finfo(SCALE_DTYPE).tiny
    return s.clamp_min(tiny).to(SCALE_DTYPE).float()


def dequantize_codes(
    u: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """``(u - z) * s`` in float32, ``[O, I]``; ``u`` may be a float (fake-quant) or integer tensor."""
    g = effective_group(u.shape[1], group_size)
    z = zeros.float() if zeros is not None else torch.full_like(scales.float(), 2 ** (bits - 1))
    x = grouped(u.float(), g) - z.unsqueeze(-1)
    return (x * scales.float().unsqueeze(-1)).reshape(u.shape)


def dequantize(state: QuantState, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight ``[O, I]`` a quantized state stands for."""
    if state.codebook is not None:
        g = state.group_size
        pts = state.codebook.float()[state.codes.long()]
        w = grouped(pts, g) * state.scales.float().unsqueeze(-1) + state.offsets.float().unsqueeze(-1)
        return w.reshape(state.codes.shape).to(dtype)
    return dequantize_codes(state.codes, state.scales, state.zeros, state.bits, state.group_size).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Packing along the input dimension, little-endian: 8 / bits codes per byte for 2, 4 and 8 bits (first code in the
# lowest bits); 3-bit codes go 8 to a 3-byte word (code j in bits 3j..3j+2 of the 24-bit little-endian word).


def packed_width(n: int, bits: int) -> int:
    """Bytes that hold ``n`` codes of ``bits`` bits (the last byte or word zero-padded)."""
    if bits == 3:
        return 3 * math.ceil(n / 8)
    return math.ceil(n * bits / 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., I]`` -> packed uint8 ``[..., packed_width(I, bits)]``."""
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    per = 8 if bits == 3 else 8 // bits
    n = codes.shape[-1]
    pad = (-n) % per
    c = codes.to(torch.uint8)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    if bits == 3:
        c = c.reshape(*c.shape[:-1], -1, 8).to(torch.int32)
        word = torch.zeros(c.shape[:-1], dtype=torch.int32, device=c.device)
        for j in range(8):
            word |= c[..., j] << (3 * j)
        out = torch.stack([(word >> (8 * k)) & 0xFF for k in range(3)], dim=-1).to(torch.uint8)
        return out.reshape(*out.shape[:-2], -1)
    c = c.reshape(*c.shape[:-1], -1, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=c.device)
    for j in range(per):
        out |= c[..., j] << (bits * j)
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: packed ``[..., B]`` -> uint8 codes ``[..., n]``."""
    if bits == 8:
        return packed[..., :n]
    if bits == 3:
        b = packed.reshape(*packed.shape[:-1], -1, 3).to(torch.int32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
        codes = ((word.unsqueeze(-1) >> shifts) & 7).to(torch.uint8)
        return codes.reshape(*packed.shape[:-1], -1)[..., :n]
    per = 8 // bits
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & mask
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :n]


def fake_quant_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-token dynamic fake-quant of activations ``[..., D]`` with a straight-through estimator."""
    qmax = 2 ** (bits - 1) - 1
    s = x.detach().abs().amax(-1, keepdim=True).float().clamp_min(1e-8) / qmax
    q = (torch.clamp(torch.round(x.float() / s), -qmax - 1, qmax) * s).to(x.dtype)
    return ste(q, x)


def ste(value: torch.Tensor, through: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the identity gradient to ``through`` in the backward pass.

    Written as ``value.detach() + (through - through.detach())`` so the forward result is exactly ``value``
    (``through + (value - through)`` is not, in floating point).
    """
    return value.detach() + (through - through.detach())
