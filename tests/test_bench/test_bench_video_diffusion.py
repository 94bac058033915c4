"""``distillkit bench`` on video flow-matching students (Wan-style transformer, latents [C, F, H, W]): the shape
taken from the manifests, distill's numbers reproduced from the saved pipelines, and the Fréchet distance over
frames against an independent computation."""

from __future__ import annotations

import json

import pytest
import torch

from distillkit.config import DistillConfig
from distillkit.distill.diffusion import run_diffusion_distill
from distillkit.models.sample_features import SampleFeatures, frechet_distance, gaussian_stats
from tests.test_bench.test_bench_flow_diffusion import DISTILL_FAST, FAST, check_one_step_reflow, run_cli
from tests.test_bench.test_bench_flow_diffusion import _samples as flow_samples
from tests.test_distill import wan_tiny

SHAPE = wan_tiny.VIDEO_SHAPE
N_DIST = 16


def test_video_features_are_frame_features():
    """A video [N, C, F, H, W] is measured as its N * F frames, video by video."""
    g = torch.Generator().manual_seed(0)
    videos = torch.randn(3, 4, *SHAPE, generator=g)
    feats = SampleFeatures(4)
    frames = torch.cat([videos[i, :, f][None] for i in range(3) for f in range(SHAPE[0])])
    assert frames.shape == (9, 4, 8, 8)
    torch.testing.assert_close(feats.features(videos), feats.features(frames))
    assert feats.features(videos).shape == (9, 64)


@pytest.fixture(scope="module")
def video_students(tmp_path_factory):
    """The tiny Wan teacher, a 1-step reflow student and a 2-step reflow student with video-tile sparse attention."""
    root = tmp_path_factory.mktemp("bench-video")
    teacher = wan_tiny.tiny_wan_pipeline(root / "teacher")[1]
    common = dict(teacher=teacher, method="reflow", video_shape=",".join(map(str, SHAPE)), **DISTILL_FAST)
    reflow = run_diffusion_distill(DistillConfig.of(target_steps=1, steps=25, **common), out=str(root / "reflow"))
    sparse = run_diffusion_distill(
        DistillConfig.of(
            target_steps=2, steps=10, sparse_attention="tiles:3,4,4:1,4,4", sparse_block_size=16, **common
        ),
        out=str(root / "sparse"),
    )
    return teacher, reflow, sparse


def _samples(path, steps, n, seed):
    return flow_samples(path, steps, n, seed, video_shape=SHAPE)


def test_bench_video_students_against_teacher(video_students):
    teacher, reflow, sparse = video_students
    # no --video-shape: the students' manifests hold it, and the teacher takes the one its students recorded
    args = ["bench", reflow["path"], sparse["path"], "--against", teacher, "--max-samples", str(N_DIST), *FAST]
    code, lines, err = run_cli(args)
    assert code == 0, err
    report = json.loads(lines[0])
    base, r, sp = report["models"]
    # the sparse student is benched with the block-sparse attention it was distilled with: distill's numbers
    assert sp["quality"]["mse"] == pytest.approx(sparse["metrics"]["student_mse"], rel=1e-5)
    assert sp["quality"]["same_steps_mse"] == pytest.approx(sparse["metrics"]["baseline_mse"], rel=1e-5)
    assert any("tiles:3,4,4:1,4,4" in n for n in sp["notes"])
    assert base["sample_shape"] == r["sample_shape"] == [4, *SHAPE]
    assert (base["steps"], r["steps"]) == (8, 1) and r["sampler"] == "euler"
    assert report["diffusion"]["video_shape"] == list(SHAPE)
    met, q = reflow["metrics"], r["quality"]
    check_one_step_reflow(q, met, _samples(reflow["path"], 1, 16, 1), _samples(teacher, 8, 16, 1))
    # the Fréchet distance over frames (N_DIST videos of 3 frames each), recomputed on the seed + 2 noises
    feats = SampleFeatures(4)
    ref = feats.features(_samples(teacher, 8, N_DIST, 2))
    assert ref.shape == (N_DIST * SHAPE[0], 64)
    got = frechet_distance(gaussian_stats(feats.features(_samples(reflow["path"], 1, N_DIST, 2))), gaussian_stats(ref))
    assert q["fd"] == pytest.approx(got, rel=1e-6)
    assert any("fd over frames" in n for n in report["notes"])


def test_bench_video_shape_flag(video_students):
    teacher = video_students[0]
    code, lines, err = run_cli(["bench", teacher, "--diffusion-steps", "2", "--max-samples", "4", *FAST])
    assert code == 1 and lines == [] and "--video-shape" in err and "hint:" in err
    code, lines, err = run_cli(
        ["bench", teacher, "--diffusion-steps", "2", "--max-samples", "4", "--video-shape", "3,4,4", *FAST]
    )
    assert code == 0, err
    assert json.loads(lines[0])["models"][0]["sample_shape"] == [4, 3, 4, 4]
