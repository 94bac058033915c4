"""``distillkit search-student``: flags -> SearchConfig -> search engine -> manifest on stdout."""

from __future__ import annotations

from typing import Annotated

import typer

from distillkit.cli import options as o


def _score_help() -> str:
    from distillkit.registry import SCORES

    return f"Score that ranks candidates (higher is better; default diswot). {SCORES.help_text()}."


def search_student(
    teacher: Annotated[
        str,
        typer.Argument(
            metavar="TEACHER",
            help="The teacher: a model directory, an artifact, a distillkit.json, '-' (previous stage) or a hub id.",
        ),
    ],
    params: Annotated[
        float | None,
        typer.Option("--params", help="Parameter budget as a fraction of the teacher's count, in (0, 1]."),
    ] = None,
    max_params: Annotated[int | None, typer.Option("--max-params", help="Parameter budget as a count.")] = None,
    max_latency_ms: Annotated[
        float | None,
        typer.Option(
            "--max-latency-ms",
            help="Latency budget: forward pass of a --batch x --seq input, measured on --device, in milliseconds.",
        ),
    ] = None,
    batch: Annotated[int | None, typer.Option("--batch", help="Batch of the latency measurement (default 1).")] = None,
    seq: Annotated[
        int | None, typer.Option("--seq", help="Sequence length of the latency measurement (default 128).")
    ] = None,
    space: Annotated[
        str | None,
        typer.Option(
            "--space",
            help="Fix or bound dimensions: 'layers=2..6,hidden=128|256,heads=4' (keys layers, hidden, heads, "
            "kv_heads, intermediate; fractions in (0, 1) are of the teacher's size). ResNet teachers: stage depths "
            "and widths, keys depth0, depth1, ..., width0, width1, ... (e.g. 'depth0=1..2,width1=0.5').",
        ),
    ] = None,
    score: Annotated[str | None, typer.Option("--score", help=_score_help())] = None,
    report: Annotated[
        list[str] | None,
        typer.Option("--report", help="Also compute this score for every candidate (repeatable; default params)."),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            "--init",
            help="Score candidates at their teacher-derived initialisation (teacher, default) or at random "
            "initialisation (random, as the DisWOT paper). The artifact is always teacher-initialised.",
        ),
    ] = None,
    relation: Annotated[
        str | None,
        typer.Option("--relation", help="DisWOT relation term: gram (row-normalised Gram matrices) or cka."),
    ] = None,
    candidates: Annotated[int | None, typer.Option("--candidates", help="Candidates to score (default 100).")] = None,
    population: Annotated[
        int | None, typer.Option("--population", help="Population of the regularised evolution (default 16).")
    ] = None,
    tournament: Annotated[
        int | None, typer.Option("--tournament", help="Tournament size for parent selection (default 4).")
    ] = None,
    crossover: Annotated[
        float | None, typer.Option("--crossover", help="Probability of crossover before mutation (default 0.5).")
    ] = None,
    time_budget: Annotated[
        float | None, typer.Option("--time-budget", help="Stop searching after this many seconds.")
    ] = None,
    seed: o.Seed = None,
    task: o.Task = None,
    data: Annotated[
        str | None,
        typer.Option("--data", "-d", help="Calibration data, as for distill (default: builtin:english)."),
    ] = None,
    text_column: o.TextColumn = None,
    label_column: o.LabelColumn = None,
    max_length: Annotated[
        int | None, typer.Option("--max-length", help="Tokens per calibration sequence (default 32).")
    ] = None,
    max_samples: Annotated[
        int | None, typer.Option("--max-samples", help="Read at most this many raw examples (default 1000).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", "-b", help="Examples in the calibration batch (default 8).")
    ] = None,
    device: o.Device = None,
    allow_pickle: o.AllowPickle = None,
    trust_remote_code: o.TrustRemoteCode = None,
    preset: o.Preset = None,
    config: o.ConfigFile = None,
    out: o.Out = None,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
) -> None:
    """Find the student architecture that will distil best from TEACHER, without training, and write it."""
    from distillkit.search import SearchConfig
    from distillkit.search import search_student as run

    flags = dict(
        teacher=teacher,
        params=params,
        max_params=max_params,
        max_latency_ms=max_latency_ms,
        latency_batch=batch,
        latency_seq=seq,
        space=space,
        score=score,
        report=tuple(report) if report else None,
        init=init,
        relation=relation,
        candidates=candidates,
        population=population,
        tournament=tournament,
        crossover=crossover,
        time_budget=time_budget,
        seed=seed,
        task=task,
        data=data,
        text_column=text_column,
        label_column=label_column,
        max_length=max_length,
        max_samples=max_samples,
        batch_size=batch_size,
        device=device,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    cfg = SearchConfig.resolve(
        preset=preset, config_file=str(config) if config else None, overrides=flags, section="search-student"
    )
    manifest = run(cfg, out=str(out or o.default_out("search-student")), overwrite=overwrite)
    o.emit(manifest, quiet)


def register(app: typer.Typer) -> None:
    app.command("search-student", no_args_is_help=True)(search_student)
