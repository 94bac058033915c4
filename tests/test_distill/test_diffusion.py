"""Diffusion distillation (progressive, consistency, guidance) on tiny UNet / DiT teachers built from configs.

The teachers are random, but each still defines a deterministic DDIM ODE, so "the K-step student is closer to
the teacher's N-step samples than the teacher itself at K steps" is a real comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distillkit.config import DistillConfig
from distillkit.errors import ConfigError, DataError, ModelError
from distillkit.models.diffusion import (
    NoiseSchedule,
    ddim_pairs,
    ddim_sample,
    ddim_sampler_config,
    denoise,
    guidance_embedding,
    label_range,
    load_diffusion,
)
from tests import tiny

FAST = dict(batch_size=16, max_samples=64, eval_samples=16, warmup=0.0, lr=1e-3)


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    return tiny.tiny_unet(tmp_path_factory.mktemp("unet"))[1]


@pytest.fixture(scope="module")
def unet_cond(tmp_path_factory):
    return tiny.tiny_unet_class_cond(tmp_path_factory.mktemp("unet-cond"))[1]


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return tiny.tiny_dit(tmp_path_factory.mktemp("dit"))[1]


def _eval_inputs(dm, cfg):
    """The noise and labels the engine's evaluation draws (seed + 1)."""
    gen = torch.Generator().manual_seed(cfg.optim.seed + 1)
    noise = torch.randn(cfg.diffusion.eval_samples, *dm.sample_shape, generator=gen)
    labels = None
    if dm.conditional:
        ids = torch.arange(label_range(dm))
        labels = ids[torch.randint(len(ids), (cfg.diffusion.eval_samples,), generator=gen)]
    return noise, labels


def _scheduler_loop(model, scheduler, noise, steps, labels, timestep_cond=None, generator=None):
    """Plain diffusers sampling: what a user does with the saved model and scheduler."""
    scheduler.set_timesteps(steps)
    x = noise
    for t in scheduler.timesteps:
        out = denoise(model, x, t.expand(x.shape[0]), labels, timestep_cond)
        x = (
            scheduler.step(out, t, x, generator=generator).prev_sample
            if generator
            else scheduler.step(out, t, x).prev_sample
        )
    return x


def _mse(a, b):
    return float(((a.double() - b.double()) ** 2).mean())


# --------------------------------------------------------------------------------------------
# The solver and the pieces of the losses against diffusers' own implementations


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_sample_matches_ddim_scheduler(tmp_path, prediction_type):
    from diffusers import DDIMScheduler

    _, path = tiny.tiny_unet(tmp_path, prediction_type=prediction_type)
    dm = load_diffusion(path)
    noise = torch.randn(3, *dm.sample_shape, generator=torch.Generator().manual_seed(0))
    for steps in (3, 4, 7):
        with torch.no_grad():
            ours = ddim_sample(dm.model, NoiseSchedule(dm.scheduler), noise, steps)
            ref = _scheduler_loop(
                dm.model, DDIMScheduler.from_config(ddim_sampler_config(dm.scheduler)), noise, steps, None
            )
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    sched = DDIMScheduler.from_config(ddim_sampler_config(dm.scheduler))
    sched.set_timesteps(7)
    assert [t for t, _ in ddim_pairs(1000, 7)] == sched.timesteps.tolist()


def test_progressive_target_is_two_teacher_steps(unet):
    """One DDIM step t -> prev with the target x0 lands exactly where the teacher's two steps land."""
    from diffusers import DDIMScheduler

    from distillkit.distill.diffusion import progressive_target

    dm = load_diffusion(unet)
    sch = NoiseSchedule(dm.scheduler)
    x_t = torch.randn(4, *dm.sample_shape, generator=torch.Generator().manual_seed(1))
    i = torch.tensor([0, 1, 2, 3])
    t, prev, target = progressive_target(dm.model, sch, x_t, i, 4, None)
    eps = (x_t - sch.alpha(t).sqrt() * target) / (1 - sch.alpha(t)).sqrt()
    one_step = sch.ddim(target, eps, prev)
    ddim = DDIMScheduler.from_config(ddim_sampler_config(dm.scheduler))
    ddim.set_timesteps(8)
    for row in range(4):
        x = x_t[row : row + 1]
        with torch.no_grad():
            for t8 in ddim.timesteps[2 * row : 2 * row + 2]:
                x = ddim.step(denoise(dm.model, x, t8.expand(1)), t8, x).prev_sample
        torch.testing.assert_close(one_step[row : row + 1], x, rtol=1e-4, atol=1e-4)


