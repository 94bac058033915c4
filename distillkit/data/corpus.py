"""The embedded corpora: text that ships inside the package, so distillation and evaluation need no download.

- ``english`` (``english.txt.gz``, the default training corpus): general English from WordNet 3.0 — definitions and
  example sentences across the whole vocabulary; built by ``python -m distillkit.data.build_english``.
- ``quotes`` (``quotes.txt.gz``, the default held-out set for embedding students): short quotations, jokes and
  aphorisms from the BSD ``fortune`` database — another domain than ``english``; never trained on by default.
- ``docstrings`` (``corpus.txt.gz``): English prose from the Python standard library's docstrings (technical
  prose; a second held-out domain); built by ``python -m distillkit.data.build_corpus``.

``--data NAME`` / ``--eval-data NAME`` accept ``builtin:NAME``. The numbers below describe the committed files and a
test checks that they still do. Licences: ``DATA_LICENSES.md`` beside this file.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources

from distillkit.errors import DataError

CORPUS_FILE = "corpus.txt.gz"
CORPUS_PARAGRAPHS = 4944
CORPUS_WORDS = 88583
CORPUS_PYTHON = "3.11.7"
CORPUS_DESCRIPTION = (
    f"{CORPUS_PARAGRAPHS:,} English paragraphs ({CORPUS_WORDS:,} words) of docstrings harvested from the "
    f"Python {CORPUS_PYTHON} standard library, with doctests and code removed."
)


BUILTIN_PREFIX = "builtin:"
DEFAULT_TRAIN = "english"
DEFAULT_HELDOUT = "quotes"
# name -> (file, module that rebuilds it, description)
BUILTIN: dict[str, tuple[str, str, str]] = {
    "english": (
        "english.txt.gz",
        "distillkit.data.build_english",
        "60,000 records (640,870 words) of general English from WordNet 3.0: definitions and example sentences "
        "across nouns, verbs, adjectives and adverbs.",
    ),
    "quotes": (
        "quotes.txt.gz",
        "distillkit.data.build_english",
        "1,500 short quotations, jokes and aphorisms (24,518 words) from the BSD fortune database: held-out text "
        "from another domain than the training corpus.",
    ),
    "docstrings": ("corpus.txt.gz", "distillkit.data.build_corpus", CORPUS_DESCRIPTION),
}


@functools.cache
def _read(name: str) -> tuple[str, ...]:
    file, builder, _ = BUILTIN[name]
    try:
        data = resources.files("distillkit.data").joinpath(file).read_bytes()
        text = gzip.decompress(data).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(
            f"the embedded corpus {file} is missing or unreadable ({e.__class__.__name__})",
            hint=f"reinstall distillkit, or rebuild it with: python -m {builder}",
        ) from None
    return tuple(line for line in text.split("\n") if line.strip())


def builtin_name(spec: str) -> str | None:
    """``english`` for ``builtin:english``; None for anything that is not a ``builtin:`` spec."""
    if not spec.startswith(BUILTIN_PREFIX):
        return None
    name = spec[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN:
        raise DataError(
            f"unknown embedded corpus {spec!r}",
            hint="use one of: " + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN),
        )
    return name


def load_builtin(name: str) -> list[str]:
    """An embedded corpus by name (``english``, ``quotes``, ``docstrings``), one record per item, in file order."""
    if name not in BUILTIN:
        raise DataError(f"unknown embedded corpus {name!r}", hint="use one of: " + ", ".join(BUILTIN))
    # A fresh list each call so a caller that shuffles or trims it cannot change what the next caller sees.
    return list(_read(name))


def load_corpus() -> list[str]:
    """The docstring corpus, one paragraph per item, in the file's (deterministic) order."""
    return load_builtin("docstrings")
