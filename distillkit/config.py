"""Frozen, validated configs for every stage, and how they are resolved.

Precedence: CLI flag > ``--config FILE`` > ``--preset NAME`` > defaults. The resolved config is
written into the manifest so every run can be reproduced from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from distillkit.errors import ConfigError

T = TypeVar("T", bound="BaseConfig")

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
STUDENT_INIT = ("teacher", "random")
LOG_TO = ("none", "tensorboard")
TEACHER_DTYPES = (None, "float32", "bfloat16", "float16")
DISTILL_MODES = ("offline", "on-policy", "sequence")
CROSS_TOKENIZER = (None, "uld")
DIFFUSION_METHODS = ("progressive", "consistency", "guidance", "reflow", "dmd")
# Below this a logit divergence divides logits by ~0 and is scaled by T^2 ~ 0: the loss and its gradients vanish
# (T = 1e-8 trains nothing), so such a temperature is refused rather than run.
MIN_TEMPERATURE = 0.05
# Every integer setting ends up in torch/numpy (int64); the seed in numpy's legacy RNG (uint32).
INT64_MAX = 2**63 - 1
SEED_MAX = 2**32 - 1


def _toml_load(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}", hint="check the TOML/JSON syntax") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A ``--config`` file: TOML or JSON (a manifest's ``config`` section also works)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist", hint="check the --config path")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"cannot read config file {path}: {e}", hint="check the JSON syntax") from None
        return data.get("config", data) if "stage" in data and "config" in data else data
    return _toml_load(path)


def preset_names() -> list[str]:
    from importlib import resources

    return sorted(p.name[:-5] for p in resources.files("distillkit.presets").iterdir() if p.name.endswith(".toml"))


def read_preset(name: str) -> dict[str, Any]:
    """A preset from ``presets/NAME.toml``; its keys may be grouped under the stage name."""
    from importlib import resources

    res = resources.files("distillkit.presets") / f"{name}.toml"
    if not res.is_file():
        raise ConfigError(f"unknown preset {name!r}", hint=f"choose one of: {', '.join(preset_names())}")
    data = _toml_load(Path(str(res)))
    data.pop("description", None)
    return data


@dataclass(frozen=True)
class BaseConfig:
    """Shared behaviour: dict round trip and layered resolution."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} key(s): {', '.join(unknown)}", hint=f"valid keys: {', '.join(sorted(names))}"
            )
        kwargs = {}
        for f in fields(cls):
            if f.name in data:
                v = data[f.name]
                check_int_range(f.name, v)
                kwargs[f.name] = tuple(v) if isinstance(v, list) else v
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{cls.__name__}: {e}") from None

    @classmethod
    def resolve(
        cls: type[T],
        *,
        preset: str | None = None,
        config_file: str | None = None,
        overrides: dict[str, Any] | None = None,
        section: str | None = None,
    ) -> T:
        """Defaults < preset < config file < flags (``overrides`` holds only the flags given)."""
        merged: dict[str, Any] = {}
        for layer in (read_preset(preset) if preset else {}, read_config_file(config_file) if config_file else {}):
            if section and isinstance(layer.get(section), dict):
                layer = {**{k: v for k, v in layer.items() if not isinstance(v, dict)}, **layer[section]}
            merged.update(layer)
        merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(merged)

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    return v


def check_int_range(name: str, value: Any) -> None:
    """An integer setting must fit int64 (a seed: uint32), so it fails here and not as an overflow deep in torch."""
    if isinstance(value, bool) or not isinstance(value, int):
        return
    flag = "--" + name.replace("_", "-")
    if name == "seed" and not 0 <= value <= SEED_MAX:
        raise ConfigError(f"{flag} {value} is out of range (it must be between 0 and {SEED_MAX})", hint="e.g. --seed 0")
    if not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise ConfigError(
            f"{flag} {value} is out of range: it does not fit in a 64-bit integer", hint=f"pass a sensible {flag}"
        )


def check_temperature(t: float, flag: str = "--temperature") -> None:
    """A distillation temperature at or above :data:`MIN_TEMPERATURE` (a positive, finite one is checked first)."""
    _check(
        not t < MIN_TEMPERATURE,
        f"{flag} {t} is below {MIN_TEMPERATURE}: the logit losses and their gradients vanish (1e-8 gives a loss of 0)",
        f"pass e.g. {flag} 2.0 (1.0 leaves the logits as they are)",
    )


