"""What ``distillkit quantize`` does: the frozen, validated :class:`QuantizeConfig` (no torch import here)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from distillkit.config import BaseConfig, check_temperature, parse_loss_spec, require
from distillkit.errors import ConfigError

METHODS = ("rtn", "gptq")
QUANTIZERS = ("ste", "lsq", "dq")
ACT_BITS = (4, 8)


@dataclass(frozen=True)
class QuantizeConfig(BaseConfig):
    """Everything that defines a quantization run (``distillkit quantize``)."""

    scheme: str = "int4"
    group_size: int | None = None  # None: the scheme's default; 0 = per output channel
    symmetric: bool | None = None  # None: the scheme's default
    method: str | None = None  # None: gptq for packed schemes
    skip: tuple[str, ...] = ()
    embeddings: bool = True
    embedding_bits: int | None = None  # None: 8 for int4/int3/int2 (embedding tables are the most sensitive)
    damp: float = 0.1
    act_order: bool = True  # GPTQ: columns by decreasing Hessian diagonal, static groups
    clip_search: bool = True  # per-group range shrink minimising the (Hessian-weighted) quantization error
    reconstruct_steps: int | None = None  # block-wise reconstruction after GPTQ; None: the scheme's default
    reconstruct_lr: float = 3e-4
    sensitive_fraction: float = 0.0  # mixed precision: this fraction of the Linear weights, the most sensitive ...
    sensitive_bits: int | None = None  # ... at these bits; None: the next wider of 3, 4, 8 bits
    task: str | None = None
    # quantized distillation
    teacher: str | None = None
    qat_steps: int = 0
    qat_lr: float = 1e-4
    quantizer: str = "lsq"
    act_bits: int | None = None
    losses: tuple[str, ...] = ()
    temperature: float = 2.0
    # data
    data: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    eval_split: float = 0.05
    max_length: int = 128
    max_samples: int | None = None
    calib_batches: int | None = None  # None: 64 with block-wise reconstruction (it learns from them), else 16
    batch_size: int = 8
    eval_batches: int = 20
    seed: int = 0
    device: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        from distillkit.quantize.schemes import SCHEMES, VALID_BITS, check_bits, check_group_size

        m = re.fullmatch(r"int(\d+)", self.scheme)
        if m and self.scheme not in SCHEMES:
            check_bits(int(m.group(1)))
        scheme = SCHEMES.get(self.scheme).obj
        if self.group_size is not None:
            check_group_size(self.group_size)
        if self.embedding_bits is not None:
            check_bits(self.embedding_bits)
            if scheme.format != "packed":
                raise ConfigError(
                    "--embedding-bits applies to the packed schemes", hint="use --scheme int8, int4, int3 or int2"
                )
        if self.act_bits is not None and self.act_bits not in ACT_BITS:
            raise ConfigError(
                f"{self.act_bits}-bit activations are not supported",
                hint=f"valid --act-bits: {', '.join(map(str, ACT_BITS))}",
            )
        if self.method is not None and self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}", hint=f"choose one of: {', '.join(METHODS)}")
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"unknown quantizer {self.quantizer!r}", hint=f"choose one of: {', '.join(QUANTIZERS)}")
        if scheme.format == "bnb":
            for flag, given in (
                ("--group-size", self.group_size is not None),
                ("--symmetric/--asymmetric", self.symmetric is not None),
                ("--method", self.method is not None),
                ("--act-bits", self.act_bits is not None),
                ("--skip", bool(self.skip)),  # bitsandbytes converts every Linear; a --skip would be ignored
            ):
                if given:
                    raise ConfigError(
                        f"{flag} does not apply to the bitsandbytes scheme {self.scheme}",
                        hint="bitsandbytes fixes its own layout; drop the flag or use --scheme int8/int4/int3/int2",
                    )
        if scheme.format == "dynamic":
            if (self.group_size or 0) != 0 or self.symmetric is False:
                raise ConfigError(
                    "dynamic-int8 uses per-channel symmetric int8 weights", hint="drop --group-size/--asymmetric"
                )
        if self.qat_steps:
            require(self.qat_steps > 0, "--qat-steps must be positive", "give a number of steps, e.g. 300")
            if not scheme.qat:
                raise ConfigError(
                    f"quantized distillation cannot target the {self.scheme} scheme",
                    hint="use --scheme int8, int4, int3 or int2 with --qat-steps",
                )
            if not self.teacher:
                raise ConfigError(
                    "quantized distillation (--qat-steps) needs a full-precision teacher",
                    hint="pass --teacher DIR (it can be the unquantized model itself)",
                )
            require(self.qat_lr > 0, "--qat-lr must be positive", "e.g. 1e-4")
        elif self.act_bits is not None:
            raise ConfigError(
                "--act-bits is trained with quantized distillation", hint="add --qat-steps N and --teacher DIR"
            )
        if self.quantizer == "dq" and scheme.format != "packed":
            raise ConfigError(
                "--quantizer dq stores a codebook, which only the packed schemes hold", hint="use int4, int3 or int2"
            )
        for spec in self.losses:
            parse_loss_spec(spec)
        require(
            self.temperature > 0 and self.temperature != float("inf"),
            f"--temperature must be > 0 (got {self.temperature})",
            "pass e.g. --temperature 2.0",
        )
        check_temperature(self.temperature)
        require(self.damp > 0, "--damp must be positive", "e.g. 0.1 (the default) or 0.01")
        if self.reconstruct_steps is not None:
            require(self.reconstruct_steps >= 0, "--reconstruct-steps must be >= 0", "0 turns reconstruction off")
            if self.reconstruct_steps and scheme.format != "packed":
                raise ConfigError(
                    f"block-wise reconstruction trains distillkit's packed codes, not the {self.scheme} scheme",
                    hint="use --scheme int8, int4, int3 or int2, or drop --reconstruct-steps",
                )
            if self.reconstruct_steps and self.method == "rtn":
                raise ConfigError(
                    "block-wise reconstruction continues from GPTQ", hint="drop --method rtn or --reconstruct-steps"
                )
        require(
            0 <= self.sensitive_fraction < 1,
            f"--sensitive-fraction must be in [0, 1) (got {self.sensitive_fraction})",
            "e.g. 0.1 to give the most sensitive tenth of the weights more bits; 0 turns it off",
        )
        if self.sensitive_bits is not None:
            check_bits(self.sensitive_bits)
            require(
                self.sensitive_fraction > 0,
                "--sensitive-bits sets the bits of the layers --sensitive-fraction promotes, and none are",
                "add --sensitive-fraction, e.g. 0.1",
            )
        if self.sensitive_fraction:
            if scheme.format != "packed":
                raise ConfigError(
                    f"mixed precision stores per-layer bits in distillkit's packed format, not the {self.scheme} scheme",
                    hint="use --scheme int4, int3 or int2, or drop --sensitive-fraction/--sensitive-bits",
                )
            wider = [b for b in VALID_BITS if b > scheme.bits]
            if not wider:
                raise ConfigError(
                    f"{self.scheme} has no wider bits to promote layers to",
                    hint="use --scheme int4, int3 or int2, or drop --sensitive-fraction",
                )
            wide = self.resolved()["sensitive_bits"]
            require(
                wide > scheme.bits,
                f"--sensitive-bits {wide} is not wider than the scheme's {scheme.bits} bits",
                f"pick one of {', '.join(map(str, wider))}",
            )
        require(self.reconstruct_lr > 0, "--reconstruct-lr must be positive", "e.g. 3e-4 (the default)")
        require(0 <= self.eval_split <= 0.5, "--eval-split must be in [0, 0.5]", "e.g. 0.05")
        if self.calib_batches is None:
            object.__setattr__(self, "calib_batches", 64 if self.resolved()["reconstruct_steps"] else 16)
        for name in ("calib_batches", "batch_size", "max_length"):
            require(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive", "give a positive number")
        require(self.eval_batches >= 0, "--eval-batches must be >= 0", "0 skips the quality measurement")

    # resolved defaults ------------------------------------------------------------------------------------------
    def resolved(self) -> dict:
        from distillkit.quantize.schemes import VALID_BITS, get_scheme

        s = get_scheme(self.scheme)
        group = s.group_size if self.group_size is None else self.group_size
        sym = s.symmetric if self.symmetric is None else self.symmetric
        method = self.method or ("gptq" if s.format in ("packed", "dynamic") else "bnb")
        emb = self.embedding_bits
        if emb is None:
            emb = 8 if s.format == "packed" and s.bits < 8 else s.bits
        wide = self.sensitive_bits
        if wide is None:
            wide = next((b for b in VALID_BITS if b > s.bits), s.bits)
        recon = self.reconstruct_steps
        if recon is None:
            recon = s.reconstruct_steps if method == "gptq" else 0
        return {
            "format": s.format,
            "bits": s.bits,
            "group_size": group,
            "symmetric": sym,
            "method": method,
            "embedding_bits": emb,
            "reconstruct_steps": recon,
            "sensitive_fraction": self.sensitive_fraction,
            "sensitive_bits": wide,
        }
