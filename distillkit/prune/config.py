"""What ``distillkit prune`` does: the frozen, validated :class:`PruneConfig` (no torch import here).

A structure amount (``mlp``, ``heads``, ``hidden``, ``layers``) is a ratio in [0, 1) of that structure to remove
or a whole number >= 1 of it to keep (``--mlp 0.3`` removes 30% of every MLP's channels, ``--mlp 1024`` keeps 1024
of them). ``channels`` (ResNet-style CNNs) is a ratio only, applied to every stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distillkit.config import BaseConfig
from distillkit.errors import ConfigError

HEAD_MODES = ("auto", "groups", "per-group")
LAYER_IMPORTANCES = ("angular", "loss")
ROUND_TO = (1, 2, 4, 8, 16, 32, 64, 128)
STRUCTURES = ("mlp", "heads", "hidden", "layers", "channels")


def _is_number(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)


def check_amount(name: str, value: float, *, sizes: bool = True) -> None:
    """A ratio in [0, 1), or (``sizes``) a whole number >= 1 of the structure to keep."""
    ok = _is_number(value) and (0.0 <= value < 1.0 or (sizes and value >= 1 and float(value).is_integer()))
    if not ok:
        what = "a ratio in [0, 1)" + (" or a whole number to keep" if sizes else "")
        raise ConfigError(
            f"--{name} must be {what} (got {value})",
            hint=f"e.g. --{name} 0.3 removes 30%" + (f"; --{name} 8 keeps 8" if sizes else ""),
        )


@dataclass(frozen=True)
class PruneConfig(BaseConfig):
    """Everything that defines a pruning run (``distillkit prune``)."""

    mlp: float = 0.0
    heads: float = 0.0
    hidden: float = 0.0
    layers: float = 0.0
    channels: float = 0.0
    head_mode: str = "auto"
    importance: str = "magnitude"
    layer_importance: str = "angular"
    round_to: int = 1
    target_params: float | None = None
    teacher: str | None = None
    task: str | None = None
    # calibration and evaluation data
    data: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    eval_split: float = 0.05
    max_length: int = 128
    max_samples: int | None = None
    calib_batches: int = 8
    batch_size: int = 8
    eval_batches: int = 20
    # recovery
    recover_steps: int = 0
    recover_lr: float = 1e-4
    seed: int = 0
    device: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        for name in ("mlp", "heads", "hidden", "layers"):
            check_amount(name, getattr(self, name))
        check_amount("channels", self.channels, sizes=False)
        if self.head_mode not in HEAD_MODES:
            raise ConfigError(f"unknown head mode {self.head_mode!r}", hint=f"choose one of: {', '.join(HEAD_MODES)}")
        if self.layer_importance not in LAYER_IMPORTANCES:
            raise ConfigError(
                f"unknown layer importance {self.layer_importance!r}",
                hint=f"choose one of: {', '.join(LAYER_IMPORTANCES)}",
            )
        from distillkit.registry import IMPORTANCES

        IMPORTANCES.get(self.importance)  # raises with the list of names
        if self.round_to not in ROUND_TO or isinstance(self.round_to, bool):
            raise ConfigError(
                f"--round-to must be one of {', '.join(map(str, ROUND_TO))} (got {self.round_to})",
                hint="use 8 for CPUs and most GPUs, 64 for tensor cores",
            )
        if self.target_params is not None and not (_is_number(self.target_params) and self.target_params > 0):
            raise ConfigError(
                f"--target-params must be a positive number (got {self.target_params})",
                hint="a fraction in (0, 1) of the model's parameters, or a parameter count such as 50e6",
            )
        if self.target_params is not None and 1 <= self.target_params and not float(self.target_params).is_integer():
            raise ConfigError(
                f"--target-params {self.target_params} is neither a fraction in (0, 1) nor a whole parameter count",
                hint="e.g. --target-params 0.6 or --target-params 50000000",
            )
        for name, value, lo in (
            ("calib batches", self.calib_batches, 1),
            ("batch size", self.batch_size, 1),
            ("eval batches", self.eval_batches, 1),
            ("max length", self.max_length, 2),
            ("recover steps", self.recover_steps, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"{name} must be an integer >= {lo} (got {value})", hint=f"pass at least {lo}")
        if not 0.0 <= self.eval_split <= 0.5:
            raise ConfigError(f"eval split must be in [0, 0.5] (got {self.eval_split})", hint="e.g. --eval-split 0.05")
        if not (_is_number(self.recover_lr) and self.recover_lr > 0):
            raise ConfigError(f"--recover-lr must be > 0 (got {self.recover_lr})", hint="e.g. --recover-lr 1e-4")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError("max samples must be > 0", hint="omit it to use all data")

    def requested(self) -> list[str]:
        """The structures this run prunes (a non-zero amount)."""
        return [name for name in STRUCTURES if getattr(self, name)]