def test_progressive_loss_value_and_gradient(unet):
    """The loss against a plain re-derivation (x0 from v, truncated-SNR weight), values and gradients."""
    from distillkit.distill.diffusion import progressive_loss, progressive_target
    from distillkit.models.diffusion import copy_student

    dm = load_diffusion(unet)
    sch = NoiseSchedule(dm.scheduler)
    student = copy_student(dm)
    x0 = torch.randn(4, *dm.sample_shape, generator=torch.Generator().manual_seed(2))
    loss = progressive_loss(student, dm.model, sch, x0, None, 4, torch.Generator().manual_seed(3))
    loss.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    # the reference draws the same index and noise
    g = torch.Generator().manual_seed(3)
    i = torch.randint(4, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    ac = dm.scheduler.alphas_cumprod
    t = torch.tensor([ddim_pairs(1000, 4)[k][0] for k in i.tolist()])
    a = ac[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    _, _, target = progressive_target(dm.model, sch, x_t, i, 4, None)
    v = student(x_t, t).sample
    pred = a.sqrt() * x_t - (1 - a).sqrt() * v
    ref = (torch.maximum(a / (1 - a), torch.ones_like(a)) * (pred - target) ** 2).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    for n, p in student.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7)


def test_consistency_scalings_and_guidance_embedding_match_diffusers():
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    from distillkit.distill.diffusion import boundary_scalings

    lcm = LCMScheduler()
    t = torch.tensor([0, 1, 19, 499, 999])
    c_skip, c_out = boundary_scalings(t, lcm.config.timestep_scaling)
    for k, tk in enumerate(t.tolist()):
        rs, ro = lcm.get_scalings_for_boundary_condition_discrete(tk)
        assert c_skip[k].item() == pytest.approx(float(rs), rel=1e-6)
        assert c_out[k].item() == pytest.approx(float(ro), rel=1e-6, abs=1e-12)
    w = torch.tensor([1.0, 2.5, 7.5])
    for dim in (256, 7):
        ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=dim)
        torch.testing.assert_close(guidance_embedding(w, dim), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# End to end: the student beats the teacher at the same small cost, and reloads without distillkit


def test_progressive_unet(unet, tmp_path):
    from diffusers import DDIMScheduler, UNet2DModel

    from distillkit.distill.diffusion import run_diffusion_distill

    cfg = DistillConfig.of(teacher=unet, method="progressive", teacher_steps=16, target_steps=4, steps=20, **FAST)
    out = tmp_path / "student"
    m = run_diffusion_distill(cfg, out=str(out), overwrite=False)
    met = m["metrics"]
    assert [r["steps"] for r in met["rounds"]] == [8, 4]
    assert met["student_mse"] < 0.8 * met["baseline_mse"], met
    assert met["student_psnr"] > met["baseline_psnr"]
    # reload with plain diffusers and sample with the saved scheduler: the recorded numbers come back
    model = UNet2DModel.from_pretrained(out).eval()
    sched = DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    assert sched.config.timestep_spacing == "trailing"
    assert m["extra"]["num_inference_steps"] == 4
    dm = load_diffusion(unet)
    noise, _ = _eval_inputs(dm, cfg)
    with torch.no_grad():
        ref = ddim_sample(dm.model, NoiseSchedule(dm.scheduler), noise, 16)
        mine = _scheduler_loop(model, sched, noise, 4, None)
    assert _mse(mine, ref) == pytest.approx(met["student_mse"], rel=1e-4)
    manifest = json.loads((out / "distillkit.json").read_text())
    assert manifest["stage"] == "distill" and manifest["config"]["method"] == "progressive"
    assert "diffusers" in (out / "README.md").read_text()


def test_consistency_dit_class_conditional(dit, tmp_path):
    from diffusers import DiTTransformer2DModel, LCMScheduler

    from distillkit.distill.diffusion import consistency_sample, lcm_timesteps, run_diffusion_distill

    cfg = DistillConfig.of(teacher=dit, method="consistency", teacher_steps=16, target_steps=2, steps=40, **FAST)
    out = tmp_path / "lcm"
    met = run_diffusion_distill(cfg, out=str(out))["metrics"]
    assert met["student_mse"] < 0.8 * met["baseline_mse"], met
    model = DiTTransformer2DModel.from_pretrained(out).eval()
    sched = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    assert sched.config.original_inference_steps == 16
    dm = load_diffusion(dit)
    noise, labels = _eval_inputs(dm, cfg)
    ts = lcm_timesteps(dict(sched.config), 2, 16)
    assert ts == met["lcm_timesteps"]
    with torch.no_grad():
        ref = ddim_sample(dm.model, NoiseSchedule(dm.scheduler), noise, 16, labels)
        mine = consistency_sample(model, NoiseSchedule(sched), noise, ts, labels, sched.config.timestep_scaling)
        # LCMScheduler's own step gives the same first-step denoised sample (its multistep adds fresh noise)
        sched.set_timesteps(2)
        t0 = sched.timesteps[0]
        lcm_first = sched.step(denoise(model, noise, t0.expand(len(noise)), labels), t0, noise).denoised
        ours_first = consistency_sample(model, NoiseSchedule(sched), noise, ts[:1], labels, 10.0)
    assert _mse(mine, ref) == pytest.approx(met["student_mse"], rel=1e-4)
    torch.testing.assert_close(lcm_first, ours_first, rtol=1e-4, atol=1e-5)


def test_guidance_unet_class_conditional(unet_cond, tmp_path):
    from diffusers import UNet2DConditionModel

    from distillkit.distill.diffusion import run_diffusion_distill

    cfg = DistillConfig.of(teacher=unet_cond, method="guidance", teacher_steps=8, guidance_scale=3.0, steps=40, **FAST)
    out = tmp_path / "guided"
    met = run_diffusion_distill(cfg, out=str(out))["metrics"]
    # one evaluation per step, closer to the guided teacher than the teacher's own unguided single pass
    assert met["student_mse"] < 0.8 * met["baseline_mse"], met
    model = UNet2DConditionModel.from_pretrained(out).eval()
    assert model.config.time_cond_proj_dim == 256
    dm = load_diffusion(unet_cond)
    noise, labels = _eval_inputs(dm, cfg)
    assert int(labels.max()) < 4  # the null class 4 is never sampled as a class
    emb = guidance_embedding(torch.full((len(noise),), 3.0), 256)
    with torch.no_grad():
        ref = ddim_sample(dm.model, NoiseSchedule(dm.scheduler), noise, 8, labels, guidance=(3.0, dm.null_class))
        mine = ddim_sample(model, NoiseSchedule(dm.scheduler), noise, 8, labels, timestep_cond=emb)
    assert _mse(mine, ref) == pytest.approx(met["student_mse"], rel=1e-4)


def test_pipeline_directory_round_trip(tmp_path):
    from diffusers import DDIMScheduler, DDPMPipeline, DiffusionPipeline

    from distillkit.distill.diffusion import run_diffusion_distill

    model, path = tiny.tiny_unet(tmp_path / "unet")
    pipe_dir = tmp_path / "pipe"
    DDPMPipeline(unet=model, scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler")).save_pretrained(
        pipe_dir
    )
    cfg = DistillConfig.of(
        teacher=str(pipe_dir), method="progressive", teacher_steps=8, target_steps=4, steps=3, **FAST
    )
    out = tmp_path / "out"
    run_diffusion_distill(cfg, out=str(out))
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "DDPMPipeline" and type(pipe.scheduler).__name__ == "DDIMScheduler"
    images = pipe(batch_size=1, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0))
    assert images.images.shape == (1, 8, 8, 3)


