"""``distillkit bench`` on Flux students (FluxTransformer2DModel, packed latents, shift mu, embedded guidance): the
latent size and guidance taken from the manifests, distill's numbers reproduced from the saved pipeline, and
``--image-size``."""

from __future__ import annotations

import json

import pytest
import torch

from distillkit.config import DistillConfig
from distillkit.distill.diffusion import run_diffusion_distill
from distillkit.models.diffusion import load_diffusion
from distillkit.models.flow import euler_sample, flow_schedule
from tests.test_bench.test_bench_flow_diffusion import DISTILL_FAST, FAST, check_one_step_reflow, run_cli
from tests.test_distill import flow_tiny, flux_tiny

SIZE = flux_tiny.IMAGE_SIZE
GUIDANCE = 2.5


@pytest.fixture(scope="module")
def flux_student(tmp_path_factory):
    """A Flux-dev-style teacher (guidance_embeds) and its 1-step reflow student, distilled at guidance 2.5."""
    root = tmp_path_factory.mktemp("bench-flux")
    teacher = flux_tiny.tiny_flux_pipeline(root / "teacher", guidance_embeds=True)[1]
    cfg = DistillConfig.of(
        teacher=teacher,
        method="reflow",
        target_steps=1,
        steps=25,
        guidance_scale=GUIDANCE,
        image_size="8,8",
        **DISTILL_FAST,
    )
    return teacher, run_diffusion_distill(cfg, out=str(root / "reflow"))


def _samples(path, steps, n, seed):
    dm = load_diffusion(path, image_size=SIZE)
    noise = torch.randn(n, *dm.sample_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return euler_sample(dm.model, flow_schedule(dm, GUIDANCE), noise, steps)


def test_bench_flux_student_against_teacher(flux_student):
    teacher, reflow = flux_student
    # no --image-size: the student's manifest holds it, and the teacher takes the one its student recorded
    code, lines, err = run_cli(["bench", reflow["path"], "--against", teacher, "--max-samples", "16", *FAST])
    assert code == 0, err
    report = json.loads(lines[0])
    base, r = report["models"]
    assert base["sample_shape"] == r["sample_shape"] == [4, *SIZE]
    assert (base["steps"], r["steps"]) == (8, 1) and r["sampler"] == "euler"
    met, q = reflow["metrics"], r["quality"]
    # distill's evaluation from the saved FluxPipeline, at the recorded embedded guidance
    check_one_step_reflow(q, met, _samples(reflow["path"], 1, 16, 1), _samples(teacher, 8, 16, 1))
    assert any(f"embedded guidance {GUIDANCE:g}" in n for n in r["notes"])


def test_bench_flux_image_size_flag(flux_student, tmp_path):
    teacher = flux_student[0]
    code, lines, err = run_cli(["bench", teacher, "--diffusion-steps", "2", "--image-size", "4,8", *FAST])
    assert code == 0, err
    rec = json.loads(lines[0])["models"][0]
    # nothing recorded a guidance for the bare teacher: distill's default --guidance-scale, said in the notes
    assert rec["sample_shape"] == [4, 4, 8] and any("embedded guidance 3" in n for n in rec["notes"])
    sd3 = flow_tiny.tiny_sd3_model_dir(tmp_path)[1]
    code, lines, err = run_cli(["bench", sd3, "--diffusion-steps", "2", "--image-size", "8,8", *FAST])
    assert code == 1 and lines == [] and "--image-size" in err and "hint:" in err
