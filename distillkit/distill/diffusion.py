"""Step and guidance distillation of diffusers denoisers (``distillkit distill --method ...``).

Data-free: the training data is a pool of the teacher's own ``--teacher-steps``-step DDIM samples from
Gaussian noise (``--max-samples`` of them, default 256; class labels drawn uniformly from the class range or
from ``--labels FILE``; for a text-conditioned teacher, prompts drawn uniformly from ``--prompts FILE``, each
encoded once by the teacher's text encoder), noised back to the timesteps a method needs. A random teacher still defines a
deterministic probability-flow ODE, so "the student's K-step samples are closer to the teacher's N-step
samples than the teacher's own K-step samples" is a meaningful test even for untrained tiny models.

- ``progressive`` (Salimans & Ho 2022): each round the student (initialised from the round's teacher) learns
  to do in one DDIM step what the teacher does in two; the x0 target ``x~`` is the one whose single DDIM step
  lands where the teacher's two steps land; loss ``max(SNR(t), 1) * |x0_student - x~|^2`` (truncated-SNR
  weighting). Rounds halve ``--teacher-steps`` until ``--target-steps``; each student teaches the next round.
- ``consistency`` (LCM): on the skipping grid ``t = k*n - 1`` (``k = T // teacher_steps``) the student's
  consistency function ``f(x, t) = c_skip(t) x + c_out(t) x0(x, t)`` (LCMScheduler's boundary scalings) at
  ``(x_t, t)`` matches an EMA copy of itself at the teacher's DDIM step ``(x_s, s = t - k)``; MSE loss, EMA
  decay 0.95.
- ``guidance`` (Meng et al. 2023): the student gains diffusers' ``timestep_cond`` input (a zero-initialised
  projection of a sinusoidal embedding of the guidance scale ``w``, ``time_cond_proj_dim``) and learns the
  teacher's classifier-free-guided output ``out_null + w (out_cond - out_null)`` with one evaluation;
  ``w ~ U[1, --guidance-scale]`` in training. The step count is unchanged.

Evaluation: from ``--eval-samples`` fixed noises, MSE and PSNR of the student's samples against the
teacher's ``--teacher-steps``-step samples, beside the same-cost baseline (the teacher at the student's step
count; for guidance, the teacher without guidance at the same steps), and per-step model time. PSNR is
``10 log10(range^2 / MSE)`` with ``range`` the max - min of the teacher's reference samples.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from distillkit.config import DistillConfig, parse_image_size, parse_video_shape
from distillkit.distill.denoise_training import (
    ProgressBar,
    apply_sparse_attention,
    ms_per_call,
    sample_errors,
    train_student,
    trainable_copy,
)
from distillkit.errors import ConfigError, DataError, ModelError
from distillkit.manifest import (
    MANIFEST_NAME,
    Manifest,
    atomic_artifact,
    check_output,
    describe_input,
    finalize_artifact,
    history_of,
    model_card,
    read_source,
    releases_locks,
)
from distillkit.models.diffusion import (
    DiffusionModel,
    NoiseSchedule,
    copy_student,
    ddim_pairs,
    ddim_sample,
    ddim_sampler_config,
    denoise,
    encode_prompts,
    guidance_embedding,
    guided_output,
    is_diffusers_dir,
    label_range,
    load_diffusion,
    null_like,
)

DEFAULT_POOL = 256
POOL_BATCH = 64
EMA_DECAY = 0.95
SIGMA_DATA = 0.5  # LCMScheduler's sigma_data of the boundary scalings
GUIDANCE_EMBED_DIM = 256  # the time_cond_proj_dim of diffusers' LCM UNets
# Methods a model kind can use: guidance needs a null class and a timestep_cond input (UNet2DConditionModel).
METHODS = ("progressive", "consistency", "guidance", "reflow", "dmd")
# flow-matching teachers (distillkit.distill.flow) take every method but guidance; reflow and dmd need a flow teacher
FLOW_ONLY_METHODS = ("reflow", "dmd")


# --------------------------------------------------------------------------------------------
# Checks


def check_method(cfg: DistillConfig, dm: DiffusionModel) -> None:
    """Refuse a method the model cannot use, before any work."""
    if cfg.diffusion.method is None:
        raise ConfigError(
            f"{dm.path} is a diffusers model; say which distillation to run",
            hint="pass --method progressive, consistency or guidance (flow-matching teachers: progressive, reflow, "
            "consistency or dmd)",
        )
    if cfg.optim.freeze_embeddings:
        raise ConfigError(
            f"--freeze-embeddings applies to text students; {dm.path} is a diffusers model", hint="drop it"
        )
    if cfg.data.data is not None:
        raise ConfigError(
            "diffusion distillation is data-free (it trains on the teacher's own samples); --data is not used",
            hint="drop --data",
        )
    if dm.flow and cfg.diffusion.method == "guidance":
        raise ConfigError(
            f"{dm.path} is a flow-matching model sampled without classes or prompts; guidance distillation does "
            "not apply",
            hint="use --method progressive, reflow, consistency or dmd",
        )
    if not dm.flow and cfg.diffusion.method in FLOW_ONLY_METHODS:
        raise ConfigError(
            f"--method {cfg.diffusion.method} distils flow-matching teachers (FlowMatchEulerDiscreteScheduler); {dm.class_name} "
            f"at {dm.path} predicts {dm.prediction_type}",
            hint="use --method progressive or consistency for a DDPM/DDIM-family teacher",
        )
    if cfg.loss.alpha > 0 and cfg.diffusion.method != "dmd":
        raise ConfigError(
            f"--alpha weighs dmd's regression term and does nothing for --method {cfg.diffusion.method}",
            hint="drop --alpha",
        )
    if cfg.diffusion.method == "guidance":
        if not dm.conditional or dm.null_condition is None:
            raise ConfigError(
                f"guidance distillation needs a class-conditional teacher with a null class; {dm.class_name} "
                f"at {dm.path} is {'unconditional' if not dm.conditional else 'conditional without a null class'}",
                hint="use --method progressive or consistency for this model",
            )
        if cfg.diffusion.target_steps is not None:
            raise ConfigError(
                "guidance distillation keeps the step count (it halves evaluations per step); --target-steps "
                "does not apply",
                hint="drop --target-steps; --teacher-steps sets the sampling steps",
            )
        if dm.class_name != "UNet2DConditionModel":
            raise ConfigError(
                f"guidance distillation stores the guidance embedding in UNet2DConditionModel's "
                f"time_cond_proj_dim; a {dm.class_name} has no such input",
                hint="use --method progressive or consistency for this model",
            )
        if getattr(dm.model.config, "time_cond_proj_dim", None):
            raise ConfigError(
                f"{dm.path} already takes a timestep_cond (time_cond_proj_dim is set)",
                hint="it looks guidance-distilled already",
            )
        return
    if cfg.diffusion.target_steps is None:
        raise ConfigError(f"--method {cfg.diffusion.method} needs --target-steps", hint="pass e.g. --target-steps 4")
    if cfg.diffusion.method == "progressive":
        ratio = cfg.diffusion.teacher_steps / cfg.diffusion.target_steps
        if ratio != 2 ** round(math.log2(ratio)):
            raise ConfigError(
                f"progressive distillation halves the steps: --teacher-steps {cfg.diffusion.teacher_steps} must be "
                f"--target-steps {cfg.diffusion.target_steps} times a power of two",
                hint=f"pass e.g. --teacher-steps {cfg.diffusion.target_steps * 8}",
            )
    if cfg.diffusion.method == "consistency" and cfg.diffusion.teacher_steps > dm.scheduler.config.num_train_timesteps:
        raise ConfigError(
            "--teacher-steps is more than the scheduler's training timesteps", hint="pass e.g. --teacher-steps 50"
        )


def read_prompts(cfg: DistillConfig, dm: DiffusionModel) -> torch.Tensor:
    """The prompt embeddings to draw from [P, L, D]: every line of ``--prompts FILE`` encoded once."""
    if cfg.diffusion.labels is not None:
        raise ConfigError(
            f"{dm.path} is text-conditioned; --labels (class ids) does not apply", hint="pass --prompts FILE instead"
        )
    if cfg.diffusion.prompts is None:
        raise ConfigError(
            f"{dm.path} is a text-conditioned pipeline and needs prompts to sample the teacher",
            hint="pass --prompts FILE with one prompt per line",
        )
    return encode_prompts(dm.text_encoder, dm.tokenizer, read_prompt_file(cfg.diffusion.prompts))


def read_prompt_file(file: str) -> list[str]:
    """The prompts of ``file``: its non-blank lines, stripped, in order (distill's ``--prompts`` and bench's)."""
    path = Path(file)
    if not path.is_file():
        raise DataError(f"prompts file {path} does not exist", hint="pass a file with one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"prompts file {path} is empty", hint="write one prompt per line")
    return prompts


def read_labels(cfg: DistillConfig, dm: DiffusionModel) -> torch.Tensor | None:
    """The conditions to draw from: label ids [L] int64 (``--labels FILE``, one integer per line, or every class),
    prompt embeddings [P, L, D] for a text-conditioned model (:func:`read_prompts`), or None (unconditional)."""
    if dm.text_conditioned:
        return read_prompts(cfg, dm)
    if cfg.diffusion.prompts is not None:
        raise ConfigError(
            f"{dm.path} is not text-conditioned; --prompts does not apply",
            hint="drop --prompts (class-conditional models take --labels)",
        )
    n = label_range(dm)
    if not dm.conditional:
        if cfg.diffusion.labels is not None:
            raise ConfigError(f"{dm.path} is unconditional; --labels does not apply", hint="drop --labels")
        return None
    if cfg.diffusion.labels is None:
        return torch.arange(n)
    path = Path(cfg.diffusion.labels)
    if not path.is_file():
        raise DataError(f"labels file {path} does not exist", hint="pass a file with one class id per line")
    try:
        ids = [int(line) for line in path.read_text().split()]
    except ValueError:
        raise DataError(
            f"{path} must hold one integer class id per line", hint="e.g. 0, 3, 7 on separate lines"
        ) from None
    if not ids:
        raise DataError(f"labels file {path} is empty", hint="write one class id per line")
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise DataError(f"class id {bad[0]} in {path} is outside the model's classes 0..{n - 1}", hint="fix the file")
    return torch.tensor(ids, dtype=torch.long)


def _sparse_spec(cfg: DistillConfig) -> tuple[str, int] | None:
    spec = cfg.diffusion.sparse_attention
    return (spec, int(cfg.diffusion.sparse_block_size)) if spec else None


# --------------------------------------------------------------------------------------------
# The teacher's samples


@torch.no_grad()
def teacher_pool(
    dm: DiffusionModel,
    schedule: NoiseSchedule,
    labels: torch.Tensor | None,
    size: int,
    steps: int,
    gen: torch.Generator,
    device: Any,
    guidance: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``size`` teacher samples x0 [P, C, H, W] (and their labels [P]) from ``steps`` DDIM steps."""
    xs, ys = [], []
    with ProgressBar("teacher samples", size, unit="sample") as bar:
        for start in range(0, size, POOL_BATCH):
            b = min(POOL_BATCH, size - start)
            noise = torch.randn(b, *dm.sample_shape, generator=gen).to(device)
            y = labels[torch.randint(len(labels), (b,), generator=gen)].to(device) if labels is not None else None
            g = (guidance, dm.null_condition) if guidance is not None else None
            xs.append(ddim_sample(dm.model, schedule, noise, steps, y, guidance=g))
            ys.append(y)
            bar.update(start + b)
    return torch.cat(xs), (torch.cat(ys) if labels is not None else None)


