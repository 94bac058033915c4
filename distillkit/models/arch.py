"""Read architecture sizes from a ``PretrainedConfig`` whatever its naming scheme.

Configs name the same quantity differently (``n_layer`` / ``num_hidden_layers``, ``n_embd`` /
``hidden_size``, ``n_inner`` / ``intermediate_size``); these accessors hide that so the spec parser,
the student builder, search and pruning agree on what "the teacher's hidden size" is.
"""

from __future__ import annotations

from typing import Any

from distillkit.errors import ModelError

#: Families whose students :mod:`distillkit.models.student` can build and initialise from a teacher.
SUPPORTED_FAMILIES = ("llama", "gpt2", "bert", "vit")

# model_type -> family. Only types whose module layout matches the family's exactly are listed:
# the student builder slices weights by parameter name, so a look-alike with other names would fail late.
_FAMILY_OF_TYPE = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gpt2": "gpt2",
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "vit": "vit",
}


def _first(cfg: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return None


def _required(cfg: Any, names: tuple[str, ...], what: str) -> int:
    value = _first(cfg, names)
    if value is None:
        kind = getattr(cfg, "model_type", type(cfg).__name__)
        raise ModelError(f"cannot tell the {what} of a {kind} config (none of {', '.join(names)} is set)")
    return int(value)


def family(cfg: Any) -> str:
    """``"llama"``, ``"gpt2"``, ``"bert"`` or ``"vit"``; otherwise the config's own ``model_type``."""
    model_type = str(getattr(cfg, "model_type", "") or "unknown")
    return _FAMILY_OF_TYPE.get(model_type, model_type)


def num_layers(cfg: Any) -> int:
    """Number of transformer blocks."""
    return _required(cfg, ("num_hidden_layers", "n_layer", "n_layers", "num_layers"), "number of layers")


def hidden_size(cfg: Any) -> int:
    """Width of the residual stream."""
    return _required(cfg, ("hidden_size", "n_embd", "d_model", "dim"), "hidden size")


def num_heads(cfg: Any) -> int:
    """Number of query heads."""
    return _required(cfg, ("num_attention_heads", "n_head", "n_heads", "num_heads"), "number of attention heads")


def num_kv_heads(cfg: Any) -> int:
    """Number of key/value heads (equal to :func:`num_heads` without grouped-query attention)."""
    value = _first(cfg, ("num_key_value_heads", "num_kv_heads", "n_kv_heads"))
    return int(value) if value is not None else num_heads(cfg)


def head_dim(cfg: Any) -> int:
    """Size of one attention head: an explicit ``head_dim`` when set, else hidden / heads."""
    value = getattr(cfg, "head_dim", None)
    return int(value) if value is not None else hidden_size(cfg) // num_heads(cfg)


def intermediate_size(cfg: Any) -> int:
    """Width of the MLP; GPT-2's ``n_inner=None`` means 4 x hidden."""
    value = _first(cfg, ("intermediate_size", "n_inner", "ffn_dim", "hidden_dim"))
    return int(value) if value is not None else 4 * hidden_size(cfg)


def vocab_size(cfg: Any) -> int | None:
    """Size of the token vocabulary, or None for models without one (vision)."""
    value = getattr(cfg, "vocab_size", None)
    return int(value) if value is not None else None


def check_vocab(teacher_cfg: Any, student_cfg: Any) -> None:
    """Refuse a teacher/student pair whose logits cannot be compared token for token."""
    t, s = vocab_size(teacher_cfg), vocab_size(student_cfg)
    if t != s:
        raise ModelError(
            f"teacher and student vocabularies differ (teacher {t}, student {s})",
            hint="distil into a student that uses the teacher's tokenizer, e.g. one built with --student layers=N",
        )
