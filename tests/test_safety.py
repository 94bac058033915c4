"""Nothing lost, nothing false: distillkit never deletes what it did not write, never trains a run other than
the one its manifest describes, never checkpoints non-finite weights, and never lets two runs share an --out.

Every case runs the real CLI (in-process through ``main`` like the other CLI tests, or as a subprocess where
two processes are the point) on the tiny Llama, and checks the exit code, the error line and that the
protected files are byte-identical afterwards.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillkit.cli.app import main
from distillkit.distill.engine import CHECKPOINT, STATE_FILE, checkpoint_step
from distillkit.manifest import MANIFEST_NAME, Manifest, finalize_artifact, work_dir

REPO = Path(__file__).resolve().parents[1]
FAST = ("--max-length", "32", "--eval-batches", "1")


@pytest.fixture(scope="module")
def teacher(llama) -> Path:
    return Path(llama[1])


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    from tests.test_distill.test_engine import markov_lines

    f = tmp_path_factory.mktemp("data") / "text.txt"
    f.write_text("\n".join(markov_lines(80, seed=0)))
    return f


@pytest.fixture(scope="module")
def artifact(teacher, tmp_path_factory) -> Path:
    """The tiny Llama as a distillkit artifact (a copy with a manifest), for stages that take a model."""
    d = tmp_path_factory.mktemp("artifact") / "model"
    shutil.copytree(teacher, d)
    finalize_artifact(d, Manifest(stage="distill", path=str(d)), d)
    return d


def distill(teacher: Path, data: Path, *extra: str, student: str = "layers=1") -> list[str]:
    return ["distill", "--teacher", str(teacher), "--student", student, "--data", str(data), *FAST, *extra]


def run(args: list[str], capsys) -> tuple[int, list[str], str]:
    code = main(args)
    cap = capsys.readouterr()
    return code, [ln for ln in cap.out.splitlines() if ln.strip()], cap.err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every directory (None) under ``root``, by relative path."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
        if p.is_file() or p.is_dir()
    }


def fill(d: Path) -> Path:
    """A user's directory that is not a distillkit artifact."""
    (d / "notes").mkdir(parents=True)
    (d / "notes" / "todo.txt").write_text("do not delete\n")
    (d / "data.bin").write_bytes(bytes(range(256)))
    return d


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------------------------
# 1. what --out / --overwrite may replace


@pytest.mark.parametrize(
    "out, expect",
    [
        ("", "is the current directory"),  # Typer reads '' as the path '.'
        (".", "is the current directory"),
        ("CWD", "is the current directory"),
        ("..", "contains the current directory"),
        ("HOME", "is your home directory"),
        ("~", "is your home directory"),
        ("/", "is the filesystem root"),
    ],
)
def test_overwrite_refuses_cwd_its_parents_home_and_root(
    out, expect, teacher, text_file, tmp_path, monkeypatch, capsys
):
    home = fill(tmp_path / "home")
    cwd = fill(home / "project" / "run")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    out = {"CWD": str(cwd), "HOME": str(home)}.get(out, out)
    before = snapshot(tmp_path)
    code, lines, err = run(distill(teacher, text_file, "--out", out, "--overwrite"), capsys)
    assert code == 1 and lines == []
    assert expect in error_line(err) and "hint: pass --out NEW_DIR" in err
    assert snapshot(tmp_path) == before  # nothing deleted, nothing written (no lock file either)


@pytest.mark.parametrize(
    "where, expect",
    [
        ("teacher", "is the input"),
        ("teacher_parent", "contains the input"),
        ("inside_teacher", "is inside the input"),
        ("data_parent", "contains the input"),
    ],
)
def test_overwrite_refuses_the_runs_inputs(where, expect, teacher, text_file, tmp_path, capsys):
    # copies, so that the session's tiny teacher is safe even if the refusal were broken
    t = tmp_path / "models" / "teacher"
    shutil.copytree(teacher, t)
    data = tmp_path / "corpus" / "text.txt"
    data.parent.mkdir()
    shutil.copy(text_file, data)
    out = {
        "teacher": t,
        "teacher_parent": t.parent,
        "inside_teacher": t / "student",
        "data_parent": data.parent,
    }[where]
    before = snapshot(tmp_path)
    code, lines, err = run(distill(t, data, "--out", str(out), "--overwrite"), capsys)
    assert code == 1 and lines == []
    assert expect in error_line(err)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("stage", ["export", "prune", "quantize"])
