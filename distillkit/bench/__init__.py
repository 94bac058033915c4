"""Benchmark models side by side: latency, decode speed, throughput, memory and quality, with ratios.

``run_bench(cfg, sources)`` is the public verb; it imports torch only when called.
"""

from __future__ import annotations

from typing import Any

from distillkit.bench.config import BenchConfig

__all__ = ["BenchConfig", "run_bench"]


def run_bench(cfg: BenchConfig, sources: list[Any] | None = None) -> dict[str, Any]:
    """Benchmark ``sources`` (paths, ``"-"`` or :class:`distillkit.manifest.Source`; default ``cfg.models``)
    against ``cfg.against`` (or the first model); returns the report dict that ``distillkit bench`` prints."""
    from distillkit.bench.engine import run_bench as _run_bench

    return _run_bench(cfg, sources)
