"""Fake-quant modules for QAT (the real packed modules they turn into are :mod:`distillkit.models.packed.modules`).

``FakeQuantLinear`` / ``FakeQuantEmbedding`` keep a float
weight and quantize it in the forward pass with a straight-through estimator; ``to_state()`` turns them into the
codes a real module holds, computing exactly what the forward pass used.

Quantizers (``--quantizer``):

- ``ste``: scales and zero-points follow the current weight (round-to-nearest grid), gradients pass the rounding
  as the identity and are zero where the weight is clipped.
- ``lsq``: learned step size (Esser et al. 2020): the scales (and zero-points when asymmetric) are parameters,
  with the gradient scaled by ``1 / sqrt(group * qmax)``.
- ``dq``: differentiable quantization (Polino et al. 2018): the ``2**bits`` quantization points are parameters,
  weights are normalised per group to [0, 1] by their min and range and assigned to the nearest point; the
  points learn through the distillation loss. Stored as a codebook.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from distillkit.quantize import functional as qf
from distillkit.quantize.functional import QuantState

QUANTIZERS = ("ste", "lsq", "dq")


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass, gradient multiplied by ``g``."""
    return qf.ste(x, x * g)


class WeightQuantizer(nn.Module):
    """Fake-quantizes a weight ``[O, I]`` with the chosen quantizer; holds its learnable parameters."""

    def __init__(
        self,
        weight: torch.Tensor,
        bits: int,
        group_size: int,
        symmetric: bool,
        quantizer: str = "ste",
        init: QuantState | None = None,
    ):
        super().__init__()
        self.bits = bits
        self.group_size = qf.effective_group(weight.shape[1], group_size)
        self.symmetric = symmetric
        self.kind = quantizer
        w = weight.detach().float()
        if quantizer == "lsq":
            if init is not None and init.codebook is None:
                s, z = init.scales.float(), (init.zeros.float() if init.zeros is not None else None)
            else:
                s, z = qf.uniform_params(w, bits, self.group_size, symmetric)
            self.scale = nn.Parameter(s.clone())
            self.scale._no_weight_decay = True
            self.zero = None
            if not symmetric:
                self.zero = nn.Parameter(z.clone())
                self.zero._no_weight_decay = True
            self._g = 1.0 / math.sqrt(self.group_size * (2 ** (bits - 1) - 1 if symmetric else 2**bits - 1))
        elif quantizer == "dq":
            self.points = nn.Parameter(torch.linspace(0, 1, 2**bits))
            self.points._no_weight_decay = True
        elif quantizer != "ste":
            raise ValueError(f"unknown quantizer {quantizer!r}")

    # -- the three quantizers, each returning (dequantized weight with gradients, codes) --------------------------

    def _uniform(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.group_size
        o, i = w.shape
        x = w.float().reshape(o, i // g, g)
        zz = z if z is not None else torch.full_like(s, 2 ** (self.bits - 1))
        u = (qf.round_ste(x / s.unsqueeze(-1)) + zz.unsqueeze(-1)).clamp(0, 2**self.bits - 1)
        deq = ((u - zz.unsqueeze(-1)) * s.unsqueeze(-1)).reshape(o, i)
        return deq, u.detach().reshape(o, i)

    def _params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.kind == "ste":
            return qf.uniform_params(w.detach(), self.bits, self.group_size, self.symmetric)
        s = qf.ste(qf.round_scale(self.scale), _grad_scale(self.scale, self._g))
        z = None
        if self.zero is not None:
            z = qf.round_ste(self.zero).clamp(0, 2**self.bits - 1)
        return s, z

    def _codebook(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self.group_size
        o, i = w.shape
        x = w.detach().float().reshape(o, i // g, g)
        lo = x.amin(-1).to(qf.SCALE_DTYPE).float()
        s = qf.round_scale(x.amax(-1) - lo)
        v = (x - lo.unsqueeze(-1)) / s.unsqueeze(-1)
        idx = (v.unsqueeze(-1) - self.points.detach()).abs().argmin(-1)
        deq = (self.points[idx] * s.unsqueeze(-1) + lo.unsqueeze(-1)).reshape(o, i)
        return deq, idx.reshape(o, i), s, lo

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.kind == "dq":
            # the value is exactly deq; the points learn through it, the weight gets the identity gradient
            deq = self._codebook(w)[0] + (w - w.detach()).float()
        else:
            deq = self._uniform(w, *self._params(w))[0]  # round_ste passes the gradient to w (zero where clipped)
        return deq.to(w.dtype)

    @torch.no_grad()
    def to_state(self, w: torch.Tensor) -> QuantState:
        """The codes and scales the forward pass used for ``w``."""
        if self.kind == "dq":
            _, idx, s, lo = self._codebook(w)
            return QuantState(
                codes=idx.to(torch.uint8),
                scales=s.to(qf.SCALE_DTYPE),
                offsets=lo.to(qf.SCALE_DTYPE),
                codebook=self.points.detach().float().clone(),
                bits=self.bits,
                group_size=self.group_size,
                symmetric=False,
            )
        s, z = self._params(w)
        _, u = self._uniform(w, s, z)
        return QuantState(
            codes=u.to(torch.uint8),
            scales=s.detach().to(qf.SCALE_DTYPE),
            zeros=None if z is None else z.detach().to(torch.uint8),
            bits=self.bits,
            group_size=self.group_size,
            symmetric=self.symmetric,
        )


class FakeQuantLinear(nn.Module):
    """A Linear whose weight is fake-quantized in the forward pass (and its input too with ``act_bits``)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, quantizer: WeightQuantizer, act_bits=None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.quantizer = quantizer
        self.act_bits = act_bits
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits:
            x = qf.fake_quant_activations(x, self.act_bits)
        return F.linear(
            x, self.quantizer(self.weight).to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )

    def to_state(self) -> QuantState:
        return self.quantizer.to_state(self.weight)


class FakeQuantEmbedding(nn.Module):
    def __init__(self, weight: nn.Parameter, padding_idx: int | None, quantizer: WeightQuantizer):
        super().__init__()
        self.weight = weight
        self.padding_idx = padding_idx
        self.quantizer = quantizer
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.quantizer(self.weight), self.padding_idx)

    def to_state(self) -> QuantState:
        return self.quantizer.to_state(self.weight)


class TiedFakeQuantLinear(nn.Module):
    """An output projection tied to a fake-quantized embedding: it uses the embedding's quantized weight."""

    def __init__(self, source: FakeQuantEmbedding, bias: nn.Parameter | None, act_bits=None):
        super().__init__()
        self._source = [source]  # a list, so the shared weight is not registered twice
        self.bias = bias
        self.act_bits = act_bits
        self.out_features, self.in_features = source.weight.shape

    @property
    def weight(self) -> torch.Tensor:
        return self._source[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = self._source[0]
        if self.act_bits:
            x = qf.fake_quant_activations(x, self.act_bits)
        return F.linear(x, src.quantizer(src.weight).to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
