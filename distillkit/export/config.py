"""What ``distillkit export`` does: the frozen, validated :class:`ExportConfig` (no torch import here)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from distillkit.config import BaseConfig
from distillkit.errors import ConfigError, DistillkitError

FORMATS = ("hf", "onnx", "torch-export")
EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")
MIN_OPSET = 7
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class ExportError(DistillkitError):
    """A model the chosen format cannot hold, or an export that fails its parity check."""


def parse_size(text: str | int) -> int:
    """``"2GB"`` / ``"500MiB"`` / ``1000000`` -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise ConfigError(f"cannot read the size {text!r}", hint="write e.g. 2GB, 500MB or 1GiB")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])
    if value <= 0:
        raise ConfigError(f"size must be positive (got {text!r})", hint="write e.g. 2GB")
    return value


@dataclass(frozen=True)
class ExportConfig(BaseConfig):
    """How a model is exported.

    ``dtype="auto"`` keeps the checkpoint's dtype for ``hf`` and uses float32 for ``onnx`` and
    ``torch-export`` (whose parity is checked in that dtype against ``atol``).
    """

    format: str = "hf"
    atol: float = 1e-4
    opset: int | None = None
    max_shard_size: str = "2GB"
    dtype: str = "auto"
    task: str | None = None
    seed: int = 0
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"unknown export format {self.format!r}", hint=f"choose one of: {', '.join(FORMATS)}")
        if (
            isinstance(self.atol, bool)
            or not isinstance(self.atol, int | float)
            or not (math.isfinite(self.atol) and self.atol > 0)
        ):
            raise ConfigError(f"--atol must be a positive number (got {self.atol})", hint="pass e.g. --atol 1e-4")
        if self.opset is not None:
            if self.format != "onnx":
                raise ConfigError("--opset applies only to --format onnx", hint="drop --opset or pass --format onnx")
            if isinstance(self.opset, bool) or not isinstance(self.opset, int) or self.opset < MIN_OPSET:
                raise ConfigError(
                    f"--opset must be an integer >= {MIN_OPSET} (got {self.opset})",
                    hint="omit it to use the exporter's default opset",
                )
        parse_size(self.max_shard_size)
        if self.dtype not in EXPORT_DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}", hint=f"choose one of: {', '.join(EXPORT_DTYPES)}")
        if self.task is not None:
            from distillkit.models.load import TASKS

            if self.task not in TASKS:
                raise ConfigError(f"unknown task {self.task!r}", hint=f"choose one of: {', '.join(TASKS)}")
