"""``--format onnx``: ``model.onnx`` with dynamic batch/sequence axes, validated with onnxruntime.

The dynamo exporter (``torch.export`` + onnxscript) is tried first; only if it fails is the
TorchScript exporter used, and the manifest records which one wrote the file. The file is
accepted only if onnxruntime matches PyTorch within ``atol`` at two input shapes that differ
from the traced one (which also proves the axes are dynamic).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from distillkit.errors import DependencyError
from distillkit.export.config import ExportError
from distillkit.export.signature import ModelIO, max_abs_diff
from distillkit.export.torch_export import check_shapes, dynamic_shapes, export_shape, first_line

ONNX_NAME = "model.onnx"
TORCHSCRIPT_OPSET = 17
# Above this the weights go to an external data file next to model.onnx (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1_800_000_000


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise DependencyError(
            f"--format onnx needs onnx, onnxscript and onnxruntime ({e.name} is missing)",
            hint="pip install 'distillkit[onnx]'",
        ) from None


@contextlib.contextmanager
def _quiet_stdout():
    """The exporters print progress on stdout, which carries only data here: send it to stderr, and keep
    their warnings (deprecations, "torchvision is not installed") out of the user's way."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration")]
    levels = [lg.level for lg in loggers]
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _param_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _export_dynamo(
    wrapper: Any, io: ModelIO, args: tuple[Any, ...], path: Path, opset: int | None, external: bool
) -> None:
    import torch

    # The module (not a pre-traced program) goes in, so that the exporter names the dynamic axes batch/sequence.
    with torch.no_grad():
        onnx_program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            dynamic_shapes=dynamic_shapes(io),
            input_names=io.input_names,
            output_names=[io.output_name],
            opset_version=opset,
            verbose=False,
        )
    onnx_program.save(path, external_data=external)
    written = _opset_of(path)
    if opset is not None and written != opset:
        # torchlib cannot go below its own opset; an explicit --opset is a requirement, not a wish
        raise ExportError(f"the dynamo exporter wrote opset {written}, not the requested {opset}")


def _opset_of(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _export_torchscript(
    wrapper: Any, io: ModelIO, args: tuple[Any, ...], path: Path, opset: int | None, external: bool
) -> None:
    import torch

    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            dynamo=False,
            input_names=io.input_names,
            output_names=[io.output_name],
            dynamic_axes=io.dynamic_axes,
            opset_version=opset or TORCHSCRIPT_OPSET,
            do_constant_folding=True,
            external_data=external,
        )


def export_onnx(
    model: Any, io: ModelIO, out_dir: Path, *, atol: float, opset: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Write ``out_dir/model.onnx``; returns ``{"metrics", "extra", "timings"}``.

    Raises :class:`ExportError` when neither exporter can trace the model, or when onnxruntime
    differs from PyTorch by more than ``atol`` (max absolute difference over non-padding positions)."""
    _require_onnx()
    wrapper = io.wrap(model)
    batch, seq = export_shape(io)
    args = io.sample(batch, seq, seed=seed)
    path = out_dir / ONNX_NAME
    external = _param_bytes(model) > EXTERNAL_DATA_BYTES
    t0 = time.perf_counter()
    exporter, notes = "dynamo", []
    with _quiet_stdout():
        try:
            _export_dynamo(wrapper, io, args, path, opset, external)
        except Exception as dynamo_error:  # noqa: BLE001 - any failure of the new exporter: try the old one
            exporter = "torchscript"
            notes.append(f"dynamo exporter failed ({first_line(dynamo_error)}); used the TorchScript exporter")
            for leftover in out_dir.glob(ONNX_NAME + "*"):
                leftover.unlink()
            try:
                _export_torchscript(wrapper, io, args, path, opset, external)
            except Exception as e:  # noqa: BLE001
                raise ExportError(
                    f"onnx cannot hold model type {io.model_type} ({io.task}): the dynamo exporter failed "
                    f"({first_line(dynamo_error)}) and so did the TorchScript exporter ({first_line(e)})",
                    hint="export it with --format hf (or try another --opset)",
                ) from None
    t1 = time.perf_counter()
    used_opset = _opset_of(path)
    shapes = check_shapes(io, dynamic=True)
    diff = validate_onnx(path, wrapper, io, shapes, seed=seed, exporter=exporter)
    t2 = time.perf_counter()
    if not diff <= atol:
        raise ExportError(
            f"onnx parity check failed: onnxruntime differs from PyTorch by {diff:.3g} > --atol {atol:g}",
            hint="raise --atol if this difference is acceptable, or try another --opset or --format",
        )
    extra: dict[str, Any] = {
        "file": ONNX_NAME,
        "exporter": exporter,
        "opset": used_opset,
        "input_names": io.input_names,
        "output_name": io.output_name,
        "dynamic_axes": io.dynamic_axes,
        "parity_shapes": [list(s) for s in shapes],
        "external_data": external,
    }
    if notes:
        extra["note"] = "; ".join(notes)
    return {
        "metrics": {"onnx_max_abs_diff": diff},
        "extra": extra,
        "timings": {"export_s": t1 - t0, "validate_s": t2 - t1},
    }


def validate_onnx(
    path: Path, wrapper: Any, io: ModelIO, shapes: list[tuple[int, int]], *, seed: int = 0, exporter: str = "dynamo"
) -> float:
    """Max abs difference between onnxruntime (CPU) and the PyTorch ``wrapper`` over ``shapes`` ([B, T] each)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    declared = {i.name for i in session.get_inputs()}
    diffs = []
    for i, (b, s) in enumerate(shapes):
        inputs = io.sample(b, s, seed=seed + 1 + i, pad=True)
        with torch.no_grad():
            ref = wrapper(*inputs).detach().cpu().float().numpy()
        feed = {name: t.cpu().numpy() for name, t in zip(io.input_names, inputs, strict=True) if name in declared}
        try:
            got = session.run([io.output_name], feed)[0]
        except Exception as e:  # noqa: BLE001 - a graph that cannot run at this shape is a failed export
            raise ExportError(
                f"onnx cannot hold model type {io.model_type} ({io.task}) with dynamic axes: the {exporter}-exported graph "
                f"fails in onnxruntime at batch {b}, sequence {s}: {first_line(e)}",
                hint="its shapes were baked in while tracing; try --format torch-export or --format hf",
            ) from None
        diffs.append(max_abs_diff(np.asarray(got), ref, io.valid_positions(inputs)))
    return max(diffs)
