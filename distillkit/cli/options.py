"""Options shared by every subcommand, and the one way a command reports its result."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from distillkit.progress import stderr_console  # noqa: F401  (its home is progress; kept here for old callers)

Out = Annotated[
    Path | None, typer.Option("--out", "-o", help="Output artifact directory (default: runs/<stage>-<time>).")
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace an existing distillkit artifact or empty directory at --out (only once the new one is "
        "complete); never the current, home or an input directory.",
    ),
]
Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print only the artifact path on stdout, not the manifest JSON.")
]
Preset = Annotated[
    str | None, typer.Option("--preset", help="A named recipe from distillkit's presets/ (flags override it).")
]
ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="A TOML or JSON config file (flags override it; it overrides --preset).")
]
Task = Annotated[
    str | None,
    typer.Option(
        "--task",
        help="causal-lm, masked-lm, feature-extraction, sequence-classification, image-classification (default: from config.architectures).",
    ),
]
TextColumn = Annotated[str | None, typer.Option("--text-column", help="Column holding the text (default: detected).")]
LabelColumn = Annotated[str | None, typer.Option("--label-column", help="Column holding class labels.")]
MaxLength = Annotated[int | None, typer.Option("--max-length", help="Tokens per sequence (default 128).")]
MaxSamples = Annotated[int | None, typer.Option("--max-samples", help="Use at most this many raw examples.")]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed (default 0).")]
QualitySplit = Annotated[
    float | None, typer.Option("--eval-split", help="Held-out fraction for quality before/after (default 0.05).")
]
Device = Annotated[str | None, typer.Option("--device", help="auto (CUDA when present), cpu, cuda, cuda:N.")]
AllowPickle = Annotated[
    bool | None, typer.Option("--allow-pickle", help="Allow loading pickle (*.bin) weights, which can run code.")
]
TrustRemoteCode = Annotated[
    bool | None, typer.Option("--trust-remote-code", help="Allow custom model code from the model directory or hub.")
]


def default_out(stage: str) -> Path:
    import datetime as dt

    return Path("runs") / f"{stage}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def emit(manifest: dict[str, Any], quiet: bool) -> None:
    """The one stdout line of a command: the manifest JSON, or with --quiet just the path."""
    import json

    line = manifest["path"] if quiet else json.dumps(manifest, sort_keys=True, default=str)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
