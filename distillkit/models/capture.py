"""Capture attention queries, keys and values during a forward pass, and pool token states.

Relation losses (MiniLM-style q/k/v relations) and DisWOT-style scores need the per-layer query, key and
value projections. :func:`capture_qkv` records them with forward hooks on the projection modules, so it
works with any attention implementation (eager, SDPA, flash) and costs no extra forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from distillkit.errors import ConfigError
from distillkit.models import arch
from distillkit.models.layout import split_layer_key

POOLING = ("mean", "cls", "max")

# Per family, the q/k/v projection modules of a block as suffixes after "<container>.<index>.". GPT-2 packs
# q|k|v into one Conv1D ("qkv").
_QKV_MODULES: dict[str, list[dict[str, str]]] = {
    "llama": [{"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"}],
    "gpt2": [{"qkv": "attn.c_attn"}],
    "bert": [{"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value"}],
    "vit": [
        {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj"},
        {"q": "attention.attention.query", "k": "attention.attention.key", "v": "attention.attention.value"},
    ],
}


def _block_modules(model: Any, fam: str) -> dict[int, dict[str, Any]]:
    by_block: dict[int, dict[str, Any]] = {}
    for name, module in model.named_modules():
        _, index, suffix = split_layer_key(name)
        if index is not None:
            by_block.setdefault(index, {})[suffix] = module
    found: dict[int, dict[str, Any]] = {}
    for index, modules in by_block.items():
        for layout in _QKV_MODULES[fam]:
            if all(s in modules for s in layout.values()):
                found[index] = {role: modules[s] for role, s in layout.items()}
                break
    return found


@contextmanager
def capture_qkv(model: Any, blocks: list[int]) -> Iterator[dict[int, tuple[Any, Any, Any]]]:
    """Record the query, key and value projections of ``blocks`` on every forward pass inside the ``with``.

    Yields a dict that, after a forward pass, maps each requested block index (as given; negative indices
    count from the end) to ``(q, k, v)``, each ``[B, T, heads * head_dim]``. They are the raw projection
    outputs: after the bias, before the split into heads, before rotary embeddings and before Qwen3's q/k
    norms. With grouped-query attention k and v are repeated per group to the query head count, so query
    head ``h`` lines up with the key/value head it attends with. GPT-2's packed ``c_attn`` output is split.
    Tensors are not detached (a student's keep their graph). A later forward pass overwrites earlier ones.
    The hooks are removed on exit, also on error.
    """
    fam = arch.family(model.config)
    if fam not in _QKV_MODULES:
        raise ConfigError(
            f"cannot capture attention projections of {fam} models",
            hint=f"supported families: {', '.join(_QKV_MODULES)}",
        )
    n_layers = arch.num_layers(model.config)
    heads, kv_heads, dim = arch.num_heads(model.config), arch.num_kv_heads(model.config), arch.head_dim(model.config)
    modules = _block_modules(model, fam)
    resolved: dict[int, int] = {}
    for block in blocks:
        index = block + n_layers if block < 0 else block
        if index not in modules:
            raise ConfigError(
                f"block {block} does not exist in a model with {n_layers} blocks",
                hint=f"use block indices from 0 to {n_layers - 1} (or negative from the end)",
            )
        resolved[block] = index

    captured: dict[int, tuple[Any, Any, Any]] = {}
    partial: dict[int, dict[str, Any]] = {}

    def widen(t: Any) -> Any:
        if kv_heads == heads:
            return t
        b, n, _ = t.shape
        return t.reshape(b, n, kv_heads, dim).repeat_interleave(heads // kv_heads, dim=2).reshape(b, n, heads * dim)

    def hook_for(block: int, role: str):
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            if role == "qkv":
                q, k, v = output.split(heads * dim, dim=-1)
                captured[block] = (q, k, v)
                return
            parts = partial.setdefault(block, {})
            parts[role] = output if role == "q" else widen(output)
            if len(parts) == 3:
                captured[block] = (parts["q"], parts["k"], parts["v"])

        return hook

    handles = []
    try:
        for block, index in resolved.items():
            for role, module in modules[index].items():
                handles.append(module.register_forward_hook(hook_for(block, role)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def pool(hidden: Any, mask: Any | None = None, mode: str = "mean") -> Any:
    """Pool token states ``[B, T, H]`` into ``[B, H]``.

    ``mask`` ``[B, T]`` (1 = token, 0 = padding; None = all tokens) is honoured by ``mean`` (average over real
    tokens) and ``max`` (padding never wins; a row without tokens gives zeros). ``cls`` takes position 0.
    """
    import torch

    if mode not in POOLING:
        raise ConfigError(f"unknown pooling {mode!r}", hint=f"choose one of: {', '.join(POOLING)}")
    if mode == "cls":
        return hidden[:, 0]
    if mask is None:
        mask = torch.ones(hidden.shape[:2], device=hidden.device)
    keep = mask.to(hidden.device).unsqueeze(-1) > 0
    if mode == "mean":
        weights = keep.to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    filled = hidden.masked_fill(~keep, torch.finfo(hidden.dtype).min)
    return torch.where(keep.any(1), filled.max(1).values, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