def require(cond: bool, msg: str, hint: str) -> None:
    """Raise ``ConfigError(msg, hint=hint)`` unless ``cond``: the one-line check of every config's ``__post_init__``."""
    if not cond:
        raise ConfigError(msg, hint=hint)


_check = require  # the short name this module's own configs use


def parse_loss_spec(spec: str) -> tuple[str, float]:
    """``name[:weight]`` -> (name, weight)."""
    from distillkit.registry import LOSSES

    name, _, weight = spec.strip().partition(":")
    name = name.strip().replace("-", "_")
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}", hint=f"choose from: {', '.join(LOSSES.names())}")
    if not weight:
        return name, 1.0
    try:
        w = float(weight)
    except ValueError:
        raise ConfigError(
            f"loss weight {weight!r} in {spec!r} is not a number", hint="write NAME or NAME:WEIGHT"
        ) from None
    _check(
        math.isfinite(w) and w > 0, f"loss weight in {spec!r} must be a positive number", "write e.g. forward_kl:1.0"
    )
    return name, w


DEFAULT_LOSSES = {
    "causal-lm": ("forward_kl",),
    "masked-lm": ("forward_kl",),
    "sequence-classification": ("forward_kl",),
    "image-classification": ("forward_kl",),
    "feature-extraction": ("embedding_cosine", "hidden_mse:0.5"),
}


