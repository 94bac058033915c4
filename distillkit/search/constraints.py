"""``--space`` parsing, shared by every search space: fix or bound the values of each dimension.

``layers=2..6,hidden=128|256,heads=4``: a range keeps the derived values inside it, ``a|b`` lists exact values, a
single value fixes the dimension; fractions in (0, 1) are fractions of the teacher's size, as in student specs.
Torch-free.
"""

from __future__ import annotations

from distillkit.errors import ConfigError

SPACE_EXAMPLE = "layers=2..6,hidden=128|256,heads=4"


def _number(teacher: dict[str, int], key: str, raw: str) -> int:
    raw = raw.strip()
    try:
        value = int(raw)
    except ValueError:
        try:
            frac = float(raw)
        except ValueError:
            frac = float("nan")
        if not 0.0 < frac < 1.0:
            raise ConfigError(
                f"--space value {key}={raw} is not a whole number or a fraction in (0, 1)",
                hint=f"write e.g. {SPACE_EXAMPLE}",
            ) from None
        value = max(1, round(frac * teacher[key]))
    if value <= 0:
        raise ConfigError(f"--space value {key}={raw} must be positive", hint=f"write e.g. {SPACE_EXAMPLE}")
    if value > teacher[key]:
        raise ConfigError(
            f"--space allows {key}={value}, larger than the teacher's {teacher[key]}",
            hint=f"a student is at most the teacher's size; use {key} values up to {teacher[key]}",
        )
    return value


def constrain_values(
    values: dict[str, list[int]],
    teacher: dict[str, int],
    keys: tuple[str, ...],
    space: str,
    *,
    gqa: bool = False,
    family: str = "",
) -> None:
    """Narrow ``values`` (dimension -> sorted allowed values) in place to what ``space`` allows.

    ``keys`` are the dimensions ``--space`` may name; ``teacher`` holds the teacher's size of each (the upper
    bound, and what fractions are fractions of). ``kv_heads`` is refused unless ``gqa``. ConfigError on bad input.
    """
    seen = set()
    for part in (p.strip() for p in space.split(",")):
        if not part:
            continue
        key, sep, expr = part.partition("=")
        key, expr = key.strip(), expr.strip()
        if not sep or not expr:
            raise ConfigError(f"malformed --space entry {part!r}", hint=f"write key=values, e.g. {SPACE_EXAMPLE}")
        if key not in keys:
            raise ConfigError(f"unknown --space key {key!r}", hint=f"valid keys: {', '.join(keys)}")
        if key in seen:
            raise ConfigError(f"--space key {key!r} is given twice", hint="give each key once")
        seen.add(key)
        if key == "kv_heads" and not gqa:
            raise ConfigError(
                f"kv_heads is only searched for models with grouped-query attention, and {family} has none",
                hint="drop kv_heads from --space; key/value heads follow heads",
            )
        if ".." in expr:
            lo_raw, _, hi_raw = expr.partition("..")
            lo, hi = _number(teacher, key, lo_raw), _number(teacher, key, hi_raw)
            if lo > hi:
                raise ConfigError(f"--space range {key}={expr} is empty", hint="write low..high")
            kept = [v for v in values[key] if lo <= v <= hi]
            if not kept:
                raise ConfigError(
                    f"--space range {key}={expr} holds none of the searched values "
                    f"({', '.join(map(str, values[key]))})",
                    hint=f"widen the range, or list exact values as {key}=a|b",
                )
            values[key] = kept
        else:
            values[key] = sorted({_number(teacher, key, v) for v in expr.split("|")})
