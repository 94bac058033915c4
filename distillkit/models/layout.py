"""Where each supported transformer family keeps its tensors, and what each tensor dimension is.

Shared by the student builder (:mod:`distillkit.models.student`), the pruner's importance scores, the search's
proxy scores and activation capture: a layer key is split into container, index and suffix
(:func:`split_layer_key`), each tensor's dimensions get roles (:func:`tensor_roles`) and each layer's projections
are found through :data:`PROJECTION_LAYOUTS`. Torch-free.
"""

from __future__ import annotations

import re
from typing import Any

# A layer key is <container>.<index>.<suffix>; the containers are Llama/ViT "layers", BERT/old ViT "layer",
# GPT-2 "h".
_LAYER_RE = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h))\.(\d+)\.(.+)$")

# Roles of a tensor's dimensions: H hidden channel, Q query features, KV key/value features, QKV GPT-2's packed
# q|k|v, M MLP channel, D within-head dimension shared by all heads, P pooler output (follows H when the
# teacher's pooler is as wide as its hidden size), None kept whole.
LAYER_RULES: dict[str, list[tuple[str, tuple[str | None, ...]]]] = {
    "llama": [
        (r"self_attn\.q_proj\.weight", ("Q", "H")),
        (r"self_attn\.q_proj\.bias", ("Q",)),
        (r"self_attn\.[kv]_proj\.weight", ("KV", "H")),
        (r"self_attn\.[kv]_proj\.bias", ("KV",)),
        (r"self_attn\.o_proj\.weight", ("H", "Q")),
        (r"self_attn\.o_proj\.bias", ("H",)),
        (r"self_attn\.[qk]_norm\.weight", ("D",)),
        (r"mlp\.(gate|up)_proj\.weight", ("M", "H")),
        (r"mlp\.(gate|up)_proj\.bias", ("M",)),
        (r"mlp\.down_proj\.weight", ("H", "M")),
        (r"mlp\.down_proj\.bias", ("H",)),
        (r"(input|post_attention)_layernorm\.weight", ("H",)),
    ],
    # Conv1D stores weights as [in, out].
    "gpt2": [
        (r"ln_[12]\.(weight|bias)", ("H",)),
        (r"attn\.c_attn\.weight", ("H", "QKV")),
        (r"attn\.c_attn\.bias", ("QKV",)),
        (r"attn\.c_proj\.weight", ("Q", "H")),
        (r"attn\.c_proj\.bias", ("H",)),
        (r"mlp\.c_fc\.weight", ("H", "M")),
        (r"mlp\.c_fc\.bias", ("M",)),
        (r"mlp\.c_proj\.weight", ("M", "H")),
        (r"mlp\.c_proj\.bias", ("H",)),
    ],
    "bert": [
        (r"attention\.self\.query\.weight", ("Q", "H")),
        (r"attention\.self\.query\.bias", ("Q",)),
        (r"attention\.self\.(key|value)\.weight", ("KV", "H")),
        (r"attention\.self\.(key|value)\.bias", ("KV",)),
        (r"attention\.output\.dense\.weight", ("H", "Q")),
        (r"attention\.output\.dense\.bias", ("H",)),
        (r"attention\.output\.LayerNorm\.(weight|bias)", ("H",)),
        (r"intermediate\.dense\.weight", ("M", "H")),
        (r"intermediate\.dense\.bias", ("M",)),
        (r"output\.dense\.weight", ("H", "M")),
        (r"output\.dense\.bias", ("H",)),
        (r"output\.LayerNorm\.(weight|bias)", ("H",)),
    ],
    # transformers >= 5 names (q_proj, mlp.fc1) and the older BERT-like names.
    "vit": [
        (r"attention\.q_proj\.weight|attention\.attention\.query\.weight", ("Q", "H")),
        (r"attention\.q_proj\.bias|attention\.attention\.query\.bias", ("Q",)),
        (r"attention\.[kv]_proj\.weight|attention\.attention\.(key|value)\.weight", ("KV", "H")),
        (r"attention\.[kv]_proj\.bias|attention\.attention\.(key|value)\.bias", ("KV",)),
        (r"attention\.o_proj\.weight|attention\.output\.dense\.weight", ("H", "Q")),
        (r"attention\.o_proj\.bias|attention\.output\.dense\.bias", ("H",)),
        (r"mlp\.fc1\.weight|intermediate\.dense\.weight", ("M", "H")),
        (r"mlp\.fc1\.bias|intermediate\.dense\.bias", ("M",)),
        (r"mlp\.fc2\.weight|output\.dense\.weight", ("H", "M")),
        (r"mlp\.fc2\.bias|output\.dense\.bias", ("H",)),
        (r"layernorm_(before|after)\.(weight|bias)", ("H",)),
    ],
}

