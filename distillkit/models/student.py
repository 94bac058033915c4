"""Build a student from a teacher and a spec, initialised from the teacher's weights.

The student is the teacher's class with a config that differs only in the spec's sizes
(:func:`student_config`). Initialisation from the teacher (:func:`plan_student`, :func:`build_student`):

- **Depth.** Student layer ``i`` of ``n`` copies teacher layer ``round_half_up(i * (L - 1) / (n - 1))`` of ``L``:
  evenly spread, always the first and the last layer (``6 -> 3`` keeps ``[0, 3, 5]``; ``n = 1`` keeps ``[0]``).
  The last layer is kept because the final norm and the output head were trained on its output.
- **Hidden channels.** One global set, used in every embedding, norm, projection and head so the residual
  stream stays consistent: channels ranked by the sum, over every tensor that reads or writes the residual
  stream, of that tensor's per-channel L2 norm divided by its mean (each tensor gets an equal vote).
- **Heads.** Per layer, key/value groups ranked by ``|k|^2 + |v|^2 + sum over their query heads of |q|^2 + |o|^2``;
  the best ``kv_heads`` groups are kept whole and each keeps its best ``heads / kv_heads`` query heads (so every
  student query head still attends with its own teacher key/value head). Without GQA a group is one head.
  A student with more query heads per group than the teacher fills groups with the best remaining heads.
- **Head size.** When it shrinks, rotary (Llama-style) heads keep every ``d / d'``-th rotation pair, which
  keeps the rotation frequencies exactly; other families keep each head's top dimensions by ``q, k, v, o`` norm.
- **MLP channels.** Per layer, ranked by the norm of their up (and gate) rows plus their down column.

Every index set is sorted, so kept heads and channels keep the teacher's order.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from distillkit.errors import ConfigError, ModelError
from distillkit.models import arch
from distillkit.models.layout import LAYER_RULES, PROJECTION_LAYOUTS, keys_by_layer, split_layer_key, tensor_roles
from distillkit.models.spec import SPEC_KEYS, head_dim_coupled, parse_student_spec, resolve_spec, teacher_sizes

INITS = ("teacher", "random")


def select_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layer copied into each student layer: evenly spread, first and last included.

    ``select_layers(6, 3) == [0, 3, 5]``, ``select_layers(12, 4) == [0, 4, 7, 11]``, ``select_layers(4, 1) == [0]``.
    """
    if not 0 < student_layers <= teacher_layers:
        raise ConfigError(
            f"cannot pick {student_layers} of {teacher_layers} teacher layers",
            hint=f"use layers between 1 and {teacher_layers}",
        )
    if student_layers == 1:
        return [0]
    # Integer round-half-up of i * (L - 1) / (n - 1): exact and platform independent.
    return [
        (2 * i * (teacher_layers - 1) + (student_layers - 1)) // (2 * (student_layers - 1))
        for i in range(student_layers)
    ]


def student_spec(spec: str | dict[str, int], teacher_config: Any, keep_head_dim: bool = False) -> dict[str, int]:
    """The resolved spec dict (keys :data:`~distillkit.models.spec.SPEC_KEYS`) of a spec string or dict."""
    if keep_head_dim:
        return _keep_head_dim_spec(spec, teacher_config)
    if isinstance(spec, str):
        return parse_student_spec(spec, teacher_config)
    return resolve_spec(dict(spec), teacher_config)


