"""What bench runs a model with: PyTorch for model directories, onnxruntime for ``export --format onnx``
artifacts, ``torch.export.load`` for ``export --format torch-export`` ones.

Each becomes a :class:`BenchModel`: a callable taking the inputs of its :class:`ModelIO` positionally and
returning the one output tensor, plus a ``model`` that :func:`distillkit.evaluate.evaluate_quality` can call
with keyword inputs (the export runtimes are wrapped as small ``nn.Module`` adapters whose output has
``.logits`` or ``.last_hidden_state``). Exports have no KV cache, so only PyTorch models are decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from distillkit import manifest as mf
from distillkit.errors import ModelError
from distillkit.export.signature import ModelIO, describe_io
from distillkit.models.load import pooling_mode

ONNX_FILE = "model.onnx"
PT2_FILE = "model.pt2"


@dataclass
class BenchModel:
    model: Any
    processor: Any
    task: str
    path: str
    pooling: str
    io: ModelIO
    runtime: str  # "pytorch" | "onnxruntime" | "torch.export"
    params: int
    weights_bytes: int
    dtype: str
    forward: Any  # forward(*inputs in io.input_names order) -> output tensor
    can_generate: bool


def export_format(src: mf.Source) -> str | None:
    """``onnx`` / ``torch-export`` for an artifact written by ``distillkit export`` in those formats, else None."""
    if src.manifest is not None and src.manifest.stage == "export":
        fmt = src.manifest.extra.get("format")
        if fmt in ("onnx", "torch-export"):
            return fmt
    p = Path(src.path)
    if src.is_local and not any(p.glob("*.safetensors")):
        if (p / ONNX_FILE).is_file():
            return "onnx"
        if (p / PT2_FILE).is_file():
            return "torch-export"
    return None


def _export_io(
    src: mf.Source, task: str | None, input_names: list[str], output_name: str | None
) -> tuple[Any, Any, ModelIO]:
    """(config, processor, io) of an exported artifact, from its config.json and manifest."""
    from transformers import AutoConfig

    from distillkit.export.signature import image_shape_of
    from distillkit.models.load import TASKS, detect_task, load_processor

    try:
        config = AutoConfig.from_pretrained(src.path)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"cannot read the config beside the export in {src.path}: {str(e).splitlines()[0]}",
            hint="bench reads config.json next to model.onnx / model.pt2, as distillkit export writes it",
        ) from None
    task = task or (src.manifest.task if src.manifest is not None else None) or detect_task(config)
    if task not in TASKS:
        raise ModelError(f"unknown task {task!r} for {src.path}", hint=f"pass --task, one of: {', '.join(TASKS)}")
    processor = load_processor(src.path, task)
    model_type = str(getattr(config, "model_type", "unknown"))
    output = output_name or ("last_hidden_state" if task == "feature-extraction" else "logits")
    token_level = task in ("causal-lm", "masked-lm", "feature-extraction")
    if input_names == ["pixel_values"]:
        io = ModelIO(
            "vision",
            task,
            model_type,
            input_names,
            output,
            image_shape=image_shape_of(config, processor),
            token_level=False,
        )
    else:
        text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        max_pos = next(
            (
                v
                for k in ("max_position_embeddings", "n_positions", "n_ctx")
                if isinstance(v := getattr(config, k, None), int) and v > 0
            ),
            None,
        )
        io = ModelIO(
            "text",
            task,
            model_type,
            input_names,
            output,
            vocab_size=int(text_cfg.vocab_size),
            type_vocab_size=int(getattr(config, "type_vocab_size", 0) or 0),
            max_positions=max_pos,
            token_level=token_level,
        )
    return config, processor, io


def _adapter(io: ModelIO, config: Any, run: Any) -> Any:
    """An ``nn.Module`` with a keyword ``forward`` over ``io.input_names`` whose output has ``.<output_name>``."""
    import torch

    class ExportedRuntime(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = config

        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None):
            given = {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "token_type_ids": token_type_ids,
                "pixel_values": pixel_values,
            }
            if input_ids is not None:
                # batches from the data module carry neither segment ids nor, sometimes, a mask
                given["token_type_ids"] = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
                given["attention_mask"] = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            return SimpleNamespace(**{io.output_name: run(*(given[n] for n in io.input_names))})

    return ExportedRuntime().eval()


def load_onnx(src: mf.Source, task: str | None, device: Any) -> BenchModel:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        from distillkit.errors import DependencyError

        raise DependencyError(
            f"benchmarking an ONNX export needs {e.name}", hint="pip install 'distillkit[onnx]'"
        ) from None
    import numpy as np
    import torch

    extra = src.manifest.extra if src.manifest is not None else {}
    path = Path(src.path) / extra.get("file", ONNX_FILE)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=providers)
    names = [i.name for i in session.get_inputs()]
    config, processor, io = _export_io(src, task, extra.get("input_names", names), extra.get("output_name"))
    graph = onnx.load(str(path), load_external_data=False).graph
    sizes = [
        (int(np.prod(t.dims)) if len(t.dims) else 1, onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)
        for t in graph.initializer
    ]
    declared = set(names)

    def run(*inputs: Any) -> Any:
        feed = {n: t.detach().cpu().numpy() for n, t in zip(io.input_names, inputs, strict=True) if n in declared}
        # back on the inputs' device, where evaluate_quality keeps labels and teacher outputs
        return torch.from_numpy(session.run([io.output_name], feed)[0]).to(inputs[0].device)

    return BenchModel(
        model=_adapter(io, config, run),
        processor=processor,
        task=io.task,
        path=src.path,
        pooling=pooling_mode(src.path),
        io=io,
        runtime="onnxruntime",
        params=sum(n for n, _ in sizes),
        weights_bytes=sum(n * b for n, b in sizes),
        dtype="float32",
        forward=run,
        can_generate=False,
    )


def load_pt2(src: mf.Source, task: str | None, device: Any) -> BenchModel:
    import torch

    extra = src.manifest.extra if src.manifest is not None else {}
    program = torch.export.load(Path(src.path) / extra.get("file", PT2_FILE))
    names = extra.get("input_names") or [
        s.arg.name
        for s in program.graph_signature.input_specs
        if s.kind == torch.export.graph_signature.InputKind.USER_INPUT
    ]
    config, processor, io = _export_io(src, task, list(names), extra.get("output_name"))
    module = program.module().to(device)
    # tied weights appear under several names but are one tensor
    unique = {
        t.data_ptr(): t for n in program.graph_signature.parameters if (t := program.state_dict.get(n)) is not None
    }
    params = list(unique.values())
    n_params, n_bytes = pt2_weight_footprint(program, config)
    # the export records the eager model's real count; the program alone cannot tell packed weights from buffers
    n_params = int(extra.get("params") or n_params)

    def run(*inputs: Any) -> Any:
        with torch.no_grad():
            return module(*(t.to(device) for t in inputs))

    dtype = str(params[0].dtype).replace("torch.", "") if params else "float32"
    return BenchModel(
        model=_adapter(io, config, run),
        processor=processor,
        task=io.task,
        path=src.path,
        pooling=pooling_mode(src.path),
        io=io,
        runtime="torch.export",
        params=n_params,
        weights_bytes=n_bytes,
        dtype=dtype,
        forward=run,
        can_generate=False,
    )


def pt2_weight_footprint(program: Any, config: Any) -> tuple[int, int]:
    """(parameters, bytes) of an ExportedProgram's weights.

    A program exported from a distillkit-packed model holds its quantized weights as buffers (``qweight``,
    ``scales``, ...), not parameters: counting ``graph_signature.parameters`` alone reports only the norms and biases
    (a few hundred "parameters" for a whole model). The packed modules listed in the config's
    ``quantization_config`` count as ``in x out`` logical parameters, like :func:`weight_footprint` counts them in
    PyTorch; bytes are those of every parameter and buffer the program stores (each tensor once).
    """
    sd = program.state_dict
    seen: set[tuple[int, int]] = set()
    n_params = n_bytes = 0
    for names, is_param in ((program.graph_signature.parameters, True), (program.graph_signature.buffers, False)):
        for n in names:
            t = sd.get(n)
            if t is None:
                t = program.constants.get(n)
            if t is None or (t.data_ptr(), t.numel()) in seen:
                continue
            seen.add((t.data_ptr(), t.numel()))
            n_bytes += t.numel() * t.element_size()
            if is_param:
                n_params += t.numel()
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else {}
    if qc.get("quant_method") == "distillkit":
        for spec in (qc.get("modules") or {}).values():
            if spec.get("kind") != "tied" and spec.get("in_features") and spec.get("out_features"):
                n_params += int(spec["in_features"]) * int(spec["out_features"])
    return n_params, n_bytes


def load_pytorch(
    src: mf.Source,
    task: str | None,
    device: Any,
    dtype: str,
    *,
    allow_pickle: bool,
    trust_remote_code: bool,
    quant_kernel: str = "auto",
) -> BenchModel:
    from distillkit.models.load import load_model

    loaded = load_model(
        src,
        task=task,
        dtype=dtype,
        device=str(device),
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        quant_kernel=quant_kernel,
    )
    model = loaded.model.eval()
    io = describe_io(model, loaded.task, loaded.processor, purpose="bench")
    params = list(model.parameters())
    n_params, n_bytes = weight_footprint(model)
    return BenchModel(
        model=model,
        processor=loaded.processor,
        task=loaded.task,
        path=loaded.path,
        pooling=loaded.pooling,
        io=io,
        runtime="pytorch",
        params=n_params,
        weights_bytes=n_bytes,
        dtype=str(params[0].dtype).replace("torch.", "") if params else "float32",
        forward=io.wrap(model),
        can_generate=loaded.task == "causal-lm" and callable(getattr(model, "generate", None)),
    )


def weight_footprint(model: Any) -> tuple[int, int]:
    """(parameters, bytes) of a model's weights, quantized ones included.

    Quantized layers (distillkit's packed modules, bitsandbytes, torch dynamic int8) keep their weights in buffers or
    packed parameters, so they count as ``in x out`` logical parameters; bytes are what the weights occupy in memory.
    """

    count, nbytes, seen = 0, 0, set()

    def add_tensor(t: Any) -> int:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen or t.numel() == 0:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    for m in model.modules():
        name = type(m).__name__
        if name in ("TiedQuantLinear", "LinearPackedParams"):
            continue  # a tied head reads its embedding's table; packed params are counted with their Linear
        if type(m).__module__.startswith("torch.ao.nn.quantized"):
            w, bias = m._weight_bias()
            count += w.numel() + (bias.numel() if bias is not None else 0)
            nbytes += w.numel() * (1 if w.is_quantized else w.element_size())
            nbytes += bias.numel() * bias.element_size() if bias is not None else 0
            continue
        quantized = name in ("QuantLinear", "QuantEmbedding", "Linear4bit", "Linear8bitLt")
        if quantized:
            count += m.in_features * m.out_features if hasattr(m, "in_features") else m.num_embeddings * m.embedding_dim
        for p in m.parameters(recurse=False):
            if not quantized or p.ndim == 1:  # a quantized layer's own weight was counted as in x out above
                count += p.numel()
            nbytes += add_tensor(p)
        if quantized:
            for b in m.buffers(recurse=False):
                nbytes += add_tensor(b)
    return count, nbytes
