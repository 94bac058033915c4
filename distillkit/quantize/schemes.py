"""The quantization schemes ``--scheme`` accepts (torch-free at import: ``--help`` reads this registry).

A scheme fixes the storage format and its defaults; ``--group-size``, ``--asymmetric``, ``--method`` and the QAT
flags refine it. Three formats exist:

- ``packed``: distillkit's own layout (see :mod:`distillkit.models.packed.format`): integer codes packed into bytes with
  fp16 scales (and uint8 zero-points when asymmetric), loaded by ``distillkit.load``.
- ``bnb``: bitsandbytes serialization through ``transformers``; ``AutoModel*.from_pretrained(dir)`` reloads it.
- ``dynamic``: int8 per-channel weights in the packed layout that the loader turns into torch's dynamically quantized
  Linear (int8 activations computed per call), for CPU inference.
"""

from __future__ import annotations

from dataclasses import dataclass

from distillkit.errors import ConfigError
from distillkit.models.packed import QUANT_KERNELS  # noqa: F401  (the schemes' companion choice, for the CLI)
from distillkit.registry import SCHEMES

VALID_BITS = (2, 3, 4, 8)
VALID_GROUP_SIZES = (0, 32, 64, 128)  # 0 = one scale per output channel


@dataclass(frozen=True)
class Scheme:
    name: str
    format: str  # packed | bnb | dynamic
    bits: int
    group_size: int  # the default; 0 = per channel
    symmetric: bool  # the default
    qat: bool  # can be the target of quantized distillation
    help: str
    reconstruct_steps: int = 0  # default steps per block of block-wise reconstruction after GPTQ


def _scheme(name: str, **kw) -> Scheme:
    s = Scheme(name=name, **kw)
    SCHEMES.register(name, help=kw["help"])(s)
    return s


_scheme(
    "int8",
    format="packed",
    bits=8,
    group_size=0,
    symmetric=True,
    qat=True,
    help="8-bit weights, per-channel symmetric by default",
)
_scheme(
    "int4",
    format="packed",
    bits=4,
    group_size=128,
    symmetric=False,
    qat=True,
    help="4-bit weights, two per byte, group 128 asymmetric by default",
)
_scheme(
    "int3",
    format="packed",
    bits=3,
    group_size=128,
    symmetric=False,
    qat=True,
    help="3-bit weights, eight per three bytes, group 128 asymmetric, block-wise reconstruction by default",
    reconstruct_steps=400,
)
_scheme(
    "int2",
    format="packed",
    bits=2,
    group_size=32,
    symmetric=False,
    qat=True,
    help="2-bit weights, four per byte, group 32 asymmetric, block-wise reconstruction by default",
    reconstruct_steps=400,
)
_scheme(
    "dynamic-int8",
    format="dynamic",
    bits=8,
    group_size=0,
    symmetric=True,
    qat=False,
    help="int8 per-channel weights run as torch dynamic int8 Linear (activations quantized per call; CPU)",
)
_scheme(
    "llm-int8",
    format="bnb",
    bits=8,
    group_size=0,
    symmetric=True,
    qat=False,
    help="bitsandbytes LLM.int8 (outliers in fp16), loadable with from_pretrained",
)
_scheme(
    "nf4",
    format="bnb",
    bits=4,
    group_size=64,
    symmetric=True,
    qat=False,
    help="bitsandbytes 4-bit NormalFloat (block 64), loadable with from_pretrained",
)
_scheme(
    "fp4",
    format="bnb",
    bits=4,
    group_size=64,
    symmetric=True,
    qat=False,
    help="bitsandbytes 4-bit float (block 64), loadable with from_pretrained",
)


def get_scheme(name: str) -> Scheme:
    return SCHEMES.get(name).obj


def check_bits(bits: int) -> None:
    if bits not in VALID_BITS:
        raise ConfigError(
            f"{bits}-bit weights are not supported", hint=f"valid bits: {', '.join(map(str, VALID_BITS))}"
        )


def check_group_size(group_size: int) -> None:
    if group_size not in VALID_GROUP_SIZES:
        raise ConfigError(
            f"group size {group_size} is not supported",
            hint="valid group sizes: 32, 64, 128, or 0 for one scale per output channel",
        )