# --------------------------------------------------------------------------------------------
# Errors: one line with a hint, no output left behind


def test_errors(unet, unet_cond, dit, llama, tmp_path):
    from distillkit.distill.diffusion import run_diffusion_distill

    out = tmp_path / "never"
    cases = [
        (dict(teacher=unet, method="guidance"), ConfigError, "conditional"),
        (dict(teacher=dit, method="guidance"), ConfigError, "time_cond_proj_dim"),
        (dict(teacher=unet, method="progressive", teacher_steps=12, target_steps=4), ConfigError, "power of two"),
        (dict(teacher=unet, method="consistency"), ConfigError, "--target-steps"),
        (dict(teacher=unet), ConfigError, "which distillation"),
        (dict(teacher=llama[1], method="progressive", target_steps=4), ModelError, "not one"),
        (dict(teacher=unet, method="progressive", target_steps=4, data="x.txt"), ConfigError, "data-free"),
    ]
    labels = tmp_path / "labels.txt"
    labels.write_text("0\n9\n")
    cases.append((dict(teacher=dit, method="progressive", target_steps=4, labels=str(labels)), DataError, "outside"))
    for kwargs, err, text in cases:
        with pytest.raises(err, match=text) as e:
            run_diffusion_distill(DistillConfig.of(**kwargs), out=str(out))
        assert e.value.hint
        assert not out.exists()
    with pytest.raises(ConfigError, match="not below"):
        DistillConfig.of(teacher=unet, method="progressive", teacher_steps=8, target_steps=8)
    assert not any(p.name.startswith(".never") for p in Path(tmp_path).iterdir())


