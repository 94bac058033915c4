"""Flow-matching teachers (SD3Transformer2DModel + FlowMatchEulerDiscreteScheduler) in ``distill --method``:
the Euler solver against diffusers, every loss against a plain-torch re-derivation (values and gradients), and end
to end runs whose students beat the teacher at the same step count and reload with plain diffusers."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from distillkit.config import DistillConfig
from distillkit.errors import ConfigError, ModelError
from distillkit.models.diffusion import denoise, load_diffusion
from distillkit.models.flow import FlowSchedule, euler_sample, flow_sigmas
from tests import tiny
from tests.test_distill import flow_tiny

FAST = dict(batch_size=8, max_samples=32, eval_samples=16, warmup=0.0, lr=1e-3)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return flow_tiny.tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3"))[1]


@pytest.fixture(scope="module")
def sd3_model_dir(tmp_path_factory):
    return flow_tiny.tiny_sd3_model_dir(tmp_path_factory.mktemp("sd3m"))[1]


_eval_noise, _mse = flow_tiny.eval_noise, flow_tiny.mse


def _v(model, x, sigma):
    """Plain velocity: the transformer at timestep sigma * 1000 with zero text conditioning."""
    b = x.shape[0]
    cfg = model.config
    return model(
        x,
        encoder_hidden_states=torch.zeros(b, 1, cfg.joint_attention_dim),
        pooled_projections=torch.zeros(b, cfg.pooled_projection_dim),
        timestep=sigma * 1000,
    ).sample


def _perturbed(model, seed=5, scale=0.05):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


# --------------------------------------------------------------------------------------------
# Loading and the solver


def test_load_detects_flow(sd3, sd3_model_dir):
    for path, layout in ((sd3, "pipeline"), (sd3_model_dir, "model")):
        dm = load_diffusion(path)
        assert dm.flow and dm.layout == layout and dm.class_name == "SD3Transformer2DModel"
        assert dm.sample_shape == (4, 8, 8) and not dm.conditional
        assert dm.prediction_type.startswith("flow")


def test_euler_sample_matches_scheduler_and_pipeline(sd3):
    """distillkit's Euler solver = FlowMatchEulerDiscreteScheduler.step in a loop = the SD3 pipeline's own call."""
    dm = load_diffusion(sd3)
    sch = FlowSchedule(dm.scheduler)
    pipe = flow_tiny.load_pipeline(sd3)
    noise = torch.randn(3, *dm.sample_shape, generator=torch.Generator().manual_seed(0))
    for steps in (1, 3, 4):
        scheduler = copy.deepcopy(dm.scheduler)
        scheduler.set_timesteps(steps)
        x = noise
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(denoise(dm.model, x, t.expand(3)), t, x).prev_sample
            ours = euler_sample(dm.model, sch, noise, steps)
        torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours, flow_tiny.pipeline_sample(pipe, noise, steps), rtol=1e-5, atol=1e-5)
        assert flow_sigmas(dm.scheduler, steps) == pytest.approx(scheduler.sigmas.tolist())
    # the shift is applied: 3 steps of shift 3 are not the linear grid
    assert flow_sigmas(dm.scheduler, 3)[1] > 0.6


# --------------------------------------------------------------------------------------------
# Losses against plain torch


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_grads(got, model):
    assert got
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7)


def test_reflow_and_progressive_losses_match_plain_torch(sd3):
    from distillkit.distill.flow import progressive_flow_loss, reflow_loss, reflow_sigmas
    from distillkit.models.diffusion import copy_student

    dm = load_diffusion(sd3)
    sch = FlowSchedule(dm.scheduler)
    student = copy_student(dm)
    g = torch.Generator().manual_seed(1)
    noise, x0 = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)

    # reflow: straight velocity noise - x0 at x_s = (1 - s) x0 + s noise
    sigma = reflow_sigmas(sch, 4, 4, torch.Generator().manual_seed(2), "cpu")
    assert set(sigma[:2].tolist()) <= set(flow_sigmas(dm.scheduler, 4)[:-1])
    loss = reflow_loss(student, sch, noise, x0, sigma)
    loss.backward()
    got = _grads(student)
    student.zero_grad()
    s = sigma.view(-1, 1, 1, 1)
    ref = ((_v(student, (1 - s) * x0 + s * noise, sigma) - (noise - x0)) ** 2).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    _check_grads(got, student)
    student.zero_grad()

    # progressive: the velocity of one Euler step that lands on the teacher's two (midpoint) steps
    loss = progressive_flow_loss(student, dm.model, sch, x0, 2, torch.Generator().manual_seed(3))
    loss.backward()
    got = _grads(student)
    student.zero_grad()
    g = torch.Generator().manual_seed(3)
    i = torch.randint(2, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    grid = torch.tensor(flow_sigmas(dm.scheduler, 2))
    s0, s1 = grid[i], grid[i + 1]
    S0, S1, M = s0.view(-1, 1, 1, 1), s1.view(-1, 1, 1, 1), ((s0 + s1) / 2).view(-1, 1, 1, 1)
    x = (1 - S0) * x0 + S0 * eps
    with torch.no_grad():
        y = x + (M - S0) * _v(dm.model, x, s0)
        y = y + (S1 - M) * _v(dm.model, y, (s0 + s1) / 2)
    ref = ((_v(student, x, s0) - (y - x) / (S1 - S0)) ** 2).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    _check_grads(got, student)


def test_consistency_loss_matches_plain_torch(sd3):
    from distillkit.distill.flow import flow_consistency_loss
    from distillkit.models.diffusion import copy_student

    dm = load_diffusion(sd3)
    sch = FlowSchedule(dm.scheduler)
    student = copy_student(dm)
    target = _perturbed(student).requires_grad_(False)
    x0 = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    loss = flow_consistency_loss(student, target, dm.model, sch, x0, 4, torch.Generator().manual_seed(5))
    loss.backward()
    got = _grads(student)
    student.zero_grad()
    g = torch.Generator().manual_seed(5)
    n = torch.randint(4, (5,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    grid = torch.tensor(flow_sigmas(dm.scheduler, 4))
    s0, s1 = grid[n], grid[n + 1]
    S0, S1 = s0.view(-1, 1, 1, 1), s1.view(-1, 1, 1, 1)
    x = (1 - S0) * x0 + S0 * eps
    with torch.no_grad():
        x1 = x + (S1 - S0) * _v(dm.model, x, s0)
        tgt = x1 - S1 * _v(target, x1, s1)  # f(x, 0) = x where s1 = 0
    ref = ((x - S0 * _v(student, x, s0) - tgt) ** 2).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    _check_grads(got, student)


def test_dmd_gradient_fake_score_and_backward_simulation(sd3):
    """The DMD loss's gradient on the generator's samples is the normalised (fake - real) x0 difference; the fake
    score learns flow matching on them; backward simulation is the generator's own first k Euler steps."""
    from distillkit.distill.flow import backward_simulate, dmd_loss, fake_score_loss

    dm = load_diffusion(sd3)
    sch = FlowSchedule(dm.scheduler)
    fake = _perturbed(dm.model)
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(3, 4, 8, 8, generator=g).requires_grad_(True)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.9, 0.5, 0.1])
    loss = dmd_loss(x0, dm.model, fake, sch, sigma, noise)
    loss.backward()
    S = sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        x = (1 - S) * x0 + S * noise
        real = x - S * _v(dm.model, x, sigma)
        fk = x - S * _v(fake, x, sigma)
        grad = (fk - real) / (x0 - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(x0.grad, grad / x0.numel(), rtol=1e-5, atol=1e-9)
    assert float(grad.abs().max()) > 0
    torch.testing.assert_close(loss, 0.5 * (grad**2).mean())

    fake.requires_grad_(True)
    lf = fake_score_loss(fake, sch, x0.detach(), sigma, noise)
    lf.backward()
    got = _grads(fake)
    fake.zero_grad()
    ref = ((_v(fake, (1 - S) * x0.detach() + S * noise, sigma) - (noise - x0.detach())) ** 2).mean()
    ref.backward()
    torch.testing.assert_close(lf, ref)
    _check_grads(got, fake)

    sigmas = flow_sigmas(dm.scheduler, 4)
    k = torch.tensor([0, 2, 3])
    state, s_k = backward_simulate(dm.model, sch, noise, k, sigmas)
    assert s_k.tolist() == pytest.approx([sigmas[0], sigmas[2], sigmas[3]])
    for row, kk in enumerate(k.tolist()):
        with torch.no_grad():
            x = noise[row : row + 1]
            for j in range(kk):
                x = x + (sigmas[j + 1] - sigmas[j]) * _v(dm.model, x, torch.tensor([sigmas[j]]))
        torch.testing.assert_close(state[row : row + 1], x, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# End to end


def _pipeline_round_trip(out, dm, cfg, met):
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    pipe = flow_tiny.load_pipeline(out)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    noise = _eval_noise(dm, cfg)
    with torch.no_grad():
        ref = euler_sample(dm.model, FlowSchedule(dm.scheduler), noise, cfg.diffusion.teacher_steps)
    mine = flow_tiny.pipeline_sample(pipe, noise, cfg.diffusion.target_steps)
    assert _mse(mine, ref) == pytest.approx(met["student_mse"], rel=1e-4)


def test_reflow_pipeline_beats_teacher_and_round_trips(sd3, tmp_path):
    from distillkit.distill.diffusion import run_diffusion_distill

    cfg = DistillConfig.of(teacher=sd3, method="reflow", teacher_steps=16, target_steps=1, steps=25, **FAST)
    out = tmp_path / "reflow"
    m = run_diffusion_distill(cfg, out=str(out))
    met = m["metrics"]
    assert met["student_mse"] < 0.5 * met["baseline_mse"], met
    assert m["extra"]["scheduler"] == "FlowMatchEulerDiscreteScheduler" and m["extra"]["num_inference_steps"] == 1
    _pipeline_round_trip(out, load_diffusion(sd3), cfg, met)
    assert "prompt_embeds" in (out / "README.md").read_text()


def test_dmd_student_beats_teacher_at_same_steps(sd3_model_dir, tmp_path):
    """A 1-step DMD2 generator (fake score, two-timescale rule, regression on teacher pairs) beats the teacher's
    own single step; the model directory reloads with plain diffusers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from distillkit.distill.diffusion import run_diffusion_distill

    cfg = DistillConfig.of(
        teacher=sd3_model_dir, method="dmd", teacher_steps=16, target_steps=1, steps=8, alpha=0.5, **FAST
    )
    out = tmp_path / "dmd"
    met = run_diffusion_distill(cfg, out=str(out))["metrics"]
    assert met["student_mse"] < 0.7 * met["baseline_mse"], met
    rnd = met["rounds"][0]
    assert rnd["fake_updates_per_step"] == 5 and set(rnd["final_loss_parts"]) == {"dmd", "regression"}
    model = SD3Transformer2DModel.from_pretrained(out).eval()
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    dm = load_diffusion(sd3_model_dir)
    assert sched.config.shift == dm.scheduler.config.shift
    noise = _eval_noise(dm, cfg)
    with torch.no_grad():
        ref = euler_sample(dm.model, FlowSchedule(dm.scheduler), noise, 16)
        mine = euler_sample(model, FlowSchedule(sched), noise, 1)
    assert _mse(mine, ref) == pytest.approx(met["student_mse"], rel=1e-4)


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_progressive_and_consistency_for_flows(sd3, tmp_path, method):
    from distillkit.distill.diffusion import run_diffusion_distill

    cfg = DistillConfig.of(teacher=sd3, method=method, teacher_steps=8, target_steps=4, steps=15, **FAST)
    out = tmp_path / method
    met = run_diffusion_distill(cfg, out=str(out))["metrics"]
    assert [r["steps"] for r in met["rounds"]] == ([4] if method == "progressive" else [4])
    assert met["student_mse"] < 0.8 * met["baseline_mse"], met
    _pipeline_round_trip(out, load_diffusion(sd3), cfg, met)


# --------------------------------------------------------------------------------------------
# Errors


def test_flow_errors(sd3, tmp_path):
    from distillkit.distill.diffusion import run_diffusion_distill

    _, unet = tiny.tiny_unet(tmp_path / "unet")
    out = tmp_path / "never"
    cases = [
        (dict(teacher=sd3, method="guidance"), ConfigError, "flow-matching"),
        (dict(teacher=unet, method="reflow", target_steps=2), ConfigError, "flow-matching teachers"),
        (dict(teacher=unet, method="dmd", target_steps=2), ConfigError, "flow-matching teachers"),
        (dict(teacher=sd3, method="reflow", target_steps=2, alpha=0.5), ConfigError, "--alpha"),
        (dict(teacher=sd3, method="dmd"), ConfigError, "--target-steps"),
    ]
    for kwargs, err, text in cases:
        with pytest.raises(err, match=text) as e:
            run_diffusion_distill(DistillConfig.of(**kwargs), out=str(out))
        assert e.value.hint
        assert not out.exists()
    with pytest.raises(ConfigError, match="reflow, dmd"):
        DistillConfig.of(teacher=sd3, method="rectified")


def test_unsupported_flow_setups_are_refused(tmp_path):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    _, path = flow_tiny.tiny_sd3_model_dir(tmp_path / "a")
    FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).save_pretrained(f"{path}/scheduler")
    with pytest.raises(ModelError, match="use_dynamic_shifting"):
        load_diffusion(path)
    DDIMScheduler().save_pretrained(f"{path}/scheduler")
    with pytest.raises(ModelError, match="pairs a SD3Transformer2DModel with a DDIMScheduler"):
        load_diffusion(path)
    _, pipe = flow_tiny.tiny_sd3_pipeline(tmp_path / "b")
    index = json.loads((tmp_path / "b" / "sd3" / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "CLIPTextModelWithProjection"]
    (tmp_path / "b" / "sd3" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="text-conditioned flow pipeline") as e:
        load_diffusion(pipe)
    assert e.value.hint


def test_cli_reflow(sd3, tmp_path, capsys):
    from distillkit.cli.app import main

    out = tmp_path / "cli"
    args = ["distill", "--teacher", sd3, "--method", "reflow", "--teacher-steps", "4", "--target-steps", "2"]
    assert main([*args, "--steps", "2", "--max-samples", "8", "--eval-samples", "4", "--out", str(out)]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][-1]
    assert json.loads(line)["metrics"]["student_steps"] == 2
    assert main(["distill", "--teacher", sd3, "--method", "guidance", "--out", str(tmp_path / "x")]) == 1
    assert "flow-matching" in capsys.readouterr().err
