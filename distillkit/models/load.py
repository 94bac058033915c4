"""Load teachers and students: local directories, distillkit artifacts or hub ids.

The task decides the ``AutoModel*`` class; it comes from ``config.architectures`` unless given.
Weights load from safetensors; pickle checkpoints are refused unless ``allow_pickle``.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillkit.errors import ConfigError, ModelError, OfflineError, warn
from distillkit.manifest import MANIFEST_NAME, Source, read_source
from distillkit.models.tasks import TASKS, auto_class, detect_task  # noqa: F401  (load's public names)

DTYPES = ("auto", "float32", "bfloat16", "float16")


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


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# A safetensors header is JSON of a few KB per hundred tensors; anything near this is a corrupt length field.
_MAX_SAFETENSORS_HEADER = 100 * 2**20
_CORRUPT_HINT = "the file is truncated or corrupt (an interrupted download or copy?): fetch or copy it again"


def _diffusers_kind(p: Path) -> str | None:
    """``"pipeline"`` / the class name of a diffusers model directory, else None (reads at most one small JSON)."""
    if (p / "model_index.json").is_file():
        return "pipeline"
    if (p / "config.json").is_file():
        try:
            name = json.loads((p / "config.json").read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            return None
        return name if isinstance(name, str) else None
    return None


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Refuse a truncated or corrupt ``*.safetensors`` file before a loader touches it.

    The format is an 8-byte little-endian header length, a JSON header giving every tensor's byte range, then
    the data; the largest end offset must equal the data size. Only the header is read (KBs), so a checkpoint of
    any size is checked in milliseconds, and a bad one fails with its name instead of a Rust error mid-load.
    """
    f = Path(path)
    size = f.stat().st_size

    def bad(reason: str) -> ModelError:
        return ModelError(f"{f} is not a valid safetensors file: {reason}", hint=_CORRUPT_HINT)

    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise bad(f"it has {size} bytes, fewer than the 8 of a header length")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > _MAX_SAFETENSORS_HEADER:
            raise bad(f"its header claims {n} bytes but the file has {size}")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("its header is not readable JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a table of tensors")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise bad(f"tensor {name!r} has no valid byte range")
        end = max(end, offsets[1])
    data = size - 8 - n
    if end > data:
        raise bad(f"it is truncated: its header describes {end} bytes of tensor data, the file holds {data}")
    if end < data:
        raise bad(f"it has {data - end} trailing bytes after the {end} bytes of tensor data its header describes")


def check_safetensors(directory: str | os.PathLike) -> None:
    """Every ``*.safetensors`` file directly in ``directory`` is whole, and every shard its index names exists."""
    d = Path(directory)
    for f in sorted(d.glob("*.safetensors")):
        if f.is_file():
            check_safetensors_file(f)
    for index in sorted(d.glob("*.safetensors.index.json")):
        try:
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            shards = sorted({str(v) for v in weight_map.values()})
        except (ValueError, AttributeError):
            raise ModelError(f"{index} is not a readable safetensors index", hint=_CORRUPT_HINT) from None
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise ModelError(
                f"{index} names {len(missing)} shard(s) that are not in {d}, e.g. {missing[0]}",
                hint="copy every model-*.safetensors shard beside the index",
            )


