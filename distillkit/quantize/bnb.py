"""bitsandbytes schemes through transformers: LLM.int8 (``llm-int8``) and 4-bit NormalFloat / float (``nf4``,
``fp4``). The model is loaded with a ``BitsAndBytesConfig`` and saved with ``save_pretrained``, so the artifact
carries transformers' own bitsandbytes serialization and ``AutoModel*.from_pretrained(dir)`` reloads it quantized.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

from distillkit.errors import ModelError


@contextlib.contextmanager
def quiet_bitsandbytes() -> Iterator[None]:
    """Drop bitsandbytes' and ``kernels``' import-time lines about an optional hub download the user did not ask for
    and cannot act on ("Failed to load CPU gemm_4bit_forward...", "Skipping publisher trust check..."), also when
    quantize runs from Python rather than the CLI; every other warning still comes through."""
    from distillkit.progress import silence_library_noise

    silence_library_noise()
    yield


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