def test_every_stage_refuses_its_own_input_even_when_it_is_an_artifact(stage, artifact, tmp_path, capsys):
    # an artifact may be overwritten, but not by a run that reads it
    model = tmp_path / "model"
    shutil.copytree(artifact, model)
    before = snapshot(tmp_path)
    code, lines, err = run([stage, str(model), "--out", str(model), "--overwrite"], capsys)
    assert code == 1 and lines == []
    assert f"error: --out {model} is the input {model}" == error_line(err)
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_a_directory_that_is_not_an_artifact(teacher, text_file, tmp_path, capsys):
    out = fill(tmp_path / "mine")
    (out / MANIFEST_NAME).write_text("{not json")  # a broken manifest does not make it distillkit's
    before = snapshot(tmp_path)
    code, lines, err = run(distill(teacher, text_file, "--out", str(out), "--overwrite"), capsys)
    assert code == 1 and lines == []
    assert error_line(err) == (
        f"error: --overwrite replaces only a distillkit artifact or an empty directory, and {out} is neither "
        f"(no readable {MANIFEST_NAME})"
    )
    assert snapshot(tmp_path) == before


def test_out_that_is_a_file_is_refused_even_with_overwrite(teacher, text_file, tmp_path, capsys):
    out = tmp_path / "result"
    out.write_text("a file of the user's\n")
    for extra in ((), ("--overwrite",)):
        code, lines, err = run(distill(teacher, text_file, "--out", str(out), *extra), capsys)
        assert code == 1 and lines == []
        assert error_line(err) == f"error: --out {out} is an existing file, not a directory"
    assert out.read_text() == "a file of the user's\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


def test_overwrite_replaces_an_empty_directory_and_an_artifact(artifact, tmp_path, capsys):
    out = tmp_path / "exported"
    out.mkdir()
    code, lines, err = run(["export", str(artifact), "--out", str(out), "--overwrite"], capsys)
    assert code == 0, err
    first = json.loads((out / MANIFEST_NAME).read_text())
    assert first["stage"] == "export" and first["path"] == str(out)
    code, lines, err = run(["export", str(artifact), "--out", str(out), "--overwrite"], capsys)
    assert code == 0, err
    second = json.loads((out / MANIFEST_NAME).read_text())
    assert second["created"] >= first["created"] and second["files"] == first["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no lock, tmp or old dirs left


# --------------------------------------------------------------------------------------------
# 2. --resume with other settings


@pytest.fixture(scope="module")
def checkpoint(teacher, text_file, tmp_path_factory) -> Path:
    """A work directory holding the checkpoint of step 3 of a 10-step --lr 1e-3 run (stopped by a NaN loss)."""
    from distillkit.distill import functional
    from distillkit.kernels.kd_loss import divergences

    real = functional.forward_kl
    calls = {"n": 0}

    def nan_at_step_4(*a, **k):
        calls["n"] += 1
        value = real(*a, **k)
        return value * float("nan") if calls["n"] == 4 else value

    out = tmp_path_factory.mktemp("ckpt") / "o"
    with pytest.MonkeyPatch.context() as mp:
        for home in (functional, divergences):  # the fused loss reads the divergences module
            mp.setattr(home, "forward_kl", nan_at_step_4)
        code = main(distill(teacher, text_file, "--steps", "10", "--lr", "1e-3", "--out", str(out), "--quiet"))
    assert code == 1 and checkpoint_step(out) == 3
    return work_dir(out)


def _with_checkpoint(checkpoint: Path, tmp_path: Path) -> Path:
    out = tmp_path / "o"
    shutil.copytree(checkpoint, work_dir(out))
    return out


def test_resume_with_a_changed_lr_is_refused_and_keeps_the_checkpoint(checkpoint, teacher, text_file, tmp_path, capsys):
    out = _with_checkpoint(checkpoint, tmp_path)
    before = snapshot(tmp_path)
    args = distill(teacher, text_file, "--steps", "10", "--lr", "2e-3", "--out", str(out), "--resume")
    code, lines, err = run(args, capsys)
    assert code == 1 and lines == []
    assert (
        error_line(err)
        == "error: --resume would continue the checkpoint of step 3 with other settings: lr: 0.001 -> 0.002"
    )
    assert "--resume-changed" in err
    assert snapshot(tmp_path) == before
    # the same settings resume as before (nothing but evaluation and placement flags may differ silently)
    same = distill(teacher, text_file, "--steps", "10", "--lr", "1e-3", "--eval-every", "5", "--out", str(out))
    code, lines, err = run([*same, "--resume"], capsys)
    assert code == 0, err
    assert json.loads(lines[0])["metrics"]["steps"] == 10 and "resume_changes" not in json.loads(lines[0])["extra"]


def test_resume_changed_continues_with_the_new_values_and_records_them(
    checkpoint, teacher, text_file, tmp_path, capsys
):
    from transformers import get_cosine_schedule_with_warmup

    out = _with_checkpoint(checkpoint, tmp_path)
    code, lines, err = run(
        distill(teacher, text_file, "--steps", "12", "--lr", "2e-3", "--out", str(out), "--resume", "--resume-changed"),
        capsys,
    )
    assert code == 0, err
    m = json.loads(lines[0])
    assert m["config"]["lr"] == 2e-3 and m["config"]["steps"] == 12 and m["metrics"]["steps"] == 12
    assert m["extra"]["resume_changes"] == [{"step": 3, "changes": {"lr": [1e-3, 2e-3], "steps": [10, 12]}}]
    assert "from step 3 on, lr 0.001 -> 0.002, steps 10 -> 12" in err
    # the logged learning rates: the old schedule up to step 3, the new one (12 steps, peak 2e-3) after
    logged = {
        r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r
    }
    assert sorted(logged) == list(range(1, 13))

    def schedule(lr: float, steps: int) -> list[float]:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        sched = get_cosine_schedule_with_warmup(opt, round(0.05 * steps), steps)
        lrs = [0.0]
        for _ in range(steps):
            opt.step()
            sched.step()
            lrs.append(sched.get_last_lr()[0])
        return lrs

    old, new = schedule(1e-3, 10), schedule(2e-3, 12)
    for step, lr in logged.items():
        assert lr == pytest.approx(old[step] if step <= 3 else new[step], rel=1e-12), step


@pytest.mark.parametrize(
    "change, expect",
    [
        (("--student", "layers=2"), "student: layers=1 -> layers=2"),
        (("--max-length", "24"), "max_length: 32 -> 24"),
        (("--batch-size", "4"), "batch_size: 8 -> 4"),
        (("--data", "OTHER"), "data: "),
    ],
)
def test_resume_changed_still_refuses_what_cannot_change_mid_run(
    change, expect, checkpoint, teacher, text_file, tmp_path, capsys
):
    out = _with_checkpoint(checkpoint, tmp_path)
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text())
    before = snapshot(tmp_path)
    args = [*distill(teacher, text_file, "--steps", "10", "--lr", "1e-3"), "--out", str(out)]
    args += [str(other) if a == "OTHER" else a for a in change]
    code, lines, err = run([*args, "--resume", "--resume-changed"], capsys)
    assert code == 1 and lines == []
    line = error_line(err)
    assert line.startswith("error: --resume cannot continue the checkpoint of step 3 with other ")
    assert "(they cannot change mid-run)" in line and expect in line
    assert snapshot(tmp_path) == before


