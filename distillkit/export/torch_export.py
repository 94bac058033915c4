"""``--format torch-export``: a ``.pt2`` ExportedProgram, validated against the eager model.

The program is traced with dynamic batch and sequence dimensions; a model whose code guards on
those sizes is traced again with static shapes, and the manifest says so.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from distillkit.export.config import ExportError
from distillkit.export.signature import ModelIO, max_abs_diff

PT2_NAME = "model.pt2"
EXPORT_BATCH, EXPORT_SEQ = 2, 16
# Validation shapes differ from the traced ones, so a dynamic program is checked off its trace shape.
CHECK_SHAPES = ((1, 7), (3, 13))


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(e).__name__}: {line[:300]}" if line else type(e).__name__


def export_shape(io: ModelIO) -> tuple[int, int]:
    seq = EXPORT_SEQ if io.max_positions is None else max(2, min(EXPORT_SEQ, io.max_positions))
    return EXPORT_BATCH, seq


def check_shapes(io: ModelIO, dynamic: bool) -> list[tuple[int, int]]:
    if not dynamic:
        return [export_shape(io)] * 2
    cap = io.max_positions or 10**9
    return [(b, max(2, min(s, cap))) for b, s in CHECK_SHAPES]


def dynamic_shapes(io: ModelIO) -> dict[str, dict[int, Any]]:
    import torch

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    if io.kind == "vision":
        return {n: {0: batch} for n in io.input_names}
    seq = torch.export.Dim("sequence", min=1, max=io.max_positions or (1 << 20))
    return {n: {0: batch, 1: seq} for n in io.input_names}


def trace(wrapper: Any, io: ModelIO, args: tuple[Any, ...], *, dynamic: bool) -> Any:
    """``torch.export.export`` of the wrapper (non-strict), dynamic batch/sequence dims when asked."""
    import torch

    with torch.no_grad():
        return torch.export.export(wrapper, args, dynamic_shapes=dynamic_shapes(io) if dynamic else None, strict=False)


def trace_with_fallback(wrapper: Any, io: ModelIO, args: tuple[Any, ...], fmt: str) -> tuple[Any, bool, str | None]:
    """(program, dynamic, note): dynamic dims when the model allows them, else static shapes."""
    try:
        return trace(wrapper, io, args, dynamic=True), True, None
    except Exception as dyn_error:  # noqa: BLE001 - any tracing failure means: try static shapes
        note = f"dynamic shapes failed ({first_line(dyn_error)}); exported with static shapes {list(args[0].shape)}"
        try:
            return trace(wrapper, io, args, dynamic=False), False, note
        except Exception as e:  # noqa: BLE001
            raise ExportError(
                f"{fmt} cannot hold model type {io.model_type} ({io.task}): torch.export failed: {first_line(e)}",
                hint="export it with --format hf, or --format onnx (which can fall back to the TorchScript exporter)",
            ) from None


def model_params(model: Any) -> int:
    """The model's parameter count, a distillkit-packed layer counting as its ``in x out`` (or ``rows x dim``)
    logical weights (they are stored as uint8 buffers, not parameters); a tied head counts once, in its embedding."""
    count, seen = 0, set()
    for m in model.modules():
        name = type(m).__name__
        if name == "TiedQuantLinear":
            continue
        if name == "QuantLinear":
            count += m.in_features * m.out_features
        elif name == "QuantEmbedding":
            count += m.num_embeddings * m.embedding_dim
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                count += p.numel()
    return count


def export_torch(model: Any, io: ModelIO, out_dir: Path, *, atol: float, seed: int = 0) -> dict[str, Any]:
    """Write ``out_dir/model.pt2`` and check ``torch.export.load(...).module()`` against ``model``.

    Returns ``{"metrics", "extra", "timings"}``; raises :class:`ExportError` above ``atol``."""
    import torch

    wrapper = io.wrap(model)
    batch, seq = export_shape(io)
    args = io.sample(batch, seq, seed=seed)
    t0 = time.perf_counter()
    program, dynamic, note = trace_with_fallback(wrapper, io, args, "torch-export")
    path = out_dir / PT2_NAME
    torch.export.save(program, path)
    t1 = time.perf_counter()
    loaded = torch.export.load(path).module()
    diffs = []
    shapes = check_shapes(io, dynamic)
    with torch.no_grad():
        for i, (b, s) in enumerate(shapes):
            inputs = io.sample(b, s, seed=seed + 1 + i, pad=True)
            ref = wrapper(*inputs)
            got = loaded(*inputs)
            diffs.append(
                max_abs_diff(
                    got.detach().cpu().float().numpy(), ref.detach().cpu().float().numpy(), io.valid_positions(inputs)
                )
            )
    diff = max(diffs)
    t2 = time.perf_counter()
    if not diff <= atol:
        raise ExportError(
            f"torch-export parity check failed: max abs diff {diff:.3g} > --atol {atol:g}",
            hint="raise --atol if this difference is acceptable, or export with --format hf",
        )
    extra: dict[str, Any] = {
        "file": PT2_NAME,
        # the program keeps packed low-bit weights as buffers, so its parameter list alone undercounts the model
        "params": model_params(model),
        "dynamic_shapes": dynamic,
        "input_names": io.input_names,
        "output_name": io.output_name,
        "parity_shapes": [list(s) for s in shapes],
        "dynamic_axes": io.dynamic_axes if dynamic else {},
    }
    if note:
        extra["note"] = note
    return {
        "metrics": {"torch_export_max_abs_diff": diff},
        "extra": extra,
        "timings": {"export_s": t1 - t0, "validate_s": t2 - t1},
    }
