"""The real quantized modules of a packed artifact: packed codes and fp16 scales held as buffers, dequantized on the
fly (or multiplied by a CPU kernel, :mod:`distillkit.models.packed.kernels`), so the model in memory is as small as
its file. ``build_quantized_`` puts empty ones where a saved layout says; the quantize stage fills them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from distillkit.models.packed import codes as qf
from distillkit.models.packed import kernels
from distillkit.models.packed.codes import QuantState


class _Packed(nn.Module):
    """Buffers of one packed weight ``[O, I]``; ``rows`` dequantizes some rows only (embeddings)."""

    def _init_buffers(self, o: int, i: int, bits: int, group_size: int, symmetric: bool, codebook: bool) -> None:
        self.bits, self.symmetric = bits, symmetric
        self.group_size = qf.effective_group(i, group_size)
        self.has_codebook = codebook
        n_groups = i // self.group_size
        self.register_buffer("qweight", torch.zeros(o, qf.packed_width(i, bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(o, n_groups, dtype=qf.SCALE_DTYPE))
        if codebook:
            self.register_buffer("offsets", torch.zeros(o, n_groups, dtype=qf.SCALE_DTYPE))
            self.register_buffer("codebook", torch.zeros(2**bits, dtype=torch.float32))
        elif not symmetric:
            self.register_buffer("zeros", torch.zeros(o, n_groups, dtype=torch.uint8))

    def _cols(self) -> int:
        raise NotImplementedError

    def load_state(self, state: QuantState) -> None:
        self.qweight.copy_(qf.pack(state.codes, self.bits))
        self.scales.copy_(state.scales)
        if self.has_codebook:
            self.offsets.copy_(state.offsets)
            self.codebook.copy_(state.codebook)
        elif not self.symmetric:
            self.zeros.copy_(state.zeros)

    def _state_of(self, qweight: torch.Tensor, scales: torch.Tensor, zeros=None, offsets=None) -> QuantState:
        return QuantState(
            codes=qf.unpack(qweight, self.bits, self._cols()),
            scales=scales,
            zeros=zeros,
            offsets=offsets,
            codebook=self.codebook if self.has_codebook else None,
            bits=self.bits,
            group_size=self.group_size,
            symmetric=self.symmetric,
        )

    def state(self) -> QuantState:
        return self._state_of(
            self.qweight,
            self.scales,
            getattr(self, "zeros", None) if not self.has_codebook else None,
            getattr(self, "offsets", None),
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return qf.dequantize(self.state(), dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows ``ids`` (any shape) -> ``[*ids.shape, I]``, touching only those rows."""
        flat = ids.reshape(-1)
        zeros = self.zeros[flat] if (not self.has_codebook and not self.symmetric) else None
        offsets = self.offsets[flat] if self.has_codebook else None
        st = self._state_of(self.qweight[flat], self.scales[flat], zeros, offsets)
        return qf.dequantize(st, dtype).reshape(*ids.shape, -1)