def _batch(pool: tuple[torch.Tensor, Any], bs: int, gen: torch.Generator) -> tuple[torch.Tensor, Any]:
    idx = torch.randint(len(pool[0]), (bs,), generator=gen)
    return pool[0][idx.to(pool[0].device)], (pool[1][idx.to(pool[1].device)] if pool[1] is not None else None)


def _randn_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=gen).to(x.device)


# --------------------------------------------------------------------------------------------
# Progressive distillation


def progressive_target(
    teacher: Any, schedule: NoiseSchedule, x_t: torch.Tensor, i: torch.Tensor, steps: int, labels: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two teacher DDIM steps of a ``2 * steps`` run from ``x_t`` [B, C, H, W] at student grid index ``i`` [B].

    Returns ``(t, prev, x0_target)``: the student's timesteps and the x0 whose one DDIM step ``t -> prev``
    lands where the teacher's two steps land (Salimans & Ho, eq. 8).
    """
    T = schedule.num_train_timesteps
    fine = torch.tensor(ddim_pairs(T, 2 * steps), device=x_t.device)
    coarse = torch.tensor(ddim_pairs(T, steps), device=x_t.device)
    t, prev = coarse[i, 0], coarse[i, 1]
    x = x_t
    with torch.no_grad():
        for j in (2 * i, 2 * i + 1):  # exactly what a 2K-step DDIMScheduler run does
            tt, pp = fine[j, 0], fine[j, 1]
            x0, eps = schedule.x0_eps(denoise(teacher, x, tt, labels), x, tt)
            x = schedule.ddim(x0, eps, pp)
        a_t, a_p = schedule.alpha(t), schedule.alpha(prev)
        ratio = (1 - a_p).sqrt() / (1 - a_t).sqrt()
        target = (x - ratio * x_t) / (a_p.sqrt() - ratio * a_t.sqrt())
    return t, prev, target


def progressive_loss(
    student: Any, teacher: Any, schedule: NoiseSchedule, x0: torch.Tensor, labels: Any, steps: int, gen: Any
) -> torch.Tensor:
    """One batch of the progressive-distillation loss for a ``steps``-step student (scalar)."""
    i = torch.randint(steps, (x0.shape[0],), generator=gen).to(x0.device)
    t = torch.tensor(ddim_pairs(schedule.num_train_timesteps, steps), device=x0.device)[i, 0]
    x_t = schedule.add_noise(x0, _randn_like(x0, gen), t)
    t, _, target = progressive_target(teacher, schedule, x_t, i, steps, labels)
    pred, _ = schedule.x0_eps(denoise(student, x_t, t, labels), x_t, t)
    a = schedule.alpha(t)
    weight = (a / (1 - a)).clamp(min=1.0)  # truncated SNR weighting
    return (weight * (pred - target) ** 2).mean()


def run_progressive(cfg, dm, schedule, pool, gen, sparse) -> tuple[Any, list[dict[str, Any]]]:
    teacher, steps, rounds = dm.model, cfg.diffusion.teacher_steps, []
    while steps > cfg.diffusion.target_steps:
        steps //= 2
        student = copy_student(dm) if teacher is dm.model else trainable_copy(teacher)
        apply_sparse_attention(student, sparse)

        def loss_fn(_step: int, student=student, teacher=teacher, steps=steps) -> torch.Tensor:
            x0, y = _batch(pool, cfg.optim.batch_size, gen)
            return progressive_loss(student, teacher, schedule, x0, y, steps, gen)

        losses = train_student(student, loss_fn, cfg, f"progressive {steps * 2}->{steps}")
        rounds.append({"steps": steps, "first_loss": losses[0], "final_loss": losses[-1]})
        teacher = student.requires_grad_(False)
    return teacher, rounds


# --------------------------------------------------------------------------------------------
# Consistency distillation


def boundary_scalings(t: torch.Tensor, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LCMScheduler's ``(c_skip, c_out)`` [B, 1, 1, 1] at integer timesteps ``t`` [B] (``t <= 0``: (1, 0))."""
    s = (t.clamp(min=0).float() * timestep_scaling).view(-1, 1, 1, 1)
    return SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2), s / (s**2 + SIGMA_DATA**2).sqrt()


