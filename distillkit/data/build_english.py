"""Build the embedded general-English corpora from two licensed text databases that install from Debian's registry.

- ``english.txt.gz`` — the default **training** corpus: WordNet 3.0 glosses (``lemma, synonyms: definition``) and
  the example sentences WordNet gives for its word senses, across nouns, verbs, adjectives and adverbs. It covers
  the whole vocabulary of ordinary English, not one subject. Source: Debian package ``wordnet-base``
  (``/usr/share/wordnet/data.*``), WordNet 3.0 licence (permissive; notice in ``DATA_LICENSES.md``).
- ``quotes.txt.gz`` — the default **held-out** set for embedding students, from another domain than the training
  corpus: short quotations, jokes and aphorisms from the classic BSD ``fortune`` database (Debian package
  ``fortunes``, BSD licence), one record per line, attribution lines removed. Never used for training.

Run as ``python -m distillkit.data.build_english`` after ``apt-get install wordnet-base fortunes`` (``--check``
compares a fresh build with the committed files). The build is deterministic: files are read in sorted order, the
shuffle is seeded, and the gzip header carries no timestamp.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

from distillkit.data.build_corpus import encode

HERE = Path(__file__).parent
ENGLISH_PATH = HERE / "english.txt.gz"
QUOTES_PATH = HERE / "quotes.txt.gz"
WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
SEED = 0
ENGLISH_RECORDS = 60_000
QUOTES_RECORDS = 1_500
# fortune files that are not prose (ASCII art), are about computing or one software distribution (too close to
# technical text), or are mostly verse, lists or other languages.
SKIP_FORTUNES = frozenset(
    {
        "art",
        "ascii-art",
        "computers",
        "debian",
        "linux",
        "linuxcookie",
        "perl",
        "startrek",
        "zippy",
        "riddles",
        "songs-poems",
        "translate-me",
        "pets",
        "sports",
        "people",
        "news",
        "politics",
    }
)
_EXAMPLE = re.compile(r'"([^"]+)"')
_ATTRIBUTION = re.compile(r"\s*\n\s*--.*$", re.S)


def wordnet_records(root: Path = WORDNET_DIR) -> list[str]:
    """Every synset's ``words: definition`` and each example sentence of three or more words, in file order."""
    out: list[str] = []
    for pos in ("noun", "verb", "adj", "adv"):
        path = root / f"data.{pos}"
        for line in path.read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):  # the licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            n_words = int(fields[3], 16)
            words = [re.sub(r"\(.*\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(n_words)]
            gloss = gloss.strip()
            definition = _EXAMPLE.sub("", gloss).strip(" ;")
            if definition:
                out.append(f"{', '.join(words[:3])}: {definition}")
            out.extend(e.strip() for e in _EXAMPLE.findall(gloss) if len(e.split()) >= 3)
    return out


def fortune_records(root: Path = FORTUNES_DIR) -> list[str]:
    """Records of 30 to 300 characters from the prose fortune files, whitespace collapsed, attributions dropped."""
    out: list[str] = []
    for path in sorted(root.iterdir()):
        if "." in path.name or path.name in SKIP_FORTUNES or not path.is_file():
            continue
        for record in path.read_text(encoding="latin-1").split("\n%\n"):
            text = " ".join(_ATTRIBUTION.sub("", record.strip()).split())
            if 30 <= len(text) <= 300:
                out.append(text)
    return out


def _sample(records: list[str], n: int) -> list[str]:
    unique = list(dict.fromkeys(records))
    random.Random(SEED).shuffle(unique)
    return unique[:n]


def build() -> tuple[list[str], list[str]]:
    """(training corpus, held-out corpus); the held-out records share no line with the training ones."""
    english = _sample(wordnet_records(), ENGLISH_RECORDS)
    seen = set(english)
    quotes = [q for q in _sample(fortune_records(), QUOTES_RECORDS * 2) if q not in seen][:QUOTES_RECORDS]
    return english, quotes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = parser.parse_args(argv)
    for root in (WORDNET_DIR, FORTUNES_DIR):
        if not root.is_dir():
            print(f"error: {root} not found; install it with: apt-get install wordnet-base fortunes", file=sys.stderr)
            return 1
    english, quotes = build()
    status = 0
    for path, records in ((ENGLISH_PATH, english), (QUOTES_PATH, quotes)):
        data = encode(records)
        words = sum(len(r.split()) for r in records)
        print(f"{path.name}: {len(records):,} records, {words:,} words, {len(data):,} bytes gzipped", file=sys.stderr)
        if args.check:
            same = path.is_file() and path.read_bytes() == data
            print("  identical" if same else "  differs from a fresh build", file=sys.stderr)
            status |= 0 if same else 1
        else:
            path.write_bytes(data)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
