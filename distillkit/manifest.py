"""The artifact contract between stages: manifest, source resolution, atomic writes, model card.

An artifact is a directory a user can load without distillkit (``save_pretrained`` layout) with
``distillkit.json`` beside the weights. Every stage prints that manifest as one JSON line on
stdout; the next stage reads it back with ``read_source("-")``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from distillkit import __version__
from distillkit.errors import ModelError, OutputError

MANIFEST_NAME = "distillkit.json"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
SCHEMA_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".pt2", ".gguf")


@dataclass
class Manifest:
    """What an artifact is and how it was made.

    ``inputs`` maps a role (``teacher``, ``student``, ``model``) to ``{"path", "sha256": {file: hash}}``;
    ``history`` holds the manifests of every earlier stage (oldest first, without their own history).
    """

    stage: str
    path: str
    task: str | None = None
    model_type: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION
    distillkit_version: str = __version__
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    environment: dict[str, str] = field(default_factory=lambda: environment())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_line(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=_json_default)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f for f in cls.__dataclass_fields__}
        missing = {"stage", "path"} - set(data)
        if missing:
            raise ModelError(f"not a distillkit manifest (missing {', '.join(sorted(missing))})")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def read(cls, path: str | os.PathLike) -> Manifest:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"cannot read manifest {path}: {e}") from None
        return cls.from_dict(data)

    def lineage(self) -> list[dict[str, Any]]:
        """Earlier stages plus this one, oldest first."""
        me = self.to_dict()
        me.pop("history", None)
        return [*self.history, me]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, set | tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def environment() -> dict[str, str]:
    """Versions that matter for reproducing a run (no torch import: read from metadata)."""
    from importlib import metadata

    env = {"python": platform.python_version(), "platform": platform.platform(terse=True)}
    for pkg in ("torch", "transformers", "accelerate", "datasets"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            env[pkg] = metadata.version(pkg)
    return env


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weight_hashes(directory: str | os.PathLike) -> dict[str, str]:
    """sha256 of every weight file in ``directory`` (recursively, relative names)."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES and ".partial" not in p.parts[-2]:
            out[str(p.relative_to(directory))] = sha256_file(p)
    return out


def describe_input(path: str, manifest: Manifest | None = None) -> dict[str, Any]:
    """The manifest's record of one input: where it was and what its weights hashed to."""
    rec: dict[str, Any] = {"path": str(path)}
    if Path(path).is_dir():
        rec["path"] = str(Path(path).resolve())
        rec["sha256"] = weight_hashes(path)
    else:
        rec["hub_id"] = str(path)
    if manifest is not None:
        rec["stage"] = manifest.stage
    return rec


# --------------------------------------------------------------------------------------------
# Sources: "-" | artifact dir | manifest path | model dir | hub id


@dataclass
class Source:
    """A resolved model argument. ``path`` is a local directory or a hub id."""

    path: str
    kind: str  # "artifact" | "model_dir" | "hub"
    manifest: Manifest | None = None

    @property
    def is_local(self) -> bool:
        return self.kind != "hub"


def read_source(arg: str, stdin: TextIO | None = None) -> Source:
    """Resolve a model argument.

    ``-`` reads the previous stage's JSON line from stdin (the last non-empty line), so stages
    chain in shell pipelines. A path to ``distillkit.json`` or a directory containing one is an
    artifact; another directory is a plain model directory; anything else that looks like
    ``org/name`` is a hub id.
    """
    if arg == "-":
        stream = stdin if stdin is not None else sys.stdin
        if stream is None or stream.isatty():
            raise ModelError(
                "'-' reads the previous stage's manifest from stdin, but nothing was piped in",
                hint="pipe a distillkit command into this one, or pass a model directory",
            )
        lines = [ln.strip() for ln in stream.read().splitlines() if ln.strip()]
        if not lines:
            raise ModelError(
                "'-' reads the previous stage's manifest from stdin, but stdin was empty",
                hint="check that the previous command succeeded",
            )
        line = lines[-1]
        if not line.startswith("{"):
            return read_source(line)  # the previous stage ran with --quiet and printed its path
        try:
            manifest = Manifest.from_dict(json.loads(line))
        except json.JSONDecodeError:
            raise ModelError(
                "stdin does not hold a distillkit manifest line",
                hint="pipe the stdout of a distillkit command (not its logs)",
            ) from None
        return Source(manifest.path, "artifact", manifest)

    p = Path(arg).expanduser()
    if p.is_file():
        if p.name.endswith(".json"):
            manifest = Manifest.read(p)
            return Source(str(p.parent.resolve()), "artifact", manifest)
        raise ModelError(
            f"{arg} is a file, not a model directory", hint="pass the directory that holds config.json and the weights"
        )
    if p.is_dir():
        if (p / MANIFEST_NAME).is_file():
            return Source(str(p.resolve()), "artifact", Manifest.read(p / MANIFEST_NAME))
        return Source(str(p.resolve()), "model_dir")
    if _HUB_ID.fullmatch(arg) and not arg.startswith("."):
        return Source(arg, "hub")
    raise ModelError(f"model path {arg} does not exist", hint="check the path")


