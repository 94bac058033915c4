"""--freeze-embeddings: the student's token-embedding table stays as initialised while the rest trains."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from distillkit.cli.app import main
from distillkit.distill.engine import _freeze_embeddings
from distillkit.errors import ConfigError
from tests import tiny


def _tensors(path):
    return load_file(str(path / "model.safetensors"))


def _key(tensors, suffix):
    (name,) = [k for k in tensors if k.endswith(suffix)]
    return name


@pytest.mark.parametrize("flag", ["--freeze-embeddings", "--train-embeddings"])
def test_the_table_is_kept_only_when_frozen(tmp_path, capsys, flag):
    _, teacher = tiny.tiny_bert(tmp_path / "t")
    data = tmp_path / "d.txt"
    data.write_text("\n".join(f"record {i} with words {' '.join(['w'] * (1 + i % 9))}" for i in range(80)))
    out = tmp_path / "s"
    code = main(
        ["distill", "--teacher", teacher, "--student", "layers=1", "--data", str(data), "--steps", "4", "--lr", "1e-2"]
        + ["--batch-size", "8", "--max-length", "32", "--eval-data", "none", flag, "--out", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "distillkit.json").read_text())["config"]["freeze_embeddings"] is (
        flag == "--freeze-embeddings"
    )
    t, s = _tensors(tmp_path / "t"), _tensors(out)
    table = _key(s, "word_embeddings.weight")
    kept = torch.equal(s[table], t[_key(t, "word_embeddings.weight")])
    assert kept is (flag == "--freeze-embeddings")
    # the encoder trains either way (the student's layer 0 starts as a copy of a teacher layer, then moves)
    query = _key(s, "layer.0.attention.self.query.weight")
    assert not any(torch.equal(s[query], v) for k, v in t.items() if k.endswith("attention.self.query.weight"))


def test_an_image_student_is_refused_before_any_output(tmp_path, capsys):
    _, vit = tiny.tiny_vit(tmp_path / "vit")
    out = tmp_path / "s"
    code = main(
        ["distill", "--teacher", vit, "--student", "layers=1", "--data", str(tmp_path / "no-images-needed")]
        + ["--steps", "2", "--freeze-embeddings", "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 1 and "--freeze-embeddings needs a student with a token-embedding table" in err
    assert "Traceback" not in err and not out.exists()


def test_refused_without_a_token_table():
    vit, _ = tiny.tiny_vit()
    with pytest.raises(ConfigError, match="token-embedding table"):
        _freeze_embeddings(vit, "image-classification")
    with pytest.raises(ConfigError, match="token-embedding table"):
        _freeze_embeddings(torch.nn.Linear(2, 2), "feature-extraction")


def test_refused_for_diffusers_teachers(tmp_path, capsys):
    _, unet = tiny.tiny_unet(tmp_path / "u")
    code = main(
        ["distill", "--teacher", unet, "--method", "progressive", "--target-steps", "2", "--freeze-embeddings"]
        + ["--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 1 and "--freeze-embeddings applies to text students" in err
    assert not (tmp_path / "o").exists()