def test_resume_changed_needs_resume(teacher, text_file, tmp_path, capsys):
    code, lines, err = run(distill(teacher, text_file, "--out", str(tmp_path / "o"), "--resume-changed"), capsys)
    assert code == 1 and error_line(err) == "error: --resume-changed only applies to --resume"
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# 3. only finite weights are checkpointed


def test_nan_gradient_without_clipping_never_reaches_the_checkpoint(teacher, text_file, tmp_path, capsys, monkeypatch):
    """--max-grad-norm 0: a step whose loss is finite but whose gradient is NaN must not be applied or saved."""
    from distillkit.distill import functional
    from distillkit.kernels.kd_loss import divergences

    real = functional.forward_kl
    calls = {"n": 0}

    def nan_gradient_at_step_5(*a, **k):
        calls["n"] += 1
        value = real(*a, **k)
        if calls["n"] == 5:  # value unchanged, but d sqrt(x)/dx at 0 is inf, and 0 * inf is NaN in backward
            value = value + 0.0 * torch.sqrt(value - value.detach())
        return value

    for home in (functional, divergences):  # the fused loss reads the divergences module
        monkeypatch.setattr(home, "forward_kl", nan_gradient_at_step_5)
    out = tmp_path / "o"
    args = distill(teacher, text_file, "--steps", "10", "--max-grad-norm", "0", "--save-every", "2", "--out", str(out))
    code, lines, err = run(args, capsys)
    assert code == 1 and lines == []
    assert error_line(err).startswith("error: the gradient norm became nan at step 5; training stopped")
    assert "--max-grad-norm" in err
    assert not out.exists() and checkpoint_step(out) == 4
    saved = load_file(str(work_dir(out) / CHECKPOINT / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_non_finite_weights_do_not_replace_the_last_good_checkpoint(teacher, text_file, tmp_path, capsys, monkeypatch):
    """Weights that went non-finite in step 5 (after the checkpoint of step 4): the step-6 NaN loss would save
    "the last good state", which is not good; the checkpoint of step 4 must stay byte-identical."""
    out = tmp_path / "o"
    real_step = torch.optim.AdamW.step
    seen = {"steps": 0, "checkpoint": None}

    def poison_after_step_5(self, *a, **k):
        result = real_step(self, *a, **k)
        seen["steps"] += 1
        if seen["steps"] == 5:
            seen["checkpoint"] = snapshot(work_dir(out) / CHECKPOINT)
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poison_after_step_5)
    args = distill(teacher, text_file, "--steps", "10", "--max-grad-norm", "0", "--save-every", "2", "--out", str(out))
    code, lines, err = run(args, capsys)
    assert code == 1 and lines == []
    assert error_line(err) == (
        f"error: the weights became non-finite by step 5; they were not saved, and the checkpoint of step 4 is "
        f"kept in {work_dir(out)}"
    )
    assert "lower --lr, or set --max-grad-norm" in err
    assert json.loads(seen["checkpoint"][STATE_FILE])["step"] == 4
    assert snapshot(work_dir(out) / CHECKPOINT) == seen["checkpoint"]
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# 4. one run per --out


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("DISTILLKIT_DEBUG", None)
    return env


def test_a_second_run_on_the_same_out_is_refused_while_the_first_runs(artifact, teacher, text_file, tmp_path, capsys):
    out = tmp_path / "o"
    shutil.copytree(artifact, out)  # an artifact both runs are allowed to overwrite
    lock = tmp_path / ".o.lock"
    # the first run: a real distill that takes the lock, loads the teacher, then waits for its student on stdin
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distillkit.cli.app",
            *distill(teacher, text_file, "--out", str(out), "--overwrite", student="-"),
        ],
        env=_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            # holding the lock, it made its work directory and then blocks reading stdin
            if lock.is_file() and lock.read_text().strip() == str(first.pid) and work_dir(out).is_dir():
                break
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()
        before = snapshot(tmp_path)
        code, lines, err = run(distill(teacher, text_file, "--out", str(out), "--overwrite"), capsys)
        assert code == 1 and lines == []
        assert error_line(err) == f"error: another distillkit run (pid {first.pid}) is writing {out}"
        assert snapshot(tmp_path) == before
    finally:
        _, first_err = first.communicate("", timeout=120)  # empty stdin: the first run stops with its own error
    assert first.returncode == 1 and "stdin was empty" in first_err
    assert not lock.exists()  # released on exit
    assert snapshot(out) == snapshot(artifact)  # the first run's failure left the artifact as it was


