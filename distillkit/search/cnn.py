"""Stage search for HF ResNet teachers: per-stage depths and widths, and teacher-initialised ResNet students.

A ResNet candidate is ``{depth0, ..., depth{S-1}, width0, ..., width{S-1}}`` for a teacher of ``S`` stages
(``ResNetConfig.depths`` and ``hidden_sizes``); the student keeps the teacher's number of stages, block type and
strides. Allowed values: depths 1 to the teacher's stage depth; widths the eighths of the teacher's stage width
(multiples of 4 for bottleneck blocks, whose inner width is ``width // 4``). The stem (``embedding_size``) scales
with stage 0, and a candidate must keep the teacher's stem/stage-0 coupling (an identity shortcut when they are
equally wide and stage 0 does not downsample), so every candidate is a config that loads.

Teacher initialisation (:func:`build_resnet_student`): stage ``s`` keeps teacher blocks
:func:`~distillkit.models.student.select_layers` (evenly spread, always the first, whose shortcut projects, and the
last); then channels are cut with the pruner's slicer (:mod:`distillkit.models.resnet_layout`), each channel space keeping
its top channels by weight magnitude (every conv and BatchNorm weight that reads or writes the space votes, each
normalised by its mean).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from distillkit.errors import ConfigError
from distillkit.search.constraints import constrain_values

FAMILY = "resnet"
WIDTH_STEPS = 8
_BLOCK_KEY = re.compile(r"^(.*encoder\.stages\.(\d+)\.layers\.)(\d+)(\..+)$")


def is_resnet(config: Any) -> bool:
    return getattr(config, "model_type", None) == FAMILY


def _keys(stages: int) -> tuple[str, ...]:
    return (*(f"depth{s}" for s in range(stages)), *(f"width{s}" for s in range(stages)))


def teacher_spec(config: Any) -> dict[str, int]:
    spec = {f"depth{s}": int(d) for s, d in enumerate(config.depths)}
    spec.update({f"width{s}": int(w) for s, w in enumerate(config.hidden_sizes)})
    return spec


def _stem_coupled(embedding: int, width0: int, config: Any) -> bool:
    return embedding == width0 and not config.downsample_in_first_stage


def _stem_width(config: Any, width0: int) -> int:
    if _stem_coupled(config.embedding_size, config.hidden_sizes[0], config):
        return width0
    return max(1, round(config.embedding_size * width0 / config.hidden_sizes[0]))


def student_config(config: Any, spec: dict[str, int]) -> Any:
    """The teacher's ResNetConfig with the spec's stage depths and widths (and the stem scaled with stage 0)."""
    import copy

    stages = len(config.depths)
    new = copy.deepcopy(config)
    new.depths = [int(spec[f"depth{s}"]) for s in range(stages)]
    new.hidden_sizes = [int(spec[f"width{s}"]) for s in range(stages)]
    new.embedding_size = _stem_width(config, new.hidden_sizes[0])
    return new


def _widths(teacher: int, multiple: int) -> list[int]:
    step = 8 if teacher % 8 == 0 and teacher >= 8 * WIDTH_STEPS else multiple
    out = {max(step, round(teacher * k / WIDTH_STEPS / step) * step) for k in range(1, WIDTH_STEPS + 1)}
    return sorted(v for v in out if v <= teacher and v % multiple == 0)


@dataclass
class ResNetSpace:
    """The stage space of a ResNet teacher, with the interface of :class:`~distillkit.search.space.SearchSpace`."""

    teacher: dict[str, int]
    values: dict[str, list[int]]
    teacher_config: Any = field(repr=False, default=None)
    family: str = FAMILY
    gqa: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        return _keys(len(self.teacher_config.depths))

    @classmethod
    def from_teacher(cls, config: Any, space: str | None = None) -> ResNetSpace:
        multiple = 4 if config.layer_type == "bottleneck" else 1
        teacher = teacher_spec(config)
        values: dict[str, list[int]] = {}
        for s, (depth, width) in enumerate(zip(config.depths, config.hidden_sizes, strict=True)):
            values[f"depth{s}"] = list(range(1, int(depth) + 1))
            values[f"width{s}"] = _widths(int(width), multiple)
        out = cls(teacher, values, config)
        if space:
            out._constrain(space)
        if out.sample_or_none(random.Random(0)) is None:
            raise ConfigError(
                f"--space {space!r} leaves no ResNet candidate whose stem keeps the teacher's shortcut layout",
                hint="allow more stage-0 widths",
            )
        return out

    def _constrain(self, space: str) -> None:
        constrain_values(self.values, self.teacher, self.keys, space, family=FAMILY)

    # --- validity ---------------------------------------------------------------------------------------------

    def repair(self, spec: dict[str, int]) -> dict[str, int] | None:
        """The spec itself if its stem keeps the teacher's shortcut layout, else None."""
        cfg = self.teacher_config
        teacher_coupled = _stem_coupled(cfg.embedding_size, cfg.hidden_sizes[0], cfg)
        stem = _stem_width(cfg, spec["width0"])
        if _stem_coupled(stem, spec["width0"], cfg) != teacher_coupled:
            return None
        return {k: int(spec[k]) for k in self.keys}

    def validate(self, spec: dict[str, int]) -> dict[str, int]:
        fixed = self.repair(spec)
        bad = [k for k in self.keys if not 1 <= int(spec.get(k, 0)) <= self.teacher[k]]
        if fixed is None or bad:
            raise ConfigError(f"{self.spec_string(spec)} is not a student of this ResNet", hint="see --space")
        return fixed

    def spec_string(self, spec: dict[str, int]) -> str:
        return ",".join(f"{k}={spec[k]}" for k in self.keys)

    def describe(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self.values.items()}

    def shrink_keys(self) -> list[str]:
        return list(self.keys)

    # --- sampling and variation -------------------------------------------------------------------------------

    def sample_or_none(self, rng: random.Random) -> dict[str, int] | None:
        for _ in range(1000):
            fixed = self.repair({k: rng.choice(self.values[k]) for k in self.keys})
            if fixed is not None:
                return fixed
        return None

    def sample(self, rng: random.Random) -> dict[str, int]:
        spec = self.sample_or_none(rng)
        if spec is None:  # pragma: no cover - from_teacher checked that one exists
            raise ConfigError("the search space holds no valid candidate", hint="loosen --space")
        return spec

    def mutate(self, spec: dict[str, int], rng: random.Random) -> dict[str, int]:
        dims = [k for k in self.keys if len(self.values[k]) > 1]
        for _ in range(100):
            if not dims:
                break
            key = rng.choice(dims)
            child = self.repair({**spec, key: rng.choice([v for v in self.values[key] if v != spec[key]])})
            if child is not None:
                return child
        return dict(spec)

    def crossover(self, a: dict[str, int], b: dict[str, int], rng: random.Random) -> dict[str, int]:
        return self.repair({k: (a if rng.random() < 0.5 else b)[k] for k in self.keys}) or dict(a)

    def smallest(self, count: Any) -> dict[str, int]:
        """The valid candidate with the fewest parameters: every stage at its shallowest and narrowest."""
        best = None
        for w0 in self.values["width0"]:
            spec = self.repair({k: self.values[k][0] for k in self.keys} | {"width0": w0})
            if spec is not None and (best is None or count(spec) < count(best)):
                best = spec
        assert best is not None
        return best

    def size(self) -> int:
        n = sum(1 for w0 in self.values["width0"] if self.repair({**self.teacher, "width0": w0}) is not None)
        for k in self.keys:
            if k != "width0":
                n *= len(self.values[k])
        return n


