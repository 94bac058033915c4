"""Export a model as a clean HF directory, ONNX or a torch.export program, each with a parity check.

``export_model(cfg, source, out, overwrite)`` is the public verb; it imports torch only when called.
"""

from __future__ import annotations

from typing import Any

from distillkit.export.config import FORMATS, ExportConfig, ExportError

__all__ = ["FORMATS", "ExportConfig", "ExportError", "export_model"]


def export_model(cfg: ExportConfig, source: Any, out: str, overwrite: bool = False) -> dict[str, Any]:
    """Export ``source`` (a path, ``"-"`` or a :class:`distillkit.manifest.Source`) as ``cfg.format``
    into the artifact directory ``out``; returns the manifest as a dict."""
    from distillkit.export.engine import export_model as _export_model

    return _export_model(cfg, source, out, overwrite)
