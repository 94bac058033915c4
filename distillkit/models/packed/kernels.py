"""How packed weights are multiplied on the CPU: the ``quant_kernel`` choice of ``distillkit.load`` and ``bench``.

- ``dequant``: every forward dequantizes the weight into the activation dtype and calls ``F.linear``. Exact (the
  file's values, computed in the model dtype) and available everywhere, but it rebuilds the whole float weight on
  every call, so a packed model runs slower than the float model it came from.
- ``cpu-bf16``: bfloat16 compute on CPUs with AVX512-BF16 (where bf16 matrix products are fast). A 4-bit layer with
  a uniform grid and a group of 32/64/128/256 multiplies up to :data:`DECODE_ROWS` rows (batch-1 decode) with
  torch's weight-only int4 CPU kernel straight from a packed copy of its codes; larger inputs (prefill, batches) go
  through a bf16 copy of the dequantized weight, made once on first use and kept (2 bytes per weight). Other layers
  (8-bit, 2-bit, learned codebooks, tied output projections) use the cached bf16 copy for every input. Outputs
  return in the input's dtype; the bias is added in that dtype.
- ``cached``: the exact weight of ``dequant``, dequantized once on first use (per dtype and device) and kept: the
  same outputs as ``dequant``, bit for bit, at the float model's speed and with its memory (4 bytes per weight in
  fp32). What quantize measures its artifacts with, and the fast exact choice where memory is not the point.
- ``auto`` (default): ``cpu-bf16`` when the model is on the CPU, the CPU has AVX512-BF16, and the int4 kernel
  passes a self-test against the exact path on this torch; ``dequant`` otherwise.

Nothing here changes the saved files; the choice is made when a model is loaded.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.nn import functional as F

from distillkit.errors import ConfigError
from distillkit.models.packed import QUANT_KERNELS
from distillkit.models.packed.codes import dequantize_codes

DECODE_ROWS = 16  # inputs with at most this many rows use the int4 kernel; more rows use the cached bf16 weight
_INT4_GROUPS = (32, 64, 128, 256)
_INNER_K_TILES = 2


def _int4_ops() -> tuple[Any, Any] | None:
    ops = torch.ops.aten
    if not (hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")):
        return None
    return ops._convert_weight_to_int4pack_for_cpu, ops._weight_int4pack_mm_for_cpu


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int):
    """(packed codes, scales-and-zeros) for torch's int4 CPU kernel from codes ``u`` [O, I] in [0, 16), fp scales
    and uint8 zero-points [O, I / g] (``None`` = symmetric, zero 8). The kernel computes ``(u - 8) * s + m``, so the
    float offset is ``m = (8 - z) * s``."""
    convert, _ = _int4_ops()
    s = scales.float()
    z = zeros.float() if zeros is not None else torch.full_like(s, 8.0)
    packed = convert(codes.to(torch.int32).contiguous(), _INNER_K_TILES)
    sz = torch.stack([s.t(), ((8.0 - z) * s).t()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    """``x [M, I]`` (bf16) times the packed weight's transpose -> ``[M, O]`` (bf16)."""
    _, mm = _int4_ops()
    return mm(x, packed, group_size, sz)


