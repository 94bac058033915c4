"""Which modules get quantized, and swapping them for fake-quant or real quantized modules.

Targets are every ``nn.Linear``, transformers ``Conv1D`` (GPT-2; its weight is stored ``[in, out]``) and
``nn.Embedding`` whose name is not skipped. An output projection tied to the input embeddings (tied word embeddings)
is not quantized twice: it becomes a tied module that reads the embedding's quantized weight.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from distillkit.errors import ConfigError
from distillkit.models.packed.modules import build_quantized_, set_module
from distillkit.quantize import functional as qf
from distillkit.quantize.functional import QuantState
from distillkit.quantize.modules import FakeQuantEmbedding, FakeQuantLinear, TiedFakeQuantLinear, WeightQuantizer


@dataclass
class Target:
    name: str
    kind: str  # linear | conv1d | embedding | tied
    in_features: int
    out_features: int
    tied_to: str | None = None


def _conv1d_type():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    for p in patterns:
        if fnmatch.fnmatch(name, p) or name == p or name.endswith("." + p) or name.startswith(p + "."):
            return True
    return False


def check_skip(model: nn.Module, skip: tuple[str, ...]) -> None:
    """Every ``--skip`` pattern must match a module: a typo would otherwise quantize what was meant to be kept."""
    names = [n for n, _ in model.named_modules() if n]
    for p in skip:
        if not any(_skipped(n, (p,)) for n in names):
            layers = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear | nn.Embedding)]
            examples = ", ".join(dict.fromkeys(layers[:2] + layers[-1:]))
            raise ConfigError(
                f"--skip {p!r} matches no module of the model",
                hint=f"module names look like {examples}; pass a full name, a last part (q_proj) or a glob ('*.mlp.*')",
            )


def find_targets(model: nn.Module, skip: tuple[str, ...] = (), embeddings: bool = True) -> list[Target]:
    """The modules to quantize, in model order."""
    check_skip(model, skip)
    conv1d = _conv1d_type()
    emb_in = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = (
        emb_in is not None
        and emb_out is not None
        and getattr(emb_out, "weight", None) is getattr(emb_in, "weight", None)
        and not _skipped(_name_of(model, emb_in), skip)
        and embeddings
    )
    emb_in_name = _name_of(model, emb_in) if emb_in is not None else None
    out: list[Target] = []
    for name, m in model.named_modules():
        if not name or _skipped(name, skip):
            continue
        if tied and m is emb_out:
            out.append(Target(name, "tied", m.in_features, m.out_features, tied_to=emb_in_name))
        elif isinstance(m, nn.Linear):
            out.append(Target(name, "linear", m.in_features, m.out_features))
        elif isinstance(m, conv1d):
            out.append(Target(name, "conv1d", m.weight.shape[0], m.weight.shape[1]))
        elif isinstance(m, nn.Embedding) and embeddings:
            out.append(Target(name, "embedding", m.embedding_dim, m.num_embeddings))
    return out


def _name_of(model: nn.Module, module: nn.Module | None) -> str | None:
    for n, m in model.named_modules():
        if m is module:
            return n
    return None


def check_group_size(targets: list[Target], group_size: int) -> None:
    """Every quantized module's input features must be a multiple of the group size."""
    if not group_size:
        return
    for t in targets:
        if t.kind != "tied" and t.in_features % group_size:
            raise ConfigError(
                f"group size {group_size} does not divide the {t.in_features} input features of {t.name}",
                hint="choose a group size that divides it (32, 64, 128), 0 for per-channel scales, or --skip that module",
            )


def weight_of(model: nn.Module, t: Target) -> torch.Tensor:
    """The weight of a target as ``[out, in]``."""
    m = model.get_submodule(t.name)
    return m.weight.t() if t.kind == "conv1d" else m.weight


