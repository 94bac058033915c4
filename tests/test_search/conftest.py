"""A tiny ResNet teacher and an image folder for the CNN stage-search tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import tiny


@pytest.fixture(scope="session")
def resnet_dir(tmp_path_factory):
    # depths [2, 3] so depth can shrink in both stages; the stem (16) is as wide as stage 0 (identity shortcut)
    return Path(tiny.tiny_resnet(tmp_path_factory.mktemp("resnet"), depths=[2, 3])[1])


@pytest.fixture(scope="session")
def resnet_bottleneck_dir(tmp_path_factory):
    path = tiny.tiny_resnet(tmp_path_factory.mktemp("resnet-b"), layer_type="bottleneck", hidden_sizes=[32, 64])[1]
    return Path(path)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    colours = {"cat": (220, 30, 30), "dog": (30, 200, 40), "bird": (20, 40, 210)}
    for name, rgb in colours.items():
        (root / name).mkdir()
        for i in range(8):
            Image.new("RGB", (32, 32), tuple(min(255, c + 4 * i) for c in rgb)).save(root / name / f"{i}.png")
    return root