@functools.lru_cache(maxsize=1)
def cpu_bf16_available() -> bool:
    """True when bf16 is fast on this CPU and torch's int4 kernel reproduces the exact product (checked once)."""
    try:
        if not torch.cpu._is_avx512_bf16_supported() or _int4_ops() is None:
            return False
        g = torch.Generator().manual_seed(0)
        o, i, gs = 64, 128, 32
        codes = torch.randint(0, 16, (o, i), generator=g, dtype=torch.uint8)
        scales = torch.rand(o, i // gs, generator=g) * 0.1 + 0.01
        zeros = torch.randint(0, 16, (o, i // gs), generator=g, dtype=torch.uint8)
        x = torch.randn(3, i, generator=g).to(torch.bfloat16)
        ref = x.float() @ dequantize_codes(codes, scales, zeros, 4, gs).t()
        packed, sz = pack_int4(codes, scales, zeros, gs)
        out = int4_mm(x, packed, gs, sz)
        return bool(torch.allclose(out.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item()))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def resolve_kernel(kernel: str, device: Any) -> str:
    """``auto`` -> the kernel this machine runs; an explicit ``cpu-bf16`` that cannot run is an error."""
    if kernel not in QUANT_KERNELS:
        raise ConfigError(f"unknown quant kernel {kernel!r}", hint=f"choose one of: {', '.join(QUANT_KERNELS)}")
    on_cpu = torch.device(device).type == "cpu"
    if kernel == "auto":
        return "cpu-bf16" if on_cpu and cpu_bf16_available() else "dequant"
    if kernel == "cpu-bf16" and not (on_cpu and cpu_bf16_available()):
        raise ConfigError(
            "--quant-kernel cpu-bf16 needs the model on a CPU with AVX512-BF16 and torch's int4 CPU kernel",
            hint="use --quant-kernel dequant (or auto) here",
        )
    return kernel


class CpuBf16Weight:
    """The ``cpu-bf16`` product of one packed weight. ``dequantize`` returns the exact float weight [O, I]."""

    def __init__(self, dequantize, int4: tuple[torch.Tensor, torch.Tensor, int] | None):
        self._dequantize = dequantize
        self._int4 = int4
        self._dense: torch.Tensor | None = None

    @property
    def cached_bytes(self) -> int:
        return 0 if self._dense is None else self._dense.numel() * self._dense.element_size()

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self._dequantize(torch.bfloat16)
        return self._dense

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if self._int4 is not None and x2.shape[0] <= DECODE_ROWS:
            y = int4_mm(x2.contiguous(), self._int4[0], self._int4[2], self._int4[1])
        else:
            y = F.linear(x2, self.dense())
        y = y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
        return y if bias is None else y + bias.to(x.dtype)


class CachedWeight:
    """The ``cached`` product: ``F.linear`` with the exact float weight, dequantized on first use and kept."""

    def __init__(self, dequantize):
        self._dequantize = dequantize
        self._dense: torch.Tensor | None = None

    @property
    def cached_bytes(self) -> int:
        return 0 if self._dense is None else self._dense.numel() * self._dense.element_size()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = self._dense
        if w is None or w.dtype != x.dtype or w.device != x.device:
            w = self._dense = self._dequantize(x.dtype).to(x.device)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def make_kernel(kernel: str, dequantize, state=None) -> CpuBf16Weight | CachedWeight | None:
    """The product object of one packed linear layer for a resolved ``kernel`` (None: ``dequant``, every call).
    ``state`` (a QuantState, or None for a tied output projection) lets ``cpu-bf16`` use the int4 kernel."""
    if kernel == "cached":
        return CachedWeight(dequantize)
    if kernel == "cpu-bf16":
        return CpuBf16Weight(dequantize, None if state is None else int4_layout(state))
    return None


def int4_layout(state) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """The int4 kernel's layout of a :class:`~distillkit.models.packed.codes.QuantState`, or None when the kernel
    cannot hold it (other bits, a codebook, a group size it lacks)."""
    if state.bits != 4 or state.codebook is not None or state.group_size not in _INT4_GROUPS:
        return None
    if state.codes.shape[1] % state.group_size:
        return None
    try:
        packed, sz = pack_int4(state.codes, state.scales, state.zeros, state.group_size)
    except RuntimeError:
        return None
    return packed, sz, state.group_size


def select_kernel_(model: torch.nn.Module, kernel: str, device: Any = "cpu") -> str | None:
    """Set the product every packed linear layer of ``model`` uses; returns the resolved kernel name, or None when
    the model has no packed linear layer (e.g. ``dynamic-int8``, whose Linears are torch's)."""
    kernel = resolve_kernel(kernel, device)
    layers = [m for m in model.modules() if callable(getattr(m, "set_kernel", None))]
    for m in layers:
        m.set_kernel(kernel)
    return kernel if layers else None
