"""Fused linear + distillation loss, chunked over tokens so the logits are never held whole.

``fused_kd_loss`` (student and teacher heads), ``fused_kd_loss_topk`` (a cached teacher top-k), their
float32 specifications ``naive_kd_loss`` / ``naive_kd_loss_topk``, the autograd functions and ``bench_kd_loss``
are loaded lazily, so importing this package pulls in neither torch nor Triton.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "fused_kd_loss": ".fused",
    "fused_kd_loss_terms": ".fused",
    "FusedKDLossFunction": ".fused",
    "fused_kd_loss_topk": ".topk",
    "fused_kd_loss_topk_terms": ".topk",
    "FusedKDLossTopKFunction": ".topk",
    "naive_kd_loss": ".naive",
    "naive_kd_loss_topk": ".naive",
    "DIVERGENCES": ".naive",
    "bench_kd_loss": ".bench",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
