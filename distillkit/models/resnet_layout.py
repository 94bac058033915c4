"""Channel spaces of HF ResNet-style CNNs (``ResNetModel``, ``ResNetForImageClassification``): which dimension of
which tensor carries which channels, and cutting a state dict to kept channels.

Shared by the pruner (:mod:`distillkit.prune.resnet`) and the student search (:mod:`distillkit.search.cnn`).
Channels live in *spaces*: ``stem`` (the embedder's output), ``stage{s}`` (the residual stream of stage ``s``:
every block's last conv, the shortcut projection, the next stage's input and the classifier share it, so its
channels are cut together) and ``inner{s}.{j}.{k}`` (the output of conv ``k`` inside block ``j``, read only by
the next conv of the block). A conv weight ``[out, in, kh, kw]`` is sliced on its output space and its input space,
a BatchNorm on its output space. Where a shortcut is the identity (stage 0 when the embedder is as wide as it and
does not downsample), ``stem`` and ``stage0`` are one space. Torch-free at import.
"""

from __future__ import annotations

import re
from typing import Any

_STEM = re.compile(r"(?:^|\.)embedder\.embedder\.(convolution|normalization)\.(\w+)$")
_BLOCK = re.compile(
    r"(?:^|\.)encoder\.stages\.(\d+)\.layers\.(\d+)\.(shortcut|layer\.(\d+))\.(convolution|normalization)\.(\w+)$"
)
_HEAD = re.compile(r"^classifier\.1\.(weight|bias)$")


def stem_coupled(cfg: Any) -> bool:
    """Whether stage 0's first block adds the stem's output unchanged (identity shortcut)."""
    return cfg.embedding_size == cfg.hidden_sizes[0] and not cfg.downsample_in_first_stage


def _space(cfg: Any, name: str) -> str:
    return "stage0" if name == "stem" and stem_coupled(cfg) else name


def spaces_of(cfg: Any, key: str) -> tuple[str | None, ...] | None:
    """The channel space of each dimension of a parameter or buffer (None: kept whole); None for unknown keys."""
    m = _STEM.search(key)
    if m:
        out = _space(cfg, "stem")
        return (out, None, None, None) if m.group(1) == "convolution" else _bn(m.group(2), out)
    m = _HEAD.search(key)
    if m:
        last = f"stage{len(cfg.hidden_sizes) - 1}"
        return (None, last) if m.group(1) == "weight" else (None,)
    m = _BLOCK.search(key)
    if m is None:
        return None
    s, j, part, k, module, pname = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4), m.group(5), m.group(6)
    stage = f"stage{s}"
    block_in = stage if j > 0 else (_space(cfg, "stem") if s == 0 else f"stage{s - 1}")
    if part == "shortcut":
        out, inp = stage, block_in
    else:
        k = int(k)
        last = 2 if cfg.layer_type == "bottleneck" else 1
        out = stage if k == last else f"inner{s}.{j}.{k}"
        inp = block_in if k == 0 else f"inner{s}.{j}.{k - 1}"
    return (out, inp, None, None) if module == "convolution" else _bn(pname, out)


def _bn(pname: str, space: str) -> tuple[str | None, ...]:
    return () if pname == "num_batches_tracked" else (space,)


def space_sizes(cfg: Any) -> dict[str, int]:
    """Width of every channel space of a config."""
    sizes = {"stem": cfg.embedding_size} if not stem_coupled(cfg) else {}
    for s, (width, depth) in enumerate(zip(cfg.hidden_sizes, cfg.depths, strict=True)):
        sizes[f"stage{s}"] = width
        inner = width // 4 if cfg.layer_type == "bottleneck" else width
        for j in range(depth):
            for k in range(2 if cfg.layer_type == "bottleneck" else 1):
                sizes[f"inner{s}.{j}.{k}"] = inner
    return sizes


def slice_state(cfg: Any, state: dict[str, Any], keep: dict[str, Any]) -> dict[str, Any]:
    """``state`` (keys and shapes of a model of ``cfg``) with every tensor cut to the ``keep`` indices of its spaces."""
    out = {}
    for key, tensor in state.items():
        roles = spaces_of(cfg, key)
        if roles:
            for dim, space in enumerate(roles):
                if space is not None and keep[space].numel() != tensor.shape[dim]:
                    tensor = tensor.index_select(dim, keep[space].to(tensor.device))
        out[key] = tensor
    return out


__all__ = ["slice_state", "space_sizes", "spaces_of", "stem_coupled"]
