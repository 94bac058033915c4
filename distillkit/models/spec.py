"""Student specs: ``"layers=6,hidden=256,heads=4,kv_heads=2,intermediate=1024"`` resolved against a teacher.

A spec names only what changes; every other size is the teacher's. A value is a whole number or a
fraction in (0, 1) of the teacher's size, rounded (``layers=0.5,hidden=0.5,heads=0.5`` halves depth
and width and keeps the head size). Two sizes follow from others:

- ``kv_heads`` (Llama-style only) defaults to the teacher's when that divides ``heads``, else to the
  largest divisor of ``heads`` below it; without grouped-query attention it always equals ``heads``.
- the head size: where the teacher's head size is ``hidden / heads`` (every family here except
  decoupled Llama-style configs such as Qwen3) the student's is ``hidden / heads`` too, so it must
  divide evenly and may not exceed the teacher's (a student head is initialised from one teacher head).
"""

from __future__ import annotations

from typing import Any

from distillkit.errors import ConfigError
from distillkit.models import arch

SPEC_KEYS = ("layers", "hidden", "heads", "kv_heads", "intermediate")
_EXAMPLE = "layers=6,hidden=256,heads=4,intermediate=1024"


def is_spec(text: str) -> bool:
    """Whether a ``--student`` value is a spec (``key=value,...``) rather than a path or hub id."""
    return "=" in text


def teacher_sizes(teacher_config: Any) -> dict[str, int]:
    """The teacher's own sizes under the spec keys."""
    return {
        "layers": arch.num_layers(teacher_config),
        "hidden": arch.hidden_size(teacher_config),
        "heads": arch.num_heads(teacher_config),
        "kv_heads": arch.num_kv_heads(teacher_config),
        "intermediate": arch.intermediate_size(teacher_config),
    }


def head_dim_coupled(teacher_config: Any) -> bool:
    """Whether the teacher's head size is hidden / heads, so that it follows hidden and heads in a student."""
    return arch.head_dim(teacher_config) * arch.num_heads(teacher_config) == arch.hidden_size(teacher_config)


def student_head_dim(teacher_config: Any, spec: dict[str, int]) -> int:
    """Head size of the student described by a resolved ``spec``."""
    if head_dim_coupled(teacher_config):
        return spec["hidden"] // spec["heads"]
    return arch.head_dim(teacher_config)


def _check_family(teacher_config: Any) -> str:
    fam = arch.family(teacher_config)
    if fam not in arch.SUPPORTED_FAMILIES:
        raise ConfigError(
            f"student specs are not supported for {fam} models",
            hint=f"supported families: {', '.join(arch.SUPPORTED_FAMILIES)}; for others pass a student model directory",
        )
    return fam


def _tokens(text: str, teacher: dict[str, int]) -> dict[str, int]:
    given: dict[str, int] = {}
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise ConfigError("the student spec is empty", hint=f"write key=value pairs, e.g. {_EXAMPLE}")
    for part in parts:
        key, sep, raw = part.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw or "=" in raw:
            raise ConfigError(
                f"malformed student spec entry {part!r}",
                hint=f"write key=value pairs separated by commas, e.g. {_EXAMPLE}",
            )
        if key not in SPEC_KEYS:
            raise ConfigError(f"unknown student spec key {key!r}", hint=f"valid keys: {', '.join(SPEC_KEYS)}")
        if key in given:
            raise ConfigError(f"student spec key {key!r} is given twice", hint="give each key once")
        given[key] = _value(key, raw, teacher)
    return given


def _value(key: str, raw: str, teacher: dict[str, int]) -> int:
    """A whole number, or a fraction in (0, 1) of the teacher's size (``layers=0.5`` is half depth)."""
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        frac = float(raw)
    except ValueError:
        frac = float("nan")
    if 0.0 < frac < 1.0:
        return max(1, round(frac * teacher[key]))
    raise ConfigError(
        f"student spec value {key}={raw} is not an integer",
        hint=f"give a whole number, e.g. {key}=4, or a fraction of the teacher's size in (0, 1), e.g. {key}=0.5",
    )