def consistency_fn(model, schedule, x, t, labels, timestep_scaling) -> torch.Tensor:
    """``f(x, t) = c_skip x + c_out x0(x, t)`` [B, C, H, W], what LCMScheduler calls ``denoised``."""
    c_skip, c_out = boundary_scalings(t, timestep_scaling)
    x0, _ = schedule.x0_eps(denoise(model, x, t.clamp(min=0), labels), x, t.clamp(min=0))
    return c_skip * x + c_out * x0


def consistency_loss(student, target_net, teacher, schedule, x0, labels, n_steps, scaling, gen) -> torch.Tensor:
    """One batch of the consistency-distillation loss on the skipping grid of ``n_steps`` (scalar)."""
    k = schedule.num_train_timesteps // n_steps
    n = torch.randint(1, n_steps + 1, (x0.shape[0],), generator=gen).to(x0.device)
    t = n * k - 1
    s = (t - k).clamp(min=0)
    x_t = schedule.add_noise(x0, _randn_like(x0, gen), t)
    with torch.no_grad():
        tx0, teps = schedule.x0_eps(denoise(teacher, x_t, t, labels), x_t, t)
        x_s = schedule.ddim(tx0, teps, s)
        target = consistency_fn(target_net, schedule, x_s, s, labels, scaling)
    pred = consistency_fn(student, schedule, x_t, t, labels, scaling)
    return ((pred - target) ** 2).mean()