class QuantLinear(_Packed):
    """``y = x W^T + b`` with ``W`` stored packed; dequantized on the fly in the input's dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        symmetric: bool,
        bias: bool,
        codebook: bool = False,
        act_bits: int | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_bits = act_bits
        self._init_buffers(out_features, in_features, bits, group_size, symmetric, codebook)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    def _cols(self) -> int:
        return self.in_features

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized_weight(self.scales.dtype if self.bias is None else self.bias.dtype)

    def set_kernel(self, kernel: str) -> None:
        """``dequant``, ``cached`` or ``cpu-bf16`` (see :mod:`distillkit.models.packed.kernels`); activation
        fake-quant keeps exact products (``cpu-bf16`` falls back to ``dequant``)."""
        if kernel == "cpu-bf16" and self.act_bits:
            kernel = "dequant"
        self._kernel = kernels.make_kernel(
            kernel, self.dequantized_weight, self.state() if kernel == "cpu-bf16" else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits:
            x = qf.fake_quant_activations(x, self.act_bits)
        return _product(self, x, self.dequantized_weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class QuantEmbedding(_Packed):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        bits: int,
        group_size: int,
        symmetric: bool,
        padding_idx: int | None = None,
        codebook: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.dtype = dtype
        self._init_buffers(num_embeddings, embedding_dim, bits, group_size, symmetric, codebook)

    def _cols(self) -> int:
        return self.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized_weight(self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"


class TiedQuantLinear(nn.Module):
    """An output projection that shares a :class:`QuantEmbedding`'s packed weight (tied word embeddings)."""

    def __init__(self, source: QuantEmbedding, bias: bool = False, act_bits: int | None = None):
        super().__init__()
        self._source = [source]
        self.act_bits = act_bits
        self.out_features, self.in_features = source.num_embeddings, source.embedding_dim
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        return self._source[0].weight

    def set_kernel(self, kernel: str) -> None:
        """As :meth:`QuantLinear.set_kernel`; under ``cpu-bf16`` the tied weight always goes through the cached
        bf16 copy."""
        if kernel == "cpu-bf16" and self.act_bits:
            kernel = "dequant"
        self._kernel = kernels.make_kernel(kernel, self._source[0].dequantized_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits:
            x = qf.fake_quant_activations(x, self.act_bits)
        return _product(self, x, self._source[0].dequantized_weight)


def _product(layer: nn.Module, x: torch.Tensor, dequantize) -> torch.Tensor:
    """``layer``'s output for ``x``: through its kernel object when it has one that runs here (``cpu-bf16`` only on
    the CPU), else the exact weight dequantized for this call."""
    fast = getattr(layer, "_kernel", None)
    if fast is not None and (x.device.type == "cpu" or isinstance(fast, kernels.CachedWeight)):
        return fast(x, layer.bias)
    return F.linear(x, dequantize(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def build_quantized_(
    model: nn.Module, layout: dict[str, dict], act_bits: int | None, dtype: torch.dtype, biases: dict | None = None
) -> dict[str, nn.Module]:
    """Put empty quantized modules where ``layout`` says (in place); ``biases`` carries existing biases over."""
    built: dict[str, nn.Module] = {}
    for name, e in sorted(layout.items(), key=lambda kv: kv[1]["kind"] == "tied"):
        old = model.get_submodule(name)
        device = next(iter(old.parameters()), torch.empty(0)).device
        if e["kind"] == "tied":
            new = TiedQuantLinear(built[e["tied_to"]], bias=e["bias"], act_bits=act_bits)
        elif e["kind"] == "embedding":
            new = QuantEmbedding(
                e["out_features"],
                e["in_features"],
                bits=e["bits"],
                group_size=e["group_size"],
                symmetric=e["symmetric"],
                padding_idx=e.get("padding_idx"),
                codebook=e["codebook"],
                dtype=dtype,
            )
        else:
            new = QuantLinear(
                e["in_features"],
                e["out_features"],
                bits=e["bits"],
                group_size=e["group_size"],
                symmetric=e["symmetric"],
                bias=e["bias"],
                codebook=e["codebook"],
                act_bits=act_bits,
                dtype=dtype,
            )
        b = (biases or {}).get(name)
        if b is not None and new.bias is not None:
            new.bias = nn.Parameter(b.detach().clone().to(dtype), requires_grad=False)
        new = new.to(device)
        set_module(model, name, new)
        built[name] = new
    return built


def to_dynamic_int8_(model: torch.nn.Module) -> torch.nn.Module:
    """Swap int8 per-channel symmetric ``QuantLinear`` modules for torch's dynamic int8 Linear (CPU, fbgemm/x86).

    The int8 weights and scales are used as stored; activations are quantized per call by torch.
    """
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    for name, m in list(model.named_modules()):
        if not isinstance(m, QuantLinear) or m.bits != 8 or not m.symmetric or m.has_codebook:
            continue
        if m.group_size != m.in_features:
            continue
        st = m.state()
        w = (st.codes.to(torch.int16) - 128).to(torch.int8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(
                w, st.scales[:, 0].double(), torch.zeros(m.out_features, dtype=torch.long), 0
            )
            dl = DynamicLinear(m.in_features, m.out_features, bias_=m.bias is not None, dtype=torch.qint8)
            dl.set_weight_bias(qw, None if m.bias is None else m.bias.detach().float())
        set_module(model, name, dl)
    return model
