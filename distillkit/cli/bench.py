"""``distillkit bench``: flags -> BenchConfig -> bench engine -> one JSON report line on stdout."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from distillkit.cli import options as o


def _kernel_help() -> str:
    from distillkit.bench.kernels import kernel_help

    return kernel_help()


def bench(
    models: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="MODEL",
            help="Models to measure: '-' (previous stage on stdin), artifact or model directories, distillkit.json files or hub ids.",
        ),
    ] = None,
    against: Annotated[
        str | None,
        typer.Option(
            "--against",
            "-a",
            help="Baseline and teacher: ratios are taken against it and agreement/KL/embedding cosine measured against it (default baseline: the first MODEL).",
        ),
    ] = None,
    batch: Annotated[
        int | None, typer.Option("--batch", "-b", help="Batch size of the timed runs (default 1).")
    ] = None,
    seq: Annotated[
        int | None,
        typer.Option(
            "--seq", help="Sequence length of the timed prefill, the decode prompt and the --data blocks (default 128)."
        ),
    ] = None,
    decode_tokens: Annotated[
        int | None,
        typer.Option("--decode-tokens", help="Tokens generated greedily per decode run of a causal LM (default 16)."),
    ] = None,
    repeats: Annotated[
        int | None, typer.Option("--repeats", help="Timed runs per measurement; p50/p90 are over these (default 10).")
    ] = None,
    warmup: Annotated[int | None, typer.Option("--warmup", help="Untimed runs before timing (default 3).")] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Evaluation data for quality (perplexity, accuracy, agreement): .txt, .jsonl/.json, .csv, .parquet, a `datasets` directory or an image folder; the whole file is used.",
        ),
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option(
            "--eval-data",
            help="Held-out text (a file as --data reads, or builtin:quotes / builtin:docstrings / builtin:english) for "
            "the held-out measures of distill --eval-data: embedding geometry against --against (Spearman, "
            "nearest-neighbour agreement, cosine) or causal-LM perplexity, top-1 agreement and top-5 overlap. "
            "PyTorch models only.",
        ),
    ] = None,
    text_column: o.TextColumn = None,
    label_column: Annotated[
        str | None,
        typer.Option(
            "--label-column", help="Column holding class labels, for accuracy (default: label/labels if present)."
        ),
    ] = None,
    max_samples: Annotated[
        int | None, typer.Option("--max-samples", help="Use at most this many rows of --data.")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot", help="Write a quality-vs-latency plot (.png, .svg or .pdf); parameters vs latency without --data."
        ),
    ] = None,
    report_out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Also write the JSON report to this file.")
    ] = None,
    device: o.Device = None,
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="auto (checkpoint dtype on CUDA, float32 on CPU), float32, bfloat16, float16."),
    ] = None,
    quant_kernel: Annotated[
        str | None,
        typer.Option(
            "--quant-kernel",
            help="How distillkit's packed quantized layers multiply: auto (cpu-bf16 on a CPU with AVX512-BF16, "
            "else dequant), cpu-bf16 (torch's int4 CPU kernel for batch-1 decode, a cached bf16 weight otherwise; "
            "bf16 compute), cached (the exact weight dequantized once and kept: dequant's outputs at float speed and "
            "memory), dequant (the stored values dequantized in the model dtype every call; exact). "
            "Default auto.",
        ),
    ] = None,
    task: o.Task = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the random inputs (default 0).")] = None,
    diffusion_steps: Annotated[
        int | None,
        typer.Option(
            "--diffusion-steps",
            help="diffusers models: sampling steps of every MODEL (default: the artifact's num_inference_steps, "
            "else 50); the --against baseline keeps its own count (its manifest's, else the --teacher-steps its "
            "students were distilled with).",
        ),
    ] = None,
    prompts: Annotated[
        str | None,
        typer.Option(
            "--prompts",
            help="Text-conditioned diffusers pipelines: prompts, one per line, drawn per sample with the quality "
            "noise (default: the prompts distill recorded in a MODEL's manifest).",
        ),
    ] = None,
    video_shape: Annotated[
        str | None,
        typer.Option(
            "--video-shape",
            help="Video diffusers models (Wan): FRAMES,HEIGHT,WIDTH of the latent video to sample (default: the "
            "one distill recorded in the manifests).",
        ),
    ] = None,
    image_size: Annotated[
        str | None,
        typer.Option(
            "--image-size",
            help="Flux transformers: HEIGHT,WIDTH of the latent image to sample (default: the one distill recorded "
            "in the manifests, else FluxPipeline's 128,128).",
        ),
    ] = None,
    allow_pickle: o.AllowPickle = None,
    trust_remote_code: o.TrustRemoteCode = None,
    preset: o.Preset = None,
    config: o.ConfigFile = None,
    kernel: Annotated[
        str | None,
        typer.Option("--kernel", help=f"Benchmark a GPU kernel instead of models (needs CUDA): {_kernel_help()}."),
    ] = None,
    speculative: Annotated[
        str | None,
        typer.Option(
            "--speculative",
            help="Teacher for speculative decoding: measure each MODEL as its draft (acceptance rate, speedup).",
        ),
    ] = None,
    search_correlation: Annotated[
        str | None,
        typer.Option(
            "--search-correlation",
            metavar="TEACHER",
            help="Instead of models: score --candidates students of TEACHER with every search-student score, distil "
            "each for --steps steps and report Kendall tau / Spearman rho between each score and the distilled "
            "quality (uses --data, --seq as tokens per sequence, --seed, --out).",
        ),
    ] = None,
    candidates: Annotated[
        int | None,
        typer.Option("--candidates", help="With --search-correlation: students scored and distilled (default 12)."),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option("--steps", help="With --search-correlation: distillation steps per student (default 40)."),
    ] = None,
) -> None:
    """Measure models side by side (latency, decode, throughput, memory, quality) and print one JSON report."""
    import json

    from distillkit.bench import BenchConfig, run_bench

    if search_correlation is not None:
        report = _search_correlation(search_correlation, models, candidates, steps, data, seq, seed, report_out)
        sys.stdout.write(json.dumps(report, sort_keys=True, default=str) + "\n")
        sys.stdout.flush()
        return
    if candidates is not None or steps is not None:
        from distillkit.errors import ConfigError

        raise ConfigError(
            "--candidates and --steps belong to --search-correlation", hint="add --search-correlation TEACHER"
        )

    if kernel is not None:
        from distillkit.bench.kernels import run_kernel_bench
        from distillkit.errors import ConfigError

        if models:
            raise ConfigError("--kernel benchmarks a kernel, not models", hint="drop the MODEL arguments")
        report = run_kernel_bench(kernel, command=shlex.join(sys.argv))
        if report_out:
            report_out.write_text(json.dumps(report, sort_keys=True, default=str) + "\n")
        sys.stdout.write(json.dumps(report, sort_keys=True, default=str) + "\n")
        return

    flags = dict(
        models=tuple(models) if models else None,
        against=against,
        batch=batch,
        seq=seq,
        decode_tokens=decode_tokens,
        repeats=repeats,
        warmup=warmup,
        data=data,
        eval_data=eval_data,
        text_column=text_column,
        label_column=label_column,
        max_samples=max_samples,
        plot=str(plot) if plot else None,
        out=str(report_out) if report_out else None,
        device=device,
        dtype=dtype,
        quant_kernel=quant_kernel,
        task=task,
        seed=seed,
        diffusion_steps=diffusion_steps,
        prompts=prompts,
        video_shape=video_shape,
        image_size=image_size,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        command=shlex.join(sys.argv),
    )
    cfg = BenchConfig.resolve(
        preset=preset, config_file=str(config) if config else None, overrides=flags, section="bench"
    )
    report = run_bench(cfg)
    if speculative is not None:
        from distillkit.bench.speculative import measure_speculative

        report["speculative"] = [measure_speculative(cfg, m, speculative) for m in cfg.models]
        if cfg.out:
            from distillkit.bench.report import write_report

            write_report(report, cfg.out)
    sys.stdout.write(json.dumps(report, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def _search_correlation(
    teacher: str,
    models: list[str] | None,
    candidates: int | None,
    steps: int | None,
    data: str | None,
    seq: int | None,
    seed: int | None,
    report_out: Path | None,
) -> dict:
    """``--search-correlation``: run :mod:`distillkit.search.correlation` and return its result (table on stderr)."""
    import json
    import tempfile

    from distillkit.errors import ConfigError
    from distillkit.search.correlation import build_parser, run_benchmark

    if models:
        raise ConfigError("--search-correlation draws its own students", hint="drop the MODEL arguments")
    if candidates is not None and candidates < 2:
        raise ConfigError(f"--candidates {candidates} gives no rank correlation", hint="pass --candidates 2 or more")
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps {steps} trains nothing", hint="pass --steps 1 or more")
    argv = ["--teacher", teacher]
    for flag, value in (("--candidates", candidates), ("--steps", steps), ("--data", data), ("--max-length", seq)):
        if value is not None:
            argv += [flag, str(value)]
    if seed is not None:
        argv += ["--seed", str(seed)]
    # The distilled students are scratch work: they go to a temporary directory, only the report is kept.
    with tempfile.TemporaryDirectory(prefix="distillkit-search-corr-") as tmp:
        report = run_benchmark(build_parser().parse_args([*argv, "--out", tmp]))
    report["config"].pop("out", None)
    if report_out:
        report_out.write_text(json.dumps(report, sort_keys=True, default=str) + "\n")
    return report


def register(app: typer.Typer) -> None:
    app.command("bench", no_args_is_help=True)(bench)
