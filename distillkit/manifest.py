"""The artifact contract between stages: manifest, source resolution, atomic writes, model card.

An artifact is a directory a user can load without distillkit (``save_pretrained`` layout) with
``distillkit.json`` beside the weights. Every stage prints that manifest as one JSON line on
stdout; the next stage reads it back with ``read_source("-")``.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
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
        return _read_stdin_source(stdin if stdin is not None else sys.stdin)

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


_STDIN_HINT = "pipe the stdout of a distillkit command into this one (its manifest line, or its path with --quiet)"


def _read_stdin_source(stream: TextIO | None) -> Source:
    """``-``: the last non-empty stdin line is a manifest (JSON) or, from ``--quiet``, an artifact's path."""
    if stream is None or stream.isatty():
        raise ModelError(
            "'-' reads the previous stage's manifest from stdin, but nothing was piped in",
            hint="pipe a distillkit command into this one, or pass a model directory",
        )
    try:
        text = stream.read()
    except UnicodeDecodeError:
        raise ModelError("stdin holds bytes that are not text, not a distillkit manifest", hint=_STDIN_HINT) from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ModelError(
            "'-' reads the previous stage's manifest from stdin, but stdin was empty",
            hint="check that the previous command succeeded",
        )
    line = lines[-1]
    shown = ascii(line if len(line) <= 60 else line[:57] + "...")
    if not line.startswith(("{", "[")):
        # --quiet prints an artifact's local path; any other word (a hub id, log noise) did not come from distillkit
        if "\x00" not in line and Path(line).expanduser().exists():
            return read_source(line)
        raise ModelError(
            f"stdin's last line {shown} is neither a distillkit manifest nor the path of an existing artifact",
            hint=_STDIN_HINT,
        )
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        raise ModelError(
            f"stdin's last line {shown} is not a distillkit manifest (not JSON)", hint=_STDIN_HINT
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("stage"), str) or not isinstance(data.get("path"), str):
        raise ModelError(
            f"stdin's last line {shown} is JSON but not a distillkit manifest (it needs 'stage' and 'path')",
            hint=_STDIN_HINT,
        )
    manifest = Manifest.from_dict(data)
    if not Path(manifest.path).expanduser().exists():
        raise ModelError(
            f"the manifest on stdin names the artifact {manifest.path}, which does not exist",
            hint="the artifact was moved or deleted; pass its directory instead of '-'",
        )
    return Source(manifest.path, "artifact", manifest)


def history_of(source: Source | None) -> list[dict[str, Any]]:
    """The history a new artifact inherits from a source."""
    return source.manifest.lineage() if source is not None and source.manifest is not None else []


# --------------------------------------------------------------------------------------------
# Atomic artifact directories


def is_artifact_dir(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a distillkit manifest that :meth:`Manifest.read` accepts."""
    f = Path(directory) / MANIFEST_NAME
    if not f.is_file():
        return False
    try:
        Manifest.read(f)
    except ModelError:
        return False
    return True


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _refuse_unsafe(out: Path, shown: str, protect: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an --out whose replacement could destroy something that is not distillkit's to delete."""
    real = _real(out)
    hint = "pass --out NEW_DIR naming a directory of its own (e.g. runs/NAME)"
    if real == Path(real.anchor):
        raise OutputError(f"--out {shown} is the filesystem root", hint=hint)
    with contextlib.suppress(RuntimeError, KeyError):  # no resolvable home directory: nothing to compare with
        if real == _real(Path.home()):
            raise OutputError(f"--out {shown} is your home directory", hint=hint)
    cwd = _real(os.getcwd())
    if real == cwd:
        raise OutputError(f"--out {shown} is the current directory", hint=hint)
    if _within(cwd, real):
        raise OutputError(f"--out {shown} contains the current directory", hint=hint)
    for p in protect:
        if p is None or str(p) in ("", "-") or not Path(p).expanduser().exists():
            continue  # a hub id, stdin or a spec: nothing on disk to protect
        inp = _real(p)
        if _within(inp, real):
            what = "is" if inp == real else "contains"
            raise OutputError(f"--out {shown} {what} the input {p}", hint=hint)
        if _within(real, inp):
            raise OutputError(f"--out {shown} is inside the input {p}", hint=hint)


def _can_create_in(directory: Path) -> bool:
    """Whether a directory can really be created in ``directory``: as root ``os.access`` says yes to /sys, /proc
    and read-only mounts, where the write fails only after the work is done."""
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".distillkit-probe-", dir=directory))
    except OSError:
        return False
    return True


