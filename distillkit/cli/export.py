"""``distillkit export``: flags -> ExportConfig -> export engine -> manifest on stdout."""

from __future__ import annotations

from typing import Annotated

import typer

from distillkit.cli import options as o

_FORMATS = "hf, onnx, torch-export"


def export(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="The model: '-' (previous stage on stdin), an artifact directory, a distillkit.json, a model directory or a hub id.",
        ),
    ],
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            help=f"One of {_FORMATS}. hf: save_pretrained directory (sharded safetensors); onnx: model.onnx with dynamic batch/sequence axes, checked with onnxruntime; torch-export: model.pt2 from torch.export, checked against the eager model (default hf).",
        ),
    ] = None,
    atol: Annotated[
        float | None,
        typer.Option(
            "--atol",
            help="Refuse the export when its outputs differ from PyTorch's by more than this (max abs, default 1e-4).",
        ),
    ] = None,
    opset: Annotated[
        int | None, typer.Option("--opset", help="ONNX opset (onnx only; default: the exporter's).")
    ] = None,
    max_shard_size: Annotated[
        str | None,
        typer.Option("--max-shard-size", help="hf: split safetensors into shards of at most this size (default 2GB)."),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help="auto (hf keeps the checkpoint's dtype; onnx/torch-export use float32), float32, bfloat16, float16.",
        ),
    ] = None,
    task: o.Task = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of the random parity-check inputs (default 0).")
    ] = None,
    allow_pickle: o.AllowPickle = None,
    trust_remote_code: o.TrustRemoteCode = None,
    preset: o.Preset = None,
    config: o.ConfigFile = None,
    out: o.Out = None,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
) -> None:
    """Export a model as a clean HF directory, ONNX or a torch.export program, with a parity check."""
    from distillkit.export import ExportConfig, export_model

    flags = dict(
        format=format,
        atol=atol,
        opset=opset,
        max_shard_size=max_shard_size,
        dtype=dtype,
        task=task,
        seed=seed,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    cfg = ExportConfig.resolve(
        preset=preset, config_file=str(config) if config else None, overrides=flags, section="export"
    )
    manifest = export_model(cfg, model, out=str(out or o.default_out("export")), overwrite=overwrite)
    o.emit(manifest, quiet)


def register(app: typer.Typer) -> None:
    app.command("export", no_args_is_help=True)(export)
