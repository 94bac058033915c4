"""End-to-end distillation through the CLI on tiny models built from configs."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillkit.cli.app import main
from distillkit.distill.engine import checkpoint_step
from distillkit.manifest import MANIFEST_NAME, sha256_file, work_dir
from tests.tiny import _WORDS, tiny_bert, tiny_bert_cls, tiny_gpt2, tiny_llama

REPO = Path(__file__).resolve().parents[2]


def markov_lines(n: int, seed: int, length: int = 30) -> list[str]:
    """Text from a fixed first-order Markov chain over 50 words (successor probabilities .6/.3/.1)."""
    words = _WORDS[11:61]
    chain = random.Random(1234)
    succ = {w: chain.sample(words, 3) for w in words}
    r = random.Random(seed)
    lines = []
    for _ in range(n):
        w = r.choice(words)
        out = [w]
        for _ in range(length):
            w = r.choices(succ[w], weights=[0.6, 0.3, 0.1])[0]
            out.append(w)
        lines.append(" ".join(out))
    return lines


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return Path(tiny_llama(tmp_path_factory.mktemp("llama"))[1])


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "text.txt"
    f.write_text("\n".join(markov_lines(80, seed=0)))
    return f


def distill_cmd(teacher, data, student: str, *extra: str) -> list[str]:
    """``distillkit distill`` arguments for a teacher, data file and student, plus ``extra``."""
    return ["distill", "--teacher", str(teacher), "--student", student, "--data", str(data), *extra]


def run(args: list[str], capsys) -> tuple[int, list[str], str]:
    code = main(args)
    cap = capsys.readouterr()
    return code, [ln for ln in cap.out.splitlines() if ln.strip()], cap.err


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_distill_tiny_llama_writes_loadable_artifact(llama_dir, text_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "student"
    code, lines, err = run(
        distill_cmd(
            llama_dir, text_file, "layers=1", "--steps", "30", "--lr", "1e-3", "--max-length", "32", "--out", str(out)
        ),
        capsys,
    )
    assert code == 0, err
    assert len(lines) == 1
    manifest = json.loads(lines[0])
    assert manifest["path"] == str(out) and manifest["stage"] == "distill" and manifest["task"] == "causal-lm"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1
    ids = torch.tensor([[1, 5, 9, 13]])
    assert torch.isfinite(model(ids).logits).all()
    on_disk = json.loads((out / MANIFEST_NAME).read_text())
    assert on_disk == manifest
    assert manifest["inputs"]["teacher"]["sha256"]["model.safetensors"] == sha256_file(llama_dir / "model.safetensors")
    assert manifest["files"]["model.safetensors"] == sha256_file(out / "model.safetensors")
    m = manifest["metrics"]
    assert m["steps"] == 30 and m["student_params"] < m["teacher_params"]
    assert m["student_kl_to_teacher"] < m["initial_student_kl_to_teacher"]
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 31))
    assert (out / "README.md").read_text().count("distill") >= 2
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temp or work dirs left
    assert manifest["config"]["resolved_losses"] == [["forward_kl", 1.0]]


def test_distillation_beats_training_without_teacher(tmp_path, capsys):
    """A 2-layer teacher that learned a Markov chain; a random 1-layer student trained for the same 60 steps on
    60 lines with forward KL (alpha 0) vs on hard labels only (alpha 1). Stated margin: KD's held-out
    perplexity is at least 10% lower."""
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    big.write_text("\n".join(markov_lines(2000, seed=1)))
    small.write_text("\n".join(markov_lines(60, seed=2)))
    _, t0 = tiny_llama(tmp_path / "t0", num_hidden_layers=2)
    common = ["--batch-size", "16", "--max-length", "32", "--quiet"]
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(t0),
                "--student",
                "layers=2",
                "--alpha",
                "1",
                "--data",
                str(big),
                "--steps",
                "120",
                "--lr",
                "5e-3",
                "--eval-batches",
                "2",
                "--out",
                str(tmp_path / "teacher"),
                *common,
            ]
        )
        == 0
    )
    ppl = {}
    for name, alpha in (("kd", "0"), ("ce", "1")):
        assert (
            main(
                [
                    "distill",
                    "--teacher",
                    str(tmp_path / "teacher"),
                    "--student",
                    "layers=1",
                    "--student-init",
                    "random",
                    "--alpha",
                    alpha,
                    "--temperature",
                    "1",
                    "--data",
                    str(small),
                    "--steps",
                    "60",
                    "--lr",
                    "3e-3",
                    "--batch-size",
                    "8",
                    "--max-length",
                    "32",
                    "--eval-split",
                    "0.3",
                    "--out",
                    str(tmp_path / name),
                    "--quiet",
                ]
            )
            == 0
        )
        ppl[name] = json.loads((tmp_path / name / MANIFEST_NAME).read_text())["metrics"]
    capsys.readouterr()
    assert ppl["kd"]["teacher_perplexity"] < 3.5  # the teacher learned the chain (entropy floor ~2.45)
    assert ppl["kd"]["student_perplexity"] < 0.9 * ppl["ce"]["student_perplexity"], ppl
    assert ppl["kd"]["student_top1_agreement"] > ppl["ce"]["student_top1_agreement"]


def test_grad_accum_matches_larger_batch(llama_dir, text_file, tmp_path, capsys):
    base = distill_cmd(
        llama_dir, text_file, "layers=2", "--steps", "6", "--max-length", "32", "--lr", "1e-3", "--quiet"
    )
    assert main([*base, "--batch-size", "8", "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--batch-size", "4", "--grad-accum", "2", "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "distillkit.cli.app", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("DISTILLKIT_DEBUG", None)
    return env


def test_resume_after_kill_reaches_the_same_weights_bitwise(llama_dir, text_file, tmp_path):
    args = distill_cmd(
        llama_dir,
        text_file,
        "layers=2",
        "--steps",
        "400",
        "--batch-size",
        "4",
        "--max-length",
        "32",
        "--save-every",
        "20",
        "--quiet",
    )
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(*args, "--out", str(killed)), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and (checkpoint_step(killed) or 0) < 40:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    step = checkpoint_step(killed)
    assert step is not None and 40 <= step < 400
    assert not killed.exists()  # no half artifact where the finished one goes
    # without --resume the leftover checkpoint is refused, not silently discarded
    r = subprocess.run(_cli(*args, "--out", str(killed)), env=_env(), capture_output=True, text=True)
    assert r.returncode == 1 and "--resume" in r.stderr
    r = subprocess.run(_cli(*args, "--out", str(killed), "--resume"), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resuming from step {step}" in r.stderr
    assert not work_dir(killed).exists()
    straight = tmp_path / "straight"
    r = subprocess.run(_cli(*args, "--out", str(straight)), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = weights(killed), weights(straight)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r][-1] == 400


def test_two_processes_match_one_with_the_same_global_batch(llama_dir, text_file, tmp_path):
    """DDP over gloo on CPU: 2 processes x batch 4 == 1 process x batch 8 (tolerance 1e-5 abs on weights)."""
    base = distill_cmd(
        llama_dir,
        text_file,
        "layers=2",
        "--steps",
        "5",
        "--max-length",
        "32",
        "--lr",
        "1e-3",
        "--device",
        "cpu",
        "--quiet",
    )
    env = _env()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29500 + os.getpid() % 1000),
            "-m",
            "distillkit.cli.app",
            *base,
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "ddp"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert [ln for ln in r.stdout.splitlines() if ln.strip()] == [str(tmp_path / "ddp")]  # one line, main rank only
    r = subprocess.run(
        _cli(*base, "--batch-size", "8", "--out", str(tmp_path / "one")),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / MANIFEST_NAME).read_text())
    assert ddp["config"]["world_size"] == 2
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(llama_dir, text_file, tmp_path, capsys, monkeypatch):
    from distillkit.distill import functional
    from distillkit.kernels.kd_loss import divergences

    real = functional.forward_kl
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        value = real(*a, **k)
        return value * float("nan") if calls["n"] == 4 else value

    for home in (functional, divergences):  # the fused loss reads the divergences module
        monkeypatch.setattr(home, "forward_kl", flaky)
    out = tmp_path / "o"
    code, lines, err = run(
        distill_cmd(llama_dir, text_file, "layers=1", "--steps", "10", "--max-length", "32", "--out", str(out)),
        capsys,
    )
    assert code == 1 and lines == []
    assert "error: the loss became nan at step 4" in err and "--resume" in err
    assert not out.exists()
    assert checkpoint_step(out) == 3
    for home in (functional, divergences):  # the fused loss reads the divergences module
        monkeypatch.setattr(home, "forward_kl", real)
    code, lines, err = run(
        distill_cmd(
            llama_dir, text_file, "layers=1", "--steps", "10", "--max-length", "32", "--out", str(out), "--resume"
        ),
        capsys,
    )
    assert code == 0, err
    assert json.loads(lines[0])["metrics"]["steps"] == 10


def test_encoder_distillation_with_embedding_loss(tmp_path, text_file, capsys):
    from transformers import AutoModel

    _, bert = tiny_bert(tmp_path / "bert")
    out = tmp_path / "s"
    code, lines, err = run(
        [
            "distill",
            "--teacher",
            str(bert),
            "--student",
            "layers=2,hidden=32,heads=2",
            "--student-init",
            "random",
            "--data",
            str(text_file),
            "--steps",
            "20",
            "--lr",
            "2e-3",
            "--max-length",
            "32",
            "--loss",
            "embedding_cosine",
            "--loss",
            "minilm_attention:0.5",
            "--loss",
            "minilm_value:0.5",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    m = json.loads(lines[0])
    assert m["task"] == "feature-extraction"
    assert m["metrics"]["student_similarity_corr"] > m["metrics"]["initial_student_similarity_corr"]
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    assert {"loss/embedding_cosine", "loss/minilm_attention", "loss/minilm_value"} <= set(
        [r for r in log if "loss" in r][-1]
    )
    assert AutoModel.from_pretrained(out).config.hidden_size == 32


def test_masked_lm_eval_is_deterministic(tmp_path, text_file, capsys):
    from tests.tiny import tiny_bert_mlm

    _, mlm = tiny_bert_mlm(tmp_path / "mlm")
    code, lines, err = run(
        [
            "distill",
            "--teacher",
            str(mlm),
            "--student",
            "layers=1",
            "--data",
            str(text_file),
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--max-length",
            "32",
            "--eval-split",
            "0.2",
            "--out",
            str(tmp_path / "s"),
        ],
        capsys,
    )
    assert code == 0, err
    m = json.loads(lines[0])["metrics"]
    evals = [json.loads(x)["eval"] for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines() if "eval" in x]
    assert len(evals) == 3  # step 0, 2 and the end
    # the same masked positions every time: the (frozen) teacher scores identically at every evaluation
    assert len({e["teacher_perplexity"] for e in evals}) == 1 and len({e["eval_tokens"] for e in evals}) == 1
    assert 0.0 <= m["student_accuracy"] <= 1.0 and m["student_top1_agreement"] > 0.0


def test_sequence_classification_with_labels_and_alpha(tmp_path, capsys):
    _, cls = tiny_bert_cls(tmp_path / "cls")
    rows = [{"text": " ".join(markov_lines(1, seed=i, length=8)), "label": ["neg", "pos"][i % 2]} for i in range(64)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    code, lines, err = run(
        [
            "distill",
            "--teacher",
            str(cls),
            "--student",
            "layers=1",
            "--data",
            str(data),
            "--label-column",
            "label",
            "--alpha",
            "0.5",
            "--steps",
            "5",
            "--eval-split",
            "0.25",
            "--out",
            str(tmp_path / "s"),
        ],
        capsys,
    )
    assert code == 0, err
    m = json.loads(lines[0])["metrics"]
    assert 0.0 <= m["student_accuracy"] <= 1.0 and 0.0 <= m["teacher_accuracy"] <= 1.0
    assert 0.0 <= m["student_top1_agreement"] <= 1.0
    # alpha mixes the hard-label loss in: loss = alpha * CE + (1 - alpha) * KD, step by step
    log = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert len(steps) == 5
    for r in steps:
        assert r["loss"] == pytest.approx(0.5 * r["loss/hard"] + 0.5 * r["loss/forward_kl"], rel=1e-5)


def test_gpt2_with_preset_and_flags(tmp_path, text_file, capsys):
    _, gpt2 = tiny_gpt2(tmp_path / "gpt2")
    code, lines, err = run(
        [
            "distill",
            "--teacher",
            str(gpt2),
            "--preset",
            "cpu-demo",
            "--data",
            str(text_file),
            "--steps",
            "3",
            "--max-samples",
            "40",
            "--batch-size",
            "4",
            "--loss",
            "jsd",
            "--loss",
            "taid:0.5",
            "--out",
            str(tmp_path / "s"),
        ],
        capsys,
    )
    assert code == 0, err
    cfg = json.loads(lines[0])["config"]
    assert cfg["steps"] == 3 and cfg["student"] == "layers=3" and cfg["lr"] == 5e-4  # flag > preset > default
    assert cfg["resolved_losses"] == [["jsd", 1.0], ["taid", 0.5]]


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit 1, no artifact


def _pickle_only(tmp_path: Path, llama_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM

    d = tmp_path / "pickled"
    AutoModelForCausalLM.from_pretrained(llama_dir).save_pretrained(d, safe_serialization=False)
    for f in d.glob("*.safetensors"):
        f.unlink()
    if not list(d.glob("*.bin")):
        torch.save(AutoModelForCausalLM.from_pretrained(llama_dir).state_dict(), d / "pytorch_model.bin")
    for f in llama_dir.glob("tokenizer*"):
        shutil.copy(f, d / f.name)
    return d


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("missing_teacher", "does not exist"),
        ("not_a_model", "not a model directory"),
        ("pickle", "pickle"),
        ("vocab", "vocabularies differ"),
        ("spec_key", "unknown student spec key 'depth'"),
        ("spec_heads", "does not divide"),
        ("spec_layers", "layers"),
        ("empty_data", "holds no rows"),
        ("text_column", "column"),
        ("temperature", "temperature must be > 0"),
        ("alpha", "alpha must be in [0, 1]"),
        ("exists", "already exists"),
        ("hub_offline", "hub"),
    ],
)
def test_bad_input_is_one_line_exit_1_and_no_artifact(case, expect, llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    teacher, student, data, extra = str(llama_dir), "layers=1", str(text_file), []
    if case == "missing_teacher":
        teacher = str(tmp_path / "nowhere")
    elif case == "not_a_model":
        (tmp_path / "empty").mkdir()
        teacher = str(tmp_path / "empty")
    elif case == "pickle":
        teacher = str(_pickle_only(tmp_path, llama_dir))
    elif case == "vocab":
        student = str(tiny_llama(tmp_path / "other", vocab_size=96)[1])
    elif case == "spec_key":
        student = "depth=2"
    elif case == "spec_heads":
        student = "hidden=50,heads=4"
    elif case == "spec_layers":
        student = "layers=9"
    elif case == "empty_data":
        (tmp_path / "e.txt").write_text("\n\n")
        data = str(tmp_path / "e.txt")
    elif case == "text_column":
        (tmp_path / "d.jsonl").write_text('{"body": "hello there"}\n' * 20)
        data, extra = str(tmp_path / "d.jsonl"), ["--text-column", "text"]
    elif case == "temperature":
        extra = ["--temperature", "0"]
    elif case == "alpha":
        extra = ["--alpha", "1.5"]
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "hub_offline":
        teacher = "some-org/some-model"
    t0 = time.time()
    code, lines, err = run(
        [
            "distill",
            "--teacher",
            teacher,
            "--student",
            student,
            "--data",
            data,
            "--steps",
            "2",
            "--max-length",
            "32",
            "--out",
            str(out),
            *extra,
        ],
        capsys,
    )
    assert code == 1
    assert lines == []
    err_lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1 and expect in err_lines[0], err
    assert "Traceback" not in err
    if case == "exists":
        assert (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()
    assert not work_dir(out).exists() or case == "exists"
    if case == "hub_offline":
        assert time.time() - t0 < 15


def test_pickle_allowed_with_flag(llama_dir, text_file, tmp_path, capsys):
    teacher = _pickle_only(tmp_path, llama_dir)
    code, lines, err = run(
        [
            "distill",
            "--teacher",
            str(teacher),
            "--allow-pickle",
            "--student",
            "layers=1",
            "--data",
            str(text_file),
            "--steps",
            "2",
            "--max-length",
            "32",
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 0, err


def test_nan_resume_refused_without_checkpoint(llama_dir, text_file, tmp_path, capsys):
    code, lines, err = run(
        ["distill", "--teacher", str(llama_dir), "--data", str(text_file), "--resume", "--out", str(tmp_path / "o")],
        capsys,
    )
    assert code == 1 and "no checkpoint" in err


def test_unwritable_output_is_refused_before_any_work(llama_dir, text_file, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, lines, err = run(
        ["distill", "--teacher", str(llama_dir), "--data", str(text_file), "--out", str(blocker / "out")], capsys
    )
    assert code == 1 and lines == [] and "cannot write" in err
    assert blocker.read_text() == "not a directory"


def test_tensorboard_logs_go_into_the_artifact(llama_dir, text_file, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    code, lines, err = run(
        distill_cmd(
            llama_dir,
            text_file,
            "layers=1",
            "--steps",
            "3",
            "--max-length",
            "32",
            "--log-to",
            "tensorboard",
            "--out",
            str(out),
        ),
        capsys,
    )
    assert code == 0, err
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]


def test_image_classification_distillation(tmp_path, capsys):
    from PIL import Image

    from tests.tiny import tiny_vit

    _, vit = tiny_vit(tmp_path / "vit")
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 210)}
    for i in range(8):
        for name, rgb in colours.items():
            d = tmp_path / "images" / name
            d.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), tuple(min(255, c + 3 * i) for c in rgb)).save(d / f"{i}.png")
    code, lines, err = run(
        [
            "distill",
            "--teacher",
            vit,
            "--student",
            "layers=2",
            "--data",
            str(tmp_path / "images"),
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--eval-split",
            "0.25",
            "--alpha",
            "0.3",
            "--out",
            str(tmp_path / "s"),
        ],
        capsys,
    )
    assert code == 0, err
    m = json.loads(lines[0])
    assert m["task"] == "image-classification"
    assert 0.0 <= m["metrics"]["student_accuracy"] <= 1.0 and 0.0 <= m["metrics"]["student_top1_agreement"] <= 1.0
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    assert AutoModelForImageClassification.from_pretrained(tmp_path / "s").config.num_hidden_layers == 2
    assert AutoImageProcessor.from_pretrained(tmp_path / "s") is not None


def test_student_from_stdin_continues_the_lineage(llama_dir, text_file, tmp_path, capsys, monkeypatch):
    import io

    first = tmp_path / "first"
    code, lines, err = run(
        distill_cmd(llama_dir, text_file, "layers=2", "--steps", "2", "--max-length", "32", "--out", str(first)),
        capsys,
    )
    assert code == 0, err
    monkeypatch.setattr("sys.stdin", io.StringIO(lines[0] + "\n"))
    code, lines, err = run(
        [
            "distill",
            "-",
            "--teacher",
            str(llama_dir),
            "--data",
            str(text_file),
            "--steps",
            "2",
            "--max-length",
            "32",
            "--out",
            str(tmp_path / "second"),
        ],
        capsys,
    )
    assert code == 0, err
    m = json.loads(lines[0])
    assert [h["stage"] for h in m["history"]] == ["distill"] and m["history"][0]["path"] == str(first)
    assert m["inputs"]["student"]["path"] == str(first) and m["inputs"]["student"]["stage"] == "distill"
    s1, s2 = weights(first), weights(tmp_path / "second")
    assert s1.keys() == s2.keys() and any(not torch.equal(s1[k], s2[k]) for k in s1)  # it trained further


def test_ctrl_c_exits_130_and_keeps_the_checkpoint(llama_dir, text_file, tmp_path):
    out = tmp_path / "run"  # not a word the assertions below look for
    args = distill_cmd(
        llama_dir,
        text_file,
        "layers=1",
        "--steps",
        "2000",
        "--batch-size",
        "4",
        "--max-length",
        "32",
        "--save-every",
        "10",
        "--quiet",
        "--out",
        str(out),
    )
    # A shell that starts a job in the background hands it SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: give the child the default disposition, as a terminal would.
    proc = subprocess.Popen(
        _cli(*args),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and (checkpoint_step(out) or 0) < 10:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    # Typer turns KeyboardInterrupt into exit code 130; the app says why on a line of its own
    assert "interrupted" in stderr.splitlines() and "--resume" in stderr and "Traceback" not in stderr
    assert stdout == ""
    assert not out.exists()
    assert (checkpoint_step(out) or 0) >= 10  # --resume can continue from here


def test_mixed_precision_on_cpu(llama_dir, text_file, tmp_path, capsys, monkeypatch):
    """bf16 autocast runs on a CPU with native bf16 matmuls; without them, and fp16 on any CPU, is refused."""
    import json

    import torch

    base = distill_cmd(llama_dir, text_file, "layers=1", "--steps", "2", "--max-length", "32", "--eval-data", "none")
    code, lines, err = run([*base, "--mixed-precision", "fp16", "--out", str(tmp_path / "fp16")], capsys)
    assert code == 1 and "fp16 needs a CUDA device" in err and not (tmp_path / "fp16").exists()
    if torch.cpu._is_avx512_bf16_supported():
        out = tmp_path / "bf16"
        code, lines, err = run([*base, "--mixed-precision", "bf16", "--out", str(out)], capsys)
        assert code == 0, err
        config = json.loads((out / "distillkit.json").read_text())["config"]
        assert config["mixed_precision"] == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    code, lines, err = run([*base, "--mixed-precision", "bf16", "--out", str(tmp_path / "emulated")], capsys)
    assert code == 1 and "AVX512-BF16" in err and not (tmp_path / "emulated").exists()


def test_alpha_one_never_runs_the_teacher_in_training(llama_dir, text_file, tmp_path, capsys, monkeypatch):
    """--alpha 1 is the no-KD baseline: the hard-label loss alone, so no training step pays for a teacher forward."""
    import json

    from distillkit.distill.feed import OfflineFeed

    def no_teacher(*a, **k):
        raise AssertionError("the teacher ran in a --alpha 1 training step")

    monkeypatch.setattr(OfflineFeed, "teacher_features", no_teacher)
    out = tmp_path / "ce"
    args = distill_cmd(llama_dir, text_file, "layers=1", "--steps", "3", "--max-length", "32", "--alpha", "1")
    code, lines, err = run([*args, "--out", str(out)], capsys)
    assert code == 0, err
    manifest = json.loads((out / "distillkit.json").read_text())
    assert manifest["config"]["resolved_fused_loss"] == "off"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert len(steps) == 3 and all(r["loss"] == r["loss/hard"] for r in steps)
