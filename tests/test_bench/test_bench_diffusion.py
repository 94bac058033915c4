"""``distillkit bench`` on diffusers denoisers: images/s, steps, MSE/PSNR against the baseline's samples, ratios.

Students are distilled for a few steps from tiny random teachers; what is checked is that bench reproduces, from
the saved artifacts alone, the numbers distill measured (same noise, same solver) and an independent recomputation
with the solvers of :mod:`distillkit.models.diffusion`."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from distillkit.bench import BenchConfig
from distillkit.bench.diffusion import QUALITY_SAMPLES
from distillkit.cli.app import main
from distillkit.config import DistillConfig
from distillkit.distill.denoise_training import sample_errors
from distillkit.distill.diffusion import run_diffusion_distill
from distillkit.errors import ConfigError
from distillkit.models.diffusion import NoiseSchedule, ddim_sample, label_range, load_diffusion
from tests import tiny

FAST = ["--repeats", "2", "--warmup", "1"]
DIFFUSION_FIELDS = {
    "latency_ms_per_image_p50",
    "latency_ms_per_image_p90",
    "steps",
    "steps_from",
    "sampler",
    "guidance_scale",
    "evaluations_per_image",
    "step_ms_p50",
    "step_ms_p90",
    "eval_ms_p50",
    "eval_ms_p90",
    "space",
    "sample_shape",
}


def run_cli(args: list[str]) -> tuple[int, list[str], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue().splitlines(), err.getvalue()


def distil(teacher: str, out: Path, method: str, **kw) -> dict:
    cfg = DistillConfig.of(
        teacher=teacher,
        method=method,
        steps=3,
        batch_size=8,
        max_samples=16,
        eval_samples=QUALITY_SAMPLES,
        warmup=0.0,
        lr=1e-3,
        **kw,
    )
    return run_diffusion_distill(cfg, out=str(out))


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-diffusion")
    teacher = tiny.tiny_dit(root / "teacher")[1]
    student = distil(teacher, root / "student", "progressive", teacher_steps=8, target_steps=2)
    return teacher, student


@pytest.fixture(scope="module")
def dit_run(dit, tmp_path_factory):
    teacher, student = dit
    root = tmp_path_factory.mktemp("bench-diffusion-run")
    plot, out = root / "plot.png", root / "report.json"
    args = ["bench", student["path"], "--against", teacher, "--batch", "2", "--plot", str(plot), "--out", str(out)]
    code, lines, err = run_cli([*args, *FAST])
    return code, lines, err, plot, out


def _reference_samples(path: str, steps: int, seed: int = 1) -> torch.Tensor:
    """Samples [16, C, H, W] of ``path`` at ``steps`` DDIM steps from the quality noise (seed + 1 of --seed 0)."""
    dm = load_diffusion(path)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(QUALITY_SAMPLES, *dm.sample_shape, generator=gen)
    n = label_range(dm)
    labels = torch.arange(n)[torch.randint(n, (QUALITY_SAMPLES,), generator=gen)] if n else None
    return ddim_sample(dm.model, NoiseSchedule(dm.scheduler), noise, steps, labels)


def test_bench_diffusion_report(dit, dit_run):
    teacher_path, manifest = dit
    code, lines, err, plot, out = dit_run
    assert code == 0, err
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert json.loads(out.read_text()) == report
    assert report["baseline"] == "teacher" and report["quality_metric"] == "mse"
    assert report["plot"] == str(plot) and plot.stat().st_size > 0
    assert report["diffusion"]["quality_samples"] == QUALITY_SAMPLES and report["diffusion"]["reference_steps"] == 8
    teacher, student = report["models"]
    assert [m["name"] for m in report["models"]] == ["teacher", "student"]
    assert (teacher["role"], student["role"]) == ("teacher", "model")
    # steps: the student's from its manifest, the teacher's from the --teacher-steps its student recorded
    assert (teacher["steps"], teacher["steps_from"]) == (8, "students' --teacher-steps")
    assert (student["steps"], student["steps_from"]) == (2, "manifest")
    assert (teacher["evaluations_per_image"], student["evaluations_per_image"]) == (8, 2)
    model = load_diffusion(teacher_path).model
    for m, path in ((teacher, teacher_path), (student, manifest["path"])):
        assert DIFFUSION_FIELDS <= set(m)
        assert m["task"] == "diffusion" and m["model_type"] == "DiTTransformer2DModel" and m["sampler"] == "ddim"
        assert m["params"] == sum(p.numel() for p in model.parameters()) and m["weights_bytes"] == 4 * m["params"]
        assert m["file_size_bytes"] == sum(p.stat().st_size for p in Path(path).rglob("*.safetensors"))
        assert m["sample_shape"] == [4, 8, 8]
        assert len(m["latency_ms"]) == 2 and 0 < m["latency_ms_p50"] <= m["latency_ms_p90"]
        assert m["throughput_unit"] == "images/s" and m["throughput"] > 0
        assert m["throughput"] == pytest.approx(2 / (m["latency_ms_p50"] / 1000))
        assert m["latency_ms_per_image_p50"] == pytest.approx(m["latency_ms_p50"] / 2)
        assert 0 < m["eval_ms_p50"] == m["step_ms_p50"] <= m["step_ms_p90"]  # one evaluation per step
        assert m["load_s"] > 0 and m["peak_memory_mb"] >= 0 and m["decode_ms_per_token_p50"] is None
    # the baseline against itself: identical samples (PSNR infinite, so absent)
    assert teacher["quality"] == {"mse": 0.0}
    # the student: distill's own evaluation (same noise, same solver) reproduced from the saved artifacts ...
    metrics = manifest["metrics"]
    assert student["quality"]["mse"] == pytest.approx(metrics["student_mse"], rel=1e-5)
    assert student["quality"]["psnr"] == pytest.approx(metrics["student_psnr"], abs=1e-4)
    # ... and recomputed independently
    expected = sample_errors(_reference_samples(manifest["path"], 2), _reference_samples(teacher_path, 8))
    assert student["quality"]["mse"] == pytest.approx(expected["mse"], rel=1e-5)
    assert student["quality"]["psnr"] == pytest.approx(expected["psnr"], abs=1e-4)
    # ratios: the transformers bench's, plus per-evaluation speed and evaluation count
    r = report["ratios"]["student"]
    flags = report.get("ratio_flags", {}).get("student", {})  # speed ratios timing noise cannot support are None
    expect = teacher["latency_ms_p50"] / student["latency_ms_p50"]
    assert r["latency_speedup"] == (None if "latency_speedup" in flags else expect)
    expect = student["throughput"] / teacher["throughput"]
    assert r["throughput_ratio"] == (None if "throughput_ratio" in flags else expect)
    assert r["step_speedup"] == teacher["step_ms_p50"] / student["step_ms_p50"]
    assert r["evaluations_ratio"] == 0.25 and r["param_ratio"] == 1.0 and r["size_ratio"] == 1.0
    assert r["decode_speedup"] is None
    # the table on stderr: images/s and the step columns instead of decode
    assert "images/s" in err and "ms/eval" in err and "decode ms/tok" not in err


def test_bench_diffusion_steps_override_and_copy(dit, tmp_path):
    """A plain copy of the teacher at --diffusion-steps N: the baseline has no count of its own (50, the default);
    at 50 steps the copy's samples are the baseline's exactly, at 4 they match an independent DDIM run."""
    teacher_path, _ = dit
    copy = tmp_path / "copy"
    shutil.copytree(teacher_path, copy)
    code, lines, err = run_cli(["bench", str(copy), "--against", teacher_path, "--diffusion-steps", "50", *FAST])
    assert code == 0, err
    teacher, student = json.loads(lines[0])["models"]
    assert (teacher["steps"], teacher["steps_from"]) == (50, "default")
    assert (student["steps"], student["steps_from"]) == (50, "--diffusion-steps")
    assert student["quality"] == {"mse": 0.0} and any("--diffusion-steps" in n for n in teacher["notes"])

    code, lines, err = run_cli(["bench", str(copy), "--against", teacher_path, "--diffusion-steps", "4", *FAST])
    assert code == 0, err
    report = json.loads(lines[0])
    student = report["models"][1]
    expected = sample_errors(_reference_samples(str(copy), 4), _reference_samples(teacher_path, 50))
    assert student["steps"] == 4 and student["quality"]["mse"] == pytest.approx(expected["mse"], rel=1e-5)
    assert report["ratios"]["copy"]["evaluations_ratio"] == 4 / 50


@pytest.mark.parametrize("method", ["consistency", "guidance"])
def test_bench_diffusion_reproduces_distill_metrics(method, tmp_path):
    """A consistency student (LCM sampler) and a guidance student (one evaluation per step against the teacher's
    classifier-free guidance, two per step): bench's MSE is distill's."""
    if method == "consistency":
        teacher = tiny.tiny_dit(tmp_path / "teacher")[1]
        manifest = distil(teacher, tmp_path / "student", method, teacher_steps=8, target_steps=2)
    else:
        teacher = tiny.tiny_unet_class_cond(tmp_path / "teacher")[1]
        manifest = distil(teacher, tmp_path / "student", method, teacher_steps=4, guidance_scale=2.0)
    code, lines, err = run_cli(["bench", manifest["path"], "--against", teacher, *FAST])
    assert code == 0, err
    report = json.loads(lines[0])
    base, student = report["models"]
    assert student["quality"]["mse"] == pytest.approx(manifest["metrics"]["student_mse"], rel=1e-5)
    if method == "consistency":
        assert (student["sampler"], student["steps"], base["steps"]) == ("consistency", 2, 8)
    else:
        assert report["diffusion"]["guidance_scale"] == base["guidance_scale"] == student["guidance_scale"] == 2.0
        assert (base["evaluations_per_image"], student["evaluations_per_image"]) == (8, 4)
        assert base["eval_ms_p50"] == pytest.approx(base["step_ms_p50"] / 2)


def test_bench_diffusion_errors(dit, tmp_path):
    teacher_path, manifest = dit
    llama = tiny.tiny_llama(tmp_path / "llama")[1]
    cases = [
        (["bench", manifest["path"], llama], "diffusers"),  # a diffusers and a transformers model
        (["bench", llama, "--against", teacher_path], "diffusers"),
        (["bench", manifest["path"], "--data", str(tmp_path)], "--data"),
        (["bench", manifest["path"], "--dtype", "float16"], "float32"),
        (["bench", llama, "--diffusion-steps", "4", "--seq", "8", "--repeats", "1"], "--diffusion-steps"),
    ]
    for args, word in cases:
        code, lines, err = run_cli(args)
        assert code == 1 and lines == [], args
        error = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(error) == 1 and word in error[0], err
        assert "hint:" in err
    with pytest.raises(ConfigError):
        BenchConfig(models=("x",), diffusion_steps=0)
