"""``distillkit prune``: flags -> PruneConfig -> prune engine -> manifest on stdout."""

from __future__ import annotations

from typing import Annotated

import typer

from distillkit.cli import options as o

_AMOUNT = "a ratio in [0, 1) to remove, or a whole number to keep"


def _importance_help() -> str:
    from distillkit.registry import IMPORTANCES

    return f"How structures are ranked (default magnitude). {IMPORTANCES.help_text()}."


def prune(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="The model: '-' (previous stage on stdin), an artifact directory, a distillkit.json, a model directory or a hub id.",
        ),
    ],
    mlp: Annotated[
        float | None, typer.Option("--mlp", help=f"MLP channels of every layer: {_AMOUNT} (e.g. 0.3, or 1024).")
    ] = None,
    heads: Annotated[
        float | None,
        typer.Option(
            "--heads",
            help=f"Attention heads of every layer: {_AMOUNT}. GQA-consistent (see --head-mode); GPT-2/BERT/ViT narrow the hidden size with them (their head size is hidden / heads).",
        ),
    ] = None,
    hidden: Annotated[
        float | None,
        typer.Option("--hidden", help=f"Hidden (embedding) channels across all layers, Minitron-style: {_AMOUNT}."),
    ] = None,
    layers: Annotated[
        float | None,
        typer.Option("--layers", help=f"Whole layers, least important first (see --layer-importance): {_AMOUNT}."),
    ] = None,
    channels: Annotated[
        float | None,
        typer.Option(
            "--channels",
            help="ResNet-style CNNs: ratio in [0, 1) of every stage's channels (and each block's inner channels) to remove.",
        ),
    ] = None,
    head_mode: Annotated[
        str | None,
        typer.Option(
            "--head-mode",
            help="auto (whole key/value groups when the count allows, else the same number per group), groups, per-group.",
        ),
    ] = None,
    importance: Annotated[str | None, typer.Option("--importance", "-i", help=_importance_help())] = None,
    layer_importance: Annotated[
        str | None,
        typer.Option(
            "--layer-importance",
            help="Block importance for --layers: angular (distance between a block's input and output) or loss (output change when the block is skipped). Default angular.",
        ),
    ] = None,
    round_to: Annotated[
        int | None,
        typer.Option(
            "--round-to",
            help="Round pruned MLP/hidden/channel widths to a multiple of this: 1, 2, 4, 8, 16, 32, 64, 128 (default 1).",
        ),
    ] = None,
    target_params: Annotated[
        float | None,
        typer.Option(
            "--target-params",
            help="Solve one ratio for the named structures (default --mlp) so the model keeps this many parameters (a fraction in (0, 1) or a count).",
        ),
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            "--teacher",
            "-t",
            help="A teacher whose soft targets give the taylor importance its loss (default: the task loss).",
        ),
    ] = None,
    task: o.Task = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Calibration and evaluation data, as for distill (default: builtin:english; random pixels for images).",
        ),
    ] = None,
    text_column: o.TextColumn = None,
    label_column: o.LabelColumn = None,
    eval_split: o.QualitySplit = None,
    max_length: o.MaxLength = None,
    max_samples: o.MaxSamples = None,
    calib_batches: Annotated[
        int | None,
        typer.Option("--calib-batches", help="Calibration batches for activation/taylor/layer importance (default 8)."),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", "-b", help="Batch size of calibration, evaluation and recovery (default 8)."),
    ] = None,
    eval_batches: Annotated[
        int | None, typer.Option("--eval-batches", help="Held-out batches per quality measurement (default 20).")
    ] = None,
    recover_steps: Annotated[
        int | None,
        typer.Option(
            "--recover-steps",
            help="After pruning, distil for this many steps with the unpruned model as the teacher (default 0: none).",
        ),
    ] = None,
    recover_lr: Annotated[
        float | None, typer.Option("--recover-lr", help="Learning rate of the recovery distillation (default 1e-4).")
    ] = None,
    seed: o.Seed = None,
    device: o.Device = None,
    allow_pickle: o.AllowPickle = None,
    trust_remote_code: o.TrustRemoteCode = None,
    preset: o.Preset = None,
    config: o.ConfigFile = None,
    out: o.Out = None,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
) -> None:
    """Remove whole heads, channels or layers and write a smaller model that from_pretrained reloads."""
    from distillkit.prune import PruneConfig, prune_model

    flags = dict(
        mlp=mlp,
        heads=heads,
        hidden=hidden,
        layers=layers,
        channels=channels,
        head_mode=head_mode,
        importance=importance,
        layer_importance=layer_importance,
        round_to=round_to,
        target_params=target_params,
        teacher=teacher,
        task=task,
        data=data,
        text_column=text_column,
        label_column=label_column,
        eval_split=eval_split,
        max_length=max_length,
        max_samples=max_samples,
        calib_batches=calib_batches,
        batch_size=batch_size,
        eval_batches=eval_batches,
        recover_steps=recover_steps,
        recover_lr=recover_lr,
        seed=seed,
        device=device,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    cfg = PruneConfig.resolve(
        preset=preset, config_file=str(config) if config else None, overrides=flags, section="prune"
    )
    manifest = prune_model(cfg, model, out=str(out or o.default_out("prune")), overwrite=overwrite)
    o.emit(manifest, quiet)


def register(app: typer.Typer) -> None:
    app.command("prune", no_args_is_help=True)(prune)
