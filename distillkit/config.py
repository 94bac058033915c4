"""Frozen, validated configs for every stage, and how they are resolved.

Precedence: CLI flag > ``--config FILE`` > ``--preset NAME`` > defaults. The resolved config is
written into the manifest so every run can be reproduced from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
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


def _parse_sizes(text: Any, flag: str, names: str, what: str, example: str) -> tuple[int, ...] | None:
    """``"A,B,..."`` (or a list from a config file) -> positive ints, one per name in ``names`` (torch-free)."""
    if text is None:
        return None
    parts = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        vals = tuple(int(v) for v in parts)
    except ValueError:
        vals = ()
    n = len(names.split(","))
    if len(vals) != n or min(vals) < 1:
        raise ConfigError(
            f"{flag} must be {'three' if n == 3 else 'two'} positive integers {names} of {what} (got {text!r})",
            hint=f"pass e.g. {flag} {example}",
        )
    return vals


def parse_video_shape(text: Any, flag: str = "--video-shape") -> tuple[int, int, int] | None:
    """``"F,H,W"`` (or ``[F, H, W]`` from a config file) -> ``(F, H, W)``: the latent frames, height and width a
    video denoiser samples (torch-free)."""
    return _parse_sizes(  # type: ignore[return-value]
        text, flag, "FRAMES,HEIGHT,WIDTH", "the latent video", "21,60,104 (Wan's 81 frames at 480x832)"
    )


def parse_image_size(text: Any, flag: str = "--image-size") -> tuple[int, int] | None:
    """``"H,W"`` (or ``[H, W]``) -> ``(H, W)``: the latent height and width a Flux transformer samples (torch-free)."""
    return _parse_sizes(  # type: ignore[return-value]
        text, flag, "HEIGHT,WIDTH", "the latent image", "128,128 (Flux's 1024x1024 pixels)"
    )


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


def _check_ints(config: BaseConfig) -> None:
    for f in fields(config):
        check_int_range(f.name, getattr(config, f.name))


def _check_min_int(name: str, value: Any, lo: int) -> None:
    _check(
        isinstance(value, int) and value >= lo,
        f"{name} must be an integer >= {lo} (got {value})",
        f"pass a {name} of at least {lo}",
    )


@dataclass(frozen=True)
class ModelOptions(BaseConfig):
    """Which teacher, which student, and how they load."""

    teacher: str = ""
    student: str = "layers=2"
    student_init: str = "teacher"
    task: str | None = None
    teacher_dtype: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _check_ints(self)
        _check(bool(self.teacher), "a teacher is required", "pass --teacher MODEL")
        _check(
            self.student_init in STUDENT_INIT,
            f"student init must be one of {', '.join(STUDENT_INIT)}",
            "pass --student-init teacher or random",
        )
        _check(
            self.teacher_dtype in TEACHER_DTYPES,
            f"teacher dtype must be one of {', '.join(TEACHER_DTYPES[1:])}",
            "pass e.g. --teacher-dtype bfloat16",
        )


@dataclass(frozen=True)
class DataOptions(BaseConfig):
    """The training and held-out data, and how it is cut into examples."""

    data: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    eval_split: float = 0.05
    eval_data: str | None = None
    max_length: int = 128
    max_samples: int | None = None
    group_by_length: bool = True  # text batches of similar lengths: less padding (no effect on packed causal LMs)

    def __post_init__(self) -> None:
        _check_ints(self)
        _check(
            0.0 <= self.eval_split <= 0.5,
            f"eval split must be in [0, 0.5] (got {self.eval_split})",
            "pass e.g. --eval-split 0.05",
        )
        _check_min_int("max length", self.max_length, 2)
        _check(self.max_samples is None or self.max_samples > 0, "max samples must be > 0", "omit it to use all data")


@dataclass(frozen=True)
class LossOptions(BaseConfig):
    """The objective: which losses, their weights and their parameters."""

    losses: tuple[str, ...] = ()
    temperature: float = 2.0
    alpha: float = 0.0
    layer_map: str = "uniform"
    jsd_beta: float = 0.5
    skew_lambda: float = 0.1
    taid_t_start: float = 0.4
    taid_t_end: float = 1.0
    # causal-LM logit divergences from hidden states without logits (distillkit.distill.fused)
    fused_loss: str = "auto"

    def __post_init__(self) -> None:
        _check_ints(self)
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
        _check(0.0 <= self.jsd_beta <= 1.0, f"jsd beta must be in [0, 1] (got {self.jsd_beta})", "pass e.g. 0.5")
        _check(
            0.0 <= self.skew_lambda < 1.0, f"skew lambda must be in [0, 1) (got {self.skew_lambda})", "pass e.g. 0.1"
        )
        _check(
            0.0 <= self.taid_t_start <= self.taid_t_end <= 1.0,
            "TAID needs 0 <= t_start <= t_end <= 1",
            "pass e.g. --taid-t-start 0.4 --taid-t-end 1.0",
        )
        for spec in self.losses:
            parse_loss_spec(spec)
        _check(
            self.fused_loss in ("auto", "on", "off"),
            f"fused loss must be auto, on or off (got {self.fused_loss!r})",
            "pass --fused-loss auto, on or off",
        )


@dataclass(frozen=True)
class OptimOptions(BaseConfig):
    """How the student is trained: steps, batches, optimiser, precision and placement."""

    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0
    # keep the student's input token embeddings as initialised: no gradient and no optimiser state for the table
    freeze_embeddings: bool = False
    mixed_precision: str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        _check_ints(self)
        for name, value in (("steps", self.steps), ("batch size", self.batch_size), ("grad accum", self.grad_accum)):
            _check_min_int(name, value, 1)
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
        _check(
            self.mixed_precision in MIXED_PRECISION,
            f"mixed precision must be one of {', '.join(MIXED_PRECISION)} (got {self.mixed_precision})",
            "pass e.g. --mixed-precision bf16",
        )

    def warmup_steps(self) -> int:
        return int(self.warmup) if self.warmup >= 1 else int(round(self.warmup * self.steps))


@dataclass(frozen=True)
class OutputOptions(BaseConfig):
    """What the run reports and keeps on the way: evaluations, checkpoints, logs."""

    eval_every: int = 0
    eval_batches: int = 20
    save_every: int = 0
    log_to: str = "none"

    def __post_init__(self) -> None:
        _check_ints(self)
        _check_min_int("eval batches", self.eval_batches, 1)
        for name, value in (("eval every", self.eval_every), ("save every", self.save_every)):
            _check(
                isinstance(value, int) and value >= 0, f"{name} must be >= 0 (got {value})", "0 means only at the end"
            )
        _check(self.log_to in LOG_TO, f"--log-to must be one of {', '.join(LOG_TO)}", "pass --log-to tensorboard")


@dataclass(frozen=True)
class LLMModeOptions(BaseConfig):
    """Causal-LM modes: on-policy, sequence-level KD, a cached teacher, a teacher with another tokenizer."""

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

    def __post_init__(self) -> None:
        _check_ints(self)
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
            _check_min_int(name, value, 1)
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


@dataclass(frozen=True)
class DiffusionOptions(BaseConfig):
    """Diffusion distillation (``--method``) and the block-sparse attention its students can train with."""

    method: str | None = None
    target_steps: int | None = None
    teacher_steps: int = 32
    guidance_scale: float = 3.0
    labels: str | None = None
    prompts: str | None = None  # text-conditioned pipelines: one prompt per line
    eval_samples: int = 16
    # the student trains with block-sparse attention (mask spec, e.g. "topk:0.25")
    sparse_attention: str | None = None
    sparse_block_size: int = 64
    # video denoisers (WanTransformer3DModel): the latent "FRAMES,HEIGHT,WIDTH" to sample; their config has no size
    video_shape: str | None = None
    # Flux transformers: the latent "HEIGHT,WIDTH" to sample (default FluxPipeline's 128,128); their config has none
    image_size: str | None = None

    def __post_init__(self) -> None:
        _check_ints(self)
        parse_video_shape(self.video_shape)
        parse_image_size(self.image_size)
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


@dataclass(frozen=True)
class DistillConfig(BaseConfig):
    """Everything that defines a distillation run (``distillkit distill``), in typed groups, each validated on its
    own: ``models``, ``data``, ``loss``, ``optim``, ``output``, ``llm`` (causal-LM modes), ``diffusion``.

    Users, presets, config files and manifests spell the settings flat (``lr``, ``max_length``, the flag names
    without ``--``): :meth:`of` / :meth:`from_dict` route each flat key to its group and :meth:`to_dict` writes
    them flat again, so a manifest's ``config`` has the same keys as before the groups existed.
    """

    models: ModelOptions
    data: DataOptions = field(default_factory=DataOptions)
    loss: LossOptions = field(default_factory=LossOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    llm: LLMModeOptions = field(default_factory=LLMModeOptions)
    diffusion: DiffusionOptions = field(default_factory=DiffusionOptions)

    def __post_init__(self) -> None:
        # what no single group can check: settings of two groups that must agree
        _check(
            self.llm.prompt_length is None
            or (isinstance(self.llm.prompt_length, int) and 1 <= self.llm.prompt_length < self.data.max_length),
            f"prompt length must be in [1, max length) (got {self.llm.prompt_length})",
            "omit --prompt-length to use half of --max-length",
        )
        _check(
            self.llm.mode != "on-policy" or self.loss.alpha == 0,
            "--alpha mixes a hard-label loss, which the student's own generations do not have",
            "use --alpha 0 with --mode on-policy",
        )

    @classmethod
    def group_of(cls) -> dict[str, str]:
        """Flat setting name -> the group that holds it."""
        return {f.name: group for group, kind in _GROUP_TYPES.items() for f in fields(kind)}

    @classmethod
    def of(cls, **flat: Any) -> DistillConfig:
        """A config from flat settings: ``DistillConfig.of(teacher="gpt2", lr=3e-4, steps=200)``."""
        return cls.from_dict(flat)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        where = cls.group_of()
        unknown = sorted(set(data) - set(where))
        if unknown:
            raise ConfigError(
                f"unknown DistillConfig key(s): {', '.join(unknown)}", hint=f"valid keys: {', '.join(sorted(where))}"
            )
        parts: dict[str, dict[str, Any]] = {g: {} for g in _GROUP_TYPES}
        for key, value in data.items():
            parts[where[key]][key] = value
        # the teacher is checked first: "a teacher is required" before any other complaint
        groups = {g: _GROUP_TYPES[g].from_dict(parts[g]) for g in _GROUP_TYPES}
        return cls(**groups)

    def to_dict(self) -> dict[str, Any]:
        """The flat settings (the manifest's ``config``)."""
        return {k: v for g in _GROUP_TYPES for k, v in getattr(self, g).to_dict().items()}

    def replace(self, **changes: Any) -> DistillConfig:
        """A copy with flat settings changed: ``cfg.replace(steps=10)``."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def prompt_tokens(self) -> int:
        """Prompt prefix length for on-policy and sequence generation (default: half of max_length)."""
        return self.llm.prompt_length if self.llm.prompt_length is not None else max(1, self.data.max_length // 2)

    def loss_specs(self, task: str) -> list[tuple[str, float]]:
        """The resolved (name, weight) list: the given losses, or the task's default."""
        return [parse_loss_spec(s) for s in (self.loss.losses or DEFAULT_LOSSES.get(task, ("forward_kl",)))]

    def warmup_steps(self) -> int:
        return self.optim.warmup_steps()


_GROUP_TYPES: dict[str, type[BaseConfig]] = {
    "models": ModelOptions,
    "data": DataOptions,
    "loss": LossOptions,
    "optim": OptimOptions,
    "output": OutputOptions,
    "llm": LLMModeOptions,
    "diffusion": DiffusionOptions,
}
