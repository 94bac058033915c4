"""``distillkit bench`` on text-conditioned pipelines: prompts from the distill manifest (or ``--prompts FILE``),
drawn per sample after the quality noise, so bench reproduces the MSE distill recorded from the artifacts alone."""

from __future__ import annotations

import json

import pytest
import torch

from distillkit.bench.diffusion import QUALITY_SAMPLES
from distillkit.models.diffusion import NoiseSchedule, ddim_sample, encode_prompts, load_diffusion
from tests import tiny
from tests.test_bench.test_bench_diffusion import FAST, distil, run_cli

PROMPTS = ["red cat", "dog", "a cat", "red dog"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-text")
    teacher = tiny.tiny_text_unet_pipeline(root / "teacher")[1]
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    progressive = distil(
        teacher, root / "progressive", "progressive", prompts=str(prompts), teacher_steps=8, target_steps=2
    )
    guided = distil(teacher, root / "guided", "guidance", prompts=str(prompts), teacher_steps=4, guidance_scale=3.0)
    return teacher, str(prompts), progressive, guided


def _report(args: list[str]) -> dict:
    code, lines, err = run_cli(["bench", *args, "--batch", "2", *FAST])
    assert code == 0, err
    assert len(lines) == 1
    return json.loads(lines[0])


def test_distill_records_prompt_texts(text_run):
    _, _, progressive, guided = text_run
    for m in (progressive, guided):
        assert m["extra"]["prompt_texts"] == PROMPTS and m["extra"]["prompts"] == 4


def test_bench_progressive_text_student_reproduces_distill_mse(text_run):
    teacher, _, progressive, _ = text_run
    report = _report([progressive["path"], "--against", teacher])
    t, s = report["models"]
    assert (t["steps"], t["steps_from"]) == (8, "students' --teacher-steps")
    assert (s["steps"], s["steps_from"]) == (2, "manifest")
    assert report["diffusion"]["prompts"] == PROMPTS and report["diffusion"]["prompts_from"] == "manifest"
    for m in (t, s):
        assert m["throughput_unit"] == "images/s" and m["throughput"] > 0 and m["eval_ms_p50"] > 0
        assert m["sample_shape"] == [3, 8, 8] and m["model_type"] == "UNet2DConditionModel"
    assert t["quality"] == {"mse": 0.0}  # the baseline against itself; an infinite PSNR is left out
    assert s["quality"]["mse"] == pytest.approx(progressive["metrics"]["student_mse"], rel=1e-4)
    assert s["quality"]["psnr"] == pytest.approx(progressive["metrics"]["student_psnr"], rel=1e-4)

    # independently: the teacher's 8-step samples from the quality noise and the prompts drawn after it
    dm = load_diffusion(teacher)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(QUALITY_SAMPLES, *dm.sample_shape, generator=gen)
    ids = torch.randint(len(PROMPTS), (QUALITY_SAMPLES,), generator=gen)
    states = encode_prompts(dm.text_encoder, dm.tokenizer, PROMPTS)[ids]
    with torch.no_grad():
        ref = ddim_sample(dm.model, NoiseSchedule(dm.scheduler), noise, 8, states)
        stu_dm = load_diffusion(progressive["path"])
        stu = ddim_sample(stu_dm.model, NoiseSchedule(stu_dm.scheduler), noise, 2, states)
    assert float(((stu.double() - ref.double()) ** 2).mean()) == pytest.approx(s["quality"]["mse"], rel=1e-4)


def test_bench_guidance_text_student_uses_empty_prompt(text_run):
    """The teacher baseline runs classifier-free guidance with the empty prompt (2 evals/step), the student its
    guidance embedding (1 eval/step); the student's MSE is the one distill recorded."""
    teacher, _, _, guided = text_run
    report = _report([guided["path"], "--against", teacher])
    t, s = report["models"]
    assert report["diffusion"]["guidance_scale"] == 3.0
    assert (t["evaluations_per_image"], s["evaluations_per_image"]) == (8, 4)
    assert t["quality"] == {"mse": 0.0}
    assert s["quality"]["mse"] == pytest.approx(guided["metrics"]["student_mse"], rel=1e-4)


def test_bench_teacher_with_prompts_file(text_run):
    teacher, prompts, _, _ = text_run
    report = _report([teacher, "--prompts", prompts, "--diffusion-steps", "3"])
    (t,) = report["models"]
    assert t["quality"] == {"mse": 0.0} and t["steps"] == 3 and t["throughput"] > 0
    assert report["diffusion"]["prompts_from"] == "--prompts"


def test_bench_text_pipeline_without_prompts_is_one_line_error(text_run, tmp_path):
    teacher = text_run[0]
    out = tmp_path / "report.json"
    for args in (
        ["bench", teacher, "--diffusion-steps", "2", "--out", str(out)],
        ["bench", teacher, "--prompts", str(tmp_path / "missing.txt")],
    ):
        code, lines, err = run_cli(args)
        assert code == 1 and lines == [], err
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, err
    assert "text-conditioned" in err or "prompts file" in err
    assert not out.exists()
