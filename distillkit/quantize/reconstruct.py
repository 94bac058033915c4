"""Block-wise reconstruction after GPTQ (``quantize --reconstruct-steps N``).

GPTQ chooses each Linear's codes from a local proxy: that layer's own output error on its own inputs, one column
at a time. Reconstruction then trains a whole block (a transformer layer) at once, with its Linears fake-quantized
(straight-through rounding of latent float weights, learned step sizes and zero-points), to reproduce what the
float block computes: its inputs come from the blocks before it, already quantized and reconstructed, and its
target is the float block's output on the float model's own inputs, so a block also learns to undo the error the
blocks before it left (BRECQ, Li et al. 2021; the block-wise stage of EfficientQAT, Chen et al. 2024).

It starts exactly where GPTQ stopped: from GPTQ's grid and its error-compensated latent weights (the weight each
column had when it was rounded). The dequantized weight would be a worse start: it sits on the grid, where the
step sizes' gradient ``round(w / s) - w / s`` is zero, so the step sizes would not learn. A block whose
reconstruction error on the calibration batches ends no lower than it started keeps GPTQ's codes.

Only the quantized weights, their step sizes and zero-points learn; biases and norms stay the float model's, so
the result is entirely the returned codes and grid (and the latents quantized distillation can continue from).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from distillkit.quantize.functional import QuantState

SCALE_LR_RATIO = 1 / 3  # step sizes and zero-points learn at this fraction of --reconstruct-lr


@dataclasses.dataclass(frozen=True)
class ReconstructSpec:
    steps: int  # optimizer steps per block, one calibration batch each
    lr: float  # Adam learning rate of the latent weights (cosine decay to 0)
    seed: int = 0


def output_of(out: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first element of a tuple/output object)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def masked_mse(out: torch.Tensor, goal: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Distillation's hidden-state MSE over the real tokens (``mask [B, T]`` of ``[B, T, H]`` outputs), else over
    everything (e.g. a pooler's ``[B, H]``)."""
    from distillkit.distill.functional import hidden_mse

    keep = mask is not None and out.dim() >= 2 and tuple(mask.shape) == tuple(out.shape[:-1])
    return hidden_mse(out, goal, mask if keep else None)


def reconstruct_block(
    block: torch.nn.Module,
    targets: list,
    states: dict[str, QuantState],
    latents: dict[str, torch.Tensor],
    inputs: list[tuple[tuple, dict]],
    goals: list[torch.Tensor],
    masks: list[torch.Tensor | None],
    spec: ReconstructSpec,
    *,
    prefix: str,
    on_step: Any = None,
) -> tuple[dict[str, QuantState], dict[str, torch.Tensor], dict[str, float]]:
    """Train a fake-quantized copy of ``block`` to map ``inputs`` to ``goals``; ``block`` itself is not changed.

    ``targets`` are the block's quantized Linears (names under the model, ``prefix`` the block's own name plus a
    dot), ``states``/``latents`` their GPTQ result. Returns the new states and latents of those Linears and
    ``{"mse_before", "mse_after"}`` over all the batches; when training did not lower the error, GPTQ's own states
    and latents come back unchanged (``"kept": 1.0``). ``on_step(step, loss)`` reports progress.
    """
    from distillkit.quantize.surgery import to_fake_quant_

    local = [dataclasses.replace(t, name=t.name.removeprefix(prefix)) for t in targets]
    trial = _copy_without_grads(block)
    first = states[targets[0].name]
    to_fake_quant_(
        trial,
        local,
        bits=first.bits,
        group_size=first.group_size,
        symmetric=first.symmetric,
        quantizer="lsq",
        init={lt.name: states[t.name] for t, lt in zip(targets, local, strict=True)},
        latents={lt.name: latents[t.name] for t, lt in zip(targets, local, strict=True)},
    )
    trial.eval()  # no dropout: the target is the float block in eval mode
    fakes = [trial.get_submodule(lt.name) for lt in local]
    weights = [f.weight for f in fakes]
    grid = [p for f in fakes for p in f.quantizer.parameters()]
    for p in trial.parameters():
        p.requires_grad_(False)
    for p in weights + grid:
        p.requires_grad_(True)

    def error() -> float:
        with torch.no_grad():
            total = sum(_loss(trial, inputs[i], goals[i], masks[i]).item() for i in range(len(inputs)))
        return total / len(inputs)

    before = error()
    opt = torch.optim.Adam(
        [{"params": weights, "lr": spec.lr}, {"params": grid, "lr": spec.lr * SCALE_LR_RATIO}],
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / spec.steps)))
    gen = torch.Generator().manual_seed(spec.seed)
    order: list[int] = []
    with torch.enable_grad():
        for step in range(spec.steps):
            if not order:
                order = torch.randperm(len(inputs), generator=gen).tolist()
            i = order.pop()
            loss = _loss(trial, inputs[i], goals[i], masks[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if on_step is not None:
                on_step(step + 1, loss.item())
    after = error()
    if not after < before:
        return (
            {t.name: states[t.name] for t in targets},
            {t.name: latents[t.name] for t in targets},
            {"mse_before": before, "mse_after": before, "kept": 1.0},
        )
    new_states, new_latents = {}, {}
    with torch.no_grad():
        for t, f in zip(targets, fakes, strict=True):
            new_states[t.name] = f.to_state()
            new_latents[t.name] = f.weight.detach().clone()
    return new_states, new_latents, {"mse_before": before, "mse_after": after}


def _loss(block: torch.nn.Module, inp: tuple[tuple, dict], goal: torch.Tensor, mask: torch.Tensor | None):
    args, kwargs = inp
    return masked_mse(output_of(block(*args, **kwargs)), goal, mask)


def _copy_without_grads(block: torch.nn.Module) -> torch.nn.Module:
    import copy

    trial = copy.deepcopy(block)
    for p in trial.parameters():
        p.requires_grad_(False)
        p.grad = None
    return trial