def to_fake_quant_(
    model: nn.Module,
    targets: list[Target],
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    quantizer: str,
    act_bits: int | None = None,
    init: dict[str, QuantState] | None = None,
    embedding_grid: tuple[int, int, bool] | None = None,
    latents: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Swap every target for its fake-quant module (in place); ``init`` starts them from given states (e.g. GPTQ),
    each on its state's own grid; ``bits``/``group_size``/``symmetric`` are the grid of the others.

    The float weight a started module keeps is the state's dequantized weight, or the target's ``latents`` entry
    (``[out, in]``) when there is one: a weight whose rounding on the state's grid gives the state's codes, such as
    GPTQ's error-compensated weight, which leaves the step sizes a gradient to learn from.

    ``embedding_grid`` (bits, group size, symmetric) gives the embedding tables a grid of their own (mixed
    precision, e.g. 8-bit tables in a 2-bit model); by default they share the Linears' grid."""
    init = init or {}
    done: dict[str, nn.Module] = {}
    for t in sorted(targets, key=lambda t: t.kind == "tied"):
        m = model.get_submodule(t.name)
        if t.kind == "tied":
            set_module(model, t.name, TiedFakeQuantLinear(done[t.tied_to], m.bias, act_bits))
            continue
        if t.name in init:
            with torch.no_grad():
                start = (latents or {}).get(t.name)
                start = init[t.name].dequantize(torch.float32) if start is None else start
                (m.weight.copy_(start.t()) if t.kind == "conv1d" else m.weight.copy_(start))
        w = weight_of(model, t)
        if t.name in init:  # a started module keeps its state's grid (its own bits under mixed precision)
            grid = (init[t.name].bits, init[t.name].group_size, init[t.name].symmetric)
        elif t.kind == "embedding" and embedding_grid is not None:
            grid = embedding_grid
        else:
            grid = (bits, group_size, symmetric)
        q = WeightQuantizer(w, *grid, quantizer, init.get(t.name)).to(w.device)
        if t.kind == "embedding":
            new = FakeQuantEmbedding(m.weight, m.padding_idx, q)
        else:
            weight = m.weight if t.kind == "linear" else nn.Parameter(m.weight.detach().t().contiguous())
            new = FakeQuantLinear(weight, m.bias, q, act_bits)
        set_module(model, t.name, new)
        done[t.name] = new
    return model


@torch.no_grad()
def fake_to_plain_(model: nn.Module, targets: list[Target]) -> dict[str, QuantState]:
    """Replace fake-quant modules by plain ones holding the dequantized weights; return their quantized states.

    The plain model computes what the fake-quant model did (up to activation fake-quant), and saves like the
    original with ``save_pretrained``.
    """
    states: dict[str, QuantState] = {}
    fakes = {t.name: model.get_submodule(t.name) for t in targets}
    for t in targets:
        if t.kind == "tied":
            continue
        states[t.name] = fakes[t.name].to_state()
    for t in sorted(targets, key=lambda t: t.kind != "tied"):
        if t.kind == "tied":
            continue
        f = fakes[t.name]
        deq = states[t.name].dequantize(f.weight.dtype)
        if t.kind == "embedding":
            f.weight.copy_(deq)
            new = nn.Embedding(t.out_features, t.in_features, padding_idx=f.padding_idx, _weight=f.weight)
        elif t.kind == "conv1d":
            new = _conv1d_type()(t.out_features, t.in_features)
            new.weight = nn.Parameter(deq.t().contiguous())
            new.bias = f.bias
        else:
            f.weight.copy_(deq)
            new = nn.Linear(t.in_features, t.out_features, bias=f.bias is not None, device=deq.device)
            new.weight = f.weight
            new.bias = f.bias
        set_module(model, t.name, new)
    for t in targets:
        if t.kind == "tied":
            f = fakes[t.name]
            new = nn.Linear(t.in_features, t.out_features, bias=f.bias is not None)
            new.weight = model.get_submodule(t.tied_to).weight
            new.bias = f.bias
            set_module(model, t.name, new)
    return states


def quantize_states_rtn(
    model: nn.Module,
    targets: list[Target],
    bits: int,
    group_size: int,
    symmetric: bool,
    bits_of: dict[str, int] | None = None,
) -> dict[str, QuantState]:
    """Round-to-nearest states of the targets, at ``bits`` or their own ``bits_of`` entry."""
    bits_of = bits_of or {}
    return {
        t.name: qf.quantize_rtn(weight_of(model, t).detach(), bits_of.get(t.name, bits), group_size, symmetric)
        for t in targets
        if t.kind != "tied"
    }


def layout_entry(t: Target, state: QuantState | None, bias: bool, padding_idx: int | None = None) -> dict:
    """What the loader needs to rebuild one quantized module (stored in config.json)."""
    e = {"kind": t.kind, "in_features": t.in_features, "out_features": t.out_features, "bias": bias}
    if t.kind == "tied":
        return {**e, "tied_to": t.tied_to}
    e.update(
        bits=state.bits, group_size=state.group_size, symmetric=state.symmetric, codebook=state.codebook is not None
    )
    if t.kind == "embedding":
        e["padding_idx"] = padding_idx
    return e


@torch.no_grad()
def to_quantized_(
    model: nn.Module, targets: list[Target], states: dict[str, QuantState], act_bits: int | None = None
) -> dict[str, dict]:
    """Swap every target for a real quantized module holding ``states`` (in place); returns the layout entries."""
    layout: dict[str, dict] = {}
    for t in targets:
        m = model.get_submodule(t.name)
        bias = getattr(m, "bias", None)
        layout[t.name] = layout_entry(t, states.get(t.name), bias is not None, getattr(m, "padding_idx", None))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    built = build_quantized_(
        model, layout, act_bits, dtype, biases={n: getattr(model.get_submodule(n), "bias", None) for n in layout}
    )
    for name, module in built.items():
        if name in states:
            module.load_state(states[name])
    return layout