def _keep_head_dim_spec(spec: str | dict[str, int], teacher_config: Any) -> dict[str, int]:
    """A spec whose heads keep the teacher's head size whatever the hidden size (pruning, Llama-style only).

    The config then carries an explicit ``head_dim``, so hidden and heads need not divide each other.
    """
    if arch.family(teacher_config) != "llama":
        raise ConfigError(
            f"only Llama-style configs can keep the head size apart from the hidden size, not {arch.family(teacher_config)}",
            hint="their head size is hidden / heads; change hidden and heads together",
        )
    given = parse_student_spec(spec, teacher_config) if isinstance(spec, str) else dict(spec)
    teacher = teacher_sizes(teacher_config)
    full = {key: int(given.get(key, teacher[key])) for key in SPEC_KEYS}
    for key, value in full.items():
        if not 0 < value <= teacher[key]:
            raise ConfigError(
                f"{key}={value} is outside 1..{teacher[key]}", hint=f"use {key} between 1 and {teacher[key]}"
            )
    if full["heads"] % full["kv_heads"]:
        raise ConfigError(
            f"kv_heads={full['kv_heads']} does not divide heads={full['heads']}",
            hint="choose kv_heads so that each key/value head serves the same number of query heads",
        )
    return full


def _set(cfg: Any, names: tuple[str, ...], value: Any) -> None:
    for name in names:
        if hasattr(cfg, name):
            setattr(cfg, name, value)
            return
    setattr(cfg, names[0], value)


def student_config(
    teacher_config: Any,
    spec: str | dict[str, int],
    *,
    layers: list[int] | None = None,
    keep_head_dim: bool = False,
) -> Any:
    """The teacher's config with only the spec's sizes changed (plus what must follow them).

    What follows: ``head_dim`` becomes hidden / heads when the teacher's head size was hidden / heads (an explicit
    decoupled ``head_dim``, as in Qwen3, is kept); per-layer ``layer_types`` keep the selected layers' entries;
    GPT-2 gets an explicit ``n_inner`` when its implicit 4 x hidden would no longer equal ``intermediate``; a ViT
    pooler as wide as the hidden size stays as wide.

    ``layers`` names the teacher layers kept when they are not the evenly spread default (pruning by importance);
    ``keep_head_dim`` (Llama-style only) writes the teacher's head size as an explicit ``head_dim``.
    """
    spec = student_spec(spec, teacher_config, keep_head_dim)
    teacher = teacher_sizes(teacher_config)
    fam = arch.family(teacher_config)
    coupled = head_dim_coupled(teacher_config)
    cfg = copy.deepcopy(teacher_config)
    if spec["layers"] != teacher["layers"]:
        _set(cfg, ("num_hidden_layers", "n_layer"), spec["layers"])
        layer_types = getattr(teacher_config, "layer_types", None)
        if isinstance(layer_types, (list, tuple)) and len(layer_types) == teacher["layers"]:
            kept = layers if layers is not None else select_layers(teacher["layers"], spec["layers"])
            cfg.layer_types = [layer_types[i] for i in kept]
    if spec["hidden"] != teacher["hidden"]:
        _set(cfg, ("hidden_size", "n_embd"), spec["hidden"])
    if spec["heads"] != teacher["heads"]:
        _set(cfg, ("num_attention_heads", "n_head"), spec["heads"])
    if fam == "llama" and spec["kv_heads"] != teacher["kv_heads"]:
        cfg.num_key_value_heads = spec["kv_heads"]
    if keep_head_dim:
        cfg.head_dim = arch.head_dim(teacher_config)
    elif coupled and getattr(teacher_config, "head_dim", None) is not None:
        if spec["hidden"] != teacher["hidden"] or spec["heads"] != teacher["heads"]:
            cfg.head_dim = spec["hidden"] // spec["heads"]
    if fam == "gpt2":
        if arch.intermediate_size(cfg) != spec["intermediate"]:
            cfg.n_inner = spec["intermediate"]
    elif spec["intermediate"] != teacher["intermediate"]:
        _set(cfg, ("intermediate_size",), spec["intermediate"])
    if fam == "vit" and getattr(teacher_config, "pooler_output_size", None) == teacher["hidden"]:
        cfg.pooler_output_size = spec["hidden"]
    return cfg


