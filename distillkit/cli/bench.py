"""``distillkit bench``: flags -> BenchConfig -> bench engine -> one JSON report line on stdout."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from distillkit.cli import options as o


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
    task: o.Task = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the random inputs (default 0).")] = None,
    allow_pickle: o.AllowPickle = None,
    trust_remote_code: o.TrustRemoteCode = None,
    preset: o.Preset = None,
    config: o.ConfigFile = None,
) -> None:
    """Measure models side by side (latency, decode, throughput, memory, quality) and print one JSON report."""
    import json

    from distillkit.bench import BenchConfig, run_bench

    flags = dict(
        models=tuple(models) if models else None,
        against=against,
        batch=batch,
        seq=seq,
        decode_tokens=decode_tokens,
        repeats=repeats,
        warmup=warmup,
        data=data,
        text_column=text_column,
        label_column=label_column,
        max_samples=max_samples,
        plot=str(plot) if plot else None,
        out=str(report_out) if report_out else None,
        device=device,
        dtype=dtype,
        task=task,
        seed=seed,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        command=shlex.join(sys.argv),
    )
    cfg = BenchConfig.resolve(
        preset=preset, config_file=str(config) if config else None, overrides=flags, section="bench"
    )
    report = run_bench(cfg)
    sys.stdout.write(json.dumps(report, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command("bench", no_args_is_help=True)(bench)