GLOBAL_RULES: dict[str, list[tuple[str, tuple[str | None, ...]]]] = {
    "llama": [
        (r"embed_tokens\.weight", (None, "H")),
        (r"norm\.weight", ("H",)),
        (r"lm_head\.weight", (None, "H")),
        (r"score\.weight", (None, "H")),
    ],
    "gpt2": [
        (r"wte\.weight", (None, "H")),
        (r"wpe\.weight", (None, "H")),
        (r"ln_f\.(weight|bias)", ("H",)),
        (r"lm_head\.weight", (None, "H")),
        (r"score\.weight", (None, "H")),
    ],
    "bert": [
        (r"embeddings\.(word|position|token_type)_embeddings\.weight", (None, "H")),
        (r"embeddings\.LayerNorm\.(weight|bias)", ("H",)),
        (r"pooler\.dense\.weight", ("H", "H")),
        (r"pooler\.dense\.bias", ("H",)),
        (r"predictions\.transform\.dense\.weight|lm_head\.dense\.weight", ("H", "H")),
        (r"predictions\.transform\.dense\.bias|lm_head\.dense\.bias", ("H",)),
        (r"predictions\.transform\.LayerNorm\.(weight|bias)|lm_head\.layer_norm\.(weight|bias)", ("H",)),
        (r"predictions\.decoder\.weight|lm_head\.decoder\.weight", (None, "H")),
        (r"predictions\.(decoder\.)?bias|lm_head\.(decoder\.)?bias", (None,)),
        (r"classifier\.dense\.weight", ("H", "H")),
        (r"classifier\.dense\.bias", ("H",)),
        (r"classifier(\.out_proj)?\.weight|seq_relationship\.weight", (None, "H")),
        (r"classifier(\.out_proj)?\.bias|seq_relationship\.bias", (None,)),
    ],
    "vit": [
        (r"embeddings\.(cls_token|mask_token|position_embeddings)", (None, None, "H")),
        (r"embeddings\.patch_embeddings\.projection\.weight", ("H", None, None, None)),
        (r"embeddings\.patch_embeddings\.projection\.bias", ("H",)),
        (r"layernorm\.(weight|bias)", ("H",)),
        (r"pooler\.dense\.weight", ("P", "H")),
        (r"pooler\.dense\.bias", ("P",)),
        (r"classifier\.weight", (None, "H")),
        (r"classifier\.bias", (None,)),
    ],
}

# Where each family keeps a layer's projections, as suffixes after "<container>.<index>.". ``qkv`` is GPT-2's
# packed Conv1D; ``conv1d`` says weights are [in, out].
PROJECTION_LAYOUTS: dict[str, list[dict[str, Any]]] = {
    "llama": [
        {
            "q": "self_attn.q_proj.weight",
            "k": "self_attn.k_proj.weight",
            "v": "self_attn.v_proj.weight",
            "o": "self_attn.o_proj.weight",
            "up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
            "down": "mlp.down_proj.weight",
        }
    ],
    "gpt2": [
        {
            "qkv": "attn.c_attn.weight",
            "o": "attn.c_proj.weight",
            "up": ("mlp.c_fc.weight",),
            "down": "mlp.c_proj.weight",
            "conv1d": True,
        }
    ],
    "bert": [
        {
            "q": "attention.self.query.weight",
            "k": "attention.self.key.weight",
            "v": "attention.self.value.weight",
            "o": "attention.output.dense.weight",
            "up": ("intermediate.dense.weight",),
            "down": "output.dense.weight",
        }
    ],
    "vit": [
        {
            "q": "attention.q_proj.weight",
            "k": "attention.k_proj.weight",
            "v": "attention.v_proj.weight",
            "o": "attention.o_proj.weight",
            "up": ("mlp.fc1.weight",),
            "down": "mlp.fc2.weight",
        },
        {
            "q": "attention.attention.query.weight",
            "k": "attention.attention.key.weight",
            "v": "attention.attention.value.weight",
            "o": "attention.output.dense.weight",
            "up": ("intermediate.dense.weight",),
            "down": "output.dense.weight",
        },
    ],
}

_COMPILED: dict[str, tuple[list[tuple[re.Pattern, tuple]], list[tuple[re.Pattern, tuple]]]] = {}


def _rules(fam: str) -> tuple[list[tuple[re.Pattern, tuple]], list[tuple[re.Pattern, tuple]]]:
    if fam not in _COMPILED:
        layer = [(re.compile(p), roles) for p, roles in LAYER_RULES[fam]]
        glob = [(re.compile(r"(?:^|\.)(?:" + p + r")$"), roles) for p, roles in GLOBAL_RULES[fam]]
        _COMPILED[fam] = (layer, glob)
    return _COMPILED[fam]


def split_layer_key(key: str) -> tuple[str, int | None, str]:
    """``"model.layers.3.mlp.up_proj.weight"`` -> ``("model.layers", 3, "mlp.up_proj.weight")``."""
    m = _LAYER_RE.match(key)
    if m is None:
        return key, None, key
    return m.group(1), int(m.group(2)), m.group(3)


def tensor_roles(fam: str, key: str) -> tuple[str | None, ...] | None:
    """The roles of the dimensions of the tensor ``key`` in a ``fam`` model (see :data:`LAYER_RULES`); None: kept whole."""
    layer_rules, global_rules = _rules(fam)
    _, index, suffix = split_layer_key(key)
    if index is not None:
        for pattern, roles in layer_rules:
            if pattern.fullmatch(suffix):
                return roles
        return None
    for pattern, roles in global_rules:
        if pattern.search(key):
            return roles
    return None


def keys_by_layer(state: dict[str, Any]) -> dict[int, dict[str, str]]:
    """``{layer index: {suffix: full key}}`` of the per-layer tensors of a state dict."""
    layers: dict[int, dict[str, str]] = {}
    for key in state:
        _, index, suffix = split_layer_key(key)
        if index is not None:
            layers.setdefault(index, {})[suffix] = key
    return layers


__all__ = [
    "GLOBAL_RULES",
    "LAYER_RULES",
    "PROJECTION_LAYOUTS",
    "keys_by_layer",
    "split_layer_key",
    "tensor_roles",
]
