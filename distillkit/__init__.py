"""distillkit: model compression from one CLI.

``import distillkit`` stays light (no torch); the public verbs import their engines when called.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "distill", "load"]


def distill(config: Any, *, out: str, overwrite: bool = False) -> dict:
    """Distil a teacher into a student as described by a :class:`distillkit.config.DistillConfig`.

    Writes the artifact directory ``out`` atomically and returns its manifest as a dict.
    """
    from distillkit.distill.engine import run_distill

    return run_distill(config, out=out, overwrite=overwrite)


def load(source: str, **kwargs: Any):
    """Load any model or distillkit artifact; returns a :class:`distillkit.models.LoadedModel`.

    A packed quantized artifact runs with the fastest exact-enough product this machine has
    (``quant_kernel="auto"``, see :mod:`distillkit.models.packed.kernels`); pass ``quant_kernel="dequant"`` (or ``"cached"``,
    the same outputs at float speed and memory) for the file's values computed in the model dtype."""
    from distillkit.models import load_model

    kwargs.setdefault("quant_kernel", "auto")
    return load_model(source, **kwargs)
