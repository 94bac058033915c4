"""Tiny models for the bench tests, built once per module."""

from __future__ import annotations

import pytest

from tests import tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (model, path): a 4-layer Llama teacher and a 2-layer student, two BERT encoders, a ViT."""
    root = tmp_path_factory.mktemp("bench-models")
    return {
        "teacher": tiny.tiny_llama(root / "teacher"),
        "student": tiny.tiny_llama(root / "student", num_hidden_layers=2, seed=1),
        "encoder": tiny.tiny_bert(root / "encoder"),
        "small-encoder": tiny.tiny_bert(root / "small-encoder", num_hidden_layers=2, seed=1),
        "vit": tiny.tiny_vit(root / "vit", num_hidden_layers=2),
    }


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """Sentences in the tiny tokenizers' vocabulary, enough for a few packed blocks of 16 tokens."""
    words = tiny._WORDS[11:]
    lines = [" ".join(words[(7 * i + j) % len(words)] for j in range(12)) for i in range(24)]
    path = tmp_path_factory.mktemp("bench-data") / "eval.txt"
    path.write_text("\n".join(lines) + "\n")
    return path
