"""The embedded corpora: their sizes are what corpus.py says, the held-out quotes share no record with the training
text, and ``builtin:NAME`` works wherever data is named."""

from __future__ import annotations

import pytest

from distillkit.data import DataSpec, read_raw
from distillkit.data.corpus import BUILTIN, builtin_name, load_builtin
from distillkit.data.heldout import read_heldout
from distillkit.errors import DataError


@pytest.mark.parametrize(("name", "records", "words"), [("english", 60000, 640870), ("quotes", 1500, 24518)])
def test_corpus_sizes_match_their_description(name, records, words):
    texts = load_builtin(name)
    assert len(texts) == records and sum(len(t.split()) for t in texts) == words
    assert f"{records:,}" in BUILTIN[name][2] and f"{words:,}" in BUILTIN[name][2]


def test_heldout_quotes_are_disjoint_from_the_training_corpus():
    english, quotes = set(load_builtin("english")), load_builtin("quotes")
    assert not english.intersection(quotes)
    assert len(set(quotes)) == len(quotes)


def test_builtin_specs_read_and_unknown_names_fail():
    raw = read_raw(DataSpec(data="builtin:quotes"))
    assert raw.source == "builtin:quotes" and len(raw.train) == 1500
    assert read_raw(DataSpec()).source == "builtin:english"
    assert builtin_name("quotes.txt") is None
    with pytest.raises(DataError, match="unknown embedded corpus"):
        read_raw(DataSpec(data="builtin:klingon"))
    held = read_heldout("builtin:docstrings")
    assert len(held.texts) == 2000 and held.n_read == 4944 and held.info()["records"] == 2000