def check_pickle_weights(directory: str | os.PathLike) -> None:
    """Pickle weights (``--allow-pickle``) must be a state dict of tensors, checked before transformers reads them.

    transformers skips what it does not recognise in a ``.bin`` and initialises the model's weights at random,
    so a file of other objects would silently load as an untrained model. ``weights_only`` keeps this check from
    running any code the file holds.
    """
    import pickle

    import torch

    for f in sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES):
        try:
            try:
                obj = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(f, map_location="cpu", weights_only=True)  # legacy (non-zip) torch.save format
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, ImportError) as e:
            lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
            # torch's weights_only refusal names the offending class on a "WeightsUnpickler error" line
            why = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("WeightsUnpickler")), None)
            raise ModelError(
                f"{f} is not a file of tensors: {why or (lines or [type(e).__name__])[0]}",
                hint="save the weights with model.save_pretrained(dir) (safetensors); a pickle may hold only tensors",
            ) from None
        if not isinstance(obj, dict) or not obj:
            raise ModelError(
                f"{f} holds a {type(obj).__name__}, not a state dict of tensors",
                hint="save the weights with model.save_pretrained(dir), or torch.save(model.state_dict(), file)",
            )
        others = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
        if others:
            raise ModelError(
                f"{f} holds {len(others)} non-tensor entr{'y' if len(others) == 1 else 'ies'} (e.g. {others[0]!r}), "
                "so it is not a state dict of tensors",
                hint="save the weights with model.save_pretrained(dir), or torch.save(model.state_dict(), file)",
            )


def check_model_dir(path: str, allow_pickle: bool) -> None:
    """Refuse directories that are not models, whole weights files that are corrupt, and pickle-only weights
    unless allowed."""
    p = Path(path)
    kind = _diffusers_kind(p)
    if kind is not None:
        what = "a diffusers pipeline (model_index.json)" if kind == "pipeline" else f"a diffusers {kind} model"
        raise ModelError(
            f"{path} is {what}, not a transformers model",
            hint="distill and bench take diffusers pipelines and UNet/DiT directories; search-student, prune, "
            "quantize and export take transformers models (config.json with a model_type)",
        )
    if not (p / "config.json").is_file():
        raise ModelError(
            f"{path} is not a model directory (no config.json)",
            hint="pass a directory written by save_pretrained, a distillkit artifact, or a hub id",
        )
    names = [f.name for f in p.iterdir() if f.is_file()]
    has_st = any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names)
    has_pickle = any(n.endswith(PICKLE_SUFFIXES) or n == "pytorch_model.bin.index.json" for n in names)
    if not has_st and not has_pickle:
        raise ModelError(f"{path} has a config.json but no weights (*.safetensors)", hint="check the directory")
    if not has_st and has_pickle and not allow_pickle:
        raise ModelError(
            f"{path} has only pickle weights (*.bin), which can run arbitrary code when loaded",
            hint="convert them to safetensors, or pass --allow-pickle if you trust the source",
        )
    check_safetensors(p)


def _check_orphan_manifest(src: Source) -> None:
    """An artifact argument whose directory holds the manifest but no model: say so instead of 'no config.json'."""
    p = Path(src.path)
    if src.kind != "artifact" or not p.is_dir() or (p / "config.json").is_file() or _diffusers_kind(p):
        return
    recorded = src.manifest.path if src.manifest is not None else None
    hint = "the artifact's weights were moved or deleted; pass the directory that holds config.json and the weights"
    if recorded and Path(recorded).resolve() != p.resolve() and (Path(recorded) / "config.json").is_file():
        hint = f"the manifest records its artifact at {recorded}; pass that directory"
    raise ModelError(
        f"{p / MANIFEST_NAME} is a distillkit manifest, but {p} holds no model (no config.json)", hint=hint
    )


# Sources whose ignored auto_map was already reported, so a model loaded twice in one run warns once.
_WARNED_AUTO_MAP: set[str] = set()


def _warn_ignored_auto_map(config: Any, path: str, trust_remote_code: bool) -> None:
    auto_map = getattr(config, "auto_map", None)
    if trust_remote_code or not auto_map or path in _WARNED_AUTO_MAP:
        return
    _WARNED_AUTO_MAP.add(path)
    names = ", ".join(sorted(auto_map)) if isinstance(auto_map, dict) else str(auto_map)
    warn(
        f"{path} asks for custom model code (config.json auto_map: {names}); it is not used without "
        f"--trust-remote-code, and transformers' built-in {config.model_type} classes load the weights instead"
    )


# RoBERTa-style position ids start after the padding index, so the first padding_idx + 1 rows are never used.
_OFFSET_POSITION_TYPES = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer"}


