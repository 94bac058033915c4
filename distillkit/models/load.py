"""Load teachers and students: local directories, distillkit artifacts or hub ids.

The task decides the ``AutoModel*`` class; it comes from ``config.architectures`` unless given.
Weights load from safetensors; pickle checkpoints are refused unless ``allow_pickle``.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillkit.errors import ConfigError, ModelError, OfflineError
from distillkit.manifest import Source, read_source

TASKS = ("causal-lm", "masked-lm", "feature-extraction", "sequence-classification", "image-classification")
DTYPES = ("auto", "float32", "bfloat16", "float16")
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


@dataclass
class LoadedModel:
    """A model with what is needed to feed it. ``processor`` is a tokenizer or an image processor (or None)."""

    model: Any
    processor: Any
    task: str
    path: str
    source: Source | None = None
    pooling: str = "mean"

    @property
    def config(self) -> Any:
        return self.model.config


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


def resolve_dtype(name: str | None) -> Any:
    """``"auto"``/None keeps the checkpoint's dtype for loading but float32 is used for training."""
    import torch

    if name in (None, "auto"):
        return None
    try:
        return {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}", hint=f"choose one of: {', '.join(DTYPES)}") from None


def resolve_device(name: str | None) -> Any:
    """``auto`` picks CUDA when present, else CPU."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}", hint="use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available", hint="use --device cpu")
    return dev


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_model_dir(path: str, allow_pickle: bool) -> None:
    """Refuse directories that are not models, and pickle-only weights unless allowed."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ModelError(
            f"{path} is not a model directory (no config.json)",
            hint="pass a directory written by save_pretrained, a distillkit artifact, or a hub id",
        )
    names = [f.name for f in p.iterdir() if f.is_file()]
    has_st = any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names)
    has_pickle = any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) or n == "pytorch_model.bin.index.json" for n in names)
    if not has_st and not has_pickle:
        raise ModelError(f"{path} has a config.json but no weights (*.safetensors)", hint="check the directory")
    if not has_st and has_pickle and not allow_pickle:
        raise ModelError(
            f"{path} has only pickle weights (*.bin), which can run arbitrary code when loaded",
            hint="convert them to safetensors, or pass --allow-pickle if you trust the source",
        )


def _pooling(path: str) -> str:
    cfg = Path(path) / "1_Pooling" / "config.json"
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError):
            return "mean"
        if data.get("pooling_mode_cls_token"):
            return "cls"
        if data.get("pooling_mode_max_tokens"):
            return "max"
    return "mean"


def load_config(
    source: str | Source, *, trust_remote_code: bool = False, allow_pickle: bool = False
) -> tuple[Any, Source]:
    """The ``PretrainedConfig`` of a source, with the same checks as :func:`load_model`."""
    from transformers import AutoConfig

    src = source if isinstance(source, Source) else read_source(source)
    local_only = False
    if src.kind == "hub":
        local_only = not _hub_reachable()
    else:
        if not Path(src.path).exists():
            raise ModelError(f"model path {src.path} does not exist", hint="check the path")
        check_model_dir(src.path, allow_pickle)
    try:
        config = AutoConfig.from_pretrained(src.path, trust_remote_code=trust_remote_code, local_files_only=local_only)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(
                f"{src.path} needs custom code to load", hint="pass --trust-remote-code if you trust the source"
            ) from None
        raise ModelError(f"cannot read the config of {src.path}: {e}") from None
    except OSError as e:
        if src.kind == "hub" and local_only:
            raise OfflineError(
                f"{src.path} looks like a hub id, but the hub cannot be reached and it is not in the local cache",
                hint="download it where there is network, or pass a local model directory",
            ) from None
        raise ModelError(f"cannot load {src.path}: {str(e).splitlines()[0]}", hint="check the path or hub id") from None
    return config, src


def load_processor(path: str, task: str, *, trust_remote_code: bool = False, local_only: bool = False) -> Any:
    """The tokenizer (text tasks) or image processor (vision) saved with a model, or None."""
    try:
        if task == "image-classification":
            from transformers import AutoImageProcessor

            return AutoImageProcessor.from_pretrained(
                path, trust_remote_code=trust_remote_code, local_files_only=local_only
            )
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=local_only)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def load_model(
    source: str | Source,
    *,
    task: str | None = None,
    dtype: str | None = None,
    device: str | None = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a model for ``task`` (detected when None) with its tokenizer or image processor."""
    import torch

    config, src = load_config(source, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    task = task or detect_task(config)
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}", hint=f"choose one of: {', '.join(TASKS)}")
    local_only = src.kind == "hub" and not _hub_reachable()
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": local_only}
    torch_dtype = resolve_dtype(dtype)
    kwargs["dtype"] = torch_dtype if torch_dtype is not None else torch.float32
    if src.kind != "hub" and allow_pickle:
        kwargs["use_safetensors"] = None
    from distillkit.quantize.format import is_quantized_dir

    if src.kind != "hub" and is_quantized_dir(src.path):
        from distillkit.quantize.format import load_quantized

        model = load_quantized(src.path, task, dtype=torch_dtype, device=resolve_device(device))
        processor = load_processor(src.path, task, trust_remote_code=trust_remote_code)
        return LoadedModel(
            model=model, processor=processor, task=task, path=src.path, source=src, pooling=_pooling(src.path)
        )
    try:
        model = auto_class(task).from_pretrained(src.path, config=config, **kwargs)
    except ValueError as e:
        raise ModelError(
            f"{src.path} cannot be loaded for task {task}: {str(e).splitlines()[0]}",
            hint=f"pass --task to choose another of: {', '.join(TASKS)}",
        ) from None
    except OSError as e:
        raise ModelError(f"cannot load the weights of {src.path}: {str(e).splitlines()[0]}") from None
    model.to(resolve_device(device))
    processor = load_processor(src.path, task, trust_remote_code=trust_remote_code, local_only=local_only)
    pooling = _pooling(src.path) if src.kind != "hub" else "mean"
    return LoadedModel(model=model, processor=processor, task=task, path=src.path, source=src, pooling=pooling)
