"""The space of students a teacher can be searched over, derived from its config, and ``--space`` parsing.

A candidate is a student spec ``{layers, hidden, heads, kv_heads, intermediate}`` (see
:mod:`distillkit.models.spec`). Each dimension has a finite, sorted list of allowed values:

- ``layers``: every depth from 1 to the teacher's;
- ``hidden`` and ``intermediate``: eighths of the teacher's width (1/8, 2/8, ... 8/8), rounded to a
  multiple of 8 when the teacher's width is;
- ``heads``: 1 to the teacher's; ``kv_heads`` (Llama-style grouped-query attention only): 1 to the teacher's.

Not every combination is a model: the head size ``hidden / heads`` must be whole, at most the teacher's
(and even for rotary embeddings), and ``kv_heads`` must divide ``heads``. :meth:`SearchSpace.repair` moves
``heads`` and then ``kv_heads`` to the nearest allowed value that fits, so sampling, mutation and crossover
only ever produce candidates that :func:`~distillkit.models.spec.resolve_spec` accepts.

``--space`` fixes or bounds dimensions: ``layers=2..6,hidden=128|256,heads=4`` (a range keeps the derived
values inside it, ``a|b`` lists exact values, a single value fixes the dimension; fractions in (0, 1) are
fractions of the teacher's size, as in student specs).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from distillkit.errors import ConfigError
from distillkit.models import arch
from distillkit.models.spec import SPEC_KEYS, head_dim_coupled, resolve_spec, teacher_sizes
from distillkit.search.constraints import constrain_values

DIMS = SPEC_KEYS
WIDTH_STEPS = 8
FAMILY_NAMES = {
    "llama": "Llama-style (Llama, Mistral, Qwen2, Qwen3)",
    "gpt2": "GPT-2",
    "bert": "BERT-style (BERT, RoBERTa, XLM-R, MiniLM)",
    "vit": "ViT",
    "resnet": "ResNet (stage depths and widths)",
}
SEARCHABLE_FAMILIES = (*arch.SUPPORTED_FAMILIES, "resnet")


def check_searchable(teacher_config: Any) -> str:
    """The teacher's family, or a ConfigError naming the families that have a search space."""
    fam = arch.family(teacher_config)
    if fam not in SEARCHABLE_FAMILIES:
        supported = "; ".join(FAMILY_NAMES.get(f, f) for f in SEARCHABLE_FAMILIES)
        raise ConfigError(
            f"there is no student search space for {fam} models",
            hint=f"search-student supports: {supported}",
        )
    return fam


def spec_key(spec: dict[str, int]) -> tuple[int, ...]:
    if "layers" not in spec:  # a CNN stage spec (depth0.., width0..): its own keys in a fixed order
        return tuple(int(v) for _, v in sorted(spec.items()))
    return tuple(int(spec[k]) for k in DIMS)


def spec_string(spec: dict[str, int], gqa: bool = True) -> str:
    """``layers=3,hidden=256,heads=4,kv_heads=2,intermediate=1024``: what ``distill --student`` takes.

    ``kv_heads`` is written only for grouped-query attention families (``gqa``); the others refuse it.
    """
    return ",".join(f"{k}={spec[k]}" for k in DIMS if k != "kv_heads" or gqa)


def spec_short(spec: dict[str, int]) -> str:
    """``L3 H256 A4/2 I1024``: layers, hidden, query/key-value heads, MLP width (for tables)."""
    if "layers" not in spec:
        from distillkit.search.cnn import spec_short as cnn_short

        return cnn_short(spec)
    return f"L{spec['layers']} H{spec['hidden']} A{spec['heads']}/{spec['kv_heads']} I{spec['intermediate']}"


def _widths(teacher: int) -> list[int]:
    step = 8 if teacher % 8 == 0 and teacher >= 8 * WIDTH_STEPS else 1
    out = set()
    for k in range(1, WIDTH_STEPS + 1):
        out.add(max(step, round(teacher * k / WIDTH_STEPS / step) * step))
    return sorted(v for v in out if v <= teacher)