@dataclass
class StudentPlan:
    """Which teacher weights each part of the student starts from (teacher indices throughout).

    Per-layer lists are indexed by student layer. ``heads[i][s]`` is the teacher query head behind student head
    ``s``; ``kv_heads[i][g]`` the teacher key/value head behind student group ``g``. ``q_features[i]`` is
    ``[heads * head_dim]`` (student head-major), ``kv_features[i]`` ``[kv_heads * head_dim]``, ``head_dims[i]``
    ``[heads, head_dim]``, ``hidden`` ``[hidden]`` and ``mlp[i]`` ``[intermediate]``.
    """

    spec: dict[str, int]
    family: str
    layers: list[int]
    hidden: Any
    heads: list[list[int]] = field(default_factory=list)
    kv_heads: list[list[int]] = field(default_factory=list)
    head_dims: list[Any] = field(default_factory=list)
    q_features: list[Any] = field(default_factory=list)
    kv_features: list[Any] = field(default_factory=list)
    mlp: list[Any] = field(default_factory=list)


@dataclass
class StructureScores:
    """Importance of every prunable structure of a teacher (higher = keep), chosen outside this module (pruning).

    Any field left None falls back to the weight-magnitude ranking of the module docs. ``layers`` ``[L]`` replaces
    the evenly spread layer choice by the top-``layers`` blocks; ``hidden`` is ``[hidden]``; ``heads[l]``
    ``[heads]`` and ``kv_heads[l]`` ``[kv_heads]`` (a group ranks by its kv score plus its query heads' scores;
    zeros when only heads are scored); ``mlp[l]`` ``[intermediate]``. Per-layer lists are indexed by teacher layer.
    """

    hidden: Any = None
    layers: Any = None
    heads: list[Any] | None = None
    kv_heads: list[Any] | None = None
    mlp: list[Any] | None = None


def weight_scores(teacher_model: Any) -> StructureScores:
    """The weight-magnitude rankings :func:`plan_student` uses by default, computed once for many plans.

    Passing the result as ``scores`` gives exactly the default plan for every spec (the same tensors, the same
    ranking code), but the teacher's tensors are ranked once instead of once per student: a search builds
    hundreds of students from one teacher. ``hidden`` is ``[hidden]``; ``heads[l]`` ``[heads]``, ``kv_heads[l]``
    ``[kv_heads]`` and ``mlp[l]`` ``[intermediate]`` per teacher layer; ``layers`` stays None (evenly spread).
    """
    cfg = teacher_model.config
    fam = arch.family(cfg)
    teacher = teacher_sizes(cfg)
    t_d = arch.head_dim(cfg)
    state = teacher_model.state_dict()
    out = StructureScores(hidden=_hidden_scores(fam, state, teacher["hidden"]), heads=[], kv_heads=[], mlp=[])
    index = keys_by_layer(state)
    for t_layer in range(teacher["layers"]):
        proj = _projections(fam, state, index[t_layer], cfg)
        t_heads, t_kv = teacher["heads"], teacher["kv_heads"]
        q = proj["q"].reshape(t_heads, t_d, -1)
        o = proj["o"].reshape(proj["o"].shape[0], t_heads, t_d)
        out.heads.append(q.pow(2).sum((1, 2)) + o.pow(2).sum((0, 2)))
        out.kv_heads.append(proj["k"].reshape(t_kv, -1).pow(2).sum(1) + proj["v"].reshape(t_kv, -1).pow(2).sum(1))
        out.mlp.append(sum(u.pow(2).sum(1) for u in proj["ups"]) + proj["down"].pow(2).sum(0))
    return out


