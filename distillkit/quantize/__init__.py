"""Post-training quantization and quantized distillation, with real low-bit artifacts.

``quantize_model(cfg, source, out, overwrite)`` is the public verb; it imports torch only when called.
``distillkit.load(dir)`` reloads what it writes.
"""

from __future__ import annotations

from typing import Any

from distillkit.quantize.config import ACT_BITS, METHODS, QUANTIZERS, QuantizeConfig

__all__ = ["ACT_BITS", "METHODS", "QUANTIZERS", "QuantizeConfig", "quantize_model"]


def quantize_model(cfg: QuantizeConfig, source: Any, out: str, overwrite: bool = False) -> dict[str, Any]:
    """Quantize ``source`` (a path, ``"-"`` or a :class:`distillkit.manifest.Source`) as ``cfg`` says into the
    artifact directory ``out``; returns the manifest as a dict."""
    from distillkit.quantize.engine import quantize_model as _quantize_model

    return _quantize_model(cfg, source, out, overwrite)