def check_output(
    out: str | os.PathLike,
    overwrite: bool,
    protect: Iterable[str | os.PathLike | None] = (),
    owned: Callable[[Path], bool] | None = None,
) -> Path:
    """Fail early, before any work, if ``out`` cannot or must not be written; then lock it for this process.

    ``protect`` lists the run's inputs (model, teacher, student, data paths; hub ids and ``-`` are
    skipped): ``out`` may be none of them, contain one or lie inside one. Whatever ``overwrite`` says,
    ``out`` may not be the root, the home directory, the current directory or a parent of it, and
    ``--overwrite`` replaces only a distillkit artifact (a readable ``distillkit.json``), an empty
    directory, or a directory ``owned(dir)`` recognises as another distillkit output (a teacher cache).

    On success this process holds a lock beside ``out`` (``.NAME.lock``) until :func:`release_output`,
    the end of :func:`atomic_artifact` or exit, so a second run on the same ``out`` is refused; and the
    ``.NAME.tmp-PID`` / ``.NAME.old-PID`` leftovers of dead runs are removed.
    """
    shown = str(out)
    if not shown.strip():
        raise OutputError("--out is empty", hint="pass --out NEW_DIR naming a directory of its own")
    out = Path(shown).expanduser().absolute()
    _refuse_unsafe(out, shown, protect)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {shown} is an existing file, not a directory", hint="choose another --out")
    if out.exists() and not overwrite:
        raise OutputError(f"output directory {out} already exists", hint="pass --overwrite or choose another --out")
    if out.exists() and any(out.iterdir()) and not is_artifact_dir(out) and not (owned is not None and owned(out)):
        raise OutputError(
            f"--overwrite replaces only a distillkit artifact or an empty directory, and {out} is neither "
            f"(no readable {MANIFEST_NAME})",
            hint="choose another --out; distillkit never deletes a directory it did not write",
        )
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK) or not _can_create_in(probe):
        raise OutputError(f"cannot write to {probe}", hint="choose an --out in a writable directory")
    lock_output(out)
    _sweep_dead_leftovers(out)
    return out


# Locks held by this process: lock file path -> open descriptor (flock is per open file, so a second
# open in this same process would block itself; a stage that calls check_output twice reuses the lock).
_HELD: dict[str, int] = {}


def _lock_path(out: Path) -> Path:
    return Path(os.path.realpath(out.parent)) / f".{out.name}.lock"


def _main_rank() -> bool:
    # every process of a torchrun / accelerate launch names the same --out; only rank 0 writes it
    return os.environ.get("RANK", "0") in ("", "0")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def lock_output(out: str | os.PathLike) -> None:
    """Take the exclusive lock of ``out`` for this process, or raise OutputError naming the holder's pid.

    The lock is ``flock`` on ``.NAME.lock`` beside ``out``: the kernel drops it when the holder dies,
    so a lock file left by a killed run never blocks. Non-main ranks of a multi-process run skip it.
    """
    out = Path(out).expanduser().absolute()
    path = _lock_path(out)
    if str(path) in _HELD or not _main_rank():
        return
    try:
        import fcntl
    except ImportError:  # no flock on this platform: run unlocked rather than not at all
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(
                f"another distillkit run (pid {holder}) is writing {out}",
                hint="wait for it to finish, or choose another --out",
            ) from None
        except OSError:  # a filesystem without flock
            os.close(fd)
            return
        # the holder unlinks the file on release; a lock on an unlinked file would exclude no one
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        mine = os.fstat(fd)
        if st is not None and (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev):
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[str(path)] = fd