def resolve_spec(given: dict[str, int], teacher_config: Any) -> dict[str, int]:
    """Fill the keys a spec leaves out from the teacher and check the result can be built.

    ``given`` may come from :func:`parse_student_spec` or from code (student search); the result has
    every key in :data:`SPEC_KEYS`. Raises :class:`ConfigError` with a hint on any impossible size.
    """
    fam = _check_family(teacher_config)
    teacher = teacher_sizes(teacher_config)
    for key, value in given.items():
        if key not in SPEC_KEYS:
            raise ConfigError(f"unknown student spec key {key!r}", hint=f"valid keys: {', '.join(SPEC_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"student spec value {key}={value!r} is not an integer", hint=f"e.g. {key}=4")
        if value <= 0:
            raise ConfigError(f"student spec value {key}={value} must be positive", hint=f"use {key}=1 or more")
    gqa = fam == "llama"
    # A resolved spec carries kv_heads == heads for every family, so only a different value is refused here.
    if "kv_heads" in given and not gqa and given["kv_heads"] != given.get("heads", teacher["heads"]):
        _no_gqa(fam)
    for key in SPEC_KEYS:
        if key in given and given[key] > teacher[key]:
            raise ConfigError(
                f"the student's {key}={given[key]} is larger than the teacher's {teacher[key]}",
                hint=f"a student must be at most the teacher's size; use {key}={teacher[key]} or less",
            )
    spec = {key: given.get(key, teacher[key]) for key in SPEC_KEYS}
    if not gqa:
        spec["kv_heads"] = spec["heads"]
    elif "kv_heads" not in given:
        spec["kv_heads"] = max(
            d for d in range(1, min(teacher["kv_heads"], spec["heads"]) + 1) if spec["heads"] % d == 0
        )
    if spec["heads"] % spec["kv_heads"]:
        raise ConfigError(
            f"kv_heads={spec['kv_heads']} does not divide heads={spec['heads']}",
            hint="choose kv_heads so that each key/value head serves the same number of query heads",
        )
    if head_dim_coupled(teacher_config):
        hidden, heads, t_dim = spec["hidden"], spec["heads"], arch.head_dim(teacher_config)
        if hidden % heads:
            raise ConfigError(
                f"heads={heads} does not divide hidden={hidden}", hint=_heads_hint(hidden, heads, t_dim, teacher)
            )
        if hidden // heads > t_dim:
            raise ConfigError(
                f"heads={heads} with hidden={hidden} gives a head size of {hidden // heads}, "
                f"larger than the teacher's {t_dim}",
                hint=_heads_hint(hidden, heads, t_dim, teacher),
            )
    if gqa and student_head_dim(teacher_config, spec) % 2:
        raise ConfigError(
            f"heads={spec['heads']} with hidden={spec['hidden']} gives an odd head size, "
            "which rotary embeddings cannot use",
            hint="choose hidden and heads so that hidden / heads is even",
        )
    return spec


def _no_gqa(fam: str) -> None:
    raise ConfigError(
        f"kv_heads is only for models with grouped-query attention, and {fam} models have none",
        hint="drop kv_heads from the spec; key/value heads follow heads",
    )


def _heads_hint(hidden: int, heads: int, teacher_head_dim: int, teacher: dict[str, int]) -> str:
    fits = [h for h in range(1, teacher["heads"] + 1) if hidden % h == 0 and hidden // h <= teacher_head_dim]
    if fits:
        return f"with hidden={hidden} use heads={fits[0]} (or another of {', '.join(map(str, fits))})"
    sizes = sorted({n for n in (hidden // heads * heads, -(-hidden // heads) * heads) if 0 < n <= teacher["hidden"]})
    return f"use a hidden size divisible by heads={heads}, e.g. " + " or ".join(f"hidden={n}" for n in sizes)


def parse_student_spec(text: str, teacher_config: Any) -> dict[str, int]:
    """Parse ``"layers=6,hidden=256,..."`` into a full spec ``{layers, hidden, heads, kv_heads, intermediate}``.

    Keys left out keep the teacher's value (see the module docstring for kv_heads and the head size).
    Raises :class:`ConfigError` for malformed entries, unknown keys, non-positive or non-integer values,
    sizes above the teacher's, impossible head layouts and families without spec support.
    """
    fam = _check_family(teacher_config)
    given = _tokens(text, teacher_sizes(teacher_config))
    if "kv_heads" in given and fam != "llama":
        _no_gqa(fam)
    return resolve_spec(given, teacher_config)