def lcm_timesteps(scheduler_config: dict[str, Any], steps: int, original_steps: int) -> list[int]:
    from diffusers import LCMScheduler

    sch = LCMScheduler.from_config(scheduler_config, original_inference_steps=original_steps)
    sch.set_timesteps(steps)
    return [int(t) for t in sch.timesteps]


@torch.no_grad()
def consistency_sample(model, schedule, noise, timesteps: list[int], labels, scaling: float) -> torch.Tensor:
    """Multistep consistency sampling that stays on ``noise``'s ODE trajectory: between steps the sample is
    re-noised with the model's own implied noise (DDIM) instead of LCMScheduler's fresh noise; returns x0."""
    x = noise
    b = x.shape[0]
    for j, t in enumerate(timesteps):
        tt = torch.full((b,), t, device=x.device, dtype=torch.long)
        x0 = consistency_fn(model, schedule, x, tt, labels, scaling)
        if j == len(timesteps) - 1:
            return x0
        a = schedule.alpha(tt)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = schedule.ddim(x0, eps, torch.full((b,), timesteps[j + 1], device=x.device, dtype=torch.long))
    return x


def run_consistency(cfg, dm, schedule, pool, gen, sparse, scaling) -> tuple[Any, list[dict[str, Any]]]:
    student = copy_student(dm)
    apply_sparse_attention(student, sparse)
    target_net = trainable_copy(student).requires_grad_(False)

    def ema() -> None:
        with torch.no_grad():
            for pt, ps in zip(target_net.parameters(), student.parameters(), strict=True):
                pt.lerp_(ps, 1 - EMA_DECAY)

    def loss_fn(_step: int) -> torch.Tensor:
        x0, y = _batch(pool, cfg.optim.batch_size, gen)
        return consistency_loss(
            student, target_net, dm.model, schedule, x0, y, cfg.diffusion.teacher_steps, scaling, gen
        )

    losses = train_student(student, loss_fn, cfg, "consistency", on_step=ema)
    return student, [{"steps": cfg.diffusion.target_steps, "first_loss": losses[0], "final_loss": losses[-1]}]


# --------------------------------------------------------------------------------------------
# Guidance distillation


