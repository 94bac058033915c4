"""Mixed precision by measured sensitivity (``quantize --sensitive-fraction F --sensitive-bits B``).

Layers do not suffer quantization alike: in a transformer a few Linears (often an attention output or the last
MLP projection) carry most of the damage. Each Linear is quantized alone, round-to-nearest on the scheme's grid,
with every other layer left in float, and the model's output error on a few calibration batches is measured:
the mean of ``(y_q - y)^2`` over the real positions relative to the mean of ``y^2``, ``y`` the float model's
output (logits, or an encoder's hidden states). That is the error the layer's quantization adds at the output, which is what is judged, rather
than a local proxy such as the layer's own weight error.

The budget ``F`` is a fraction of the quantized Linear weights (by count). Promoting a layer from ``b`` to ``B``
bits removes (most of) its error at the cost of its size, so layers are taken in order of error per weight (the
greedy answer to that knapsack) while they fit in the budget. The chosen layers are then quantized at ``B`` bits
by the same method (GPTQ, reconstruction, quantized distillation) as the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

SENSITIVITY_BATCHES = 4  # calibration batches each layer's output error is measured on


@torch.no_grad()
def linear_sensitivity(
    model: torch.nn.Module,
    targets: list,
    batches: list[dict],
    quantize: Callable[[Any, torch.Tensor], torch.Tensor],
    outputs: Callable[[torch.nn.Module, dict], torch.Tensor],
    on_layer: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """``{name: relative output error}`` of every Linear target quantized alone: the squared error of the outputs
    over all the batches' real positions, relative to the float outputs' square (each batch's
    :func:`~distillkit.quantize.reconstruct.masked_mse` weighted by its real positions).

    ``quantize(target, weight)`` returns the dequantized weight ``[out, in]`` to try; ``outputs(model, batch)``
    runs the model. The model is left as it was."""
    from distillkit.quantize.reconstruct import masked_mse
    from distillkit.quantize.surgery import weight_of

    want = [outputs(model, b) for b in batches]
    masks = [b.get("attention_mask") for b in batches]
    # each batch's mean counts as many times as it has positions: every real token weighs the same
    counts = [_positions(y, m) for y, m in zip(want, masks, strict=True)]
    energy = sum(n * masked_mse(y, torch.zeros_like(y), m).item() for y, m, n in zip(want, masks, counts, strict=True))
    out: dict[str, float] = {}
    for i, t in enumerate(targets):
        w = weight_of(model, t)
        original = w.detach().clone()
        try:
            w.copy_(quantize(t, original).to(w.dtype))
            err = sum(
                n * masked_mse(outputs(model, b), y, m).item()
                for y, b, m, n in zip(want, batches, masks, counts, strict=True)
            )
        finally:
            w.copy_(original)
        out[t.name] = err / max(energy, 1e-30)
        if on_layer is not None:
            on_layer(i + 1)
    return out


def _positions(y: torch.Tensor, mask: torch.Tensor | None) -> int:
    """The positions :func:`~distillkit.quantize.reconstruct.masked_mse` averages ``y``'s error over."""
    if mask is not None and y.dim() >= 2 and tuple(mask.shape) == tuple(y.shape[:-1]):
        return int(mask.sum())
    return y[..., 0].numel()


def choose_promoted(sizes: dict[str, int], sensitivity: dict[str, float], fraction: float) -> list[str]:
    """The layers to promote: by decreasing error per weight, each while it fits in ``fraction`` of all the
    weights (``sizes``: weights per layer); in model order."""
    budget = fraction * sum(sizes.values())
    order = sorted(sizes, key=lambda n: sensitivity[n] / max(sizes[n], 1), reverse=True)
    chosen, used = set(), 0
    for n in order:
        if sensitivity[n] > 0 and used + sizes[n] <= budget:
            chosen.add(n)
            used += sizes[n]
    return [n for n in sizes if n in chosen]
