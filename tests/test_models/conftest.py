"""The model tests run over every tiny teacher (fixtures in tests/conftest.py)."""

from __future__ import annotations

import pytest

TEACHERS = ("llama", "gpt2", "bert", "bert_mlm", "bert_cls", "vit", "vit_model")


@pytest.fixture(params=TEACHERS)
def teacher(request):
    """Each tiny teacher in turn, as ``(name, model, path)``."""
    model, path = request.getfixturevalue(request.param)
    return request.param, model, path
