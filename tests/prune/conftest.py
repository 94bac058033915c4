"""Tiny models for the pruning tests, built once per session. Tests must not modify them in place."""

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
def resnet(tmp_path_factory):
    return tiny.tiny_resnet(tmp_path_factory.mktemp("resnet"))


@pytest.fixture(scope="session")
def resnet_bottleneck(tmp_path_factory):
    return tiny.tiny_resnet(tmp_path_factory.mktemp("resnet-b"), layer_type="bottleneck", hidden_sizes=[32, 64])
