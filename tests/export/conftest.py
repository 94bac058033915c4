"""Tiny models for the export tests, built once per module; single-threaded torch so CPU CI is not oversubscribed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Plain `pytest` puts only tests/ on sys.path, and these tests import `tests.tiny`.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests import tiny  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (model, path): a 2-layer Llama (causal LM) and a 2-layer BERT masked LM, with tokenizers."""
    root = tmp_path_factory.mktemp("export-models")
    return {
        "llama": tiny.tiny_llama(root / "llama", num_hidden_layers=2),
        "bert": tiny.tiny_bert_mlm(root / "bert", num_hidden_layers=2),
    }
