"""Diffusion distillation of a text-conditioned (cross-attention) pipeline: prompts encoded once by the teacher's
text encoder condition teacher and student; the empty prompt is guidance's unconditional branch.

The tiny pipeline (``tests.tiny.tiny_text_unet_pipeline``) is random, but its DDIM ODE is deterministic, so the
student-vs-teacher comparisons are real (see ``test_diffusion.py``)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from distillkit.config import DistillConfig
from distillkit.errors import ConfigError, ModelError
from distillkit.models.diffusion import (
    NoiseSchedule,
    ddim_sample,
    denoise,
    encode_prompts,
    guidance_embedding,
    load_diffusion,
)
from tests import tiny

FAST = dict(batch_size=16, max_samples=64, eval_samples=16, warmup=0.0, lr=1e-3)
PROMPTS = ["red cat", "dog", "a cat", "red dog"]
NO_VAE = dict(vae=None, safety_checker=None, feature_extractor=None)  # the pipeline was saved without them


@pytest.fixture(scope="module")
def text_pipe(tmp_path_factory):
    return tiny.tiny_text_unet_pipeline(tmp_path_factory.mktemp("text-pipe"))[1]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")  # the blank line is skipped
    return str(path)


def _eval_inputs(dm, cfg, embeds):
    """The noise and prompt embeddings the engine's evaluation draws (seed + 1: noise, then prompt ids)."""
    gen = torch.Generator().manual_seed(cfg.optim.seed + 1)
    noise = torch.randn(cfg.diffusion.eval_samples, *dm.sample_shape, generator=gen)
    ids = torch.randint(len(embeds), (cfg.diffusion.eval_samples,), generator=gen)
    return noise, embeds[ids]


def _mse(a, b):
    return float(((a.detach().double() - b.detach().double()) ** 2).mean())


def test_prompt_encoding_matches_stable_diffusion_pipeline(text_pipe):
    """Our prompt embeddings [P, L, D] and the null embedding are what StableDiffusionPipeline.encode_prompt gives."""
    from diffusers import DiffusionPipeline

    dm = load_diffusion(text_pipe)
    assert dm.text_conditioned and dm.conditional and dm.space == "pixel" and dm.num_classes is None
    pipe = DiffusionPipeline.from_pretrained(text_pipe, **NO_VAE)
    mine = encode_prompts(dm.text_encoder, dm.tokenizer, PROMPTS)
    assert mine.shape == (4, 8, 16)
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        empty, _ = pipe.encode_prompt([""], "cpu", 1, False)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    torch.testing.assert_close(dm.null_embedding, empty[0], rtol=0, atol=0)
    # the prompts reach the UNet: different prompts, different outputs; the empty prompt is the null input
    x, t = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((4,), 500)
    with torch.no_grad():
        out = denoise(dm.model, x, t, mine)
        ref = dm.model(x, t, encoder_hidden_states=theirs).sample
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert _mse(out[0], out[1]) > 1e-6


def test_progressive_text_pipeline(text_pipe, prompts_file, tmp_path):
    from diffusers import DDIMScheduler, DiffusionPipeline

    from distillkit.distill.diffusion import run_diffusion_distill

    cfg = DistillConfig.of(
        teacher=text_pipe,
        method="progressive",
        prompts=prompts_file,
        teacher_steps=16,
        target_steps=4,
        steps=20,
        **FAST,
    )
    out = tmp_path / "student"
    m = run_diffusion_distill(cfg, out=str(out))
    met = m["metrics"]
    assert [r["steps"] for r in met["rounds"]] == [8, 4]
    assert met["student_mse"] < 0.8 * met["baseline_mse"], met
    assert met["student_psnr"] > met["baseline_psnr"]
    assert m["extra"]["text_conditioned"] is True and m["extra"]["prompts"] == 4
    assert json.loads((out / "distillkit.json").read_text())["config"]["prompts"] == prompts_file

    # the artifact is a pipeline plain diffusers loads, with the teacher's text encoder and tokenizer unchanged
    pipe = DiffusionPipeline.from_pretrained(out, **NO_VAE)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    teacher = DiffusionPipeline.from_pretrained(text_pipe, **NO_VAE)
    for k, v in teacher.text_encoder.state_dict().items():
        torch.testing.assert_close(pipe.text_encoder.state_dict()[k], v, rtol=0, atol=0)
    assert pipe.tokenizer("red cat").input_ids == teacher.tokenizer("red cat").input_ids
    assert _mse(pipe.unet.conv_in.weight, teacher.unet.conv_in.weight) > 0  # the UNet is the trained student

    # the recorded MSE comes back from the reloaded pipeline: its own prompt encoding and scheduler loop
    dm = load_diffusion(text_pipe)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        noise, states = _eval_inputs(dm, cfg, embeds)
        ref = ddim_sample(dm.model, NoiseSchedule(dm.scheduler), noise, 16, states)
        pipe.scheduler.set_timesteps(4)
        x = noise
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(pipe.unet(x, t, encoder_hidden_states=states).sample, t, x).prev_sample
    assert _mse(x, ref) == pytest.approx(met["student_mse"], rel=1e-4)


