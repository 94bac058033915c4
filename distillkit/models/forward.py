"""Feeding batches to models: which batch keys a model takes, and where they go."""

from __future__ import annotations

import inspect
from typing import Any

_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "position_ids")


def model_inputs(model: Any, batch: dict[str, Any], device: Any = None) -> dict[str, Any]:
    """The subset of ``batch`` that ``model.forward`` accepts (labels excluded), moved to ``device``."""
    params = forward_params(type(model))
    out = {}
    for k in _INPUT_KEYS:
        if k in batch and (k in params or "kwargs" in params):
            v = batch[k]
            out[k] = v.to(device) if device is not None and hasattr(v, "to") else v
    return out


_CACHE: dict[type, frozenset[str]] = {}


def forward_params(cls: type) -> frozenset[str]:
    """The parameter names of ``cls.forward`` (cached per class)."""
    if cls not in _CACHE:
        _CACHE[cls] = frozenset(inspect.signature(cls.forward).parameters)
    return _CACHE[cls]


def to_device(batch: dict[str, Any], device: Any, *, non_blocking: bool = False) -> dict[str, Any]:
    """``batch`` with every value that has ``.to`` moved to ``device``; ``non_blocking`` is passed on when set (the
    distill loop's copies from pinned memory)."""
    kwargs = {"non_blocking": True} if non_blocking else {}
    return {k: (v.to(device, **kwargs) if hasattr(v, "to") else v) for k, v in batch.items()}