def position_limit(config: Any) -> int | None:
    """How many token positions a text model takes (its position table or RoPE range), or None when unset."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = next(
        (
            v
            for k in ("max_position_embeddings", "n_positions", "n_ctx")
            if isinstance(v := getattr(text, k, None), int) and not isinstance(v, bool) and v > 0
        ),
        None,
    )
    if limit is not None and getattr(text, "model_type", None) in _OFFSET_POSITION_TYPES:
        limit -= int(getattr(text, "pad_token_id", 1) or 0) + 1
    return limit


def check_max_length(config: Any, max_length: int, *, who: str, flag: str = "--max-length") -> None:
    """Refuse sequences longer than ``config``'s position limit: learned position tables (GPT-2, BERT) index out of
    range, and RoPE models (Llama) run but on positions they never saw, so either way the result is wrong."""
    limit = position_limit(config)
    if limit is not None and max_length > limit:
        raise ConfigError(
            f"{flag} {max_length} is longer than the {limit} positions of {who} ({config.model_type})",
            hint=f"pass {flag} {limit} or less",
        )


def _check_loaded_weights(model: Any, info: dict[str, Any], path: str) -> None:
    """Refuse a load that left most of the model at its random initialisation (weights that do not fit the config)."""
    missing = [k for k in info.get("missing_keys") or [] if isinstance(k, str)]
    if not missing:
        return
    state = model.state_dict()
    total = sum(t.numel() for t in state.values())
    lost = sum(state[k].numel() for k in missing if k in state)
    if total and lost / total > 0.5:
        raise ModelError(
            f"the weights in {path} do not fit its config.json: {len(missing)} of {len(state)} tensors "
            f"(e.g. {sorted(missing)[0]}) are not in the checkpoint, so {lost / total:.0%} of the model would be random",
            hint="check that the weight files belong to this config.json, or pass --task for the head they were saved with",
        )


def pooling_mode(path: str) -> str:
    """How a sentence-transformers directory pools token states (its ``1_Pooling`` config): mean, cls or max."""
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
        _check_orphan_manifest(src)
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
    _warn_ignored_auto_map(config, src.path, trust_remote_code)
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
    quant_kernel: str = "dequant",
) -> LoadedModel:
    """Load a model for ``task`` (detected when None) with its tokenizer or image processor.

    ``quant_kernel`` applies to distillkit's packed quantized artifacts (:mod:`distillkit.models.packed.kernels`): the
    engines keep the exact ``dequant`` product; ``distillkit.load`` and ``bench`` default to ``auto``."""
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
    from distillkit.models.packed.format import is_quantized_dir

    if src.kind != "hub" and is_quantized_dir(src.path):
        from distillkit.models.packed.format import load_quantized

        model = load_quantized(src.path, task, dtype=torch_dtype, device=resolve_device(device), kernel=quant_kernel)
        processor = load_processor(src.path, task, trust_remote_code=trust_remote_code)
        return LoadedModel(
            model=model, processor=processor, task=task, path=src.path, source=src, pooling=pooling_mode(src.path)
        )
    if src.kind != "hub" and allow_pickle and not any(Path(src.path).glob("*.safetensors")):
        check_pickle_weights(src.path)
    try:
        model, info = auto_class(task).from_pretrained(src.path, config=config, output_loading_info=True, **kwargs)
    except ValueError as e:
        raise ModelError(
            f"{src.path} cannot be loaded for task {task}: {str(e).splitlines()[0]}",
            hint=f"pass --task to choose another of: {', '.join(TASKS)}",
        ) from None
    except OSError as e:
        raise ModelError(f"cannot load the weights of {src.path}: {str(e).splitlines()[0]}") from None
    _check_loaded_weights(model, info, src.path)
    model.to(resolve_device(device))
    processor = load_processor(src.path, task, trust_remote_code=trust_remote_code, local_only=local_only)
    pooling = pooling_mode(src.path) if src.kind != "hub" else "mean"
    return LoadedModel(model=model, processor=processor, task=task, path=src.path, source=src, pooling=pooling)