def spec_short(spec: dict[str, int]) -> str:
    """``D1-2 W16-32``: stage depths and widths (for tables)."""
    stages = sum(1 for k in spec if k.startswith("depth"))
    return (
        "D"
        + "-".join(str(spec[f"depth{s}"]) for s in range(stages))
        + " W"
        + "-".join(str(spec[f"width{s}"]) for s in range(stages))
    )


class ResNetCounter:
    """Exact parameter counts of ResNet students, from models built on the ``meta`` device."""

    def __init__(self, teacher_model: Any):
        self.teacher = teacher_model
        self._cache: dict[tuple[tuple[str, int], ...], int] = {}

    def __call__(self, spec: dict[str, int]) -> int:
        import torch

        key = tuple(sorted(spec.items()))
        if key not in self._cache:
            with torch.device("meta"):
                model = type(self.teacher)(student_config(self.teacher.config, spec))
            self._cache[key] = sum(p.numel() for p in model.parameters())
        return self._cache[key]


def _depth_state(teacher_model: Any, depths: list[int]) -> tuple[Any, dict[str, Any]]:
    """The teacher's config and state with stage ``s`` cut to its ``depths[s]`` evenly spread blocks, renumbered."""
    import copy

    from distillkit.models.student import select_layers

    cfg = teacher_model.config
    keep = [select_layers(int(t), int(d)) for t, d in zip(cfg.depths, depths, strict=True)]
    new_cfg = copy.deepcopy(cfg)
    new_cfg.depths = list(depths)
    state = {}
    for key, tensor in teacher_model.state_dict().items():
        m = _BLOCK_KEY.match(key)
        if m is None:
            state[key] = tensor
            continue
        stage, block = int(m.group(2)), int(m.group(3))
        if block in keep[stage]:
            state[f"{m.group(1)}{keep[stage].index(block)}{m.group(4)}"] = tensor
    return new_cfg, state


def build_resnet_student(teacher_model: Any, spec: dict[str, int], *, init: str = "teacher", seed: int = 0) -> Any:
    """A model of the teacher's class with the spec's stages, from the teacher's blocks and channels or at random.

    On the teacher's device and dtype, in its train/eval mode; the caller's RNG state is left as it was.
    """
    import torch

    from distillkit.models.resnet_layout import slice_state, space_sizes, spaces_of
    from distillkit.models.student import INITS, top_indices

    if init not in INITS:
        raise ConfigError(f"unknown student init {init!r}", hint=f"choose one of: {', '.join(INITS)}")
    s_cfg = student_config(teacher_model.config, spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = type(teacher_model)(s_cfg)
    if init == "teacher":
        d_cfg, state = _depth_state(teacher_model, s_cfg.depths)
        scores = {name: torch.zeros(n) for name, n in space_sizes(d_cfg).items()}
        for key, tensor in state.items():
            roles = spaces_of(d_cfg, key)
            if not key.endswith(".weight") or not roles or tensor.dim() != len(roles):
                continue
            for dim, space in enumerate(roles):
                if space is None:
                    continue
                norms = tensor.detach().float().abs().transpose(0, dim).reshape(tensor.shape[dim], -1).sum(1).cpu()
                if norms.mean() > 0:
                    scores[space] += norms / norms.mean()
        new_sizes = space_sizes(s_cfg)
        keep = {name: top_indices(score, new_sizes[name]) for name, score in scores.items()}
        with torch.no_grad():
            student.load_state_dict(slice_state(d_cfg, state, keep), strict=True)
    param = next(teacher_model.parameters())
    return student.to(device=param.device, dtype=param.dtype).train(teacher_model.training)


__all__ = [
    "FAMILY",
    "ResNetCounter",
    "ResNetSpace",
    "build_resnet_student",
    "is_resnet",
    "spec_short",
    "student_config",
    "teacher_spec",
]
