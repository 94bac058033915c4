"""Read what ``--data`` names into a ``datasets.Dataset`` of raw rows.

A source is one of: nothing (the embedded general-English corpus, ``builtin:english``), an embedded corpus by name
(``builtin:NAME``, :mod:`distillkit.data.corpus`), a file (``.txt`` one example per non-blank line, ``.jsonl`` /
``.json`` records, ``.csv``, ``.parquet``, each optionally ``.gz``), a directory written by ``save_to_disk`` (a
``Dataset`` or a ``DatasetDict``), an image folder (class sub-directories of images), a directory of data files of
one format, or else a ``datasets`` hub name (``name`` or ``name:config``). Reading goes through the ``datasets``
library; every failure becomes a :class:`~distillkit.errors.DataError` that says what was wrong.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from distillkit.errors import ConfigError, DataError

# Extension -> the `datasets` packaged builder that reads it.
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SUPPORTED_EXTENSIONS = tuple(_BUILDERS)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
EMBEDDED_SOURCE = "builtin:english"  # what --data reads when it is not given
# Splits that, when a saved DatasetDict has them, serve as the held-out set instead of a random split.
EVAL_SPLIT_NAMES = ("validation", "valid", "dev", "test")
_SUPPORTED_TEXT = ", ".join(SUPPORTED_EXTENSIONS)


@dataclass(frozen=True)
class DataSpec:
    """What data to read and how to cut it.

    ``data`` is a path or a ``datasets`` hub name (``None``: the embedded corpus). ``eval_split`` is the fraction of
    examples held out (at least one example is, even at 0) unless the data brings its own validation split.
    ``max_samples`` caps the raw rows read from each split, in file order, before anything is split or packed.
    """

    data: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    eval_split: float = 0.05
    max_length: int = 128
    max_samples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.data, os.PathLike):
            object.__setattr__(self, "data", os.fspath(self.data))
        if self.data is not None and not isinstance(self.data, str):
            raise ConfigError(f"data must be a path or a dataset name, not {type(self.data).__name__}")
        if self.data is not None and not self.data.strip():
            object.__setattr__(self, "data", None)
        for name in ("text_column", "label_column"):
            if getattr(self, name) == "":
                object.__setattr__(self, name, None)
        if isinstance(self.eval_split, bool) or not isinstance(self.eval_split, (int, float)):
            raise ConfigError(f"eval_split must be a number, not {self.eval_split!r}", hint="use a value in [0, 0.5]")
        if not 0.0 <= self.eval_split <= 0.5:
            raise ConfigError(
                f"eval_split {self.eval_split} is outside [0, 0.5]",
                hint="pass --eval-split as a fraction such as 0.05 (at most half the data can be held out)",
            )
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ConfigError(
                f"max_length must be an integer >= 2, not {self.max_length!r}", hint="e.g. --max-length 128"
            )
        if self.max_samples is not None and (
            isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int) or self.max_samples < 1
        ):
            raise ConfigError(
                f"max_samples must be a positive integer, not {self.max_samples!r}",
                hint="leave --max-samples out to use every example",
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, not {self.seed!r}")


@dataclass
class RawData:
    """Rows as read. ``eval`` is a held-out split that came with the data (a saved ``validation`` split), else None."""

    train: Any
    eval: Any
    source: str
    kind: str  # embedded | file | files | save_to_disk | imagefolder | hub
    fmt: str | None = None
    train_split: str | None = None
    eval_split_name: str | None = None

    def info(self) -> dict:
        return {
            "source": self.source,
            "source_kind": self.kind,
            "format": self.fmt,
            "train_split": self.train_split,
            "eval_from": self.eval_split_name or "random-split",
            "n_rows": len(self.train),
            "n_eval_rows": None if self.eval is None else len(self.eval),
        }


def read_dataset(spec: DataSpec) -> Any:
    """The training rows ``spec`` names, as a ``datasets.Dataset`` (at most ``spec.max_samples`` of them)."""
    return read_raw(spec).train


def read_raw(spec: DataSpec) -> RawData:
    """Read ``spec.data`` into :class:`RawData`; a provided validation split, if any, comes back as ``eval``."""
    from distillkit.data.corpus import builtin_name

    name = builtin_name(spec.data) if spec.data is not None else None
    if spec.data is None or name is not None:
        raw = _read_embedded(spec.data or EMBEDDED_SOURCE)
    else:
        path = Path(spec.data).expanduser()
        if path.exists():
            raw = _read_path(path)
        elif _looks_like_path(spec.data):
            raise DataError(
                f"data path {spec.data} does not exist",
                hint=f"check the path; supported files: {_SUPPORTED_TEXT} (or a directory, or a hub dataset name)",
            )
        else:
            raw = _read_hub(spec.data)
    if spec.max_samples is not None:
        raw.train = _head(raw.train, spec.max_samples)
        if raw.eval is not None:
            raw.eval = _head(raw.eval, spec.max_samples)
    if len(raw.train) == 0:
        raise DataError(f"{raw.source} holds no rows", hint="pass a file or dataset with at least a few examples")
    return raw


def _head(ds: Any, n: int) -> Any:
    return ds if len(ds) <= n else ds.select(range(n))


def _read_embedded(source: str) -> RawData:
    from datasets import Dataset

    from distillkit.data.corpus import builtin_name, load_builtin

    name = builtin_name(source)
    assert name is not None, source
    return RawData(Dataset.from_dict({"text": load_builtin(name)}), None, source, "embedded", "text")


def _looks_like_path(name: str) -> bool:
    """A missing path should be reported as missing, not sent to the hub as a dataset name."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        return True
    suffixes = [s.lower() for s in Path(name).suffixes]
    return bool(suffixes) and (suffixes[-1] in _BUILDERS or suffixes[-1] in IMAGE_EXTENSIONS or suffixes[-1] == ".gz")


