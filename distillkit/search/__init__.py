"""Student architecture search without training: ``search_student(cfg, out=...)``.

``import distillkit.search`` stays light (no torch); the engine is imported when the verb runs.
"""

from __future__ import annotations

from typing import Any

from distillkit.search.config import SearchConfig


def search_student(cfg: SearchConfig, teacher_source: Any = None, *, out: str, overwrite: bool = False) -> dict:
    """Search the student that will distil best from ``cfg.teacher``; write it to ``out``; return the manifest."""
    from distillkit.search.engine import search_student as run

    return run(cfg, teacher_source, out=out, overwrite=overwrite)


__all__ = ["SearchConfig", "search_student"]