def guidance_loss(student, teacher, schedule, x0, labels, null_class, max_w, n_steps, gen) -> torch.Tensor:
    """One batch of the guidance-distillation loss: the student's single output with the embedding of ``w``
    against the teacher's guided output, at timesteps of the ``n_steps`` DDIM grid (scalar). ``null_class`` is
    the null class id, or the empty-prompt embedding [L, D] for prompt embeddings ``labels`` [B, L, D]."""
    b = x0.shape[0]
    grid = torch.tensor([t for t, _ in ddim_pairs(schedule.num_train_timesteps, n_steps)], device=x0.device)
    t = grid[torch.randint(len(grid), (b,), generator=gen).to(x0.device)]
    w = (1 + (max_w - 1) * torch.rand(b, generator=gen)).to(x0.device)
    x_t = schedule.add_noise(x0, _randn_like(x0, gen), t)
    with torch.no_grad():
        both = denoise(
            teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([null_like(labels, null_class), labels])
        )
        out_null, out_cond = both.chunk(2)
        target = out_null + w.view(-1, 1, 1, 1) * (out_cond - out_null)
    emb = guidance_embedding(w, student.config.time_cond_proj_dim)
    return ((denoise(student, x_t, t, labels, emb) - target) ** 2).mean()


def run_guidance(cfg, dm, schedule, pool, gen, sparse) -> tuple[Any, list[dict[str, Any]]]:
    student = copy_student(dm, time_cond_proj_dim=GUIDANCE_EMBED_DIM)
    apply_sparse_attention(student, sparse)

    def loss_fn(_step: int) -> torch.Tensor:
        x0, y = _batch(pool, cfg.optim.batch_size, gen)
        return guidance_loss(
            student,
            dm.model,
            schedule,
            x0,
            y,
            dm.null_condition,
            cfg.diffusion.guidance_scale,
            cfg.diffusion.teacher_steps,
            gen,
        )

    losses = train_student(student, loss_fn, cfg, "guidance")
    return student, [{"steps": cfg.diffusion.teacher_steps, "first_loss": losses[0], "final_loss": losses[-1]}]