def test_a_stage_called_from_python_releases_its_lock_when_it_fails(artifact, tmp_path, monkeypatch):
    from distillkit.errors import DataError
    from distillkit.quantize import engine
    from distillkit.quantize.config import QuantizeConfig

    def fail(run):
        raise DataError("no calibration data today")

    monkeypatch.setattr(engine, "_calibration_data", fail)
    out = tmp_path / "q"
    with pytest.raises(DataError):
        engine.quantize_model(QuantizeConfig(scheme="int8", method="rtn"), str(artifact), str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no lock, no partial output


def test_a_lock_file_of_a_dead_run_does_not_block(artifact, tmp_path, capsys):
    out = tmp_path / "exported"
    (tmp_path / ".exported.lock").write_text(f"{dead_pid()}\n")
    code, lines, err = run(["export", str(artifact), "--out", str(out)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


# --------------------------------------------------------------------------------------------
# 5. leftovers of earlier runs


def test_a_new_run_never_merges_a_stale_work_dir_and_sweeps_dead_runs(teacher, text_file, tmp_path, capsys):
    out = tmp_path / "o"
    wd = work_dir(out)
    wd.mkdir()
    (wd / "metrics.jsonl").write_text(json.dumps({"step": 999, "loss": 123.0}) + "\n")
    (wd / "tensorboard").mkdir()
    (wd / "tensorboard" / "events.out").write_bytes(b"old run")
    dead = dead_pid()
    (tmp_path / f".o.tmp-{dead}").mkdir()
    (tmp_path / f".o.tmp-{dead}" / "model.safetensors").write_bytes(b"half")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".o.tmp-{alive.pid}").mkdir()  # a live run's: not ours to remove
        (tmp_path / f".o.old-{dead}").mkdir()  # the only copy of a replaced artifact when o is missing: kept
        code, lines, err = run(distill(teacher, text_file, "--steps", "3", "--out", str(out)), capsys)
        assert code == 0, err
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o", f".o.tmp-{alive.pid}", f".o.old-{dead}"])
        assert f"note: {tmp_path / f'.o.old-{dead}'} holds the artifact an interrupted run was replacing" in err
        log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
        assert all(r.get("loss", 0) != 123.0 for r in log)
        assert not (out / "logs").exists()
        # with o in place, the dead run's old copy is a replaced artifact and goes on the next run
        code, lines, err = run(distill(teacher, text_file, "--steps", "3", "--out", str(out), "--overwrite"), capsys)
        assert code == 0, err
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o", f".o.tmp-{alive.pid}"])
    finally:
        alive.kill()
        alive.wait()
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["metrics"]["steps"] == 3 and math.isfinite(m["metrics"]["final_train_loss"])
