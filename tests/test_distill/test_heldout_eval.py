"""``distill --eval-data``: held-out quality in the manifest, measured on the saved artifact; the embedding teacher
is run once per example (memo feed); bad held-out input fails before any output."""

from __future__ import annotations

import json

import pytest

from distillkit.data.heldout import read_heldout
from distillkit.evaluate import embedding_geometry, heldout_embeddings, heldout_lm
from tests.test_distill.test_engine import distill_cmd, markov_lines, run
from tests.tiny import tiny_bert, tiny_gpt2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("heldout")
    (d / "train.txt").write_text("\n".join(markov_lines(24, seed=1)) + "\n")
    (d / "held.txt").write_text("\n".join(markov_lines(30, seed=7)) + "\n")
    return d


def test_embedding_student_reports_heldout_geometry_of_its_saved_file(tmp_path, files, capsys):
    from transformers import AutoModel, AutoTokenizer

    _, bert = tiny_bert(tmp_path / "bert")
    out = tmp_path / "s"
    args = distill_cmd(bert, files / "train.txt", "layers=1", "--steps", "12", "--batch-size", "8")
    code, lines, err = run(
        [*args, "--max-length", "16", "--eval-data", str(files / "held.txt"), "--out", str(out)], capsys
    )
    assert code == 0, err
    m = json.loads(lines[0])
    info = m["extra"]["eval_data"]
    assert info["source"] == str(files / "held.txt") and info["records"] == 30
    metrics = m["metrics"]
    for k in ("heldout_spearman", "heldout_nn_agreement", "heldout_embedding_cosine"):
        assert k in metrics and f"initial_student_{k}" in metrics
    # the figure is that of the saved file, recomputed here from scratch
    texts = read_heldout(str(files / "held.txt")).texts
    tok = AutoTokenizer.from_pretrained(out)
    t_emb = heldout_embeddings(AutoModel.from_pretrained(bert), texts, tok, pooling="mean", max_length=16)
    s_emb = heldout_embeddings(AutoModel.from_pretrained(out), texts, tok, pooling="mean", max_length=16)
    want = embedding_geometry(s_emb, t_emb)
    assert metrics["heldout_spearman"] == pytest.approx(want["spearman"], abs=1e-6)
    assert metrics["heldout_nn_agreement"] == pytest.approx(want["nn_agreement"])
    # 12 steps of 8 over ~23 training examples: the teacher ran once per example, not once per step
    n_train = m["extra"]["data"]["n_train"]
    assert metrics["teacher_forward_examples"] <= n_train < 12 * 8


def test_causal_lm_reports_heldout_perplexity_beside_the_teacher(tmp_path, files, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, gpt = tiny_gpt2(tmp_path / "gpt")
    out = tmp_path / "s"
    args = distill_cmd(gpt, files / "train.txt", "layers=1", "--steps", "3", "--batch-size", "4")
    code, lines, err = run(
        [*args, "--max-length", "16", "--eval-data", str(files / "held.txt"), "--out", str(out)], capsys
    )
    assert code == 0, err
    metrics = json.loads(lines[0])["metrics"]
    texts = read_heldout(str(files / "held.txt")).texts
    tok = AutoTokenizer.from_pretrained(out)
    want = heldout_lm(AutoModelForCausalLM.from_pretrained(out), texts, tok, max_length=16)
    assert metrics["heldout_perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    assert metrics["heldout_teacher_perplexity"] > 1 and 0 <= metrics["heldout_top1_agreement"] <= 1
    assert 0 <= metrics["heldout_top5_overlap"] <= 1


def test_eval_data_none_turns_it_off_and_bad_input_fails_before_output(tmp_path, files, capsys):
    _, bert = tiny_bert(tmp_path / "bert")
    args = distill_cmd(bert, files / "train.txt", "layers=1", "--steps", "2", "--max-length", "16")
    code, lines, err = run([*args, "--eval-data", "none", "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    m = json.loads(lines[0])
    assert not [k for k in m["metrics"] if "heldout" in k] and "eval_data" not in m["extra"]
    for bad, words in (("builtin:nope", "unknown embedded corpus"), (str(tmp_path / "missing.txt"), "does not exist")):
        code, lines, err = run([*args, "--eval-data", bad, "--out", str(tmp_path / "b")], capsys)
        assert code == 1 and words in err and "Traceback" not in err
        assert not (tmp_path / "b").exists()
    (tmp_path / "tiny.txt").write_text("one line\n")
    code, _, err = run([*args, "--eval-data", str(tmp_path / "tiny.txt"), "--out", str(tmp_path / "b")], capsys)
    assert code == 1 and "at least" in err and not (tmp_path / "b").exists()
