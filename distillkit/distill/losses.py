"""Distillation losses, registered by name in :data:`distillkit.registry.LOSSES`.

This module must import without torch: ``distillkit --help`` lists the loss names from it. The
math lives in :mod:`distillkit.distill.functional`, imported inside the methods.

The engine's side of the contract:

- it builds one :class:`LossContext`, then each loss as ``LOSSES.get(name).obj(ctx)``;
- it asks ``loss.needs`` which :class:`Features` fields to produce and ``loss.layers()`` which
  student/teacher blocks those hidden states or q/k/v come from;
- it adds the parameters of ``loss.modules()`` (learned width projections, built in ``__init__``
  from the configs so they exist before the optimizer) to the optimizer, moves them to the
  training device and saves them, and saves ``loss.state_dict()`` for exact resumption;
- every step it calls ``loss(student_features, teacher_features, mask, progress=step / total)``
  and gets a scalar tensor. Teacher features are treated as constants (detached).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distillkit.errors import ConfigError, ModelError
from distillkit.registry import LOSSES

__all__ = [
    "JSD",
    "TAID",
    "TVD",
    "ContrastiveKD",
    "EmbeddingCosine",
    "Features",
    "ForwardKL",
    "HiddenCosine",
    "HiddenMSE",
    "Loss",
    "LossContext",
    "MiniLMAttention",
    "MiniLMValue",
    "ReverseKL",
    "SimilarityKD",
    "SkewKL",
    "SkewReverseKL",
    "resolve_layer_map",
    "uniform_layer_map",
]


@dataclass
class Features:
    """What a model produced for one batch; a field is None when no loss asked for it.

    - ``logits``: [B, T, V] for token tasks, [B, C] for sequence or image classification.
    - ``hidden_states``: tuple ``(embeddings_output, block_0_output, ..., block_{L-1}_output)``,
      each [B, T, H]; block ``i`` is entry ``i + 1``.
    - ``qkv``: dict block index (0-based) -> ``(q, k, v)``, each [B, T, W]: raw projection outputs,
      k and v already repeated to the query head count for GQA, so W = heads * head_dim for all 3.
    - ``embedding``: [B, H] pooled sentence embedding.
    """

    logits: Any = None
    hidden_states: Any = None
    qkv: Any = None
    embedding: Any = None


@dataclass(frozen=True)
class LossContext:
    """Everything a loss needs to build itself; made once by the engine.

    ``layer_map`` is ``"uniform"`` or ``"s:t,s:t,..."`` (student block : teacher block, 0-based).
    ``relation_heads`` is the MiniLM relation head count; None picks gcd(student heads, teacher heads).
    Configs are ``transformers`` configs; logit losses accept None.
    """

    temperature: float = 2.0
    student_config: Any = None
    teacher_config: Any = None
    layer_map: Any = "uniform"
    jsd_beta: float = 0.5
    skew_lambda: float = 0.1
    taid_t_start: float = 0.4
    taid_t_end: float = 1.0
    relation_heads: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}", hint="use e.g. --temperature 2.0")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ConfigError(
                f"jsd beta must be in [0, 1], got {self.jsd_beta}",
                hint="0 gives forward KL, 1 reverse KL, 0.5 the symmetric JSD",
            )
        if not 0.0 <= self.skew_lambda < 1.0:
            raise ConfigError(
                f"skew lambda must be in [0, 1), got {self.skew_lambda}",
                hint="1 makes the skewed KL identically 0; DistiLLM uses 0.1",
            )
        for name in ("taid_t_start", "taid_t_end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value}", hint="TAID uses 0.4 -> 1.0")
        if self.relation_heads is not None and (
            isinstance(self.relation_heads, bool) or not isinstance(self.relation_heads, int) or self.relation_heads < 1
        ):
            raise ConfigError(
                f"relation heads must be a positive integer, got {self.relation_heads!r}",
                hint="leave it unset to use gcd(student heads, teacher heads)",
            )


class Loss:
    """Base of every registered loss: see the module docstring for how the engine drives it."""

    name: str = ""
    needs: frozenset[str] = frozenset()

    def __init__(self, ctx: LossContext):
        self.ctx = ctx

    def layers(self) -> tuple[list[int], list[int]]:
        """(student blocks, teacher blocks), 0-based and aligned: ``zip`` gives the compared pairs."""
        return [], []

    def modules(self) -> dict[str, Any]:
        """Trainable extra ``torch.nn.Module``s by name (letters, digits and ``_`` only)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")

    def __call__(self, s: Features, t: Features, mask: Any, *, progress: float) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# --- model config accessors (private: distillkit.models has the public ones) ---------------

