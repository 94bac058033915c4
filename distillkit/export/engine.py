"""``export_model``: load a source, write it in one format with a parity check, and record the manifest.

Every format writes into a temporary sibling that becomes ``out`` only once the artifact, its
parity check, ``distillkit.json`` and the model card are complete, so a refused export leaves
nothing behind.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from distillkit import manifest as mf
from distillkit.errors import DistillkitError
from distillkit.export.config import ExportConfig, ExportError, parse_size
from distillkit.export.signature import describe_io, max_abs_diff

# Sentence-transformers pooling config: distillkit reads it to pool embeddings the model's way.
_SIDECAR_DIRS = ("1_Pooling",)

FORMATS_WITH_OWN_LOADER = ("onnx", "torch-export")


def _usage(fmt: str, extra: dict[str, Any], path: str) -> str:
    """How to run an ONNX or .pt2 export without distillkit (for the model card)."""
    inputs, output = extra.get("input_names", []), extra.get("output_name", "logits")
    vision = inputs == ["pixel_values"]
    if vision:
        imp = "from transformers import AutoImageProcessor"
        prep = [
            f'processor = AutoImageProcessor.from_pretrained("{path}")',
            'batch = processor(images=[image], return_tensors="{rt}")',
        ]
    else:
        imp = "from transformers import AutoTokenizer"
        prep = [
            f'tokenizer = AutoTokenizer.from_pretrained("{path}")',
            'batch = tokenizer(["hello world"], return_tensors="{rt}")',
        ]
        if "token_type_ids" in inputs:
            prep.append("# one segment: token_type_ids are zeros, and tokenizers may leave them out")
            prep.append('batch["token_type_ids"] = 0 * batch["input_ids"]')
    if fmt == "onnx":
        cast = "" if vision else ".astype(np.int64)"
        code = [
            "import numpy as np",
            "import onnxruntime as ort",
            imp,
            "",
            f'session = ort.InferenceSession("{path}/model.onnx")',
            *(x.replace("{rt}", "np") for x in prep),
            f"feed = {{i.name: batch[i.name]{cast} for i in session.get_inputs()}}",
            f'{output} = session.run(["{output}"], feed)[0]',
        ]
        tail = (
            f"Inputs {inputs} (dynamic axes {extra.get('dynamic_axes')}), output `{output}`; "
            f"written by the {extra.get('exporter')} exporter, opset {extra.get('opset')}."
        )
    else:
        code = [
            "import torch",
            imp,
            "",
            f'module = torch.export.load("{path}/model.pt2").module()',
            *(x.replace("{rt}", "pt") for x in prep),
            f"{output} = module(*(batch[name] for name in {inputs!r}))",
        ]
        tail = f"Positional inputs {inputs}, output `{output}`; dynamic batch/sequence: {extra.get('dynamic_shapes')}."
    return "```python\n" + "\n".join(code) + "\n```\n\n" + tail


def _checkpoint_dtype(config: Any) -> str:
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dt).replace("torch.", "") if dt is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _load(cfg: ExportConfig, source: mf.Source) -> Any:
    from distillkit.models.load import load_config, load_model

    dtype = cfg.dtype
    if dtype == "auto":
        dtype = (
            _checkpoint_dtype(
                load_config(source, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)[0]
            )
            if cfg.format == "hf"
            else "float32"
        )
    loaded = load_model(
        source,
        task=cfg.task,
        dtype=dtype,
        device="cpu",
        allow_pickle=cfg.allow_pickle,
        trust_remote_code=cfg.trust_remote_code,
    )
    loaded.model.eval()
    return loaded


def _save_sidecars(loaded: Any, tmp: Path) -> None:
    """Config, tokenizer/processor and pooling config, so the artifact is usable on its own."""
    loaded.model.config.save_pretrained(tmp)
    gen = getattr(loaded.model, "generation_config", None)
    if gen is not None and loaded.task == "causal-lm":
        gen.save_pretrained(tmp)
    if loaded.processor is not None:
        loaded.processor.save_pretrained(tmp)
    src = Path(loaded.path)
    if not src.is_dir():
        return
    # A sentence-transformers model is more than its transformer: modules.json lists pooling and normalisation
    # stages (1_Pooling/, 2_Normalize/, 2_Dense/...) that SentenceTransformer(dir) silently drops when missing.
    from distillkit.models.save import copy_sentence_transformers_files

    copy_sentence_transformers_files(src, tmp)
    modules = _st_module_dirs(src)
    for name in (*_SIDECAR_DIRS, *modules):
        if (src / name).is_dir():
            shutil.copytree(src / name, tmp / name, dirs_exist_ok=True)


def _st_module_dirs(src: Path) -> list[str]:
    """The module folders a sentence-transformers ``modules.json`` names (not the root transformer, path "")."""
    import json

    try:
        entries = json.loads((src / "modules.json").read_text())
    except (OSError, ValueError):
        return []
    return [
        e["path"]
        for e in entries
        if isinstance(e, dict)
        and isinstance(e.get("path"), str)
        and e["path"]
        and "/" not in e["path"].strip("/")
        and not e["path"].startswith(".")
    ]


def _export_hf(cfg: ExportConfig, loaded: Any, tmp: Path) -> dict[str, Any]:
    """``save_pretrained`` (sharded safetensors) and a reload check: the reloaded model must match."""
    import torch

    from distillkit.models.load import auto_class
    from distillkit.models.packed.format import is_quantized_dir

    if is_quantized_dir(loaded.path):
        return _export_quantized(cfg, loaded, tmp)
    model = loaded.model
    t0 = time.perf_counter()
    model.save_pretrained(tmp, max_shard_size=parse_size(cfg.max_shard_size))
    _save_sidecars(loaded, tmp)
    t1 = time.perf_counter()
    extra: dict[str, Any] = {
        "max_shard_size": cfg.max_shard_size,
        "dtype": str(model.dtype).replace("torch.", ""),
        "shards": sorted(p.name for p in tmp.glob("*.safetensors")),
    }
    try:
        io = describe_io(model, loaded.task, loaded.processor, purpose="the hf reload check")
    except DistillkitError as e:
        extra["note"] = f"reload parity not checked: {e.message}"
        return {"metrics": {}, "extra": extra, "timings": {"export_s": t1 - t0}}
    reloaded = auto_class(loaded.task).from_pretrained(tmp, dtype=model.dtype, trust_remote_code=cfg.trust_remote_code)
    reloaded.eval()
    inputs = io.sample(2, min(16, io.max_positions or 16), seed=cfg.seed + 1, pad=True)
    with torch.no_grad():
        ref = io.wrap(model)(*inputs).float().numpy()
        got = io.wrap(reloaded)(*inputs).float().numpy()
    diff = max_abs_diff(got, ref, io.valid_positions(inputs))
    t2 = time.perf_counter()
    if not diff <= cfg.atol:
        raise ExportError(
            f"hf reload check failed: the saved model differs from the loaded one by {diff:.3g} > --atol {cfg.atol:g}",
            hint="the model may hold state save_pretrained does not write; check its custom code",
        )
    return {
        "metrics": {"hf_max_abs_diff": diff},
        "extra": extra,
        "timings": {"export_s": t1 - t0, "validate_s": t2 - t1},
    }


def _export_quantized(cfg: ExportConfig, loaded: Any, tmp: Path) -> dict[str, Any]:
    """A distillkit-packed model stays packed: the same layout, rewritten, and reloaded for the parity check."""
    import json

    import torch

    from distillkit.models.packed.format import load_quantized, save_quantized
    from distillkit.models.save import config_dtype

    t0 = time.perf_counter()
    qc = json.loads((Path(loaded.path) / "config.json").read_text())["quantization_config"]
    _save_sidecars(loaded, tmp)
    save_quantized(loaded.model, tmp, qc, config_dtype(loaded.model.config))
    t1 = time.perf_counter()
    reloaded = load_quantized(tmp, loaded.task, dtype=loaded.model.dtype, kernel="dequant")
    io = describe_io(loaded.model, loaded.task, loaded.processor, purpose="the hf reload check")
    inputs = io.sample(2, min(16, io.max_positions or 16), seed=cfg.seed + 1, pad=True)
    with torch.no_grad():
        ref = io.wrap(loaded.model)(*inputs).float().numpy()
        got = io.wrap(reloaded)(*inputs).float().numpy()
    diff = max_abs_diff(got, ref, io.valid_positions(inputs))
    if not diff <= cfg.atol:
        raise ExportError(f"reload check of the packed model failed: {diff:.3g} > --atol {cfg.atol:g}")
    extra = {"quantization": qc.get("scheme"), "note": "distillkit packed layout; load with distillkit.load(dir)"}
    return {
        "metrics": {"hf_max_abs_diff": diff},
        "extra": extra,
        "timings": {"export_s": t1 - t0, "validate_s": time.perf_counter() - t1},
    }


def _rewrite_card_usage(tmp: Path, fmt: str, extra: dict[str, Any], path: str) -> None:
    """The generic card says ``AutoModel.from_pretrained``; an ONNX or .pt2 export is loaded differently."""
    card = tmp / "README.md"
    text = card.read_text()
    usage = _usage(fmt, extra, path)
    start = text.find("## Load\n")
    if start < 0:
        card.write_text(text + f"\n## Load\n\n{usage}\n")
        return
    end = text.find("\n## ", start + 1)
    end = len(text) if end < 0 else end + 1
    card.write_text(text[:start] + f"## Load\n\n{usage}\n\n" + text[end:])


@mf.releases_locks
def export_model(cfg: ExportConfig, source: str | mf.Source, out: str, overwrite: bool = False) -> dict[str, Any]:
    """Export ``source`` as ``cfg.format`` into the artifact directory ``out``; returns its manifest dict.

    ``hf``: ``save_pretrained`` directory; ``onnx``: ``model.onnx`` checked with onnxruntime;
    ``torch-export``: ``model.pt2`` checked with ``torch.export.load``. Refused exports
    (:class:`ExportError`) leave no directory behind."""
    src = source if isinstance(source, mf.Source) else mf.read_source(source)
    final = mf.check_output(out, overwrite, protect=[src.path])
    t_start = time.perf_counter()
    if cfg.format == "onnx" and src.kind != "hub":
        from distillkit.models.packed.format import is_quantized_dir

        if is_quantized_dir(src.path):
            raise ExportError(
                "ONNX cannot hold distillkit's packed low-bit weights (unpacking needs integer bit operations)",
                hint="use --format hf or torch-export for the quantized model, or export the float model to ONNX",
            )
    loaded = _load(cfg, src)
    t_loaded = time.perf_counter()
    with mf.atomic_artifact(final, overwrite) as tmp:
        if cfg.format == "hf":
            result = _export_hf(cfg, loaded, tmp)
        else:
            io = describe_io(
                loaded.model, loaded.task, loaded.processor, purpose=f"--format {cfg.format}", error=ExportError
            )
            if cfg.format == "onnx":
                from distillkit.export.onnx import export_onnx

                result = export_onnx(loaded.model, io, tmp, atol=cfg.atol, opset=cfg.opset, seed=cfg.seed)
            else:
                from distillkit.export.torch_export import export_torch

                result = export_torch(loaded.model, io, tmp, atol=cfg.atol, seed=cfg.seed)
            _save_sidecars(loaded, tmp)
        # The exported model is the source model: its quality metrics still describe it (an earlier export's
        # parity numbers do not, and stay in the history).
        previous = {
            k: v
            for k, v in (src.manifest.metrics if src.manifest is not None else {}).items()
            if not k.endswith("_max_abs_diff")
        }
        manifest = mf.Manifest(
            stage="export",
            path=str(final),
            task=loaded.task,
            model_type=getattr(loaded.model.config, "model_type", None),
            inputs={"model": mf.describe_input(src.path, src.manifest)},
            config=cfg.to_dict(),
            metrics={**previous, **result["metrics"]},
            timings={"load_s": t_loaded - t_start, **result["timings"], "total_s": time.perf_counter() - t_start},
            history=mf.history_of(src),
            extra={"format": cfg.format, **result["extra"]},
        )
        mf.finalize_artifact(tmp, manifest, final)
        if cfg.format in FORMATS_WITH_OWN_LOADER:
            _rewrite_card_usage(tmp, cfg.format, manifest.extra, str(final))
    return manifest.to_dict()
