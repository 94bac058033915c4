"""What a model gives the losses on one batch: its features (logits, hidden states, attention q/k/v, pooled
embedding), the positions that count, and the last hidden state the fused loss works from.

Shared by the engine (student and teacher), the teacher feeds (``feed``, ``memo``) and the fused loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from distillkit.errors import ConfigError

# the feature name that makes ``student_features`` return the last hidden state instead of logits (--fused-loss)
FUSED_NEED = "fused_hidden"


def loss_mask(batch: dict[str, Any], task: str) -> Any:
    """Positions that count for token-level losses ([B, T]); None for one prediction per example."""
    if task in ("sequence-classification", "image-classification"):
        return None
    # on-policy and cross-tokenizer batches count only generated / aligned positions
    return batch.get("kd_mask", batch.get("attention_mask"))


def student_features(
    model: nn.Module,
    batch: dict[str, Any],
    task: str,
    needs: set[str],
    blocks: list[int],
    pooling: str,
    with_labels: bool = False,
) -> tuple[Any, Any]:
    """Run ``model`` on ``batch`` and collect what the losses need (plus the hard-label loss)."""
    from distillkit.distill.losses import Features
    from distillkit.models.capture import capture_qkv, pool
    from distillkit.models.forward import model_inputs

    if FUSED_NEED in needs:  # --fused-loss: the last hidden state instead of logits
        return last_hidden_features(model, batch), None
    inputs = model_inputs(model, batch)
    if with_labels and "labels" in batch:
        inputs["labels"] = batch["labels"]
    want_hidden = bool(needs & {"hidden_states"}) or task == "feature-extraction"
    if "qkv" in needs:
        with capture_qkv(model, blocks) as qkv:
            out = model(**inputs, output_hidden_states=want_hidden)
        qkv = dict(qkv)
    else:
        out = model(**inputs, output_hidden_states=want_hidden)
        qkv = None
    feats = Features(
        logits=getattr(out, "logits", None),
        hidden_states=getattr(out, "hidden_states", None) if want_hidden else None,
        qkv=qkv,
    )
    if "embedding" in needs:
        hidden = out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]
        feats.embedding = pool(hidden, batch.get("attention_mask"), pooling)
    hard = getattr(out, "loss", None) if with_labels else None
    return feats, hard


@dataclass
class HiddenFeatures:
    """What a model gives the fused loss: its last hidden state [B, T, H] (after the final norm)."""

    last_hidden: Any


def decoder_and_head(model: Any) -> tuple[Any, Any]:
    """(decoder returning ``last_hidden_state``, linear output head) of a causal LM, or raise ConfigError."""
    import torch

    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if decoder is None or decoder is model:
        raise ConfigError(f"{type(model).__name__} has no separate decoder to stop before the output head")
    # exactly nn.Linear without hooks: a subclass (fake-quantized, 4-bit) or a hook could change what the
    # head computes, and the fused loss multiplies by the raw weight
    if type(head) is not torch.nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        raise ConfigError(f"{type(model).__name__}'s output head is {type(head).__name__}, not a plain Linear layer")
    return decoder, head


def last_hidden_features(model: Any, batch: dict[str, Any]) -> HiddenFeatures:
    """Run ``model``'s decoder on ``batch`` (no output head): its last hidden state [B, T, H]."""
    from distillkit.models.forward import model_inputs

    decoder, _ = decoder_and_head(model)
    out = decoder(**model_inputs(decoder, batch))
    return HiddenFeatures(last_hidden=out.last_hidden_state)
