"""Step distillation of flow-matching teachers (``SD3Transformer2DModel``, ``FluxTransformer2DModel``, or the video
``WanTransformer3DModel``, with ``FlowMatchEulerDiscreteScheduler``); samples are images [B, C, H, W] or videos [B, C, F, H, W] alike.

Data-free, as for DDPM-family teachers: the pool is ``--max-samples`` pairs (noise, the teacher's
``--teacher-steps``-step Euler sample from it). Every student samples with plain Euler on the saved scheduler's
``--target-steps``-step sigma grid (``FlowMatchEulerDiscreteScheduler.set_timesteps(K)``, shift included), so a
DiffusionPipeline loaded from the artifact reproduces the recorded numbers. Notation: ``x_s = (1 - s) x0 + s eps``,
velocity ``v = eps - x0``, ``x0 = x - s v``.

- ``progressive``: each round the student learns to do in one Euler step ``s_i -> s_{i+1}`` of the K-step grid what
  the round's teacher does in two (through the midpoint sigma); target velocity ``(x'' - x) / (s_{i+1} - s_i)``,
  MSE on velocities. Rounds halve ``--teacher-steps`` until ``--target-steps``.
- ``reflow`` (rectified flow, Liu et al. 2023): the student regresses the straight velocity ``eps - x0`` of the
  teacher's own (noise, sample) pairs at ``x_s``; half of each batch at the K-step grid's sigmas (the points the
  student will be evaluated at), half at shifted-uniform sigmas.
- ``consistency`` (consistency distillation for flows): ``f(x, s) = x - s v(x, s)`` (``f(x, 0) = x`` by
  construction) at ``(x_{s_n}, s_n)`` of the teacher's grid matches an EMA copy of itself at the teacher's Euler
  step ``(x_{s_{n+1}}, s_{n+1})``; MSE. Multistep consistency sampling that re-noises with the implied noise is
  Euler, so the student samples with the Euler scheduler.
- ``dmd`` (DMD2, Yin et al. 2024): a K-step generator (initialised from the teacher) and a trainable fake-score copy
  of the teacher. Generator inputs come from backward simulation (the generator's own first ``k`` Euler steps from
  noise, ``k`` uniform in 0..K-1, no gradient), its output ``x0^ = x_k - s_k v_G``. Distribution-matching
  gradient at ``x_t = (1 - t) x0^ + t eps'``, ``t`` the shifted ``U[0.02, 0.98]``:
  ``g = (x0_fake - x0_real) / mean|x0^ - x0_real|`` with ``x0_*`` the fake score's and the teacher's x0
  predictions, loss ``0.5 |x0^ - sg(x0^ - g)|^2`` (mean). Two-timescale rule: :data:`DMD_FAKE_UPDATES` fake-score
  updates (flow matching on the generator's detached samples) per generator update. ``--alpha`` > 0 adds the
  regression term ``alpha * |x0^(x_k) - x0|^2`` on the teacher's pairs (``x_k`` on the pair's straight path at the
  generator's step ``k``; ``k = 0`` is DMD's one-step regression).
"""

from __future__ import annotations

from typing import Any

import torch

from distillkit.distill.denoise_training import (
    ProgressBar,
    apply_sparse_attention,
    ms_per_call,
    sample_errors,
    train_student,
    trainable_copy,
)
from distillkit.models.diffusion import copy_student
from distillkit.models.flow import FlowSchedule, euler_sample, per_sample, velocity

POOL_BATCH = 64
EMA_DECAY = 0.95
DMD_FAKE_UPDATES = 5  # DMD2's two-timescale update rule: fake-score updates per generator update
DMD_T_RANGE = (0.02, 0.98)  # DMD2's min/max step, as fractions of the noise path
FLOW_METHODS = ("progressive", "reflow", "consistency", "dmd")


def _randn(shape: Any, gen: torch.Generator, device: Any) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=gen).to(device)


