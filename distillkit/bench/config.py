"""What ``distillkit bench`` measures: the frozen, validated :class:`BenchConfig` (no torch import here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distillkit.config import BaseConfig, parse_image_size, parse_video_shape
from distillkit.errors import ConfigError
from distillkit.models.packed import QUANT_KERNELS

BENCH_DTYPES = ("auto", "float32", "bfloat16", "float16")
PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def _positive_int(name: str, value: object, lo: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo} (got {value!r})", hint=hint)


@dataclass(frozen=True)
class BenchConfig(BaseConfig):
    """A side-by-side benchmark of ``models`` (and ``against``, the baseline and teacher, when given).

    ``dtype="auto"`` runs in the checkpoint's dtype on CUDA and in float32 on CPU.
    """

    models: tuple[str, ...] = ()
    against: str | None = None
    batch: int = 1
    seq: int = 128
    decode_tokens: int = 16
    repeats: int = 10
    warmup: int = 3
    data: str | None = None
    eval_data: str | None = None  # held-out texts for embedding geometry / causal-LM agreement (PyTorch models)
    text_column: str | None = None
    label_column: str | None = None
    max_samples: int | None = None
    plot: str | None = None
    out: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quant_kernel: str = "auto"  # how distillkit's packed quantized layers multiply (quantize/kernels.py)
    task: str | None = None
    seed: int = 0
    diffusion_steps: int | None = None
    prompts: str | None = None  # text-conditioned diffusers pipelines: one prompt per line
    video_shape: str | None = None  # video denoisers: latent "FRAMES,HEIGHT,WIDTH" (default: the manifests')
    image_size: str | None = None  # Flux transformers: latent "HEIGHT,WIDTH" (default: the manifests')
    allow_pickle: bool = False
    trust_remote_code: bool = False
    command: str = ""

    def __post_init__(self) -> None:
        if not self.models and not self.against:
            raise ConfigError("bench needs at least one model", hint="pass one or more MODEL arguments")
        _positive_int("--batch", self.batch, 1, "pass e.g. --batch 1")
        _positive_int("--seq", self.seq, 2, "pass e.g. --seq 128")
        _positive_int("--decode-tokens", self.decode_tokens, 1, "pass e.g. --decode-tokens 16")
        _positive_int("--repeats", self.repeats, 1, "pass e.g. --repeats 10")
        _positive_int("--warmup", self.warmup, 0, "pass e.g. --warmup 3 (0 disables warm-up)")
        if self.max_samples is not None:
            _positive_int("--max-samples", self.max_samples, 1, "omit it to use the whole file")
        if self.diffusion_steps is not None:
            _positive_int("--diffusion-steps", self.diffusion_steps, 1, "pass e.g. --diffusion-steps 4")
        parse_video_shape(self.video_shape)
        parse_image_size(self.image_size)
        if self.dtype not in BENCH_DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}", hint=f"choose one of: {', '.join(BENCH_DTYPES)}")
        if self.quant_kernel not in QUANT_KERNELS:
            raise ConfigError(
                f"unknown quant kernel {self.quant_kernel!r}", hint=f"choose one of: {', '.join(QUANT_KERNELS)}"
            )
        if self.plot is not None and Path(self.plot).suffix.lower() not in PLOT_SUFFIXES:
            raise ConfigError(
                f"--plot {self.plot} must end in {', '.join(PLOT_SUFFIXES)}", hint="pass e.g. --plot bench.png"
            )
        if self.task is not None:
            from distillkit.models.load import TASKS

            if self.task not in TASKS:
                raise ConfigError(f"unknown task {self.task!r}", hint=f"choose one of: {', '.join(TASKS)}")