def _file_format(path: Path) -> str:
    """The builder for ``path``, looking through a trailing ``.gz``."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext not in _BUILDERS or (ext == ".parquet" and path.suffix.lower() == ".gz"):
        raise DataError(
            f"{path} has an unsupported extension {ext or '(none)'!r}",
            hint=f"use one of: {_SUPPORTED_TEXT} (text formats may be .gz), a save_to_disk directory or an image folder",
        )
    return _BUILDERS[ext]


def _read_path(path: Path) -> RawData:
    if path.is_file():
        fmt = _file_format(path)
        ds = _load_files(fmt, [path], str(path))
        return RawData(ds, None, str(path), "file", fmt)
    if not path.is_dir():
        raise DataError(f"{path} is neither a file nor a directory", hint="pass a data file or a directory")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _read_saved(path)
    if _has_images(path):
        return _read_image_folder(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    by_fmt: dict[str, list[Path]] = {}
    for f in files:
        try:
            by_fmt.setdefault(_file_format(f), []).append(f)
        except DataError:
            continue
    if len(by_fmt) == 1:
        fmt, group = next(iter(by_fmt.items()))
        return RawData(_load_files(fmt, group, str(path)), None, str(path), "files", fmt)
    if len(by_fmt) > 1:
        raise DataError(
            f"directory {path} mixes data formats ({', '.join(sorted(by_fmt))})",
            hint="put files of one format in the directory, or pass one file",
        )
    raise DataError(
        f"directory {path} holds nothing readable as data",
        hint=(
            "pass a directory written by datasets' save_to_disk, an image folder (one sub-directory of images per "
            f"class), a directory of {_SUPPORTED_TEXT} files, or one such file"
        ),
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0]}" if text else e.__class__.__name__


# How much of a text file is checked for UTF-8 up front; a bad byte further on is caught when the rows are read.
UTF8_CHECK_BYTES = 64 * 2**20
_UTF8_HINT = "save it as UTF-8 text, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8"


def check_text_file(f: Path) -> None:
    """Refuse an empty or non-UTF-8 text/JSON/CSV file by name and place, before a parser turns it into a vague
    ``DatasetGenerationError`` (or, for JSON, into rows whose strings fail only when read)."""
    import codecs
    import gzip

    decoder = codecs.getincrementaldecoder("utf-8")()
    seen, line = 0, 1
    try:
        with (gzip.open if f.suffix.lower() == ".gz" else open)(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    at = max(0, min(e.start, len(chunk) - 1))
                    where = line + chunk[:at].count(b"\n")
                    raise DataError(
                        f"{f} is not UTF-8 text: byte 0x{chunk[at]:02x} near offset {seen + at} (line {where}) "
                        "is not valid UTF-8",
                        hint=_UTF8_HINT,
                    ) from None
                line += chunk.count(b"\n")
                seen += len(chunk)
                if seen >= UTF8_CHECK_BYTES:
                    return
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"{f} is not UTF-8 text: it ends inside a multi-byte character", hint=_UTF8_HINT) from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {f}: {_first_line(e)}", hint="check that the file is whole") from None
    if seen == 0:
        raise DataError(f"{f} is empty", hint="pass a data file with at least a few examples")


def _root_cause(e: BaseException) -> BaseException:
    """The innermost cause: ``datasets`` wraps every parser error in a bare 'An error occurred' message."""
    seen = [e]
    while (nxt := e.__cause__ or e.__context__) is not None and nxt not in seen:
        seen.append(nxt)
        e = nxt
    return e


def _load_files(fmt: str, files: list[Path], source: str) -> Any:
    from datasets import load_dataset

    for f in files:
        if not os.access(f, os.R_OK):
            raise DataError(f"{f} cannot be read (permission denied)", hint="check the file's permissions")
        if fmt != "parquet":
            check_text_file(f)
    try:
        ds = load_dataset(fmt, data_files=[str(f) for f in files], split="train")
    except Exception as e:  # any parser failure is a problem with the user's file
        cause = _root_cause(e)
        if isinstance(cause, UnicodeDecodeError):
            raise DataError(
                f"{source} is not UTF-8 text: {cause.reason} at byte {cause.start}", hint=_UTF8_HINT
            ) from None
        e = cause if cause is not e and str(cause).strip() else e
        hint = "check that the file is valid"
        if fmt == "json":
            hint = "a .jsonl file needs one JSON object per line; a .json file a list of objects"
        elif fmt == "csv":
            hint = "a .csv file needs a header row naming its columns"
        raise DataError(f"cannot read {source} as {fmt}: {_first_line(e)}", hint=hint) from None
    if fmt == "text":
        ds = _drop_blank_lines(ds)
    return ds


def _drop_blank_lines(ds: Any) -> Any:
    """A .txt file has one example per non-blank line."""
    import pyarrow.compute as pc

    column = ds.data.column("text")
    keep = pc.not_equal(pc.utf8_trim_whitespace(column), "")
    indices = [i for i, k in enumerate(keep.to_pylist()) if k]
    return ds if len(indices) == len(ds) else ds.select(indices)


def _pick_splits(splits: dict, source: str) -> tuple[Any, Any, str, str | None]:
    """(train, eval or None, train split name, eval split name) of a DatasetDict-like mapping."""
    names = list(splits)
    if not names:
        raise DataError(f"{source} holds no splits", hint="save a dataset with at least a train split")
    train_name = "train" if "train" in splits else names[0]
    eval_name = next((n for n in EVAL_SPLIT_NAMES if n in splits and n != train_name), None)
    return splits[train_name], (splits[eval_name] if eval_name else None), train_name, eval_name


def _read_saved(path: Path) -> RawData:
    from datasets import Dataset, load_from_disk

    try:
        obj = load_from_disk(str(path))
    except Exception as e:  # a damaged directory is the user's to fix
        raise DataError(
            f"cannot load the saved dataset at {path}: {_first_line(e)}", hint="re-save it with datasets' save_to_disk"
        ) from None
    if isinstance(obj, Dataset):
        return RawData(obj, None, str(path), "save_to_disk", "arrow")
    train, ev, train_name, eval_name = _pick_splits(dict(obj), str(path))
    return RawData(train, ev, str(path), "save_to_disk", "arrow", train_name, eval_name)


def _has_images(path: Path, max_depth: int = 3) -> bool:
    """True when an image file sits in a sub-directory (class folders, possibly under split folders)."""
    frontier = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for _ in range(max_depth):
        nxt = []
        for d in frontier:
            for p in d.iterdir():
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                    return True
                if p.is_dir() and not p.name.startswith("."):
                    nxt.append(p)
        frontier = nxt
    return False


def _read_image_folder(path: Path) -> RawData:
    from datasets import load_dataset

    try:
        obj = load_dataset("imagefolder", data_dir=str(path))
    except Exception as e:  # unreadable images or layout are the user's to fix
        raise DataError(
            f"cannot read the image folder {path}: {_first_line(e)}",
            hint="lay it out as DIR/<class name>/<image files>",
        ) from None
    train, ev, train_name, eval_name = _pick_splits(dict(obj), str(path))
    return RawData(train, ev, str(path), "imagefolder", "imagefolder", train_name, eval_name)


def _env_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _hub_reachable(timeout: float = 2.0) -> bool:
    """One short TCP connect, so an unplugged machine gets an answer in seconds rather than after retries."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_mode():
    """Force offline mode for one call: the libraries read HF_HUB_OFFLINE once, at import time."""
    import datasets.config as dcfg
    import huggingface_hub.constants as hcfg

    saved = (hcfg.HF_HUB_OFFLINE, dcfg.HF_HUB_OFFLINE, getattr(dcfg, "HF_DATASETS_OFFLINE", None))
    hcfg.HF_HUB_OFFLINE = dcfg.HF_HUB_OFFLINE = True
    if saved[2] is not None:
        dcfg.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hcfg.HF_HUB_OFFLINE, dcfg.HF_HUB_OFFLINE = saved[0], saved[1]
        if saved[2] is not None:
            dcfg.HF_DATASETS_OFFLINE = saved[2]