def test_guidance_text_pipeline(text_pipe, prompts_file, tmp_path):
    """One evaluation per step, with the guidance-scale embedding, closer to the teacher's empty-prompt-guided
    samples than the teacher's own unguided pass."""
    from diffusers import UNet2DConditionModel

    from distillkit.distill.diffusion import run_diffusion_distill

    cfg = DistillConfig.of(
        teacher=text_pipe,
        method="guidance",
        prompts=prompts_file,
        teacher_steps=8,
        guidance_scale=7.0,
        steps=40,
        **{**FAST, "lr": 3e-4, "max_samples": 32},
    )
    out = tmp_path / "guided"
    met = run_diffusion_distill(cfg, out=str(out))["metrics"]
    assert met["student_mse"] < 0.8 * met["baseline_mse"], met
    model = UNet2DConditionModel.from_pretrained(out, subfolder="unet").eval()
    assert model.config.time_cond_proj_dim == 256 and model.config.cross_attention_dim == 16
    dm = load_diffusion(text_pipe)
    embeds = encode_prompts(dm.text_encoder, dm.tokenizer, PROMPTS)
    noise, states = _eval_inputs(dm, cfg, embeds)
    emb = guidance_embedding(torch.full((len(noise),), 7.0), 256)
    with torch.no_grad():
        # the reference by hand: classifier-free guidance with the empty prompt as the unconditional input
        sched = NoiseSchedule(dm.scheduler)
        ref = ddim_sample(dm.model, sched, noise, 8, states, guidance=(7.0, dm.null_embedding))
        mine = ddim_sample(model, sched, noise, 8, states, timestep_cond=emb)
        t = torch.full((len(noise),), 500)
        null = dm.null_embedding.expand_as(states)
        out_null = dm.model(noise, t, encoder_hidden_states=null).sample
        out_cond = dm.model(noise, t, encoder_hidden_states=states).sample
        from distillkit.models.diffusion import guided_output

        guided = guided_output(dm.model, noise, t, states, (7.0, dm.null_embedding))
    torch.testing.assert_close(guided, out_null + 7.0 * (out_cond - out_null), rtol=1e-5, atol=1e-5)
    assert _mse(mine, ref) == pytest.approx(met["student_mse"], rel=1e-4)


def test_text_errors(text_pipe, prompts_file, tmp_path, capsys):
    from distillkit.cli.app import main
    from distillkit.distill.diffusion import run_diffusion_distill

    out = tmp_path / "never"
    unet = tiny.tiny_unet(tmp_path / "unet")[1]
    labels = tmp_path / "labels.txt"
    labels.write_text("0\n")
    # a cross-attention UNet alone as a model directory, its scheduler beside it: no text encoder to encode with
    bare = tmp_path / "bare-unet"
    shutil.copytree(f"{text_pipe}/unet", bare)
    shutil.copy(f"{text_pipe}/scheduler/scheduler_config.json", bare)
    cases = [
        (dict(teacher=text_pipe, method="progressive", target_steps=4), ConfigError, "needs prompts"),
        (dict(teacher=text_pipe, method="progressive", target_steps=4, labels=str(labels)), ConfigError, "--labels"),
        (dict(teacher=unet, method="progressive", target_steps=4, prompts=prompts_file), ConfigError, "--prompts"),
        (dict(teacher=str(bare), method="progressive", target_steps=4), ModelError, "text_encoder"),
    ]
    for kwargs, err, text in cases:
        with pytest.raises(err, match=text) as e:
            run_diffusion_distill(DistillConfig.of(**kwargs), out=str(out))
        assert e.value.hint
        assert not out.exists()
    args = ["distill", "--teacher", text_pipe, "--method", "progressive", "--target-steps", "4", "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "needs prompts" in err and "--prompts FILE" in err
    assert not out.exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())
