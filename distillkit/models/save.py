"""Writing a model directory the way every stage does: in the source checkpoint's dtype, with its
sentence-transformers files, so the artifact loads like its source (``AutoModel`` or ``SentenceTransformer``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

# The sentence-transformers files at the top of a model directory (besides the module folders it lists).
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def config_dtype(config: Any) -> Any:
    """The ``torch.dtype`` a transformers config records (``dtype`` or the older ``torch_dtype``); float32 if none."""
    import torch

    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else torch.float32


def save_student(model: Any, teacher: Any, directory: Path) -> None:
    """``save_pretrained`` in the teacher checkpoint's dtype (bf16/fp16 kept), plus its sentence-transformers files.

    ``teacher`` is a :class:`~distillkit.models.load.LoadedModel` (its ``config`` and ``path`` are read).
    """
    import torch

    dtype = config_dtype(teacher.config)
    if dtype in (torch.bfloat16, torch.float16):
        model = model.to(dtype)
    model.save_pretrained(directory, safe_serialization=True)
    copy_sentence_transformers_files(teacher.path, directory)


def copy_sentence_transformers_files(source: str | Path, directory: Path) -> None:
    """The sentence-transformers files (modules.json, pooling config) of a model directory, copied beside a new one."""
    src = Path(source)
    if src.is_dir() and (src / "modules.json").is_file():
        for name in ST_FILES:
            if (src / name).is_file():
                shutil.copy(src / name, directory / name)
        for sub in src.iterdir():
            if sub.is_dir() and sub.name.startswith("1_Pooling"):
                shutil.copytree(sub, directory / sub.name)


__all__ = ["ST_FILES", "config_dtype", "copy_sentence_transformers_files", "save_student"]
