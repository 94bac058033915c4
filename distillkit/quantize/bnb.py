"""bitsandbytes schemes through transformers: LLM.int8 (``llm-int8``) and 4-bit NormalFloat / float (``nf4``,
``fp4``). The model is loaded with a ``BitsAndBytesConfig`` and saved with ``save_pretrained``, so the artifact
carries transformers' own bitsandbytes serialization and ``AutoModel*.from_pretrained(dir)`` reloads it quantized.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

from distillkit.errors import ModelError


@contextlib.contextmanager
def quiet_bitsandbytes() -> Iterator[None]:
    """Silence bitsandbytes' and ``kernels``' log lines while it imports and loads ("Failed to load CPU
    gemm_4bit_forward from kernels-community...", "Skipping publisher trust check..."): they are about an optional
    download the user did not ask for and cannot act on, and errors still raise."""
    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def bnb_config(scheme: str) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    if scheme == "llm-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=scheme,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.uint8,
    )


def quantize_bnb(path: str, task: str, scheme: str, device: Any, *, trust_remote_code: bool = False) -> Any:
    """Load ``path`` quantized with the bitsandbytes ``scheme`` on ``device``."""
    from distillkit.models.load import auto_class

    with quiet_bitsandbytes(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = auto_class(task).from_pretrained(
                path,
                quantization_config=bnb_config(scheme),
                device_map={"": str(device)},
                trust_remote_code=trust_remote_code,
            )
        except (ValueError, RuntimeError, ImportError) as e:
            raise ModelError(
                f"bitsandbytes could not quantize {path}: {str(e).splitlines()[0]}",
                hint="bitsandbytes 0.45+ runs on CUDA and (0.50+) on CPU; try --scheme int8 or int4 otherwise",
            ) from None
    return model.eval()