_LAYER_NAMES = ("num_hidden_layers", "n_layer", "num_layers")
_WIDTH_NAMES = ("hidden_size", "n_embd", "d_model")
_HEAD_NAMES = ("num_attention_heads", "n_head", "num_heads")


def _config_int(config: Any, names: tuple[str, ...], what: str, role: str) -> int:
    candidates = [config]
    text_config = getattr(config, "get_text_config", None)
    if callable(text_config):
        # Multimodal configs keep the language model's sizes in a nested text config.
        try:
            nested = text_config()
        except Exception:  # an odd config must not hide the clearer error below
            nested = None
        if nested is not None and nested is not config:
            candidates.append(nested)
    for candidate in candidates:
        for name in names:
            value = getattr(candidate, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    raise ConfigError(
        f"cannot read the {role} model's {what} from its {type(config).__name__}",
        hint=f"the config needs one of: {', '.join(names)}",
    )


def _num_layers(config: Any, role: str) -> int:
    return _config_int(config, _LAYER_NAMES, "number of layers", role)


def _width(config: Any, role: str) -> int:
    return _config_int(config, _WIDTH_NAMES, "hidden size", role)


def _heads(config: Any, role: str) -> int:
    return _config_int(config, _HEAD_NAMES, "number of attention heads", role)


def _qkv_width(config: Any, role: str) -> int:
    heads = _heads(config, role)
    head_dim = getattr(config, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0:
        head_dim = _width(config, role) // heads
    return heads * head_dim


def _require_configs(ctx: LossContext, loss: str) -> tuple[Any, Any]:
    if ctx.student_config is None or ctx.teacher_config is None:
        raise ConfigError(
            f"the {loss} loss needs the student and teacher model configs",
            hint="build the LossContext with student_config= and teacher_config=",
        )
    return ctx.student_config, ctx.teacher_config


# --- layer maps -------------------------------------------------------------------------------


def uniform_layer_map(num_student: int, num_teacher: int) -> list[tuple[int, int]]:
    """Student block i -> teacher block round((i + 1) * Lt / Ls) - 1, rounding halves up.

    Each student block meets the teacher block at the same relative depth, and the last meets the
    last: 3 -> 6 gives 0:1, 1:3, 2:5. Integer arithmetic, so no float or banker's rounding.
    """
    if num_student < 1 or num_teacher < 1:
        raise ConfigError(f"cannot map {num_student} student blocks onto {num_teacher} teacher blocks")
    return [(i, max(0, (2 * (i + 1) * num_teacher + num_student) // (2 * num_student) - 1)) for i in range(num_student)]


def resolve_layer_map(spec: Any, num_student: int, num_teacher: int) -> list[tuple[int, int]]:
    """(student block, teacher block) pairs, 0-based, from ``"uniform"``, ``"0:1,1:3"``, a dict or pairs.

    Raises :class:`ConfigError` for a malformed spec, an index out of range or a repeated pair.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "uniform"):
        return uniform_layer_map(num_student, num_teacher)
    hint = f"write 'student:teacher' pairs such as '0:1,1:3' with student blocks 0..{num_student - 1} and teacher blocks 0..{num_teacher - 1}, or 'uniform'"
    pairs: list[tuple[int, int]] = []
    try:
        if isinstance(spec, str):
            items = [item.split(":") for item in spec.split(",") if item.strip()]
            if any(len(item) != 2 for item in items):
                raise ValueError
            raw = [(item[0].strip(), item[1].strip()) for item in items]
        elif isinstance(spec, Mapping):
            raw = list(spec.items())
        elif isinstance(spec, Sequence):
            raw = [tuple(item) for item in spec]
            if any(len(item) != 2 for item in raw):
                raise ValueError
        else:
            raise ValueError
        for s, t in raw:
            if isinstance(s, bool) or isinstance(t, bool) or isinstance(s, float) or isinstance(t, float):
                raise ValueError
            pairs.append((int(s), int(t)))
    except (TypeError, ValueError):
        raise ConfigError(f"layer map {spec!r} is not a list of student:teacher block pairs", hint=hint) from None
    if not pairs:
        raise ConfigError(f"layer map {spec!r} maps no blocks", hint=hint)
    for s, t in pairs:
        if not 0 <= s < num_student or not 0 <= t < num_teacher:
            raise ConfigError(
                f"layer map {spec!r}: pair {s}:{t} is out of range for a {num_student}-block student "
                f"and a {num_teacher}-block teacher",
                hint=hint,
            )
    if len(set(pairs)) != len(pairs):
        raise ConfigError(f"layer map {spec!r} repeats a pair", hint=hint)
    return pairs


# --- logit losses -----------------------------------------------------------------------------


def _logits(s: Features, t: Features, loss: str) -> tuple[Any, Any]:
    if s.logits is None or t.logits is None:
        raise ValueError(f"the {loss} loss needs student and teacher logits (Features.logits is None)")
    if s.logits.shape[-1] != t.logits.shape[-1]:
        raise ModelError(
            f"the student has {s.logits.shape[-1]} output classes/tokens but the teacher has {t.logits.shape[-1]}",
            hint="logit losses need a student with the teacher's vocabulary or label set; "
            "use a feature loss (hidden_mse, minilm_attention) otherwise",
        )
    if s.logits.shape != t.logits.shape:
        raise ValueError(f"student logits {tuple(s.logits.shape)} and teacher logits {tuple(t.logits.shape)} differ")
    return s.logits, t.logits.detach()


class _LogitLoss(Loss):
    """A divergence between softened output distributions, times temperature**2 (see functional)."""

    needs = frozenset({"logits"})

    def __call__(self, s: Features, t: Features, mask: Any, *, progress: float) -> Any:
        from distillkit.distill import functional

        student, teacher = _logits(s, t, self.name)
        return self._divergence(functional, student, teacher, mask, progress)

    def _divergence(self, functional: Any, student: Any, teacher: Any, mask: Any, progress: float) -> Any:
        raise NotImplementedError


@LOSSES.register("forward_kl", help="KL(teacher || student) on softened logits", kind="logits")
class ForwardKL(_LogitLoss):
    """KL(p_T || p_S) on temperature-softened logits, times temperature**2; mode-covering."""

    name = "forward_kl"

    def _divergence(self, functional, student, teacher, mask, progress):
        return functional.forward_kl(student, teacher, mask, self.ctx.temperature)


@LOSSES.register("reverse_kl", help="KL(student || teacher) on softened logits (mode-seeking)", kind="logits")
class ReverseKL(_LogitLoss):
    """KL(p_S || p_T) on temperature-softened logits, times temperature**2; mode-seeking."""

    name = "reverse_kl"

    def _divergence(self, functional, student, teacher, mask, progress):
        return functional.reverse_kl(student, teacher, mask, self.ctx.temperature)


@LOSSES.register(
    "jsd", help="generalized Jensen-Shannon divergence (--jsd-beta: 0 forward KL, 1 reverse KL)", kind="logits"
)
class JSD(_LogitLoss):
    """beta*KL(p_T||M) + (1-beta)*KL(p_S||M), M = beta*p_T + (1-beta)*p_S; beta 0/1 are forward/reverse KL."""

    name = "jsd"

    def _divergence(self, functional, student, teacher, mask, progress):
        return functional.jsd(student, teacher, mask, self.ctx.temperature, beta=self.ctx.jsd_beta)


@LOSSES.register("tvd", help="total variation distance 0.5*sum|p_T - p_S|", kind="logits")
class TVD(_LogitLoss):
    """Total variation distance between softened distributions, times temperature**2."""

    name = "tvd"

    def _divergence(self, functional, student, teacher, mask, progress):
        return functional.tvd(student, teacher, mask, self.ctx.temperature)


@LOSSES.register("skew_kl", help="DistiLLM skew KL(teacher || l*teacher + (1-l)*student)", kind="logits")
class SkewKL(_LogitLoss):
    """KL(p_T || l*p_T + (1-l)*p_S) with l = ctx.skew_lambda (DistiLLM), times temperature**2."""

    name = "skew_kl"

    def _divergence(self, functional, student, teacher, mask, progress):
        return functional.skew_kl(student, teacher, mask, self.ctx.temperature, skew=self.ctx.skew_lambda)


@LOSSES.register(
    "skew_reverse_kl", help="DistiLLM skew reverse KL(student || l*student + (1-l)*teacher)", kind="logits"
)
class SkewReverseKL(_LogitLoss):
    """KL(p_S || l*p_S + (1-l)*p_T) with l = ctx.skew_lambda (DistiLLM), times temperature**2."""

    name = "skew_reverse_kl"

    def _divergence(self, functional, student, teacher, mask, progress):
        return functional.skew_reverse_kl(student, teacher, mask, self.ctx.temperature, skew=self.ctx.skew_lambda)


@LOSSES.register(
    "taid", help="TAID: KL to a target moving from the student to the teacher over training", kind="logits"
)
class TAID(_LogitLoss):
    """TAID (Shing et al., 2025) with a linear schedule of the interpolation weight t.

    t = taid_t_start + (taid_t_end - taid_t_start) * progress, so the target is a pure function of
    progress and resuming at the same step is exact. The paper's adaptive momentum schedule is not
    used. ``state_dict()`` records the last t for logging; ``t`` is recomputed on every call.
    """

    name = "taid"

    def __init__(self, ctx: LossContext):
        super().__init__(ctx)
        self.t = ctx.taid_t_start

    def interpolation(self, progress: float) -> float:
        """The weight t used at ``progress`` in [0, 1]."""
        from distillkit.distill.functional import taid_interpolation

        return taid_interpolation(progress, self.ctx.taid_t_start, self.ctx.taid_t_end)

    def _divergence(self, functional, student, teacher, mask, progress):
        self.t = self.interpolation(progress)
        return functional.taid(student, teacher, mask, self.ctx.temperature, t=self.t)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.t = float(state["t"])


# --- feature losses ---------------------------------------------------------------------------


def _projection(in_features: int, out_features: int) -> Any:
    import torch

    # No bias, as in TinyBERT: the projection only maps student directions into the teacher basis.
    return torch.nn.Linear(in_features, out_features, bias=False)


def _project(projection: Any, x: Any) -> Any:
    if projection is None:
        return x
    return projection(x.to(projection.weight.dtype))


def _hidden_block(hidden_states: Any, block: int, role: str, loss: str) -> Any:
    if hidden_states is None:
        raise ValueError(f"the {loss} loss needs {role} hidden states (Features.hidden_states is None)")
    if block + 1 >= len(hidden_states):
        raise ModelError(
            f"the {loss} loss needs {role} block {block} but the model returned {len(hidden_states) - 1} blocks",
            hint="check the layer map against the models",
        )
    return hidden_states[block + 1]


class _HiddenLoss(Loss):
    """A distance between student and teacher hidden states per mapped block pair, averaged over pairs.

    Widths that differ get one learned ``Linear(student_hidden, teacher_hidden)`` per pair, named
    ``proj_s{i}_t{j}``; equal widths compare directly.
    """

    needs = frozenset({"hidden_states"})

    def __init__(self, ctx: LossContext):
        super().__init__(ctx)
        student, teacher = _require_configs(ctx, self.name)
        self.pairs = resolve_layer_map(ctx.layer_map, _num_layers(student, "student"), _num_layers(teacher, "teacher"))
        self.student_width = _width(student, "student")
        self.teacher_width = _width(teacher, "teacher")
        self._projections: dict[str, Any] = {}
        if self.student_width != self.teacher_width:
            for s_block, t_block in self.pairs:
                self._projections[f"proj_s{s_block}_t{t_block}"] = _projection(self.student_width, self.teacher_width)

    def layers(self) -> tuple[list[int], list[int]]:
        return [s for s, _ in self.pairs], [t for _, t in self.pairs]

    def modules(self) -> dict[str, Any]:
        return dict(self._projections)

    def __call__(self, s: Features, t: Features, mask: Any, *, progress: float) -> Any:
        from distillkit.distill import functional

        total = 0.0
        for s_block, t_block in self.pairs:
            student = _hidden_block(s.hidden_states, s_block, "student", self.name)
            teacher = _hidden_block(t.hidden_states, t_block, "teacher", self.name).detach()
            if student.shape[-1] != self.student_width or teacher.shape[-1] != self.teacher_width:
                raise ModelError(
                    f"{self.name}: hidden widths {student.shape[-1]}/{teacher.shape[-1]} do not match the configs' "
                    f"{self.student_width}/{self.teacher_width}",
                    hint="build the loss from the configs of the models being trained",
                )
            student = _project(self._projections.get(f"proj_s{s_block}_t{t_block}"), student)
            total = total + self._distance(functional, student, teacher, mask)
        return total / len(self.pairs)

    def _distance(self, functional: Any, student: Any, teacher: Any, mask: Any) -> Any:
        raise NotImplementedError


@LOSSES.register("hidden_mse", help="MSE between (projected) student and teacher hidden states", kind="features")
class HiddenMSE(_HiddenLoss):
    """Mean squared error between projected student and teacher hidden states per mapped block pair."""

    name = "hidden_mse"

    def _distance(self, functional, student, teacher, mask):
        return functional.hidden_mse(student, teacher, mask)


@LOSSES.register(
    "hidden_cosine", help="1 - cosine between (projected) student and teacher hidden states", kind="features"
)
class HiddenCosine(_HiddenLoss):
    """``1 - cosine`` between projected student and teacher hidden states per mapped block pair."""

    name = "hidden_cosine"

    def _distance(self, functional, student, teacher, mask):
        return functional.hidden_cosine(student, teacher, mask)


class _RelationLoss(Loss):
    """MiniLM(v2) self-attention relation transfer: no projection, any widths.

    With ``layer_map="uniform"`` the last student block learns from the last teacher block (as in
    MiniLM); an explicit map compares every listed pair and averages. q/k/v are split into R
    relation heads, R = ``ctx.relation_heads`` or gcd(student heads, teacher heads), which must
    divide both q/k/v widths.
    """

    needs = frozenset({"qkv"})

    def __init__(self, ctx: LossContext):
        super().__init__(ctx)
        student, teacher = _require_configs(ctx, self.name)
        num_student, num_teacher = _num_layers(student, "student"), _num_layers(teacher, "teacher")
        if ctx.layer_map is None or (isinstance(ctx.layer_map, str) and ctx.layer_map.strip().lower() == "uniform"):
            self.pairs = [(num_student - 1, num_teacher - 1)]
        else:
            self.pairs = resolve_layer_map(ctx.layer_map, num_student, num_teacher)
        self.student_width = _qkv_width(student, "student")
        self.teacher_width = _qkv_width(teacher, "teacher")
        self.relation_heads = ctx.relation_heads or math.gcd(_heads(student, "student"), _heads(teacher, "teacher"))
        self._check_heads(self.student_width, self.teacher_width)

    def _check_heads(self, student_width: int, teacher_width: int) -> None:
        for role, width in (("student", student_width), ("teacher", teacher_width)):
            if width % self.relation_heads:
                raise ConfigError(
                    f"{self.relation_heads} relation heads do not divide the {role}'s q/k/v width {width}",
                    hint=f"pick relation heads that divide both {student_width} and {teacher_width}, "
                    f"e.g. {math.gcd(student_width, teacher_width)}'s divisors, or leave it unset",
                )

    def layers(self) -> tuple[list[int], list[int]]:
        return [s for s, _ in self.pairs], [t for _, t in self.pairs]

    def _block(self, qkv: Any, block: int, role: str) -> tuple[Any, Any, Any]:
        if qkv is None:
            raise ValueError(f"the {self.name} loss needs {role} q/k/v (Features.qkv is None)")
        if block not in qkv:
            raise ValueError(f"the {self.name} loss needs {role} q/k/v of block {block}, got blocks {sorted(qkv)}")
        return qkv[block]

    def __call__(self, s: Features, t: Features, mask: Any, *, progress: float) -> Any:
        from distillkit.distill import functional

        total = 0.0
        for s_block, t_block in self.pairs:
            student = self._operands(self._block(s.qkv, s_block, "student"))
            teacher = tuple(x.detach() for x in self._operands(self._block(t.qkv, t_block, "teacher")))
            self._check_heads(student[0].shape[-1], teacher[0].shape[-1])
            total = total + functional.minilm_relation(*student, *teacher, heads=self.relation_heads, mask=mask)
        return total / len(self.pairs)

    def _operands(self, qkv: tuple[Any, Any, Any]) -> tuple[Any, Any]:
        raise NotImplementedError


@LOSSES.register(
    "minilm_attention", help="MiniLM: KL between teacher and student Q-K attention relations", kind="features"
)
class MiniLMAttention(_RelationLoss):
    """KL(teacher || student) of softmax(q k^T / sqrt(d_r)) per relation head, over real keys."""

    name = "minilm_attention"

    def _operands(self, qkv):
        q, k, _ = qkv
        return q, k


@LOSSES.register("minilm_value", help="MiniLM: KL between teacher and student V-V value relations", kind="features")
class MiniLMValue(_RelationLoss):
    """KL(teacher || student) of softmax(v v^T / sqrt(d_r)) per relation head, over real keys."""

    name = "minilm_value"

    def _operands(self, qkv):
        _, _, v = qkv
        return v, v


@LOSSES.register(
    "embedding_cosine", help="1 - cosine between (projected) student and teacher sentence embeddings", kind="embedding"
)
class EmbeddingCosine(Loss):
    """``1 - cosine(proj(e_S), e_T)`` averaged over the batch; ``proj`` is learned when the widths differ.

    Widths come from the configs' hidden sizes; without configs the embeddings are compared as they are.
    """

    name = "embedding_cosine"
    needs = frozenset({"embedding"})

    def __init__(self, ctx: LossContext):
        super().__init__(ctx)
        self._projections: dict[str, Any] = {}
        if ctx.student_config is not None and ctx.teacher_config is not None:
            student_width = _width(ctx.student_config, "student")
            teacher_width = _width(ctx.teacher_config, "teacher")
            if student_width != teacher_width:
                self._projections["proj"] = _projection(student_width, teacher_width)

    def modules(self) -> dict[str, Any]:
        return dict(self._projections)

    def __call__(self, s: Features, t: Features, mask: Any, *, progress: float) -> Any:
        from distillkit.distill import functional

        if s.embedding is None or t.embedding is None:
            raise ValueError("the embedding_cosine loss needs student and teacher embeddings (Features.embedding)")
        projection = self._projections.get("proj")
        student, teacher = s.embedding, t.embedding.detach()
        expected = projection.in_features if projection is not None else teacher.shape[-1]
        if student.shape[-1] != expected:
            raise ModelError(
                f"student embeddings are {student.shape[-1]} wide but {expected} was expected",
                hint="the embedding loss projects the student's hidden size onto the teacher's; "
                "pool the last hidden state without an extra dense layer",
            )
        return functional.embedding_cosine(_project(projection, student), teacher)


def _embeddings(s: Features, t: Features, loss: str) -> tuple[Any, Any]:
    if s.embedding is None or t.embedding is None:
        raise ValueError(f"the {loss} loss needs student and teacher embeddings (Features.embedding)")
    return s.embedding, t.embedding.detach()


@LOSSES.register(
    "similarity_kd",
    help="relational KD: MSE between the student's and the teacher's in-batch cosine-similarity matrices",
    kind="embedding",
)
class SimilarityKD(Loss):
    """The geometry of the embedding space: ``mean((S_S - S_T)^2)`` over off-diagonal in-batch cosine similarities.

    Width-agnostic (each side's similarities use its own embeddings), so no projection is learned.
    """

    name = "similarity_kd"
    needs = frozenset({"embedding"})

    def __call__(self, s: Features, t: Features, mask: Any, *, progress: float) -> Any:
        from distillkit.distill import functional

        student, teacher = _embeddings(s, t, self.name)
        return functional.similarity_kd(student, teacher)


@LOSSES.register(
    "contrastive_kd",
    help="in-batch contrastive KD: each student embedding must retrieve its own teacher embedding (InfoNCE, t=0.05)",
    kind="embedding",
)
class ContrastiveKD(EmbeddingCosine):
    """InfoNCE over the batch, student embeddings as queries and teacher embeddings as keys, temperature 0.05.

    Shares :class:`EmbeddingCosine`'s learned projection when the widths differ.
    """

    name = "contrastive_kd"
    temperature = 0.05

    def __call__(self, s: Features, t: Features, mask: Any, *, progress: float) -> Any:
        from distillkit.distill import functional

        student, teacher = _embeddings(s, t, self.name)
        projection = self._projections.get("proj")
        return functional.contrastive_kd(_project(projection, student), teacher, self.temperature)