# --------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(cfg, dm, schedule, student, labels, scaling, device) -> dict[str, Any]:
    """Student vs teacher samples from the same noise; see the module docstring."""
    gen = torch.Generator().manual_seed(cfg.optim.seed + 1)
    n = cfg.diffusion.eval_samples
    noise = torch.randn(n, *dm.sample_shape, generator=gen).to(device)
    y = labels[torch.randint(len(labels), (n,), generator=gen)].to(device) if labels is not None else None
    N = cfg.diffusion.teacher_steps
    m: dict[str, Any] = {"teacher_steps": N, "eval_samples": n, "space": dm.space}
    t_probe = torch.full((n,), schedule.num_train_timesteps // 2, device=device, dtype=torch.long)
    if cfg.diffusion.method == "guidance":
        g = (cfg.diffusion.guidance_scale, dm.null_condition)
        ref = ddim_sample(dm.model, schedule, noise, N, y, guidance=g)
        emb = guidance_embedding(
            torch.full((n,), cfg.diffusion.guidance_scale, device=device), student.config.time_cond_proj_dim
        )
        stu = ddim_sample(student, schedule, noise, N, y, timestep_cond=emb)
        base = ddim_sample(dm.model, schedule, noise, N, y)
        m.update(
            student_steps=N,
            guidance_scale=cfg.diffusion.guidance_scale,
            baseline="teacher without guidance, same steps",
        )
        student_ms = ms_per_call(lambda: denoise(student, noise, t_probe, y, emb))
        teacher_ms = ms_per_call(lambda: guided_output(dm.model, noise, t_probe, y, g))
        evals_student = N
    else:
        K = cfg.diffusion.target_steps
        ref = ddim_sample(dm.model, schedule, noise, N, y)
        base = ddim_sample(dm.model, schedule, noise, K, y)
        if cfg.diffusion.method == "consistency":
            ts = lcm_timesteps(dict(dm.scheduler.config), K, N)
            stu = consistency_sample(student, schedule, noise, ts, y, scaling)
            m["lcm_timesteps"] = ts
        else:
            stu = ddim_sample(student, schedule, noise, K, y)
        m.update(student_steps=K, baseline=f"teacher at {K} steps")
        student_ms = ms_per_call(lambda: denoise(student, noise, t_probe, y))
        teacher_ms = ms_per_call(lambda: denoise(dm.model, noise, t_probe, y))
        evals_student = K
    for name, samples in (("student", stu), ("baseline", base)):
        for k, v in sample_errors(samples, ref).items():
            m[f"{name}_{k}"] = v
    m["mse_ratio"] = m["student_mse"] / m["baseline_mse"] if m["baseline_mse"] > 0 else float("nan")
    m.update(
        student_ms_per_step=student_ms / n,
        teacher_ms_per_step=teacher_ms / n,
        student_images_per_s=1000.0 / (student_ms / n * evals_student),
        # the teacher's reference run: N steps, each of two evaluations when guided
        teacher_images_per_s=1000.0 / (teacher_ms / n * N),
    )
    return m


# --------------------------------------------------------------------------------------------
# Saving


def student_scheduler(cfg: DistillConfig, dm: DiffusionModel) -> Any:
    """DDIM with trailing spacing (progressive, guidance) or LCMScheduler (consistency), on the teacher's schedule."""
    from diffusers import DDIMScheduler, LCMScheduler

    if dm.flow:
        # Euler on the teacher's own sigma schedule, shift included: a flow student samples as its teacher does
        return type(dm.scheduler).from_config(dm.scheduler.config)
    if cfg.diffusion.method == "consistency":
        return LCMScheduler.from_config(dm.scheduler.config, original_inference_steps=cfg.diffusion.teacher_steps)
    return DDIMScheduler.from_config(ddim_sampler_config(dm.scheduler))


def _save(student: Any, scheduler: Any, dm: DiffusionModel, tmp: Path) -> None:
    if dm.layout == "pipeline":
        src = Path(dm.path)
        skip = {dm.subfolder, "scheduler", MANIFEST_NAME, "README.md"}
        for item in src.iterdir():
            if item.name in skip or item.name.startswith("."):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy)(item, tmp / item.name)
        student.save_pretrained(tmp / dm.subfolder, safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        index = json.loads((src / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", type(scheduler).__name__]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    else:
        student.save_pretrained(tmp, safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")


def _card(manifest: Manifest, dm: DiffusionModel, usage: str) -> str:
    """The model card: diffusers loading instructions instead of the transformers ones."""
    generic = model_card(manifest)
    tail = generic[generic.index("## Metrics") :] if "## Metrics" in generic else ""
    load = (
        f"from diffusers import DiffusionPipeline\npipe = DiffusionPipeline.from_pretrained({manifest.path!r})"
        if dm.layout == "pipeline"
        else f"from diffusers import {dm.class_name}, SchedulerMixin\n"
        f"model = {dm.class_name}.from_pretrained({manifest.path!r})\n"
        f"# scheduler: {type_name(manifest)}.from_pretrained({manifest.path!r}, subfolder='scheduler')"
    )
    return "\n".join(
        [
            "---",
            "library_name: diffusers",
            f"tags: [distillkit, distill, {manifest.config.get('method')}]",
            "---",
            "",
            f"# {Path(manifest.path).name}",
            "",
            f"Made by distillkit {manifest.distillkit_version} (`distill --method {manifest.config.get('method')}`).",
            "",
            "## Load",
            "",
            "```python",
            load,
            "```",
            "",
            usage,
            "",
            tail,
        ]
    )


def type_name(manifest: Manifest) -> str:
    return manifest.extra.get("scheduler", "DDIMScheduler")


# --------------------------------------------------------------------------------------------
# The run


def _pool_and_train(cfg: DistillConfig, dm: DiffusionModel, schedule: Any, labels: Any, sparse, scaling, device):
    """The teacher's sample pool, then the method's training: (pool, student, rounds, pool_s, train_s)."""
    gen = torch.Generator().manual_seed(cfg.optim.seed)
    t0 = time.perf_counter()
    if dm.flow:
        from distillkit.distill.flow import flow_pool, run_flow_method

        pool = flow_pool(dm, schedule, cfg.data.max_samples or DEFAULT_POOL, cfg.diffusion.teacher_steps, gen, device)
    else:
        pool = teacher_pool(
            dm,
            schedule,
            labels,
            cfg.data.max_samples or DEFAULT_POOL,
            cfg.diffusion.teacher_steps,
            gen,
            device,
            guidance=cfg.diffusion.guidance_scale if cfg.diffusion.method == "guidance" else None,
        )
    pool_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if dm.flow:
        student, rounds = run_flow_method(cfg, dm, schedule, pool, gen, sparse)
    elif cfg.diffusion.method == "progressive":
        student, rounds = run_progressive(cfg, dm, schedule, pool, gen, sparse)
    elif cfg.diffusion.method == "consistency":
        student, rounds = run_consistency(cfg, dm, schedule, pool, gen, sparse, scaling)
    else:
        student, rounds = run_guidance(cfg, dm, schedule, pool, gen, sparse)
    train_s = time.perf_counter() - t0
    return pool, student, rounds, pool_s, train_s


def _usage(cfg: DistillConfig, dm: DiffusionModel, scheduler_name: str, steps: int, sparse: tuple | None) -> str:
    """How to sample with the saved student (the model card's usage paragraph)."""
    if dm.video:
        f, h, w = dm.video_shape
        usage = (
            f"Sample with the saved {scheduler_name} (Euler, the teacher's shift) in "
            f"`num_inference_steps={steps}`, latents [B, {dm.sample_shape[0]}, {f}, {h}, {w}] (frames, height, "
            f"width). The transformer is conditioned on zero text embeddings: with a pipeline, pass "
            f"`prompt_embeds=torch.zeros(B, 1, {dm.model.config.text_dim})`, `guidance_scale=1.0`, "
            f"`latents=noise` and the `num_frames`/`height`/`width` whose latent size that is."
        )
    elif dm.flux:
        c, h, w = dm.sample_shape
        mc = dm.model.config
        guidance = f"guidance_scale={cfg.diffusion.guidance_scale:g}" if mc.guidance_embeds else "any guidance_scale"
        usage = (
            f"Sample with the saved {scheduler_name} in `num_inference_steps={steps}` at latents [B, {c}, {h}, {w}] "
            f"(FluxPipeline: `height`/`width` = {h}/{w} x its VAE scale factor, `latents` packed 2x2 as "
            f"`FluxPipeline._pack_latents` packs them; it computes the same shift mu). The transformer is "
            f"conditioned on zero text embeddings: pass `prompt_embeds=torch.zeros(B, 1, {mc.joint_attention_dim})`, "
            f"`pooled_prompt_embeds=torch.zeros(B, {mc.pooled_projection_dim})` and {guidance}."
        )
    elif dm.flow:
        usage = (
            f"Sample with the saved {scheduler_name} (Euler, the teacher's shift) in "
            f"`num_inference_steps={steps}`. The transformer is conditioned on zero text embeddings: with a "
            f"pipeline, pass `prompt_embeds=torch.zeros(B, 1, {dm.model.config.joint_attention_dim})`, "
            f"`pooled_prompt_embeds=torch.zeros(B, {dm.model.config.pooled_projection_dim})`, `guidance_scale=1.0`."
        )
    elif cfg.diffusion.method == "consistency":
        usage = (
            f"Sample with the saved LCMScheduler in {steps} steps (`scheduler.set_timesteps({steps})`); "
            "distillkit's evaluation re-noises deterministically between steps (see distillkit.json)."
        )
    elif cfg.diffusion.method == "guidance":
        usage = (
            f"One evaluation per step replaces classifier-free guidance: pass "
            f"`timestep_cond` = the sinusoidal embedding of `(w - 1) * 1000` ({GUIDANCE_EMBED_DIM} features, as "
            f"diffusers' LCM pipelines compute it; `distillkit.models.diffusion.guidance_embedding`), with the "
            f"class labels (or prompt embeddings); trained for w in [1, {cfg.diffusion.guidance_scale:g}]; {steps} DDIM steps."
        )
    else:
        usage = f"Sample with the saved DDIMScheduler (trailing spacing) in `num_inference_steps={steps}`."
    if sparse:
        usage += (
            f" The student was trained with block-sparse self-attention `{sparse[0]}` (block {sparse[1]}): "
            f"`distillkit.distill.denoise_training.apply_sparse_attention(model, ({sparse[0]!r}, {sparse[1]}))` "
            "reproduces it (every attention layer gets a block-sparse processor); without it the model runs dense "
            "attention."
        )
    return usage


def _extra(
    cfg: DistillConfig, dm: DiffusionModel, scheduler_name: str, steps: int, labels: Any, sparse, pool_size: int
) -> dict[str, Any]:
    """The manifest's ``extra``: how the student is laid out and sampled, and what it was conditioned on."""
    return {
        "method": cfg.diffusion.method,
        "layout": dm.layout,
        "denoiser": dm.class_name,
        "subfolder": dm.subfolder,
        "scheduler": scheduler_name,
        "num_inference_steps": steps,
        "conditional": dm.conditional,
        "null_class": dm.null_class,
        "text_conditioned": dm.text_conditioned,
        "prompts": len(labels) if dm.text_conditioned else None,
        # the texts themselves, in draw order, so bench can condition on the same (noise, prompt) pairs
        "prompt_texts": read_prompt_file(cfg.diffusion.prompts) if dm.text_conditioned else None,
        "guidance_embedding": (
            {
                "time_cond_proj_dim": GUIDANCE_EMBED_DIM,
                "input": "(w - 1) * 1000",
                "max_w": cfg.diffusion.guidance_scale,
            }
            if cfg.diffusion.method == "guidance"
            else None
        ),
        "sparse_attention": {"spec": sparse[0], "block_size": sparse[1]} if sparse else None,
        "teacher_pool": pool_size,
        # a video model's latent (frames, height, width): its config does not hold it, and bench samples it
        "video_shape": list(dm.video_shape) if dm.video else None,
        # a Flux model's latent (height, width) and embedded guidance scale: bench samples it the same way
        "image_size": list(dm.sample_shape[1:]) if dm.flux else None,
        "flux_guidance": cfg.diffusion.guidance_scale if dm.flux and dm.model.config.guidance_embeds else None,
    }


@releases_locks
def run_diffusion_distill(cfg: DistillConfig, *, out: str, overwrite: bool = False) -> dict[str, Any]:
    """Distil the diffusers teacher ``cfg.models.teacher`` with ``cfg.diffusion.method``; write the artifact ``out``; return its
    manifest."""
    from rich.console import Console

    from distillkit.models.load import resolve_device

    t_start = time.perf_counter()
    out_path = check_output(
        out, overwrite, protect=[cfg.models.teacher, cfg.data.data, cfg.diffusion.labels, cfg.diffusion.prompts]
    )
    console = Console(stderr=True)
    src = read_source(cfg.models.teacher)
    if not src.is_local or not is_diffusers_dir(src.path):
        raise ModelError(
            f"--method {cfg.diffusion.method} distils diffusers models, and {src.path} is not one",
            hint="pass a diffusers pipeline or model directory as --teacher, or drop --method",
        )
    device = resolve_device(cfg.optim.device)
    torch.manual_seed(cfg.optim.seed)
    t0 = time.perf_counter()
    dm = load_diffusion(
        src.path,
        device=device,
        video_shape=parse_video_shape(cfg.diffusion.video_shape),
        image_size=parse_image_size(cfg.diffusion.image_size),
    )
    check_method(cfg, dm)
    labels = read_labels(cfg, dm)
    sparse = _sparse_spec(cfg)
    if dm.flow:
        from distillkit.models.flow import flow_schedule

        schedule = flow_schedule(dm, cfg.diffusion.guidance_scale)
    else:
        schedule = NoiseSchedule(dm.scheduler, device)
    scaling = float(getattr(dm.scheduler.config, "timestep_scaling", 10.0))
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in dm.model.parameters())
    console.print(
        f"[bold]distill --method {cfg.diffusion.method}[/] {dm.class_name} {n_params / 1e6:.2f}M params, "
        f"{'text-conditioned' if dm.text_conditioned else 'class-conditional' if dm.conditional else 'unconditional'}"
        f", samples {tuple(dm.sample_shape)} "
        f"({dm.space}), prediction {dm.prediction_type}; teacher {cfg.diffusion.teacher_steps} steps"
        + (f" -> student {cfg.diffusion.target_steps}" if cfg.diffusion.target_steps else "")
        + (f"; sparse attention {sparse[0]} (block {sparse[1]})" if sparse else "")
    )

    pool, student, rounds, pool_s, train_s = _pool_and_train(cfg, dm, schedule, labels, sparse, scaling, device)
    student.requires_grad_(False).eval()
    if dm.flow:
        from distillkit.distill.flow import evaluate_flow

        metrics = evaluate_flow(cfg, dm, schedule, student, device)
    else:
        metrics = evaluate(cfg, dm, schedule, student, labels, scaling, device)
    metrics["rounds"] = rounds
    metrics["final_train_loss"] = rounds[-1]["final_loss"]
    console.print(
        f"[bold]eval[/] student {metrics['student_steps']} steps vs teacher {cfg.diffusion.teacher_steps}: "
        f"MSE {metrics['student_mse']:.4g} (PSNR {metrics['student_psnr']:.2f} dB); "
        f"{metrics['baseline']}: MSE {metrics['baseline_mse']:.4g} (PSNR {metrics['baseline_psnr']:.2f} dB)"
    )

    scheduler = student_scheduler(cfg, dm)
    steps = metrics["student_steps"]
    usage = _usage(cfg, dm, type(scheduler).__name__, steps, sparse)
    manifest = Manifest(
        stage="distill",
        path=str(out_path),
        task="diffusion",
        model_type=dm.class_name,
        inputs={"teacher": describe_input(src.path, src.manifest)},
        config=cfg.to_dict(),
        metrics=metrics,
        timings={"load_s": load_s, "teacher_samples_s": pool_s, "train_s": train_s},
        history=history_of(src),
        extra=_extra(cfg, dm, type(scheduler).__name__, steps, labels, sparse, len(pool[0])),
    )
    with atomic_artifact(out_path, overwrite) as tmp:
        _save(student, scheduler, dm, tmp)
        manifest.timings["total_s"] = time.perf_counter() - t_start
        finalize_artifact(tmp, manifest, out_path)
        (tmp / "README.md").write_text(_card(manifest, dm, usage))
    with contextlib.suppress(Exception):
        _summary(console, manifest)
    return manifest.to_dict()


def _summary(console: Any, manifest: Manifest) -> None:
    from rich.table import Table

    m = manifest.metrics
    table = Table(title=f"distill --method {manifest.extra['method']}")
    for col in ("", "steps", "MSE vs teacher", "PSNR dB", "ms/step"):
        table.add_column(col)
    table.add_row(
        "student",
        str(m["student_steps"]),
        f"{m['student_mse']:.4g}",
        f"{m['student_psnr']:.2f}",
        f"{m['student_ms_per_step']:.2f}",
    )
    table.add_row(m["baseline"], "", f"{m['baseline_mse']:.4g}", f"{m['baseline_psnr']:.2f}", "")
    console.print(table)
    console.print(f"wrote {manifest.path}")
