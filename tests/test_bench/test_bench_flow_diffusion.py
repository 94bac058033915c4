"""``distillkit bench`` on flow-matching students (SD3-style transformer, Euler on FlowMatchEulerDiscreteScheduler):
the Euler sampler, distill's numbers reproduced from the saved pipelines, the same-step teacher side by side, and
the Fréchet distance against an independent (scipy) computation."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from distillkit.cli.app import main
from distillkit.config import DistillConfig
from distillkit.distill.denoise_training import sample_errors
from distillkit.distill.diffusion import run_diffusion_distill
from distillkit.models.diffusion import load_diffusion
from distillkit.models.flow import FlowSchedule, euler_sample
from distillkit.models.sample_features import SampleFeatures, frechet_distance, gaussian_stats
from tests.test_distill import flow_tiny

FAST = ["--repeats", "1", "--warmup", "0", "--batch", "4"]
# the distill settings of the students benched here: 8 teacher steps, a small pool, fast training
DISTILL_FAST = dict(teacher_steps=8, batch_size=8, max_samples=32, eval_samples=16, warmup=0.0, lr=1e-3)
N_DIST = 64


def check_one_step_reflow(q: dict, met: dict, student: list, teacher: list) -> None:
    """A 1-step reflow student's bench quality ``q`` reproduces distill's metrics ``met`` (student, and the teacher at
    one step), beats that teacher, and its PSNR is that of its ``student`` samples against the 8-step ``teacher``
    samples of seed 1."""
    assert q["mse"] == pytest.approx(met["student_mse"], rel=1e-5)
    assert q["same_steps_mse"] == pytest.approx(met["baseline_mse"], rel=1e-5)
    assert q["mse"] < q["same_steps_mse"]
    assert q["psnr"] == pytest.approx(sample_errors(student, teacher)["psnr"], abs=1e-4)


def run_cli(args: list[str]) -> tuple[int, list[str], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue().splitlines(), err.getvalue()


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


def test_frechet_distance_matches_scipy():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64)
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = b + 0.5
    got = frechet_distance(gaussian_stats(a), gaussian_stats(b))
    assert got == pytest.approx(_scipy_frechet(a.numpy(), b.numpy()), rel=1e-6)
    assert frechet_distance(gaussian_stats(a), gaussian_stats(a)) == pytest.approx(0.0, abs=1e-9)
    # a pure mean shift of d in every coordinate costs D d^2
    assert frechet_distance(gaussian_stats(a), gaussian_stats(a + 0.3)) == pytest.approx(6 * 0.09, rel=1e-6)
    # the features are fixed: two instances agree, and they are the plain conv stack
    x = torch.randn(5, 4, 8, 8, generator=g)
    f1, f2 = SampleFeatures(4).features(x), SampleFeatures(4).features(x)
    torch.testing.assert_close(f1, f2)
    net = SampleFeatures(4)
    h = x
    for w, stride in zip(net.weights, (1, 2, 2), strict=True):
        h = torch.relu(torch.nn.functional.conv2d(h, w, stride=stride, padding=1))
    torch.testing.assert_close(f1, h.mean(dim=(2, 3)).double())
    assert f1.shape == (5, 64)


@pytest.fixture(scope="module")
def flow_students(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-flow")
    teacher = flow_tiny.tiny_sd3_pipeline(root / "teacher")[1]
    common = DISTILL_FAST
    reflow = run_diffusion_distill(
        DistillConfig.of(teacher=teacher, method="reflow", target_steps=1, steps=25, **common), out=str(root / "reflow")
    )
    dmd = run_diffusion_distill(
        DistillConfig.of(teacher=teacher, method="dmd", target_steps=2, steps=6, alpha=0.5, **common),
        out=str(root / "dmd"),
    )
    return teacher, reflow, dmd


def _samples(path, steps, n, seed, video_shape=None):
    """Euler samples [n, *sample_shape] of the model at ``path`` from the noises of ``seed``."""
    dm = load_diffusion(path, video_shape=video_shape)
    noise = torch.randn(n, *dm.sample_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return euler_sample(dm.model, FlowSchedule(dm.scheduler), noise, steps)


def test_bench_flow_students_side_by_side(flow_students):
    teacher, reflow, dmd = flow_students
    args = ["bench", reflow["path"], dmd["path"], "--against", teacher, "--max-samples", str(N_DIST), *FAST]
    code, lines, err = run_cli(args)
    assert code == 0, err
    report = json.loads(lines[0])
    base, r, d = report["models"]
    assert [m["sampler"] for m in report["models"]] == ["euler"] * 3
    assert (base["steps"], r["steps"], d["steps"]) == (8, 1, 2)
    assert report["diffusion"]["distribution_samples"] == N_DIST
    assert base["quality"] == {"mse": 0.0}
    for rec, manifest in ((r, reflow), (d, dmd)):
        met = manifest["metrics"]
        q = rec["quality"]
        # distill's evaluation from the saved pipeline: the student and the teacher at the student's steps
        assert q["mse"] == pytest.approx(met["student_mse"], rel=1e-5)
        assert q["same_steps_mse"] == pytest.approx(met["baseline_mse"], rel=1e-5)
        assert q["same_steps_psnr"] == pytest.approx(met["baseline_psnr"], abs=1e-4)
        # the distilled student beats the teacher run at its own step count
        assert q["mse"] < q["same_steps_mse"]
    # the Fréchet distances, recomputed independently on the distribution noises (seed + 2)
    ref = _samples(teacher, 8, N_DIST, 2)
    feats = SampleFeatures(4)
    ref_stats = gaussian_stats(feats.features(ref))
    for rec, path, steps in ((r, reflow["path"], 1), (d, dmd["path"], 2)):
        got = frechet_distance(gaussian_stats(feats.features(_samples(path, steps, N_DIST, 2))), ref_stats)
        assert rec["quality"]["fd"] == pytest.approx(got, rel=1e-6)
        same = frechet_distance(gaussian_stats(feats.features(_samples(teacher, steps, N_DIST, 2))), ref_stats)
        assert rec["quality"]["same_steps_fd"] == pytest.approx(same, rel=1e-6)
        assert _scipy_frechet(
            feats.features(_samples(path, steps, N_DIST, 2)).numpy(), feats.features(ref).numpy()
        ) == pytest.approx(got, rel=1e-4)
    assert r["quality"]["fd"] < r["quality"]["same_steps_fd"]
    # the MSE recomputed on the quality noises (seed + 1)
    expected = sample_errors(_samples(reflow["path"], 1, 16, 1), _samples(teacher, 8, 16, 1))
    assert r["quality"]["mse"] == pytest.approx(expected["mse"], rel=1e-5)
    assert "at its steps" in err and "FD" in err


def test_bench_flow_max_samples_error(flow_students):
    teacher, reflow, _ = flow_students
    code, lines, err = run_cli(["bench", reflow["path"], "--against", teacher, "--max-samples", "1", *FAST])
    assert code == 1 and lines == [] and "Fréchet" in err and "hint:" in err