def test_cli_dispatch_and_exit_code(unet, tmp_path, capsys):
    from distillkit.cli.app import main

    assert main(["distill", "--teacher", unet, "--method", "guidance", "--out", str(tmp_path / "x")]) == 1
    assert "conditional" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    out = tmp_path / "ok"
    args = ["distill", "--teacher", unet, "--method", "progressive", "--teacher-steps", "4", "--target-steps", "2"]
    assert main([*args, "--steps", "2", "--max-samples", "8", "--eval-samples", "4", "--out", str(out)]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][-1]
    assert json.loads(line)["metrics"]["student_steps"] == 2


def test_sparse_attention_student(tmp_path):
    """The student trains and is evaluated with block-sparse self-attention; setting the same processor on the
    reloaded model reproduces the recorded numbers, and the dense model gives different samples."""
    from diffusers import DDIMScheduler, UNet2DModel

    from distillkit.distill.denoise_training import apply_sparse_attention
    from distillkit.distill.diffusion import run_diffusion_distill
    from distillkit.models.diffusion import copy_student

    # attention at the 8x8 level: 64 tokens, 4 blocks of 16, top-50% keeps 2 key blocks per query block
    _, path = tiny.tiny_unet(
        tmp_path / "t",
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
    )
    cfg = DistillConfig.of(
        teacher=path,
        method="progressive",
        teacher_steps=8,
        target_steps=4,
        steps=30,
        sparse_attention="topk:0.5",
        sparse_block_size=16,
        **{**FAST, "lr": 3e-4},
    )
    out = tmp_path / "sparse"
    m = run_diffusion_distill(cfg, out=str(out))
    assert m["extra"]["sparse_attention"] == {"spec": "topk:0.5", "block_size": 16}
    met = m["metrics"]
    model = UNet2DModel.from_pretrained(out).eval()
    sched = DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    dm = load_diffusion(path)
    noise, _ = _eval_inputs(dm, cfg)
    with torch.no_grad():
        ref = ddim_sample(dm.model, NoiseSchedule(dm.scheduler), noise, 8)
        dense = _scheduler_loop(model, sched, noise, 4, None)
        apply_sparse_attention(model, ("topk:0.5", 16))
        sparse = _scheduler_loop(model, sched, noise, 4, None)
        untrained = copy_student(dm)
        apply_sparse_attention(untrained, ("topk:0.5", 16))
        before = _scheduler_loop(untrained, sched, noise, 4, None)
    assert _mse(sparse, ref) == pytest.approx(met["student_mse"], rel=1e-4)
    assert _mse(sparse, dense) > 1e-8
    # sparsity costs accuracy that a few CPU steps do not fully buy back, but distillation must recover some
    assert met["student_mse"] < _mse(before, ref)