def _drop_lock(path: str) -> None:
    fd = _HELD.pop(path, None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(path)  # while still holding it, so no one waits on a file about to vanish
    with contextlib.suppress(OSError):
        os.close(fd)


def release_output(out: str | os.PathLike) -> None:
    """Drop this process's lock of ``out`` (and its lock file); nothing if it holds none."""
    _drop_lock(str(_lock_path(Path(out).expanduser().absolute())))


@atexit.register
def release_outputs() -> None:
    """Drop every lock this process holds."""
    for path in list(_HELD):
        _drop_lock(path)


def releases_locks(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a stage's entry point: the output locks it takes are dropped when it returns or fails, so a run that
    stops on an error leaves no lock file behind, whether it was called from the CLI or from Python."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = set(_HELD)
        try:
            return fn(*args, **kwargs)
        finally:
            for path in set(_HELD) - before:
                _drop_lock(path)

    return wrapper


_LEFTOVER = re.compile(r"\.(tmp|old)-(\d+)")


def _sweep_dead_leftovers(out: Path) -> None:
    """Remove the temporary and replaced-artifact directories of dead runs on ``out`` (under its lock)."""
    if not _main_rank() or not out.parent.is_dir():
        return
    prefix = f".{out.name}"
    for p in out.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        m = _LEFTOVER.fullmatch(p.name[len(prefix) :])
        if m is None or not p.is_dir() or int(m.group(2)) == os.getpid() or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists():
            # the run died between moving the old artifact aside and moving the new one in: the old one
            # is the only copy, so it is kept for the user to move back
            sys.stderr.write(f"note: {p} holds the artifact an interrupted run was replacing; move it back to {out}\n")
            continue
        shutil.rmtree(p, ignore_errors=True)


def work_dir(out: str | os.PathLike) -> Path:
    """The stable sibling where a stage keeps checkpoints while it runs (for --resume)."""
    out = Path(out).expanduser().absolute()
    return out.parent / f".{out.name}.partial"


@contextlib.contextmanager
def atomic_artifact(
    out: str | os.PathLike,
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike | None] = (),
    owned: Callable[[Path], bool] | None = None,
    keep_lock: bool = False,
) -> Iterator[Path]:
    """Yield a temporary sibling directory; move it to ``out`` only if the block succeeds.

    On any exception the temporary directory is removed and ``out`` is untouched. With
    ``overwrite`` an existing ``out`` (an artifact, see :func:`check_output`) is replaced only after
    the new artifact is complete. The lock on ``out`` is released at the end unless ``keep_lock``
    (a caller with more cleanup to do under it then calls :func:`release_output`).
    """
    out = check_output(out, overwrite, protect, owned)
    try:
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
        apply_umask(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if not keep_lock:
            release_output(out)


def apply_umask(directory: Path) -> None:
    """Give every file and folder under ``directory`` the mode the user's umask asks for (0644 / 0755 under 022).

    safetensors writes its files through a private temporary file (mode 0600) and renames it, so without this the
    weights of an artifact would be unreadable to the user's group and to other accounts that read the rest of it.
    """
    mask = os.umask(0)
    os.umask(mask)
    for path in [directory, *directory.rglob("*")]:
        if path.is_symlink():
            continue
        executable = path.is_dir() or bool(path.stat().st_mode & 0o111)
        os.chmod(path, (0o777 if executable else 0o666) & ~mask)


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


def _input_label(rec: Any) -> str:
    """How the card names one input: its local path or hub id, or the spec a student was built from."""
    if not isinstance(rec, dict):
        return f"`{rec}`"
    for key in ("path", "hub_id"):
        if rec.get(key):
            return f"`{rec[key]}`"
    if rec.get("spec") is not None:
        spec = rec["spec"]
        if isinstance(spec, dict):
            spec = ",".join(f"{k}={v}" for k, v in spec.items() if v is not None and not isinstance(v, dict | list))
        init = f" (init: {rec['init']})" if rec.get("init") else ""
        return f"spec `{spec}`{init}"
    return "`unknown`"


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
        ins = ", ".join(f"{role}: {_input_label(rec)}" for role, rec in step.get("inputs", {}).items())
        lines.append(f"| {i} | {step.get('stage')} | {ins} | {step.get('created', '')} |")
    lines += ["", "The full resolved configuration of every stage is in `distillkit.json`.", ""]
    return "\n".join(lines)