def _rand(n: int, gen: torch.Generator, device: Any) -> torch.Tensor:
    return torch.rand(n, generator=gen).to(device)


def _grid(sigmas: list[float], idx: torch.Tensor) -> torch.Tensor:
    return torch.tensor(sigmas, dtype=torch.float32, device=idx.device)[idx]


@torch.no_grad()
def flow_pool(dm: Any, schedule: FlowSchedule, size: int, steps: int, gen: torch.Generator, device: Any):
    """``size`` (noise, teacher sample) pairs [P, C, H, W] each, from ``steps`` Euler steps of the teacher."""
    noises, xs = [], []
    sigmas = schedule.sigmas(steps)
    with ProgressBar("teacher samples", size, unit="sample") as bar:
        for start in range(0, size, POOL_BATCH):
            b = min(POOL_BATCH, size - start)
            noise = _randn((b, *dm.sample_shape), gen, device)
            noises.append(noise)
            xs.append(euler_sample(dm.model, schedule, noise, sigmas))
            bar.update(start + b)
    return torch.cat(noises), torch.cat(xs)


def _pairs(pool: tuple[torch.Tensor, torch.Tensor], bs: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    idx = torch.randint(len(pool[0]), (bs,), generator=gen).to(pool[0].device)
    return pool[0][idx], pool[1][idx]


# --------------------------------------------------------------------------------------------
# progressive


def progressive_flow_target(teacher: Any, schedule: FlowSchedule, x: torch.Tensor, s: torch.Tensor, s_next):
    """The velocity whose one Euler step ``s -> s_next`` lands where the teacher's two Euler steps (through the
    midpoint sigma) land, [B, C, H, W]."""
    mid = (s + s_next) / 2
    with torch.no_grad():
        y = schedule.euler(x, velocity(teacher, schedule, x, s), s, mid)
        y = schedule.euler(y, velocity(teacher, schedule, y, mid), mid, s_next)
    return (y - x) / per_sample(s_next - s, x)


def progressive_flow_loss(student, teacher, schedule: FlowSchedule, x0, steps: int, gen) -> torch.Tensor:
    """One batch of flow progressive distillation for a ``steps``-step student (scalar)."""
    sigmas = schedule.sigmas(steps)
    i = torch.randint(steps, (x0.shape[0],), generator=gen).to(x0.device)
    s, s_next = _grid(sigmas, i), _grid(sigmas, i + 1)
    x = schedule.add_noise(x0, _randn(x0.shape, gen, x0.device), s)
    target = progressive_flow_target(teacher, schedule, x, s, s_next)
    return ((velocity(student, schedule, x, s) - target) ** 2).mean()


def run_progressive(cfg, dm, schedule, pool, gen, sparse):
    teacher, steps, rounds = dm.model, cfg.diffusion.teacher_steps, []
    while steps > cfg.diffusion.target_steps:
        steps //= 2
        student = copy_student(dm) if teacher is dm.model else trainable_copy(teacher)
        apply_sparse_attention(student, sparse)

        def loss_fn(_step: int, student=student, teacher=teacher, steps=steps) -> torch.Tensor:
            _, x0 = _pairs(pool, cfg.optim.batch_size, gen)
            return progressive_flow_loss(student, teacher, schedule, x0, steps, gen)

        losses = train_student(student, loss_fn, cfg, f"progressive {steps * 2}->{steps}")
        rounds.append({"steps": steps, "first_loss": losses[0], "final_loss": losses[-1]})
        teacher = student.requires_grad_(False)
    return teacher, rounds


# --------------------------------------------------------------------------------------------
# reflow


def reflow_sigmas(schedule: FlowSchedule, steps: int, b: int, gen, device) -> torch.Tensor:
    """Training sigmas [B]: the first half from the ``steps``-step grid (without its final 0), the rest shifted
    uniform in (0, 1]."""
    grid = schedule.sigmas(steps)[:-1]
    half = b // 2
    on_grid = _grid(grid, torch.randint(len(grid), (half,), generator=gen).to(device))
    u = 1 - _rand(b - half, gen, device)  # (0, 1]
    return torch.cat([on_grid, schedule.shift(u)])


def reflow_loss(student, schedule: FlowSchedule, noise, x0, sigma) -> torch.Tensor:
    """Rectified-flow loss: the student's velocity at ``x_s`` of the pair (noise, x0) against ``noise - x0``."""
    x = schedule.add_noise(x0, noise, sigma)
    return ((velocity(student, schedule, x, sigma) - (noise - x0)) ** 2).mean()


def run_reflow(cfg, dm, schedule, pool, gen, sparse):
    student = copy_student(dm)
    apply_sparse_attention(student, sparse)

    def loss_fn(_step: int) -> torch.Tensor:
        noise, x0 = _pairs(pool, cfg.optim.batch_size, gen)
        sigma = reflow_sigmas(schedule, cfg.diffusion.target_steps, len(x0), gen, x0.device)
        return reflow_loss(student, schedule, noise, x0, sigma)

    losses = train_student(student, loss_fn, cfg, "reflow")
    return student, [{"steps": cfg.diffusion.target_steps, "first_loss": losses[0], "final_loss": losses[-1]}]


# --------------------------------------------------------------------------------------------
# consistency


def flow_consistency_fn(model, schedule: FlowSchedule, x, sigma) -> torch.Tensor:
    """``f(x, s) = x - s v(x, s)`` [B, C, H, W]: the x0 prediction, ``x`` itself at ``s = 0``."""
    return schedule.x0_eps(velocity(model, schedule, x, sigma), x, sigma)[0]


def flow_consistency_loss(student, target_net, teacher, schedule: FlowSchedule, x0, n_steps: int, gen):
    """One batch of consistency distillation on the teacher's ``n_steps``-step grid (scalar)."""
    sigmas = schedule.sigmas(n_steps)
    n = torch.randint(n_steps, (x0.shape[0],), generator=gen).to(x0.device)
    s, s_next = _grid(sigmas, n), _grid(sigmas, n + 1)
    x = schedule.add_noise(x0, _randn(x0.shape, gen, x0.device), s)
    with torch.no_grad():
        x_next = schedule.euler(x, velocity(teacher, schedule, x, s), s, s_next)
        target = flow_consistency_fn(target_net, schedule, x_next, s_next)
    return ((flow_consistency_fn(student, schedule, x, s) - target) ** 2).mean()


def run_consistency(cfg, dm, schedule, pool, gen, sparse):
    student = copy_student(dm)
    apply_sparse_attention(student, sparse)
    target_net = trainable_copy(student).requires_grad_(False)

    def ema() -> None:
        with torch.no_grad():
            for pt, ps in zip(target_net.parameters(), student.parameters(), strict=True):
                pt.lerp_(ps, 1 - EMA_DECAY)

    def loss_fn(_step: int) -> torch.Tensor:
        _, x0 = _pairs(pool, cfg.optim.batch_size, gen)
        return flow_consistency_loss(student, target_net, dm.model, schedule, x0, cfg.diffusion.teacher_steps, gen)

    losses = train_student(student, loss_fn, cfg, "consistency", on_step=ema)
    return student, [{"steps": cfg.diffusion.target_steps, "first_loss": losses[0], "final_loss": losses[-1]}]


# --------------------------------------------------------------------------------------------
# DMD


def backward_simulate(generator, schedule: FlowSchedule, noise, k: torch.Tensor, sigmas: list[float]):
    """The generator's own state at grid step ``k`` [B] of its ``len(sigmas) - 1``-step Euler run from ``noise``
    (no gradient), and that step's sigma [B]."""
    x = noise
    b = x.shape[0]
    with torch.no_grad():
        for j in range(int(k.max()) if b else 0):
            s = torch.full((b,), sigmas[j], device=x.device)
            moved = schedule.euler(x, velocity(generator, schedule, x, s), s, torch.full_like(s, sigmas[j + 1]))
            x = torch.where(per_sample(k > j, x), moved, x)
    return x, _grid(sigmas, k)


def dmd_sigmas(schedule: FlowSchedule, b: int, gen, device) -> torch.Tensor:
    lo, hi = DMD_T_RANGE
    return schedule.shift(lo + (hi - lo) * _rand(b, gen, device))


def dmd_loss(x0_gen, teacher, fake, schedule: FlowSchedule, sigma, noise) -> torch.Tensor:
    """The distribution-matching loss of generator samples ``x0_gen`` [B, C, H, W] (with gradient) at sigmas
    [B] and noise [B, C, H, W]: its gradient with respect to ``x0_gen`` is the normalised DMD gradient / numel."""
    with torch.no_grad():
        x = schedule.add_noise(x0_gen, noise, sigma)
        real = schedule.x0_eps(velocity(teacher, schedule, x, sigma), x, sigma)[0]
        fake_x0 = schedule.x0_eps(velocity(fake, schedule, x, sigma), x, sigma)[0]
        weight = (x0_gen - real).abs().flatten(1).mean(1).clamp(min=1e-8)
        weight = per_sample(weight, x0_gen)
        grad = torch.nan_to_num((fake_x0 - real) / weight)
    return 0.5 * ((x0_gen - (x0_gen - grad).detach()) ** 2).mean()


def fake_score_loss(fake, schedule: FlowSchedule, x0_gen, sigma, noise) -> torch.Tensor:
    """Flow matching of the fake score on the generator's (detached) samples."""
    x = schedule.add_noise(x0_gen, noise, sigma)
    return ((velocity(fake, schedule, x, sigma) - (noise - x0_gen)) ** 2).mean()


def generator_x0(generator, schedule: FlowSchedule, x, sigma) -> torch.Tensor:
    return schedule.x0_eps(velocity(generator, schedule, x, sigma), x, sigma)[0]


def dmd_generator_loss(generator, teacher, fake, schedule, pool, cfg, gen, device) -> tuple[torch.Tensor, dict]:
    """One generator batch: DMD loss on backward-simulated samples, plus ``alpha`` times the regression term."""
    b, K = cfg.optim.batch_size, cfg.diffusion.target_steps
    sigmas = schedule.sigmas(K)
    shape = (b, *pool[0].shape[1:])
    k = torch.randint(K, (b,), generator=gen).to(device)
    x_k, s_k = backward_simulate(generator, schedule, _randn(shape, gen, device), k, sigmas)
    x0_gen = generator_x0(generator, schedule, x_k, s_k)
    loss_dmd = dmd_loss(
        x0_gen, teacher, fake, schedule, dmd_sigmas(schedule, b, gen, device), _randn(shape, gen, device)
    )
    parts = {"dmd": loss_dmd.item()}
    loss = loss_dmd
    if cfg.loss.alpha > 0:
        noise, x0 = _pairs(pool, b, gen)
        kr = torch.randint(K, (b,), generator=gen).to(device)
        s = _grid(sigmas, kr)
        x = schedule.add_noise(x0, noise, s)
        loss_reg = ((generator_x0(generator, schedule, x, s) - x0) ** 2).mean()
        parts["regression"] = loss_reg.item()
        loss = loss + cfg.loss.alpha * loss_reg
    return loss, parts


def run_dmd(cfg, dm, schedule, pool, gen, sparse):
    from transformers import get_cosine_schedule_with_warmup

    from distillkit.errors import TrainingError

    device = pool[0].device
    K = cfg.diffusion.target_steps
    generator = copy_student(dm)
    apply_sparse_attention(generator, sparse)
    fake = copy_student(dm)
    g_params = [p for p in generator.parameters() if p.requires_grad]
    f_params = [p for p in fake.parameters() if p.requires_grad]
    opt_g = torch.optim.AdamW(g_params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    opt_f = torch.optim.AdamW(f_params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched_g = get_cosine_schedule_with_warmup(opt_g, cfg.warmup_steps(), cfg.optim.steps)
    sigmas = schedule.sigmas(K)
    shape = (cfg.optim.batch_size, *pool[0].shape[1:])
    losses, fake_losses, last_parts = [], [], {}

    def update(opt, params, loss, what, step):
        if not torch.isfinite(loss):
            raise TrainingError(f"the dmd {what} loss became {loss.item()} at step {step + 1}", hint="lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        opt.step()

    with ProgressBar("dmd", cfg.optim.steps) as bar:
        for step in range(cfg.optim.steps):
            for _ in range(DMD_FAKE_UPDATES):
                k = torch.randint(K, (cfg.optim.batch_size,), generator=gen).to(device)
                x_k, s_k = backward_simulate(generator, schedule, _randn(shape, gen, device), k, sigmas)
                with torch.no_grad():
                    x0_gen = generator_x0(generator, schedule, x_k, s_k)
                lf = fake_score_loss(
                    fake,
                    schedule,
                    x0_gen,
                    dmd_sigmas(schedule, cfg.optim.batch_size, gen, device),
                    _randn(shape, gen, device),
                )
                update(opt_f, f_params, lf, "fake-score", step)
                fake_losses.append(lf.item())
            loss, last_parts = dmd_generator_loss(generator, dm.model, fake, schedule, pool, cfg, gen, device)
            update(opt_g, g_params, loss, "generator", step)
            sched_g.step()
            losses.append(loss.item())
            bar.update(step + 1, f"loss {loss.item():.4g}")
    return generator, [
        {
            "steps": K,
            "first_loss": losses[0],
            "final_loss": losses[-1],
            "final_loss_parts": last_parts,
            "fake_score_final_loss": fake_losses[-1],
            "fake_updates_per_step": DMD_FAKE_UPDATES,
        }
    ]


RUNNERS = {"progressive": run_progressive, "reflow": run_reflow, "consistency": run_consistency, "dmd": run_dmd}


def run_flow_method(cfg, dm, schedule, pool, gen, sparse):
    return RUNNERS[cfg.diffusion.method](cfg, dm, schedule, pool, gen, sparse)


# --------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_flow(cfg, dm, schedule: FlowSchedule, student, device) -> dict[str, Any]:
    """Student (K Euler steps) and teacher at K steps, against the teacher at N steps, from the same noises."""
    gen = torch.Generator().manual_seed(cfg.optim.seed + 1)
    n, N, K = cfg.diffusion.eval_samples, cfg.diffusion.teacher_steps, cfg.diffusion.target_steps
    noise = torch.randn(n, *dm.sample_shape, generator=gen).to(device)
    ref = euler_sample(dm.model, schedule, noise, N)
    base = euler_sample(dm.model, schedule, noise, K)
    stu = euler_sample(student, schedule, noise, K)
    m: dict[str, Any] = {
        "teacher_steps": N,
        "eval_samples": n,
        "space": dm.space,
        "student_steps": K,
        "baseline": f"teacher at {K} steps",
        "sampler": "euler",
        "sigmas": schedule.sigmas(K),
    }
    for name, samples in (("student", stu), ("baseline", base)):
        for key, v in sample_errors(samples, ref).items():
            m[f"{name}_{key}"] = v
    m["mse_ratio"] = m["student_mse"] / m["baseline_mse"] if m["baseline_mse"] > 0 else float("nan")
    s_probe = torch.full((n,), 0.5, device=device)
    student_ms = ms_per_call(lambda: velocity(student, schedule, noise, s_probe))
    teacher_ms = ms_per_call(lambda: velocity(dm.model, schedule, noise, s_probe))
    m.update(
        student_ms_per_step=student_ms / n,
        teacher_ms_per_step=teacher_ms / n,
        student_images_per_s=1000.0 / (student_ms / n * K),
        teacher_images_per_s=1000.0 / (teacher_ms / n * N),
    )
    return m
