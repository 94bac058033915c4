"""Tiny models for the export tests, built once per module."""

from __future__ import annotations

import pytest

from tests import tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (model, path): a 2-layer Llama (causal LM) and a 2-layer BERT masked LM, with tokenizers."""
    root = tmp_path_factory.mktemp("export-models")
    return {
        "llama": tiny.tiny_llama(root / "llama", num_hidden_layers=2),
        "bert": tiny.tiny_bert_mlm(root / "bert", num_hidden_layers=2),
    }
