"""distillkit's packed low-bit format: save and load.

An artifact directory holds the usual ``config.json`` (plus tokenizer files) and one ``quantized.safetensors``. The
weights file is deliberately not ``model.safetensors``: a plain ``transformers`` ``from_pretrained`` then fails
loudly ("no file named model.safetensors") instead of building the model with random weights. ``config.json``
carries ``quantization_config`` with ``quant_method: "distillkit"`` and describes every quantized module::

    "quantization_config": {
      "quant_method": "distillkit", "format_version": 1, "scheme": "int4", "act_bits": null,
      "runtime": "dequant" | "dynamic-int8",
      "modules": {"model.layers.0.mlp.up_proj": {"kind": "linear", "in_features": 2048, "out_features": 8192,
                  "bits": 4, "group_size": 128, "symmetric": false, "codebook": false, "bias": false}, ...}
    }

For a quantized module ``M`` with ``O`` outputs, ``I`` inputs, ``b`` bits and group ``g`` the tensors are:

- ``M.qweight``: uint8 ``[O, ceil(I * b / 8)]``; codes ``u`` in ``[0, 2**b)``, ``8 / b`` per byte, the first code
  in the lowest bits, along the input dimension;
- ``M.scales``: float16 ``[O, I / g]``;
- ``M.zeros``: uint8 ``[O, I / g]`` when asymmetric (symmetric codes have the implicit zero ``2**(b-1)``);
- ``M.offsets`` (float16 ``[O, I / g]``) and ``M.codebook`` (float32 ``[2**b]``) for learned quantization points;
- ``M.bias`` in the model dtype when the layer has one.

Dequantization: ``W[o, i] = (u - z[o, i // g]) * s[o, i // g]``, or ``codebook[u] * s + offset`` with a codebook.
Embeddings use the same layout with ``O`` = vocabulary rows; a ``tied`` output projection has no tensors and reads
its embedding's. Every other parameter is stored unchanged under its usual name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from distillkit.errors import ModelError

QUANT_METHOD = "distillkit"
WEIGHTS_NAME = "quantized.safetensors"
FORMAT_VERSION = 1
_KEEP_DTYPE = ("qweight", "scales", "zeros", "offsets", "codebook")


def is_quantized_dir(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return qc.get("quant_method") == QUANT_METHOD


def save_quantized(model: torch.nn.Module, directory: Path, quantization_config: dict, dtype: torch.dtype) -> None:
    """Write ``model`` (with quantized modules in place) as config.json + quantized.safetensors."""
    from safetensors.torch import save_file

    sd = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point() and k.rsplit(".", 1)[-1] not in _KEEP_DTYPE:
            v = v.to(dtype)
        sd[k] = v.detach().contiguous().cpu()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "quant_method": QUANT_METHOD})
    config = model.config
    config.quantization_config = quantization_config
    try:
        config.save_pretrained(directory)
    finally:
        del config.quantization_config
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(directory)


def load_quantized(
    path: str | Path, task: str, *, dtype: torch.dtype | None = None, device: Any = "cpu", kernel: str = "dequant"
) -> Any:
    """Rebuild a model saved by :func:`save_quantized`; ``kernel`` picks how its packed layers multiply
    (:mod:`distillkit.models.packed.kernels`). The resolved kernel is ``model.quant_kernel``."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from distillkit.models.packed.kernels import resolve_kernel, select_kernel_
    from distillkit.models.packed.modules import build_quantized_, to_dynamic_int8_
    from distillkit.models.tasks import auto_class

    path = Path(path)
    resolve_kernel(kernel, device)  # a kernel this machine cannot run is refused before any work
    config = AutoConfig.from_pretrained(path)
    qc = config.quantization_config
    del config.quantization_config
    if qc.get("format_version", 0) > FORMAT_VERSION:
        raise ModelError(
            f"{path} was written by a newer distillkit (format {qc['format_version']})",
            hint="upgrade distillkit to load it",
        )
    dtype = dtype or _config_dtype(config)
    if qc.get("runtime") == "dynamic-int8":
        dtype = torch.float32  # torch's dynamic int8 Linear takes float32 activations
    model = auto_class(task).from_config(config, dtype=dtype)
    build_quantized_(model, qc["modules"], qc.get("act_bits"), dtype)
    if not (path / WEIGHTS_NAME).is_file():
        raise ModelError(f"{path} has a distillkit quantization config but no {WEIGHTS_NAME}", hint="quantize again")
    state = load_file(str(path / WEIGHTS_NAME))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _is_tied_alias(model, k)]
    if missing or unexpected:
        raise ModelError(
            f"{path} does not match its quantization layout (missing {missing[:3]}, unexpected {unexpected[:3]})",
            hint="the files were changed after quantization; quantize again",
        )
    if qc.get("runtime") == "dynamic-int8":
        to_dynamic_int8_(model)
    model = model.to(device).eval()
    model.quant_kernel = select_kernel_(model, kernel, device)
    return model


def _is_tied_alias(model: Any, key: str) -> bool:
    # transformers may list a tied output weight (lm_head.weight) as expected; it lives in the embedding
    name = key.rsplit(".", 1)[0]
    from distillkit.models.packed.modules import TiedQuantLinear

    try:
        return isinstance(model.get_submodule(name), TiedQuantLinear)
    except AttributeError:
        return False


def _config_dtype(config: Any) -> torch.dtype:
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else torch.float32