def _read_hub(name: str) -> RawData:
    """``load_dataset(name, split="train")``; ``name:config`` picks a configuration. Offline, only the cache is tried."""
    from datasets import load_dataset

    repo, _, config = name.partition(":")
    env_offline = _env_offline()
    offline = env_offline or not _hub_reachable()
    why = "HF_HUB_OFFLINE is set" if env_offline else "the Hugging Face Hub cannot be reached"
    try:
        with _offline_mode() if offline else contextlib.nullcontext():
            ds = load_dataset(repo, config or None, split="train")
    except Exception as e:  # every failure here means "this name cannot be used as data"
        if offline:
            raise DataError(
                f"{name!r} is not a local path and looks like a hub dataset, but {why} and it is not in the local cache",
                hint=f"pass a local file ({_SUPPORTED_TEXT}) or directory, or run once with network to cache it",
            ) from None
        raise DataError(
            f"cannot load {name!r}: it is not a local path, and as a hub dataset: {_first_line(e)}",
            hint="check the path or dataset name (use name:config for a dataset with several configurations)",
        ) from None
    if not hasattr(ds, "column_names") or not hasattr(ds, "__len__"):
        raise DataError(
            f"hub dataset {name!r} did not load as a table", hint="save it with save_to_disk and pass the dir"
        )
    return RawData(ds, None, name, "hub", "hub", "train")