@dataclass(frozen=True)
class DistillConfig(BaseConfig):
    """Everything that defines a distillation run (``distillkit distill``)."""

    teacher: str = ""
    student: str = "layers=2"
    student_init: str = "teacher"
    task: str | None = None
    # data
    data: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    eval_split: float = 0.05
    eval_data: str | None = None
    max_length: int = 128
    max_samples: int | None = None
    # objective
    losses: tuple[str, ...] = ()
    temperature: float = 2.0
    alpha: float = 0.0
    layer_map: str = "uniform"
    jsd_beta: float = 0.5
    skew_lambda: float = 0.1
    taid_t_start: float = 0.4
    taid_t_end: float = 1.0
    # optimisation
    steps: int = 100
    batch_size: int = 8
    group_by_length: bool = True  # text batches of similar lengths: less padding (no effect on packed causal LMs)
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0
    # precision and placement
    mixed_precision: str = "auto"
    teacher_dtype: str | None = None
    device: str = "auto"
    # evaluation, checkpoints, logs
    eval_every: int = 0
    eval_batches: int = 20
    save_every: int = 0
    log_to: str = "none"
    # loading
    allow_pickle: bool = False
    trust_remote_code: bool = False
    # LLM modes (on-policy, sequence, teacher cache, cross-tokenizer)
    mode: str = "offline"
    student_data_fraction: float = 0.5
    gen_temperature: float = 1.0
    max_new_tokens: int = 32
    prompt_length: int | None = None
    sequence_cache: str | None = None
    sequence_shard_size: int = 64
    teacher_cache: str | None = None
    cache_topk: int = 64
    cross_tokenizer: str | None = None
    # diffusion
    method: str | None = None
    target_steps: int | None = None
    teacher_steps: int = 32
    guidance_scale: float = 3.0
    labels: str | None = None
    prompts: str | None = None  # text-conditioned pipelines: one prompt per line
    eval_samples: int = 16
    # sparse attention: the student trains with block-sparse attention (mask spec, e.g. "topk:0.25")
    sparse_attention: str | None = None
    sparse_block_size: int = 64
    # fused loss: causal-LM logit divergences from hidden states without logits (distillkit.distill.fused)
    fused_loss: str = "auto"

    def __post_init__(self) -> None:
        _check(bool(self.teacher), "a teacher is required", "pass --teacher MODEL")
        for f in fields(self):
            check_int_range(f.name, getattr(self, f.name))
        _check(
            self.temperature > 0 and math.isfinite(self.temperature),
            f"temperature must be > 0 (got {self.temperature})",
            "pass e.g. --temperature 2.0",
        )
        check_temperature(self.temperature)
        _check(
            0.0 <= self.alpha <= 1.0,
            f"alpha must be in [0, 1] (got {self.alpha})",
            "alpha is the weight of the hard-label loss; pass e.g. --alpha 0.5",
        )
        _check(
            0.0 <= self.eval_split <= 0.5,
            f"eval split must be in [0, 0.5] (got {self.eval_split})",
            "pass e.g. --eval-split 0.05",
        )
        _check(
            self.student_init in STUDENT_INIT,
            f"student init must be one of {', '.join(STUDENT_INIT)}",
            "pass --student-init teacher or random",
        )
        _check(
            self.mixed_precision in MIXED_PRECISION,
            f"mixed precision must be one of {', '.join(MIXED_PRECISION)} (got {self.mixed_precision})",
            "pass e.g. --mixed-precision bf16",
        )
        _check(
            self.teacher_dtype in TEACHER_DTYPES,
            f"teacher dtype must be one of {', '.join(TEACHER_DTYPES[1:])}",
            "pass e.g. --teacher-dtype bfloat16",
        )
        _check(self.log_to in LOG_TO, f"--log-to must be one of {', '.join(LOG_TO)}", "pass --log-to tensorboard")
        for name, value, lo in (
            ("steps", self.steps, 1),
            ("batch size", self.batch_size, 1),
            ("grad accum", self.grad_accum, 1),
            ("max length", self.max_length, 2),
            ("eval batches", self.eval_batches, 1),
        ):
            _check(
                isinstance(value, int) and value >= lo,
                f"{name} must be an integer >= {lo} (got {value})",
                f"pass a {name} of at least {lo}",
            )
        for name, value in (("eval every", self.eval_every), ("save every", self.save_every)):
            _check(
                isinstance(value, int) and value >= 0, f"{name} must be >= 0 (got {value})", "0 means only at the end"
            )
        _check(
            self.lr > 0 and math.isfinite(self.lr), f"learning rate must be > 0 (got {self.lr})", "pass e.g. --lr 1e-4"
        )
        _check(self.weight_decay >= 0, f"weight decay must be >= 0 (got {self.weight_decay})", "pass e.g. 0.01")
        _check(
            0.0 <= self.warmup < 1.0 or (self.warmup >= 1 and float(self.warmup).is_integer()),
            f"warmup must be a fraction in [0, 1) or a whole number of steps (got {self.warmup})",
            "pass e.g. --warmup 0.05",
        )
        _check(self.max_grad_norm >= 0, "max grad norm must be >= 0", "0 disables clipping")
        _check(0.0 <= self.jsd_beta <= 1.0, f"jsd beta must be in [0, 1] (got {self.jsd_beta})", "pass e.g. 0.5")
        _check(
            0.0 <= self.skew_lambda < 1.0, f"skew lambda must be in [0, 1) (got {self.skew_lambda})", "pass e.g. 0.1"
        )
        _check(
            0.0 <= self.taid_t_start <= self.taid_t_end <= 1.0,
            "TAID needs 0 <= t_start <= t_end <= 1",
            "pass e.g. --taid-t-start 0.4 --taid-t-end 1.0",
        )
        _check(self.max_samples is None or self.max_samples > 0, "max samples must be > 0", "omit it to use all data")
        for spec in self.losses:
            parse_loss_spec(spec)
        self._check_llm_modes()
        self._check_diffusion()
        self._check_sparse_attention()
        _check(
            self.fused_loss in ("auto", "on", "off"),
            f"fused loss must be auto, on or off (got {self.fused_loss!r})",
            "pass --fused-loss auto, on or off",
        )

    def _check_sparse_attention(self) -> None:
        if self.sparse_attention is not None:
            from distillkit.kernels.block_sparse_attention.masks import parse_mask_spec  # torch-free

            parse_mask_spec(self.sparse_attention)
        _check(
            isinstance(self.sparse_block_size, int)
            and self.sparse_block_size >= 16
            and not self.sparse_block_size & (self.sparse_block_size - 1),
            f"sparse block size must be a power of two >= 16 (got {self.sparse_block_size})",
            "pass e.g. --sparse-block-size 64",
        )

    def _check_llm_modes(self) -> None:
        _check(
            self.mode in DISTILL_MODES,
            f"mode must be one of {', '.join(DISTILL_MODES)} (got {self.mode})",
            "pass --mode offline, on-policy or sequence",
        )
        _check(
            0.0 <= self.student_data_fraction <= 1.0,
            f"student data fraction must be in [0, 1] (got {self.student_data_fraction})",
            "it is the probability that a batch is the student's own generations; pass e.g. 0.5",
        )
        _check(
            self.gen_temperature > 0 and math.isfinite(self.gen_temperature),
            f"generation temperature must be > 0 (got {self.gen_temperature})",
            "pass e.g. --gen-temperature 1.0",
        )
        for name, value in (
            ("max new tokens", self.max_new_tokens),
            ("sequence shard size", self.sequence_shard_size),
            ("cache top-k", self.cache_topk),
        ):
            _check(
                isinstance(value, int) and value >= 1,
                f"{name} must be an integer >= 1 (got {value})",
                f"pass a {name} of at least 1",
            )
        _check(
            self.prompt_length is None
            or (isinstance(self.prompt_length, int) and 1 <= self.prompt_length < self.max_length),
            f"prompt length must be in [1, max length) (got {self.prompt_length})",
            "omit --prompt-length to use half of --max-length",
        )
        _check(
            self.cross_tokenizer in CROSS_TOKENIZER,
            f"cross-tokenizer method must be one of {', '.join(CROSS_TOKENIZER[1:])} (got {self.cross_tokenizer})",
            "pass --cross-tokenizer uld",
        )
        _check(
            self.teacher_cache is None or self.mode == "offline",
            f"--teacher-cache replays fixed data and cannot score {self.mode} batches",
            "drop --teacher-cache, or use --mode offline",
        )
        _check(
            self.cross_tokenizer is None or self.mode == "offline",
            f"--cross-tokenizer works with --mode offline only (got {self.mode})",
            "use --mode offline",
        )
        _check(
            self.cross_tokenizer is None or self.teacher_cache is None,
            "--cross-tokenizer needs the live teacher (its logits are on its own tokens)",
            "drop --teacher-cache",
        )
        _check(
            self.mode != "on-policy" or self.alpha == 0,
            "--alpha mixes a hard-label loss, which the student's own generations do not have",
            "use --alpha 0 with --mode on-policy",
        )

    def _check_diffusion(self) -> None:
        _check(
            self.method is None or self.method in DIFFUSION_METHODS,
            f"--method must be one of {', '.join(DIFFUSION_METHODS)} (got {self.method})",
            "pass --method progressive, consistency, guidance, reflow or dmd",
        )
        _check(
            isinstance(self.teacher_steps, int) and self.teacher_steps >= 2,
            f"teacher steps must be an integer >= 2 (got {self.teacher_steps})",
            "pass e.g. --teacher-steps 32",
        )
        _check(
            self.target_steps is None or (isinstance(self.target_steps, int) and self.target_steps >= 1),
            f"target steps must be an integer >= 1 (got {self.target_steps})",
            "pass e.g. --target-steps 4",
        )
        _check(
            self.target_steps is None or self.target_steps < self.teacher_steps,
            f"--target-steps {self.target_steps} is not below the teacher's {self.teacher_steps} steps",
            "pass a --target-steps smaller than --teacher-steps",
        )
        _check(
            self.guidance_scale >= 1 and math.isfinite(self.guidance_scale),
            f"guidance scale must be >= 1 (got {self.guidance_scale})",
            "pass e.g. --guidance-scale 3.0",
        )
        _check(self.eval_samples >= 1, f"eval samples must be >= 1 (got {self.eval_samples})", "pass e.g. 16")

    def prompt_tokens(self) -> int:
        """Prompt prefix length for on-policy and sequence generation (default: half of max_length)."""
        return self.prompt_length if self.prompt_length is not None else max(1, self.max_length // 2)

    def loss_specs(self, task: str) -> list[tuple[str, float]]:
        """The resolved (name, weight) list: the given losses, or the task's default."""
        return [parse_loss_spec(s) for s in (self.losses or DEFAULT_LOSSES.get(task, ("forward_kl",)))]

    def warmup_steps(self) -> int:
        return int(self.warmup) if self.warmup >= 1 else int(round(self.warmup * self.steps))
