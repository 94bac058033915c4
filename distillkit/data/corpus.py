"""The embedded default corpus: English prose from the Python standard library's docstrings.

It lets ``distillkit distill`` run with no ``--data`` and no download. ``corpus.txt.gz`` holds one paragraph per line
and is produced by ``python -m distillkit.data.build_corpus``; the numbers below describe the committed file and a
test checks that they still do.
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


@functools.lru_cache(maxsize=1)
def _read_corpus() -> tuple[str, ...]:
    try:
        data = resources.files("distillkit.data").joinpath(CORPUS_FILE).read_bytes()
        text = gzip.decompress(data).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(
            f"the embedded corpus {CORPUS_FILE} is missing or unreadable ({e.__class__.__name__})",
            hint="reinstall distillkit, or rebuild it with: python -m distillkit.data.build_corpus",
        ) from None
    return tuple(line for line in text.split("\n") if line.strip())


def load_corpus() -> list[str]:
    """The embedded corpus, one paragraph per item, in the file's (deterministic) order."""
    # A fresh list each call so a caller that shuffles or trims it cannot change what the next caller sees.
    return list(_read_corpus())
