"""Which task a model does (``--task``) and the ``transformers`` auto class that builds it."""

from __future__ import annotations

from typing import Any

from distillkit.errors import ConfigError, ModelError

TASKS = ("causal-lm", "masked-lm", "feature-extraction", "sequence-classification", "image-classification")
_VISION_TYPES = {
    "vit",
    "deit",
    "resnet",
    "convnext",
    "convnextv2",
    "swin",
    "beit",
    "dinov2",
    "efficientnet",
    "mobilenet_v2",
}


def detect_task(config: Any) -> str:
    """The task implied by ``config.architectures`` (``--task`` overrides it)."""
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch.endswith(("ForCausalLM", "LMHeadModel")) and "DoubleHeads" not in arch:
            return "causal-lm"
        if arch.endswith("ForMaskedLM") or arch.endswith("ForPreTraining"):
            return "masked-lm"
        if arch.endswith("ForSequenceClassification"):
            return "sequence-classification"
        if arch.endswith("ForImageClassification"):
            return "image-classification"
        if arch.endswith("Model"):
            return "feature-extraction"
    if getattr(config, "model_type", None) in _VISION_TYPES:
        return "image-classification"
    if archs:
        raise ModelError(
            f"cannot tell the task of architecture {archs[0]}", hint=f"pass --task, one of: {', '.join(TASKS)}"
        )
    return "feature-extraction"


def auto_class(task: str) -> Any:
    import transformers as tf

    try:
        return {
            "causal-lm": tf.AutoModelForCausalLM,
            "masked-lm": tf.AutoModelForMaskedLM,
            "feature-extraction": tf.AutoModel,
            "sequence-classification": tf.AutoModelForSequenceClassification,
            "image-classification": tf.AutoModelForImageClassification,
        }[task]
    except KeyError:
        raise ConfigError(f"unknown task {task!r}", hint=f"choose one of: {', '.join(TASKS)}") from None
