"""Tiny teachers shared by the model tests, built once per session. Tests must not modify them in place."""

from __future__ import annotations

import pytest

from tests import tiny


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    return tiny.tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory):
    return tiny.tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def bert(tmp_path_factory):
    return tiny.tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="session")
def bert_mlm(tmp_path_factory):
    return tiny.tiny_bert_mlm(tmp_path_factory.mktemp("bert-mlm"))


@pytest.fixture(scope="session")
def bert_cls(tmp_path_factory):
    return tiny.tiny_bert_cls(tmp_path_factory.mktemp("bert-cls"))


@pytest.fixture(scope="session")
def vit(tmp_path_factory):
    return tiny.tiny_vit(tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="session")
def vit_model(tmp_path_factory):
    return tiny.tiny_vit_model(tmp_path_factory.mktemp("vit-model"))


TEACHERS = ("llama", "gpt2", "bert", "bert_mlm", "bert_cls", "vit", "vit_model")


@pytest.fixture(params=TEACHERS)
def teacher(request):
    """Each tiny teacher in turn, as ``(name, model, path)``."""
    model, path = request.getfixturevalue(request.param)
    return request.param, model, path