def history_of(source: Source | None) -> list[dict[str, Any]]:
    """The history a new artifact inherits from a source."""
    return source.manifest.lineage() if source is not None and source.manifest is not None else []


# --------------------------------------------------------------------------------------------
# Atomic artifact directories


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early, before any work, if ``out`` cannot be written."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise OutputError(f"output directory {out} already exists", hint="pass --overwrite or choose another --out")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is not a directory", hint="choose another --out")
    parent = out.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {probe}", hint="choose an --out in a writable directory")
    return out


def work_dir(out: str | os.PathLike) -> Path:
    """The stable sibling where a stage keeps checkpoints while it runs (for --resume)."""
    out = Path(out).expanduser().absolute()
    return out.parent / f".{out.name}.partial"


@contextlib.contextmanager
def atomic_artifact(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; move it to ``out`` only if the block succeeds.

    On any exception the temporary directory is removed and ``out`` is untouched. With
    ``overwrite`` an existing ``out`` is replaced only after the new artifact is complete.
    """
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True, default=_json_default) + "\n")
    return path


def finalize_artifact(tmp: Path, manifest: Manifest, final_path: str | os.PathLike) -> Manifest:
    """Hash the weights, write manifest and model card into ``tmp`` (which becomes ``final_path``)."""
    manifest.path = str(Path(final_path).expanduser().absolute())
    manifest.files = weight_hashes(tmp)
    write_manifest(tmp, manifest)
    (tmp / "README.md").write_text(model_card(manifest))
    return manifest


# --------------------------------------------------------------------------------------------
# Model card


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def model_card(manifest: Manifest) -> str:
    """A README.md for the artifact: what it is, where it came from, its metrics, how to load it."""
    task = manifest.task or "model"
    loader = {
        "causal-lm": "AutoModelForCausalLM",
        "masked-lm": "AutoModelForMaskedLM",
        "sequence-classification": "AutoModelForSequenceClassification",
        "image-classification": "AutoModelForImageClassification",
        "feature-extraction": "AutoModel",
    }.get(task, "AutoModel")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [distillkit, " + manifest.stage + "]",
        "---",
        "",
        f"# {Path(manifest.path).name}",
        "",
        f"Made by distillkit {manifest.distillkit_version} (`{manifest.stage}` stage) on {manifest.created}.",
        f"Task: `{task}`" + (f", model type `{manifest.model_type}`." if manifest.model_type else "."),
        "",
        "## Load",
        "",
        "```python",
        f"from transformers import {loader}",
        f'model = {loader}.from_pretrained("{manifest.path}")',
        "```",
        "",
    ]
    if manifest.metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        for k, v in sorted(manifest.metrics.items()):
            if isinstance(v, int | float | str):
                lines.append(f"| {k} | {_fmt(v)} |")
        lines.append("")
    lines += ["## Lineage", "", "| # | stage | inputs | created |", "|---|---|---|---|"]
    for i, step in enumerate(manifest.lineage()):
        ins = ", ".join(
            f"{role}: `{rec.get('path', rec.get('hub_id', '?'))}`" for role, rec in step.get("inputs", {}).items()
        )
        lines.append(f"| {i} | {step.get('stage')} | {ins} | {step.get('created', '')} |")
    lines += ["", "The full resolved configuration of every stage is in `distillkit.json`.", ""]
    return "\n".join(lines)
