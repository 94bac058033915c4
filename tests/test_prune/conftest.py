"""ResNet models for the pruning tests (the transformer teachers come from tests/conftest.py); not to be modified."""

from __future__ import annotations

import pytest

from tests import tiny


@pytest.fixture(scope="session")
def resnet(tmp_path_factory):
    return tiny.tiny_resnet(tmp_path_factory.mktemp("resnet"))


@pytest.fixture(scope="session")
def resnet_bottleneck(tmp_path_factory):
    return tiny.tiny_resnet(tmp_path_factory.mktemp("resnet-b"), layer_type="bottleneck", hidden_sizes=[32, 64])
