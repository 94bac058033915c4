"""Structured pruning: remove MLP channels, attention heads, hidden channels, whole layers or CNN channels.

``prune_model(cfg, source, out, overwrite)`` is the public verb; it imports torch only when called.
"""

from __future__ import annotations

from typing import Any

from distillkit.prune.config import HEAD_MODES, LAYER_IMPORTANCES, ROUND_TO, STRUCTURES, PruneConfig

__all__ = ["HEAD_MODES", "LAYER_IMPORTANCES", "ROUND_TO", "STRUCTURES", "PruneConfig", "prune_model"]


def prune_model(cfg: PruneConfig, source: Any, out: str, overwrite: bool = False) -> dict[str, Any]:
    """Prune ``source`` (a path, ``"-"`` or a :class:`distillkit.manifest.Source`) as ``cfg`` says into the artifact
    directory ``out``; returns the manifest as a dict."""
    from distillkit.prune.engine import prune_model as _prune_model

    return _prune_model(cfg, source, out, overwrite)