def top_indices(score: Any, k: int) -> Any:
    """Indices of the ``k`` largest scores, sorted ascending; ties go to the lower index."""
    import torch

    if k >= score.numel():
        return torch.arange(score.numel())
    order = torch.sort(score, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def _projections(fam: str, state: dict[str, Any], keys: dict[str, str], cfg: Any) -> dict[str, Any]:
    """One layer's weights as float Linear matrices ``[out, in]``: q, k, v, o, ups (list) and down."""
    for layout in PROJECTION_LAYOUTS[fam]:
        if (layout.get("q") or layout.get("qkv")) in keys:
            break
    else:
        raise ModelError(f"unexpected {fam} layer layout (parameters {', '.join(sorted(keys))})")

    def get(suffix: str) -> Any:
        # Ranking is cheap next to training; doing it on CPU keeps index tensors and scores on one device.
        t = state[keys[suffix]].detach().float().cpu()
        return t.t() if layout.get("conv1d") else t

    out = {"o": get(layout["o"]), "ups": [get(s) for s in layout["up"]], "down": get(layout["down"])}
    if "qkv" in layout:
        width = arch.num_heads(cfg) * arch.head_dim(cfg)
        out["q"], out["k"], out["v"] = get(layout["qkv"]).split(width, dim=0)
    else:
        out.update(q=get(layout["q"]), k=get(layout["k"]), v=get(layout["v"]))
    return out


def _hidden_scores(fam: str, state: dict[str, Any], hidden: int) -> Any:
    import torch

    score = torch.zeros(hidden)
    seen: set[int] = set()
    for key, tensor in state.items():
        roles = tensor_roles(fam, key)
        if roles is None or tensor.dim() != len(roles) or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        for dim, role in enumerate(roles):
            if role != "H" or tensor.shape[dim] != hidden:
                continue
            norms = tensor.detach().float().transpose(0, dim).reshape(hidden, -1).norm(dim=1).cpu()
            mean = norms.mean()
            if mean > 0:
                score += norms / mean
    return score


def _choose_heads(
    proj: dict[str, Any],
    t_heads: int,
    t_kv: int,
    d: int,
    s_heads: int,
    s_kv: int,
    q_score: Any = None,
    kv_score: Any = None,
):
    """Teacher query heads per student head and kv heads per student group, GQA-consistent."""
    import torch

    if q_score is None:
        q = proj["q"].reshape(t_heads, d, -1)
        o = proj["o"].reshape(proj["o"].shape[0], t_heads, d)
        q_score = q.pow(2).sum((1, 2)) + o.pow(2).sum((0, 2))
    if kv_score is None:
        kv_score = proj["k"].reshape(t_kv, -1).pow(2).sum(1) + proj["v"].reshape(t_kv, -1).pow(2).sum(1)
    q_score, kv_score = q_score.float().cpu(), kv_score.float().cpu()
    group, s_group = t_heads // t_kv, s_heads // s_kv
    groups = top_indices(kv_score + q_score.reshape(t_kv, group).sum(1), s_kv).tolist()
    heads: list[int] = []
    used: set[int] = set()
    for g in groups:
        members = torch.arange(g * group, (g + 1) * group)
        own = members[top_indices(q_score[members], min(s_group, group))].tolist()
        used.update(own)
        heads.extend(own)
        if s_group > group:
            # More query heads per group than the teacher has: borrow the best heads of other groups. They are
            # paired with this group's key/value head, so they start close to, not equal to, the teacher.
            rest = torch.tensor([h for h in range(t_heads) if h not in used and h // group not in groups])
            extra = rest[top_indices(q_score[rest], s_group - group)].tolist()
            used.update(extra)
            heads.extend(extra)
    return heads, groups


def _choose_head_dims(fam: str, proj: dict[str, Any], heads: list[int], d: int, s_d: int, t_heads: int, t_kv: int):
    """``[heads, s_d]`` teacher dimensions kept within each chosen head."""
    import torch

    if s_d == d:
        return torch.arange(d).repeat(len(heads), 1)
    if fam == "llama":
        # Rotary pairs dim j with j + d/2 at frequency base^(-2j/d); keeping pair j * d/d' gives the student's
        # pair j the frequency base^(-2j/d') it will use, so positions rotate exactly as in the teacher.
        half, s_half = d // 2, s_d // 2
        pairs = torch.tensor([j * half // s_half for j in range(s_half)])
        return torch.cat([pairs, pairs + half]).repeat(len(heads), 1)
    group = t_heads // t_kv
    rows = []
    for h in heads:
        kv = h // group
        sl, kvsl = slice(h * d, (h + 1) * d), slice(kv * d, (kv + 1) * d)
        score = (
            proj["q"][sl].pow(2).sum(1)
            + proj["k"][kvsl].pow(2).sum(1)
            + proj["v"][kvsl].pow(2).sum(1)
            + proj["o"][:, sl].pow(2).sum(0)
        )
        rows.append(top_indices(score, s_d))
    return torch.stack(rows)


def plan_student(
    teacher_model: Any,
    spec: str | dict[str, int],
    *,
    scores: StructureScores | None = None,
    keep_head_dim: bool = False,
) -> StudentPlan:
    """Decide which teacher layers, channels and heads a teacher-initialised student keeps (see module docs).

    ``scores`` replaces the built-in weight-magnitude rankings where it has a field (pruning by importance);
    ``keep_head_dim`` keeps every head whole (see :func:`student_config`).
    """
    import torch

    cfg = teacher_model.config
    spec = student_spec(spec, cfg, keep_head_dim)
    scores = scores or StructureScores()
    fam = arch.family(cfg)
    teacher = teacher_sizes(cfg)
    t_d = arch.head_dim(cfg)
    s_d = spec["hidden"] // spec["heads"] if head_dim_coupled(cfg) and not keep_head_dim else t_d
    state = teacher_model.state_dict()
    if scores.layers is not None:
        layers = top_indices(scores.layers.float().cpu(), spec["layers"]).tolist()
    else:
        layers = select_layers(teacher["layers"], spec["layers"])
    if spec["hidden"] < teacher["hidden"]:
        h_score = scores.hidden if scores.hidden is not None else _hidden_scores(fam, state, teacher["hidden"])
        hidden = top_indices(h_score.float().cpu(), spec["hidden"])
    else:
        hidden = torch.arange(teacher["hidden"])
    plan = StudentPlan(spec=spec, family=fam, layers=layers, hidden=hidden)
    index = keys_by_layer(state)
    same_heads = spec["heads"] == teacher["heads"] and spec["kv_heads"] == teacher["kv_heads"]
    for t_layer in layers:
        proj = _projections(fam, state, index[t_layer], cfg)
        if same_heads:
            heads, groups = list(range(teacher["heads"])), list(range(teacher["kv_heads"]))
        else:
            heads, groups = _choose_heads(
                proj,
                teacher["heads"],
                teacher["kv_heads"],
                t_d,
                spec["heads"],
                spec["kv_heads"],
                q_score=scores.heads[t_layer] if scores.heads is not None else None,
                kv_score=scores.kv_heads[t_layer] if scores.kv_heads is not None else None,
            )
        dims = _choose_head_dims(fam, proj, heads, t_d, s_d, teacher["heads"], teacher["kv_heads"])
        q_features = torch.cat([h * t_d + dims[s] for s, h in enumerate(heads)])
        if fam == "llama":
            kv_features = torch.cat([g * t_d + dims[0] for g in groups])
        else:
            kv_features = q_features
        if spec["intermediate"] < teacher["intermediate"]:
            if scores.mlp is not None:
                m_score = scores.mlp[t_layer].float().cpu()
            else:
                m_score = sum(u.pow(2).sum(1) for u in proj["ups"]) + proj["down"].pow(2).sum(0)
            mlp = top_indices(m_score, spec["intermediate"])
        else:
            mlp = torch.arange(teacher["intermediate"])
        plan.heads.append(heads)
        plan.kv_heads.append(groups)
        plan.head_dims.append(dims)
        plan.q_features.append(q_features)
        plan.kv_features.append(kv_features)
        plan.mlp.append(mlp)
    return plan


def _slice(tensor: Any, roles: tuple[str | None, ...], plan: StudentPlan, layer: int | None, cfg: Any) -> Any:
    import torch

    for dim, role in enumerate(roles):
        if role is None:
            continue
        if role == "P":
            pooler = getattr(cfg, "pooler_output_size", None)
            if pooler is not None and pooler != arch.hidden_size(cfg):
                continue
            idx = plan.hidden
        elif role == "H":
            idx = plan.hidden
        elif role == "M":
            idx = plan.mlp[layer]
        elif role == "Q":
            idx = plan.q_features[layer]
        elif role == "KV":
            idx = plan.kv_features[layer]
        elif role == "D":
            idx = plan.head_dims[layer][0]
        elif role == "QKV":
            width = tensor.shape[dim] // 3
            q = plan.q_features[layer]
            idx = torch.cat([q, q + width, q + 2 * width])
        else:  # pragma: no cover - the rule tables only use the roles above
            raise AssertionError(role)
        if idx.numel() == tensor.shape[dim] and torch.equal(idx, torch.arange(tensor.shape[dim])):
            continue
        tensor = tensor.index_select(dim, idx.to(tensor.device))
    return tensor


class SliceCache:
    """Teacher tensors outside the blocks (embeddings, final norm, heads) sliced to a hidden-channel set, for reuse.

    They depend only on the kept hidden channels, and a search builds many students with few distinct hidden
    sizes; the word embeddings are the largest single slice. Holds the slices of the last ``keep`` hidden sets
    (a vocabulary of 128k x 2048 is 1 GB a set). The cached tensors are only read: students copy them, or share
    them (``share=True``).
    """

    def __init__(self, keep: int = 2):
        self.keep = keep
        self.sets: dict[bytes, dict[str, Any]] = {}

    def for_hidden(self, hidden: Any) -> dict[str, Any]:
        key = hidden.cpu().numpy().tobytes()
        if key not in self.sets:
            while len(self.sets) >= self.keep:
                self.sets.pop(next(iter(self.sets)))
            self.sets[key] = {}
        return self.sets[key]


def _teacher_state_for(
    student: Any, teacher_model: Any, plan: StudentPlan, cache: SliceCache | None = None
) -> dict[str, Any]:
    teacher_state = teacher_model.state_dict()
    cfg = teacher_model.config
    globals_ = cache.for_hidden(plan.hidden) if cache is not None else None
    out = {}
    for key, target in student.state_dict().items():
        prefix, layer, suffix = split_layer_key(key)
        t_key = key if layer is None else f"{prefix}.{plan.layers[layer]}.{suffix}"
        if t_key not in teacher_state:
            raise ModelError(f"the student parameter {key} has no counterpart {t_key} in the teacher")
        tensor = teacher_state[t_key]
        roles = tensor_roles(plan.family, key)
        if roles is None or len(roles) != tensor.dim():
            if tensor.shape != target.shape:
                raise ModelError(
                    f"do not know how to initialise {key} {tuple(target.shape)} "
                    f"from the teacher's {tuple(tensor.shape)}",
                    hint="use --init random for this architecture",
                )
        elif globals_ is not None and layer is None:
            if t_key not in globals_:
                globals_[t_key] = _slice(tensor, roles, plan, layer, cfg)
            tensor = globals_[t_key]
        else:
            tensor = _slice(tensor, roles, plan, layer, cfg)
        if tensor.shape != target.shape:
            raise ModelError(
                f"initialising {key}: got {tuple(tensor.shape)} from the teacher, need {tuple(target.shape)}"
            )
        out[key] = tensor
    return out


def construct_model(cls: Any, cfg: Any, teacher_model: Any) -> Any:
    """``cls(cfg)`` with the constructor flags of ``teacher_model`` (randomly initialised, or on the meta device)."""
    # Base models take constructor flags that the config does not record; mirror the teacher's choices so
    # the student has the same parameters.
    kwargs: dict[str, Any] = {}
    if teacher_model is getattr(teacher_model, "base_model", None) and hasattr(teacher_model, "pooler"):
        kwargs["add_pooling_layer"] = teacher_model.pooler is not None
        embeddings = getattr(teacher_model, "embeddings", None)
        if embeddings is not None and hasattr(embeddings, "mask_token"):
            kwargs["use_mask_token"] = embeddings.mask_token is not None
    return cls(cfg, **kwargs)


def _construct_uninitialised(cls: Any, cfg: Any, teacher_model: Any) -> Any:
    """The student with its weights allocated but not initialised: every one is overwritten from the teacher.

    The random initialisation of a large student costs more than slicing the teacher's weights into it. Buffers
    computed in ``__init__`` (rotary ``inv_freq``, position ids) are not weight initialisation and stay exact.
    transformers' ``no_init_weights`` also skips tying (it replaces ``init_weights``), so tie afterwards.
    """
    from transformers.initialization import no_init_weights

    with no_init_weights():
        student = construct_model(cls, cfg, teacher_model)
    student.tie_weights()
    return student


def build_student(
    teacher_model: Any,
    spec: str | dict[str, int],
    *,
    init: str = "teacher",
    seed: int = 0,
    plan: StudentPlan | None = None,
    keep_head_dim: bool = False,
    cache: SliceCache | None = None,
    share: bool = False,
) -> Any:
    """A model of the teacher's class, sized by ``spec`` and initialised from the teacher or at random.

    ``spec`` is a spec string or a dict with keys from :data:`~distillkit.models.spec.SPEC_KEYS`. ``init="random"``
    uses the class's own initialisation under ``torch.manual_seed(seed)`` (the caller's RNG state is restored).
    The student is on the teacher's device and dtype, in the teacher's train/eval mode. A ``plan`` from
    :func:`plan_student` (e.g. with importance ``scores``) is used instead of the default one. A ``cache`` shared by
    builds from one teacher (a search) reuses the sliced embeddings and heads. ``share=True`` (teacher init) makes
    the student's weights the sliced tensors themselves instead of copies: weights kept whole are the teacher's own
    storage and cached slices are shared between students, so such a student must not be trained or changed in
    place (a search only scores it).
    """
    import torch

    if init not in INITS:
        raise ConfigError(f"unknown student init {init!r}", hint=f"choose one of: {', '.join(INITS)}")
    cfg = teacher_model.config
    spec = student_spec(spec, cfg, keep_head_dim)
    fam = arch.family(cfg)
    if fam not in LAYER_RULES:  # pragma: no cover - resolve_spec already refused it
        raise ConfigError(f"cannot build {fam} students", hint=f"supported: {', '.join(arch.SUPPORTED_FAMILIES)}")
    s_cfg = student_config(cfg, spec, layers=plan.layers if plan is not None else None, keep_head_dim=keep_head_dim)
    param = next(teacher_model.parameters())
    # Some classes draw from the global RNG in __init__ (ViT's cls token) even without initialisation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if init == "teacher":
            student = _construct_uninitialised(type(teacher_model), s_cfg, teacher_model)
        else:
            student = construct_model(type(teacher_model), s_cfg, teacher_model)
    if init == "teacher":
        plan = plan if plan is not None else plan_student(teacher_model, spec, keep_head_dim=keep_head_dim)
        with torch.no_grad():
            state = _teacher_state_for(student, teacher_model, plan, cache)
            student.load_state_dict(state, strict=True, assign=share)
        if share:
            student.tie_weights()  # assigning gives tied parameters one tensor each
    student.to(device=param.device, dtype=param.dtype)
    student.train(teacher_model.training)
    return student


__all__ = [
    "INITS",
    "SPEC_KEYS",
    "SliceCache",
    "StructureScores",
    "StudentPlan",
    "build_student",
    "construct_model",
    "plan_student",
    "select_layers",
    "student_config",
    "student_spec",
    "top_indices",
    "weight_scores",
]
