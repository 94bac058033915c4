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
            help="Training text: .txt, .jsonl/.json, .csv, .parquet, a `datasets` directory or hub name, or builtin:NAME (default: builtin:english, general English shipped with distillkit).",
        ),
    ] = None,
    text_column: o.TextColumn = None,
    label_column: Annotated[
        str | None, typer.Option("--label-column", help="Column holding class labels (classification).")
    ] = None,
    eval_split: Annotated[
        float | None, typer.Option("--eval-split", help="Held-out fraction for evaluation [0, 0.5] (default 0.05).")
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option(
            "--eval-data",
            help="Held-out text for the final quality report, measured on the saved student: a file (as --data reads) "
            "or builtin:quotes / builtin:docstrings / builtin:english; `none` turns it off (default for embedding "
            "models and causal LMs: builtin:quotes, another domain than the default training corpus).",
        ),
    ] = None,
    max_length: o.MaxLength = None,
    max_samples: o.MaxSamples = None,
    group_by_length: Annotated[
        bool | None,
        typer.Option(
            "--group-by-length/--no-group-by-length",
            help="Build each training batch from examples of similar length (sorted within windows of 32 batches, "
            "batches in random order), so little compute goes to padding (default on; packed causal-LM blocks "
            "all have one length).",
        ),
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
    seed: o.Seed = None,
    freeze_embeddings: Annotated[
        bool | None,
        typer.Option(
            "--freeze-embeddings/--train-embeddings",
            help="Keep the student's input token embeddings as initialised (from the teacher: its table): no gradient and no "
            "optimiser state for it, so each step costs less where the table is much of the model (all-MiniLM-L6-v2: "
            "11.7 M of the 3-layer student's 17.4 M weights). A tied output head is frozen with it. Text models "
            "only (default off; on in --preset cpu-demo).",
        ),
    ] = None,
    mixed_precision: Annotated[
        str | None,
        typer.Option(
            "--mixed-precision",
            help="auto (bf16 on GPUs that have it, else none), no, bf16 (also on CPUs with AVX512-BF16/AMX), "
            "fp16 (CUDA only).",
        ),
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
    resume_changed: Annotated[
        bool,
        typer.Option(
            "--resume-changed",
            help="With --resume: continue even though hyper-parameters (--lr, --steps, ...) differ from the "
            "checkpoint's; the new values apply from its step on and the manifest records the change.",
        ),
    ] = False,
    quiet: o.Quiet = False,
    # LLM modes (on-policy, sequence, teacher cache, cross-tokenizer)
    mode: Annotated[
        str | None,
        typer.Option(
            "--mode",
            help="Causal LMs: offline (fixed data, default), on-policy (GKD: mix in the student's own generations) "
            "or sequence (train on cached teacher completions).",
        ),
    ] = None,
    student_data_fraction: Annotated[
        float | None,
        typer.Option(
            "--student-data-fraction", help="On-policy: probability that a batch is the student's generations (0.5)."
        ),
    ] = None,
    gen_temperature: Annotated[
        float | None, typer.Option("--gen-temperature", help="Sampling temperature of generations (default 1.0).")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", help="Tokens generated per prompt (default 32).")
    ] = None,
    prompt_length: Annotated[
        int | None,
        typer.Option("--prompt-length", help="Prompt prefix tokens taken from each block (default max-length / 2)."),
    ] = None,
    sequence_cache: Annotated[
        str | None,
        typer.Option("--sequence-cache", help="Sequence mode: where teacher completions are cached (resumable)."),
    ] = None,
    sequence_shard_size: Annotated[
        int | None,
        typer.Option("--sequence-shard-size", help="Examples per generated / cached shard (default 64)."),
    ] = None,
    teacher_cache: Annotated[
        str | None,
        typer.Option(
            "--teacher-cache", help="Train from top-k teacher logits written by --cache-teacher (no teacher weights)."
        ),
    ] = None,
    cache_topk: Annotated[
        int | None, typer.Option("--cache-topk", help="Logits kept per position by --cache-teacher (default 64).")
    ] = None,
    cross_tokenizer: Annotated[
        str | None,
        typer.Option(
            "--cross-tokenizer",
            help="uld: Universal Logit Distillation for a student with its own tokenizer (another vocabulary).",
        ),
    ] = None,
    cache_teacher: Annotated[
        str | None,
        typer.Option(
            "--cache-teacher", help="Only write the teacher's top-k logits on the training data to DIR and exit."
        ),
    ] = None,
    # diffusion
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            help="diffusers teachers: progressive (halve the sampling steps per round), consistency (LCM; for "
            "flow-matching teachers, consistency on the Euler ODE), guidance (classifier-free guidance in one pass), "
            "reflow (rectified flow on the teacher's noise/sample pairs; flow-matching teachers) or dmd (DMD2 "
            "distribution matching with a fake-score model; flow-matching teachers; --alpha weighs its regression "
            "term on teacher pairs).",
        ),
    ] = None,
    target_steps: Annotated[
        int | None,
        typer.Option("--target-steps", help="Diffusion: the student's sampling steps (below --teacher-steps)."),
    ] = None,
    teacher_steps: Annotated[
        int | None,
        typer.Option("--teacher-steps", help="Diffusion: the teacher's many-step reference DDIM count (default 32)."),
    ] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option("--guidance-scale", help="Diffusion: classifier-free guidance scale w (default 3.0)."),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option("--labels", help="Diffusion: class ids to sample, one per line (default: every class)."),
    ] = None,
    prompts: Annotated[
        str | None,
        typer.Option("--prompts", help="Diffusion: prompts to sample a text-conditioned pipeline, one per line."),
    ] = None,
    eval_samples: Annotated[
        int | None, typer.Option("--eval-samples", help="Diffusion: samples compared with the teacher (default 16).")
    ] = None,
    video_shape: Annotated[
        str | None,
        typer.Option(
            "--video-shape",
            help="Diffusion, video transformers (Wan): FRAMES,HEIGHT,WIDTH of the latent video to sample (required "
            "for them; e.g. 21,60,104 is Wan's 81 frames at 480x832).",
        ),
    ] = None,
    image_size: Annotated[
        str | None,
        typer.Option(
            "--image-size",
            help="Diffusion, Flux transformers: HEIGHT,WIDTH of the latent image to sample (default 128,128, "
            "FluxPipeline's 1024x1024 pixels).",
        ),
    ] = None,
    # sparse attention
    sparse_attention: Annotated[
        str | None,
        typer.Option(
            "--sparse-attention",
            help="Train the student with block-sparse attention: causal, window:TOKENS, strided:S[,G], "
            "tiles:F,H,W[:TF,TH,TW], topk:FRACTION or cdf:THRESHOLD (transformers students; diffusers students' "
            "self-attention, Wan video transformers included; Flux: over the image tokens of its joint attention).",
        ),
    ] = None,
    sparse_block_size: Annotated[
        int | None, typer.Option("--sparse-block-size", help="Block size of --sparse-attention (default 64).")
    ] = None,
    # fused loss
    fused_loss: Annotated[
        str | None,
        typer.Option(
            "--fused-loss",
            help="Causal LMs: compute the logit divergence from hidden states in chunks, never holding the "
            "logits. auto (when the loss allows; default), on (error when it does not), off.",
        ),
    ] = None,
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
        eval_data=eval_data,
        max_length=max_length,
        max_samples=max_samples,
        group_by_length=group_by_length,
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
        freeze_embeddings=freeze_embeddings,
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
        mode=mode,
        student_data_fraction=student_data_fraction,
        gen_temperature=gen_temperature,
        max_new_tokens=max_new_tokens,
        prompt_length=prompt_length,
        sequence_cache=sequence_cache,
        sequence_shard_size=sequence_shard_size,
        teacher_cache=teacher_cache,
        cache_topk=cache_topk,
        cross_tokenizer=cross_tokenizer,
        method=method,
        target_steps=target_steps,
        teacher_steps=teacher_steps,
        guidance_scale=guidance_scale,
        labels=labels,
        prompts=prompts,
        eval_samples=eval_samples,
        video_shape=video_shape,
        image_size=image_size,
        sparse_attention=sparse_attention,
        sparse_block_size=sparse_block_size,
        fused_loss=fused_loss,
    )
    cfg = DistillConfig.resolve(
        preset=preset, config_file=str(config) if config else None, overrides=flags, section="distill"
    )
    from distillkit.distill.engine import run_distill

    if out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "multi-process runs need an explicit --out (every process must name the same one)", hint="pass --out DIR"
        )

    if cache_teacher is not None:
        from distillkit.distill.teacher_cache import write_teacher_cache

        o.emit(write_teacher_cache(cfg, cache_teacher, overwrite=overwrite), quiet)
        return
    from distillkit.models.diffusion import is_diffusers_teacher

    if cfg.diffusion.method is not None or is_diffusers_teacher(cfg.models.teacher):
        from distillkit.distill.diffusion import run_diffusion_distill

        if resume:
            raise ConfigError("--resume is not supported for diffusion distillation", hint="drop --resume")
        o.emit(run_diffusion_distill(cfg, out=str(out or o.default_out("distill")), overwrite=overwrite), quiet)
        return
    manifest = run_distill(
        cfg, out=str(out or o.default_out("distill")), overwrite=overwrite, resume=resume, resume_changed=resume_changed
    )
    if manifest is not None:  # other ranks of a multi-process run print nothing
        o.emit(manifest, quiet)


def register(app: typer.Typer) -> None:
    app.command("distill", no_args_is_help=True)(distill)
