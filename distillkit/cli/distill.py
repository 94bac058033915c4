"""``distillkit distill``: flags -> DistillConfig -> engine -> manifest on stdout."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from distillkit.cli import options as o


def _loss_help() -> str:
    from distillkit.registry import LOSSES

    return (
        "Loss NAME[:WEIGHT], repeatable; the weighted sum is the distillation loss. "
        f"Default per task (forward_kl; embedding_cosine + hidden_mse:0.5 for encoders). Names: {', '.join(LOSSES.names())}."
    )


def distill(
    student_arg: Annotated[
        str | None,
        typer.Argument(
            metavar="[STUDENT]",
            help="The student: a model dir, an artifact, '-' (previous stage on stdin), or a spec like layers=3. Same as --student.",
        ),
    ] = None,
    teacher: Annotated[
        str | None, typer.Option("--teacher", "-t", help="Teacher: model directory, distillkit artifact or hub id.")
    ] = None,
    student: Annotated[
        str | None,
        typer.Option(
            "--student",
            "-s",
            help="Student: an existing model, or a spec derived from the teacher: 'layers=3' or 'layers=6,hidden=256,heads=4,kv_heads=2,intermediate=1024'.",
        ),
    ] = None,
    student_init: Annotated[
        str | None,
        typer.Option("--student-init", help="teacher (slice the teacher's weights) or random (train from scratch)."),
    ] = None,
    task: o.Task = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Training text: .txt, .jsonl/.json, .csv, .parquet, a `datasets` directory or hub name (default: the embedded corpus).",
        ),
    ] = None,
    text_column: o.TextColumn = None,
    label_column: Annotated[
        str | None, typer.Option("--label-column", help="Column holding class labels (classification).")
    ] = None,
    eval_split: Annotated[
        float | None, typer.Option("--eval-split", help="Held-out fraction for evaluation [0, 0.5] (default 0.05).")
    ] = None,
    max_length: Annotated[int | None, typer.Option("--max-length", help="Tokens per sequence (default 128).")] = None,
    max_samples: Annotated[
        int | None, typer.Option("--max-samples", help="Use at most this many raw examples.")
    ] = None,
    loss: Annotated[list[str] | None, typer.Option("--loss", "-l", help=_loss_help())] = None,
    temperature: Annotated[
        float | None,
        typer.Option("--temperature", "-T", help="Softmax temperature of the logit divergences (default 2.0)."),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            "--alpha", help="Weight of the hard-label loss in [0, 1]; the distillation loss gets 1 - alpha (default 0)."
        ),
    ] = None,
    layer_map: Annotated[
        str | None,
        typer.Option(
            "--layer-map", help="Feature-loss layer pairs 'student:teacher,...' (0-based blocks) or 'uniform'."
        ),
    ] = None,
    jsd_beta: Annotated[
        float | None, typer.Option("--jsd-beta", help="Beta of the generalized JSD (default 0.5).")
    ] = None,
    skew_lambda: Annotated[
        float | None, typer.Option("--skew-lambda", help="Teacher mix of skew KL (default 0.1).")
    ] = None,
    taid_t_start: Annotated[
        float | None, typer.Option("--taid-t-start", help="TAID interpolation at the start (default 0.4).")
    ] = None,
    taid_t_end: Annotated[
        float | None, typer.Option("--taid-t-end", help="TAID interpolation at the end (default 1.0).")
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps (default 100).")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", "-b", help="Sequences per device per micro-batch (default 8).")
    ] = None,
    grad_accum: Annotated[
        int | None, typer.Option("--grad-accum", help="Micro-batches per optimizer step (default 1).")
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak AdamW learning rate (default 1e-4).")] = None,
    weight_decay: Annotated[
        float | None, typer.Option("--weight-decay", help="AdamW weight decay (default 0.01).")
    ] = None,
    warmup: Annotated[
        float | None,
        typer.Option(
            "--warmup", help="Warmup as a fraction of steps, or a number of steps (default 0.05); cosine decay after."
        ),
    ] = None,
    max_grad_norm: Annotated[
        float | None, typer.Option("--max-grad-norm", help="Gradient clipping norm, 0 disables (default 1.0).")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed (default 0).")] = None,
    mixed_precision: Annotated[
        str | None,
        typer.Option("--mixed-precision", help="auto (bf16 on GPUs that have it, else none), no, bf16, fp16."),
    ] = None,
    teacher_dtype: Annotated[
        str | None,
        typer.Option(
            "--teacher-dtype",
            help="Hold the teacher in float32, bfloat16 or float16 (default: the training precision).",
        ),
    ] = None,
    device: o.Device = None,
    eval_every: Annotated[
        int | None, typer.Option("--eval-every", help="Evaluate every N steps, 0 = only at the end (default 0).")
    ] = None,
    eval_batches: Annotated[
        int | None, typer.Option("--eval-batches", help="At most this many eval batches per evaluation (default 20).")
    ] = None,
    save_every: Annotated[
        int | None, typer.Option("--save-every", help="Checkpoint every N steps for --resume, 0 = never (default 0).")
    ] = None,
    log_to: Annotated[
        str | None, typer.Option("--log-to", help="none or tensorboard (metrics always go to metrics.jsonl).")
    ] = None,
    allow_pickle: o.AllowPickle = None,
    trust_remote_code: o.TrustRemoteCode = None,
    preset: o.Preset = None,
    config: o.ConfigFile = None,
    out: o.Out = None,
    overwrite: o.Overwrite = False,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue from the last checkpoint of an interrupted run with the same --out."),
    ] = False,
    quiet: o.Quiet = False,
) -> None:
    """Distil a teacher into a smaller student and write it as a loadable artifact."""
    from distillkit.config import DistillConfig
    from distillkit.errors import ConfigError

    if student_arg is not None and student is not None and student_arg != student:
        raise ConfigError("the student was given twice (argument and --student)", hint="give only one")
    flags = dict(
        teacher=teacher,
        student=student_arg or student,
        student_init=student_init,
        task=task,
        data=data,
        text_column=text_column,
        label_column=label_column,
        eval_split=eval_split,
        max_length=max_length,
        max_samples=max_samples,
        losses=tuple(loss) if loss else None,
        temperature=temperature,
        alpha=alpha,
        layer_map=layer_map,
        jsd_beta=jsd_beta,
        skew_lambda=skew_lambda,
        taid_t_start=taid_t_start,
        taid_t_end=taid_t_end,
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        max_grad_norm=max_grad_norm,
        seed=seed,
        mixed_precision=mixed_precision,
        teacher_dtype=teacher_dtype,
        device=device,
        eval_every=eval_every,
        eval_batches=eval_batches,
        save_every=save_every,
        log_to=log_to,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    cfg = DistillConfig.resolve(
        preset=preset, config_file=str(config) if config else None, overrides=flags, section="distill"
    )
    from distillkit.distill.engine import run_distill

    if out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "multi-process runs need an explicit --out (every process must name the same one)", hint="pass --out DIR"
        )

    manifest = run_distill(cfg, out=str(out or o.default_out("distill")), overwrite=overwrite, resume=resume)
    if manifest is not None:  # other ranks of a multi-process run print nothing
        o.emit(manifest, quiet)


def register(app: typer.Typer) -> None:
    app.command("distill", no_args_is_help=True)(distill)