@dataclass
class SearchSpace:
    """Allowed values per dimension plus the rules that tie heads to the hidden size."""

    family: str
    teacher: dict[str, int]
    values: dict[str, list[int]]
    gqa: bool
    coupled: bool
    teacher_head_dim: int
    teacher_config: Any = field(repr=False, default=None)
    KEYS = DIMS  # what --space may name

    @classmethod
    def from_teacher(cls, teacher_config: Any, space: str | None = None) -> Any:
        """The teacher's space: this class for transformers, a :class:`~distillkit.search.cnn.ResNetSpace` for ResNets."""
        fam = check_searchable(teacher_config)
        if fam == "resnet":
            from distillkit.search.cnn import ResNetSpace

            return ResNetSpace.from_teacher(teacher_config, space)
        teacher = teacher_sizes(teacher_config)
        gqa = fam == "llama"
        values = {
            "layers": list(range(1, teacher["layers"] + 1)),
            "hidden": _widths(teacher["hidden"]),
            "heads": list(range(1, teacher["heads"] + 1)),
            "kv_heads": list(range(1, teacher["kv_heads"] + 1)) if gqa else [],
            "intermediate": _widths(teacher["intermediate"]),
        }
        out = cls(
            fam, teacher, values, gqa, head_dim_coupled(teacher_config), arch.head_dim(teacher_config), teacher_config
        )
        if space:
            out._constrain(space)
        if not any(out.heads_for(h) for h in out.values["hidden"]):
            raise ConfigError(
                f"--space {space!r} leaves no hidden size that the allowed head counts divide",
                hint=f"with a head size of at most {out.teacher_head_dim}, allow more heads or other hidden sizes",
            )
        return out

    # --- --space ------------------------------------------------------------------------------------------------

    def _constrain(self, space: str) -> None:
        constrain_values(self.values, self.teacher, self.KEYS, space, gqa=self.gqa, family=self.family)

    # --- validity -----------------------------------------------------------------------------------------------

    def heads_for(self, hidden: int) -> list[int]:
        """Allowed head counts that give a valid head size with ``hidden``."""
        if not self.coupled:
            return list(self.values["heads"])
        out = []
        for h in self.values["heads"]:
            if hidden % h or hidden // h > self.teacher_head_dim:
                continue
            if self.gqa and (hidden // h) % 2:
                continue
            out.append(h)
        return out

    def kv_for(self, heads: int) -> list[int]:
        if not self.gqa:
            return [heads]
        return [kv for kv in self.values["kv_heads"] if heads % kv == 0]

    def repair(self, spec: dict[str, int]) -> dict[str, int] | None:
        """Move heads, then kv_heads, to the nearest allowed value that fits (the smaller on ties); None if none."""
        spec = dict(spec)
        heads = self.heads_for(spec["hidden"])
        if not heads:
            return None
        spec["heads"] = min(heads, key=lambda h: (abs(h - spec["heads"]), h))
        kvs = self.kv_for(spec["heads"])
        if not kvs:
            return None
        spec["kv_heads"] = min(kvs, key=lambda k: (abs(k - spec.get("kv_heads", k)), k))
        return spec

    def spec_string(self, spec: dict[str, int]) -> str:
        return spec_string(spec, self.gqa)

    def validate(self, spec: dict[str, int]) -> dict[str, int]:
        """The resolved spec; ConfigError if the student builder would refuse it."""
        return resolve_spec(dict(spec), self.teacher_config)

    # --- sampling and variation -----------------------------------------------------------------------------

    def _mutable(self) -> list[str]:
        return [k for k in DIMS if len(self.values[k]) > 1 and (k != "kv_heads" or self.gqa)]

    def sample(self, rng: random.Random) -> dict[str, int]:
        """A uniformly drawn valid candidate (dimensions drawn independently, then repaired)."""
        for _ in range(1000):
            spec = {k: rng.choice(self.values[k]) for k in DIMS if k != "kv_heads" or self.gqa}
            spec.setdefault("kv_heads", spec["heads"])
            fixed = self.repair(spec)
            if fixed is not None:
                return fixed
        raise ConfigError("the search space holds no valid candidate", hint="loosen --space")  # pragma: no cover

    def mutate(self, spec: dict[str, int], rng: random.Random) -> dict[str, int]:
        """Change one dimension to another allowed value, then repair the heads."""
        dims = self._mutable()
        for _ in range(100):
            if not dims:
                return dict(spec)
            key = rng.choice(dims)
            child = dict(spec)
            child[key] = rng.choice([v for v in self.values[key] if v != spec[key]])
            fixed = self.repair(child)
            if fixed is not None and spec_key(fixed) != spec_key(spec):
                return fixed
        return dict(spec)

    def crossover(self, a: dict[str, int], b: dict[str, int], rng: random.Random) -> dict[str, int]:
        """Each dimension from one parent or the other (uniform crossover), then repaired."""
        child = {k: (a if rng.random() < 0.5 else b)[k] for k in DIMS}
        return self.repair(child) or dict(a)

    def smallest(self, count: Any) -> dict[str, int]:
        """The candidate with the fewest parameters (``count(spec) -> int``)."""
        base = {k: self.values[k][0] for k in ("layers", "intermediate")}
        best: tuple[int, dict[str, int]] | None = None
        for hidden in self.values["hidden"]:
            for heads in self.heads_for(hidden):
                for kv in self.kv_for(heads):
                    spec = {**base, "hidden": hidden, "heads": heads, "kv_heads": kv}
                    n = count(spec)
                    if best is None or n < best[0]:
                        best = (n, spec)
            if best is not None and hidden > best[1]["hidden"]:
                break  # widths only grow the model once one fits
        assert best is not None
        return best[1]

    def size(self) -> int:
        """How many distinct valid candidates the space holds."""
        n = 0
        for hidden in self.values["hidden"]:
            n += sum(len(self.kv_for(h)) for h in self.heads_for(hidden))
        return n * len(self.values["layers"]) * len(self.values["intermediate"])

    def describe(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self.values.items() if k != "kv_heads" or self.gqa}

    def shrink_keys(self) -> list[str]:
        """The dimensions a too-large candidate is shrunk along."""
        return [k for k in ("layers", "hidden", "intermediate", "heads", "kv_heads") if k != "kv_heads" or self.gqa]


def param_counter(teacher_model: Any) -> Any:
    """A ``count(spec) -> int`` for the teacher's students (:class:`ParamCounter`, or the ResNet one)."""
    if arch.family(teacher_model.config) == "resnet":
        from distillkit.search.cnn import ResNetCounter

        return ResNetCounter(teacher_model)
    return ParamCounter(teacher_model)


class ParamCounter:
    """Exact parameter counts of students, from models built on the ``meta`` device (no memory, no init).

    Blocks are identical, so a student of ``L`` layers has ``P(1) + (L - 1) * (P(2) - P(1))`` parameters;
    the two shallow builds are cached per width.
    """

    def __init__(self, teacher_model: Any):
        self.teacher = teacher_model
        self.cfg = teacher_model.config
        self.t_layers = arch.num_layers(self.cfg)
        self._cache: dict[tuple[int, ...], tuple[int, int]] = {}

    def _build_count(self, spec: dict[str, int]) -> int:
        import torch

        from distillkit.models.student import construct_model, student_config

        cfg = student_config(self.cfg, spec)
        with torch.device("meta"):
            model = construct_model(type(self.teacher), cfg, self.teacher)
        return sum(p.numel() for p in model.parameters())

    def __call__(self, spec: dict[str, int]) -> int:
        width = (spec["hidden"], spec["heads"], spec["kv_heads"], spec["intermediate"])
        if width not in self._cache:
            one = self._build_count({**spec, "layers": 1})
            two = self._build_count({**spec, "layers": 2}) if self.t_layers >= 2 else one
            self._cache[width] = (one, two - one)
        one, per_layer = self._cache[width]
        return one + (spec["layers"] - 1) * per_layer
