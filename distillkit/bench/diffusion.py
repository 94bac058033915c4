"""``distillkit bench`` for diffusers denoisers: sampling speed (images/s) and sample quality against the baseline.

Per model (a diffusers pipeline or model directory, e.g. a ``distill --method ...`` artifact): parameters, weight
file size, load time, the sampling step count, latency of sampling one ``--batch`` of images (p50/p90; per image
and per denoiser evaluation too), images/s, peak memory (the transformers bench's method: load plus one sampled
batch), and the MSE / PSNR of its samples against the baseline's samples from the same noise and labels.

Sampling reuses distillkit's own solvers (:mod:`distillkit.models.diffusion`, :mod:`distillkit.distill.diffusion`,
:mod:`distillkit.models.flow`): Euler on the saved scheduler's sigma grid for flow-matching models
(FlowMatchEulerDiscreteScheduler), deterministic DDIM with trailing timestep spacing, the consistency sampler for LCM students, classifier-free
guidance (two evaluations per step) for a baseline that a guidance-distilled student is compared with, and the
guidance embedding (one evaluation per step) for that student.

Step counts, per model: ``--diffusion-steps`` for the MODEL arguments; else the artifact's manifest
``extra.num_inference_steps``; else, for the baseline, the ``--teacher-steps`` that students distilled from it
recorded in their manifests; else :data:`DEFAULT_STEPS`. Quality uses :data:`QUALITY_SAMPLES` fixed noises drawn
with ``--seed + 1`` (the draw of ``distill``'s own evaluation, so a student benched against its teacher with the
distill seed reproduces the manifest's ``student_mse``); timing uses one batch drawn with ``--seed``.

Text-conditioned pipelines (cross-attention UNet with a text encoder) are conditioned on prompts: ``--prompts FILE``,
else the ``prompt_texts`` that ``distill --prompts`` recorded in an artifact's manifest. A prompt is drawn per sample
after its noise (as for class labels, and as ``distill``'s evaluation draws them), and each model encodes the prompts
once with its own text encoder, outside the timed runs; guidance's unconditional branch is the empty prompt.

Video models (Wan) sample latent videos [C, F, H, W] of ``--video-shape``, else of the size recorded in their manifest
(for a teacher, in its students'); MSE/PSNR are over whole videos, the Fréchet distance over frames. A student
distilled with ``--sparse-attention`` is run with the block-sparse self-attention its manifest records. Flux models
sample latents of ``--image-size``, else of the size their manifests record, at the embedded guidance recorded there
(a guidance-distilled Flux model nothing recorded one for: :data:`FLUX_GUIDANCE`).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from distillkit import manifest as mf
from distillkit.bench.config import BenchConfig
from distillkit.errors import ConfigError, ModelError

DEFAULT_STEPS = 50  # diffusers' DDIM pipelines sample in 50 steps by default
QUALITY_SAMPLES = 16  # distill's default --eval-samples, so its evaluation noise is reproduced
FLUX_GUIDANCE = 3.0  # distill's default --guidance-scale, for a guidance-distilled Flux model nothing recorded one
DISTRIBUTION_SAMPLES = 256  # samples per model for the Fréchet distance (--max-samples changes it)


def is_diffusers_source(src: mf.Source) -> bool:
    """Cheap (two small JSON reads, no torch): is ``src`` a local diffusers pipeline/model directory?"""
    from distillkit.models.diffusion import is_diffusers_dir

    return src.is_local and is_diffusers_dir(src.path)


def check_kinds(entries: list[tuple[mf.Source, bool]], names: list[str]) -> bool:
    """True when every model is a diffusers one, False when none is; a mixed list is an error."""
    kinds = [is_diffusers_source(s) for s, _ in entries]
    if all(kinds) or not any(kinds):
        return kinds[0]
    diff = names[kinds.index(True)]
    other = names[kinds.index(False)]
    raise ConfigError(
        f"bench compares models of one kind: {diff} is a diffusers model and {other} is not",
        hint="bench diffusers models and transformers models in separate calls",
    )


def _check_flags(cfg: BenchConfig) -> None:
    if cfg.data is not None:
        raise ConfigError(
            "diffusers models are compared on samples from fixed noise, not on --data", hint="drop --data"
        )
    if cfg.task is not None:
        raise ConfigError("--task does not apply to diffusers models", hint="drop --task")
    if cfg.dtype not in ("auto", "float32"):
        raise ConfigError(
            f"diffusers models are benchmarked in float32 (the precision distillkit samples and distils in), "
            f"not {cfg.dtype}",
            hint="drop --dtype",
        )


# ----------------------------------------------------------------------------------------------
# What each model runs


@dataclass(frozen=True)
class Plan:
    """How one model samples: ``steps`` with ``sampler`` (``ddim`` | ``consistency`` | ``euler`` for flow-matching
    models), and ``guidance`` w for
    classifier-free guidance (``embedded``: through a guidance-distilled student's ``timestep_cond``)."""

    steps: int
    steps_from: str
    sampler: str = "ddim"
    guidance: float | None = None
    embedded: bool = False
    # a guidance-distilled Flux transformer's embedded guidance scale (one evaluation per step)
    embedded_guidance: float | None = None

    @property
    def evaluations_per_step(self) -> int:
        return 2 if self.guidance is not None and not self.embedded else 1


def _extra(src: mf.Source) -> dict[str, Any]:
    return dict(src.manifest.extra) if src.manifest is not None else {}


def _same_path(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _students_of(base: mf.Source, others: list[mf.Source]) -> list[mf.Manifest]:
    """The manifests of the students (among ``others``) that were distilled from ``base``."""
    found = []
    for s in others:
        m = s.manifest
        teacher = (m.inputs.get("teacher") or {}).get("path") if m is not None else None
        if teacher and _same_path(teacher, base.path):
            found.append(m)
    return found


def _teacher_steps_of(base: mf.Source, others: list[mf.Source]) -> int | None:
    """The ``--teacher-steps`` recorded by the students (among ``others``) that were distilled from ``base``."""
    found = {int(m.config["teacher_steps"]) for m in _students_of(base, others) if m.config.get("teacher_steps")}
    return found.pop() if len(found) == 1 else None


def _recorded(src: mf.Source, others: list[mf.Source], key: str) -> Any:
    """``extra[key]`` of ``src``'s manifest, else the one value its students (among ``others``) recorded, else None."""
    if (own := _extra(src).get(key)) is not None:
        return own
    found = {json.dumps(v) for m in _students_of(src, others) if (v := m.extra.get(key)) is not None}
    return json.loads(found.pop()) if len(found) == 1 else None


def video_shape_of(cfg: BenchConfig, src: mf.Source, others: list[mf.Source]) -> tuple[int, int, int] | None:
    """The latent (frames, height, width) a video model is sampled at: ``--video-shape``, else its manifest's
    ``video_shape``, else the one its students recorded (a teacher benched against its students); None for image
    models, whose size is in their config."""
    from distillkit.config import parse_video_shape

    return parse_video_shape(cfg.video_shape if cfg.video_shape is not None else _recorded(src, others, "video_shape"))


def image_size_of(cfg: BenchConfig, src: mf.Source, others: list[mf.Source]) -> tuple[int, int] | None:
    """The latent (height, width) a Flux model is sampled at: ``--image-size``, else its manifest's ``image_size``,
    else its students'; None otherwise (a Flux model then samples FluxPipeline's default size)."""
    from distillkit.config import parse_image_size

    return parse_image_size(cfg.image_size if cfg.image_size is not None else _recorded(src, others, "image_size"))


def _guidance_scale(entries: list[tuple[mf.Source, bool]]) -> float | None:
    """The w of the guidance-distilled students in the run (they must agree), or None."""
    scales = {
        float(s.manifest.config.get("guidance_scale"))
        for s, _ in entries
        if _extra(s).get("guidance_embedding") and s.manifest.config.get("guidance_scale") is not None
    }
    if len(scales) > 1:
        raise ConfigError(
            f"the guidance-distilled students were trained for different guidance scales {sorted(scales)}",
            hint="bench students of one guidance scale together",
        )
    return scales.pop() if scales else None


def prompt_texts(cfg: BenchConfig, srcs: list[mf.Source]) -> tuple[list[str] | None, str | None]:
    """The prompts text-conditioned models are sampled with, and where they came from: ``--prompts FILE`` (a flag
    wins over a manifest), else the ``prompt_texts`` distill recorded (the students of one run must agree)."""
    if cfg.prompts is not None:
        from distillkit.distill.diffusion import read_prompt_file

        return read_prompt_file(cfg.prompts), "--prompts"
    recorded = {tuple(t) for s in srcs if (t := _extra(s).get("prompt_texts"))}
    if len(recorded) > 1:
        raise ConfigError(
            "the text-conditioned students were distilled with different prompts",
            hint="pass --prompts FILE to sample every model with the same prompts",
        )
    return (list(recorded.pop()), "manifest") if recorded else (None, None)


def plan_for(
    cfg: BenchConfig, src: mf.Source, dm: Any, *, is_model: bool, others: list[mf.Source], guidance: float | None
) -> Plan:
    """The :class:`Plan` of ``src`` (loaded as ``dm``); see the module docstring for where the step count comes from."""
    extra = _extra(src)
    if is_model and cfg.diffusion_steps is not None:
        steps, steps_from = cfg.diffusion_steps, "--diffusion-steps"
    elif extra.get("num_inference_steps"):
        steps, steps_from = int(extra["num_inference_steps"]), "manifest"
    elif (taught := _teacher_steps_of(src, others)) is not None:
        steps, steps_from = taught, "students' --teacher-steps"
    else:
        steps, steps_from = DEFAULT_STEPS, "default"
    if dm.flow:
        # every flow student (progressive, reflow, consistency, dmd) samples with Euler on its saved scheduler
        return Plan(steps, steps_from, "euler")
    consistency = extra.get("method") == "consistency" or type(dm.scheduler).__name__ == "LCMScheduler"
    if extra.get("guidance_embedding"):
        return Plan(steps, steps_from, guidance=guidance, embedded=True)
    cfg_guided = guidance is not None and dm.conditional and dm.null_condition is not None and not consistency
    return Plan(steps, steps_from, "consistency" if consistency else "ddim", guidance if cfg_guided else None)


class Sampler:
    """Samples ``x0`` [B, C, H, W] from noise [B, C, H, W] (and labels [B]) with a model's :class:`Plan`.

    For a text-conditioned model the labels [B] are prompt ids, looked up in the prompt embeddings [P, L, D] that
    its own text encoder gives for ``prompts``."""

    def __init__(self, dm: Any, plan: Plan, device: Any, prompts: list[str] | None = None):
        from distillkit.models.diffusion import NoiseSchedule, encode_prompts

        self.dm, self.plan = dm, plan
        if dm.flow:
            from distillkit.models.flow import flow_schedule

            self.schedule = flow_schedule(dm, plan.embedded_guidance)
        else:
            self.schedule = NoiseSchedule(dm.scheduler, device)
        self.prompt_embeds = encode_prompts(dm.text_encoder, dm.tokenizer, prompts) if dm.text_conditioned else None
        self.timesteps: list[int] | None = None
        if plan.sampler == "consistency":
            from distillkit.distill.diffusion import lcm_timesteps

            config = dict(dm.scheduler.config)
            original = int(config.get("original_inference_steps") or 50)
            self.scaling = float(config.get("timestep_scaling", 10.0))
            try:
                self.timesteps = lcm_timesteps(config, plan.steps, original)
            except ValueError as e:
                raise ConfigError(
                    f"{Path(dm.path).name} cannot sample in {plan.steps} consistency steps: {str(e).splitlines()[0]}",
                    hint=f"pass --diffusion-steps {original} or fewer",
                ) from None

    def _embedding(self, n: int, device: Any) -> Any:
        import torch

        from distillkit.models.diffusion import guidance_embedding

        w = torch.full((n,), self.plan.guidance, device=device)
        return guidance_embedding(w, self.dm.model.config.time_cond_proj_dim)

    def condition(self, labels: Any) -> Any:
        """What the denoiser is fed: the class labels [B], or the prompt embeddings [B, L, D] of prompt ids [B]."""
        return self.prompt_embeds[labels] if self.prompt_embeds is not None else labels

    def sample(self, noise: Any, labels: Any) -> Any:
        import torch

        from distillkit.distill.diffusion import consistency_sample
        from distillkit.models.diffusion import ddim_sample

        model, plan = self.dm.model, self.plan
        labels = self.condition(labels)
        with torch.no_grad():
            if plan.sampler == "euler":
                from distillkit.models.flow import euler_sample

                return euler_sample(model, self.schedule, noise, plan.steps, labels)
            if plan.sampler == "consistency":
                return consistency_sample(model, self.schedule, noise, self.timesteps, labels, self.scaling)
            if plan.embedded:
                emb = self._embedding(noise.shape[0], noise.device)
                return ddim_sample(model, self.schedule, noise, plan.steps, labels, timestep_cond=emb)
            g = (plan.guidance, self.dm.null_condition) if plan.guidance is not None else None
            return ddim_sample(model, self.schedule, noise, plan.steps, labels, guidance=g)

    def step(self, noise: Any, labels: Any) -> Any:
        """One sampling step's model call(s) at the middle timestep (two evaluations, batched, when guided)."""
        import torch

        from distillkit.models.diffusion import guided_output

        if self.plan.sampler == "euler":
            from distillkit.models.flow import velocity

            with torch.no_grad():
                return velocity(self.dm.model, self.schedule, noise, torch.full((noise.shape[0],), 0.5), labels)
        t = torch.full((noise.shape[0],), self.schedule.num_train_timesteps // 2, device=noise.device)
        emb = self._embedding(noise.shape[0], noise.device) if self.plan.embedded else None
        g = (self.plan.guidance, self.dm.null_condition) if self.plan.guidance is not None and emb is None else None
        with torch.no_grad():
            return guided_output(self.dm.model, noise, t.long(), self.condition(labels), g, emb)


# ----------------------------------------------------------------------------------------------
# Inputs shared by every model


@dataclass
class Inputs:
    """The timed batch (noise [B, C, H, W] or, for video, [B, C, F, H, W]; labels [B] or None) and the quality
    noises [Q, ...] / labels [Q].

    Labels are class ids, or prompt ids into ``prompts`` for text-conditioned models (``classes`` is then P)."""

    noise: Any
    labels: Any
    quality_noise: Any
    quality_labels: Any
    sample_shape: tuple[int, ...]
    classes: int
    prompts: list[str] | None = None
    # the distribution noises [M, C, H, W] / labels [M] of the Fréchet distance (seed + 2)
    dist_noise: Any = None
    dist_labels: Any = None


def draw_inputs(cfg: BenchConfig, dm: Any, device: Any, prompts: list[str] | None = None) -> Inputs:
    """Noise and class labels (prompt ids for a text-conditioned model) from the baseline's sample shape and
    classes, drawn as ``distill``'s evaluation does (noise first, then labels uniformly over the real classes)."""
    import torch

    from distillkit.models.diffusion import label_range

    prompts = prompts if dm.text_conditioned else None
    classes = len(prompts) if prompts is not None else label_range(dm)

    def draw(n: int, seed: int) -> tuple[Any, Any]:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(n, *dm.sample_shape, generator=gen).to(device)
        labels = torch.arange(classes)[torch.randint(classes, (n,), generator=gen)].to(device) if classes else None
        return noise, labels

    noise, labels = draw(cfg.batch, cfg.seed)
    qn, ql = draw(QUALITY_SAMPLES, cfg.seed + 1)
    dn, dl = draw(distribution_samples(cfg), cfg.seed + 2)
    return Inputs(noise, labels, qn, ql, tuple(dm.sample_shape), classes, prompts, dn, dl)


def distribution_samples(cfg: BenchConfig) -> int:
    """How many samples per model the Fréchet distance is computed over: ``--max-samples``, else 256."""
    n = cfg.max_samples or DISTRIBUTION_SAMPLES
    if n < 2:
        raise ConfigError(
            f"the Fréchet distance of diffusers samples needs at least 2 samples (--max-samples {n})",
            hint=f"pass --max-samples {DISTRIBUTION_SAMPLES} or more, or omit it",
        )
    return n


def _check_compatible(dm: Any, inputs: Inputs, name: str, baseline: str) -> None:
    from distillkit.models.diffusion import label_range

    if tuple(dm.sample_shape) != inputs.sample_shape:
        raise ModelError(
            f"{name} samples {tuple(dm.sample_shape)}, the baseline {baseline} samples {inputs.sample_shape}",
            hint="bench models that sample the same shape (a teacher and its students)",
        )
    if dm.text_conditioned != (inputs.prompts is not None):
        which = "is" if dm.text_conditioned else "is not"
        raise ModelError(
            f"{name} {which} text-conditioned and the baseline {baseline} {'is not' if dm.text_conditioned else 'is'}",
            hint="bench models with the same conditioning (a teacher and its students)",
        )
    if inputs.prompts is not None:
        return
    if (label_range(dm) > 0) != (inputs.classes > 0) or label_range(dm) < inputs.classes:
        raise ModelError(
            f"{name} has {label_range(dm)} classes, the baseline {baseline} has {inputs.classes}",
            hint="bench models with the same class conditioning (a teacher and its students)",
        )


def quality_samples(sampler: Sampler, inputs: Inputs, batch: int) -> Any:
    """The model's samples [Q, C, H, W] of the quality noises, in chunks of ``batch`` (at least all Q at once, as
    ``distill``'s evaluation samples them, so that its numbers are reproduced to the last digit)."""
    return _chunked(sampler, inputs.quality_noise, inputs.quality_labels, batch)


def _chunked(sampler: Sampler, noise: Any, labels: Any, batch: int) -> Any:
    import torch

    n = noise.shape[0]
    return torch.cat(
        [
            sampler.sample(noise[i : i + batch], labels[i : i + batch] if labels is not None else None)
            for i in range(0, n, batch)
        ]
    )


class Quality:
    """Every model's samples of the quality noises (MSE/PSNR) and distribution noises (Fréchet distance of the
    fixed features of :mod:`distillkit.models.sample_features`), against the baseline's; and the baseline run at
    each model's step count from the same noises (``same_steps_*``), the same-cost comparison."""

    def __init__(self, inputs: Inputs, batch: int, device: Any):
        from distillkit.models.sample_features import SampleFeatures

        self.inputs, self.batch = inputs, batch
        self.features = SampleFeatures(inputs.sample_shape[0], device)
        self.reference: Any = None
        self.reference_stats: Any = None
        self.baseline: Sampler | None = None
        self.same_steps: dict[int, dict[str, float]] = {}

    def _run(self, sampler: Sampler) -> tuple[Any, Any]:
        from distillkit.models.sample_features import gaussian_stats

        samples = quality_samples(sampler, self.inputs, self.batch)
        dist = _chunked(sampler, self.inputs.dist_noise, self.inputs.dist_labels, self.batch)
        return samples, gaussian_stats(self.features.features(dist))

    def _against_reference(self, sampler: Sampler) -> dict[str, float]:
        from distillkit.models.sample_features import frechet_distance

        samples, stats = self._run(sampler)
        q = _quality(samples, self.reference)
        if q["mse"] > 0:  # identical samples (the baseline's own model and steps): nothing to measure, as for PSNR
            q["fd"] = frechet_distance(stats, self.reference_stats)
        return q

    def of_baseline(self, sampler: Sampler) -> dict[str, float]:
        """Record the baseline (kept for the same-steps runs); its quality against itself is an MSE of 0."""
        self.reference, self.reference_stats = self._run(sampler)
        self.baseline = sampler
        return _quality(self.reference, self.reference)

    def of_model(self, sampler: Sampler) -> dict[str, float]:
        import dataclasses

        q = self._against_reference(sampler)
        base = self.baseline
        steps = sampler.plan.steps
        if base is not None and steps != base.plan.steps:
            if steps not in self.same_steps:
                plan = dataclasses.replace(base.plan, steps=steps, steps_from=f"{steps} steps, as {base.plan.steps}")
                same = Sampler(base.dm, plan, self.inputs.noise.device, self.inputs.prompts)
                self.same_steps[steps] = self._against_reference(same)
            q.update({f"same_steps_{k}": v for k, v in self.same_steps[steps].items()})
        return q


# ----------------------------------------------------------------------------------------------
# Measurement


def measure(
    cfg: BenchConfig,
    src: mf.Source,
    name: str,
    device: Any,
    *,
    is_model: bool,
    others: list[mf.Source],
    guidance: float | None,
    inputs: Inputs | None,
    baseline: str,
    prompts: list[str] | None = None,
    prompts_from: str | None = None,
) -> tuple[dict[str, Any], Sampler, Inputs]:
    """Load ``src`` and time it; returns (record without quality, its Sampler, the shared inputs)."""
    import torch

    from distillkit.bench.measure import PeakMemory, percentile, sync_device, timed, trim_heap, weight_file_bytes
    from distillkit.models.diffusion import load_diffusion
    from distillkit.progress import Progress

    trim_heap()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with PeakMemory(device) as memory:
        t0 = time.perf_counter()
        dm = load_diffusion(
            src.path,
            device=device,
            video_shape=video_shape_of(cfg, src, others),
            image_size=image_size_of(cfg, src, others),
        )
        if dm.text_conditioned and prompts is None:
            # zero or made-up encoder states would time and score a model not used as it is meant to be
            raise ConfigError(
                f"{src.path} is a text-conditioned pipeline and no prompts were recorded by distill",
                hint="pass --prompts FILE with one prompt per line",
            )
        sparse = _extra(src).get("sparse_attention")
        if sparse:
            # a sparse-attention student runs as it was trained (and as distill measured it)
            from distillkit.attention import set_diffusers_sparse_attention

            set_diffusers_sparse_attention(dm.model, sparse["spec"], int(sparse["block_size"]))
        sync_device(device)
        load_s = time.perf_counter() - t0
        if inputs is None:
            inputs = draw_inputs(cfg, dm, device, prompts)
        _check_compatible(dm, inputs, name, baseline)
        plan = plan_for(cfg, src, dm, is_model=is_model, others=others, guidance=guidance)
        flux_guidance = _recorded(src, others, "flux_guidance") if dm.flux else None
        if flux_guidance is None and dm.flux and dm.model.config.guidance_embeds:
            flux_guidance = FLUX_GUIDANCE
        plan = replace(plan, embedded_guidance=flux_guidance)
        sampler = Sampler(dm, plan, device, inputs.prompts)
        sampler.sample(inputs.noise, inputs.labels)
    # timed runs show on stderr: sampling a large denoiser many times is minutes of otherwise silent work
    with Progress(f"bench {name}", 2 * (cfg.warmup + cfg.repeats), unit="run") as bar:
        batch_ms = timed(
            lambda: sampler.sample(inputs.noise, inputs.labels), device, cfg.warmup, cfg.repeats, tick=bar.advance
        )
        step_ms = timed(
            lambda: sampler.step(inputs.noise, inputs.labels), device, cfg.warmup, cfg.repeats, tick=bar.advance
        )
    params = [p for p in dm.model.parameters()]
    p50, per_eval = percentile(batch_ms, 50), plan.evaluations_per_step
    notes: list[str] = []
    if plan.steps_from == "default":
        notes.append(f"{plan.steps} steps is the default: pass --diffusion-steps N (or --against its teacher)")
    if sparse:
        notes.append(f"block-sparse self-attention {sparse['spec']} (block {sparse['block_size']}), as distilled")
    if inputs.prompts is not None:
        notes.append(
            f"{len(inputs.prompts)} prompts ({prompts_from}), encoded once by its own text encoder (not timed)"
        )
    if plan.embedded_guidance is not None:
        notes.append(f"Flux embedded guidance {plan.embedded_guidance:g} (guidance_embeds)")
    if plan.guidance is not None:
        notes.append(
            f"guidance w={plan.guidance:g} "
            + ("through its guidance embedding" if plan.embedded else "by classifier-free guidance (2 evals/step)")
        )
    record: dict[str, Any] = {
        "name": name,
        "path": src.path,
        "stage": src.manifest.stage if src.manifest is not None else None,
        "role": "model",
        "runtime": "pytorch",
        "task": "diffusion",
        "model_type": dm.class_name,
        "dtype": "float32",
        "params": sum(p.numel() for p in params),
        "weights_bytes": sum(p.numel() * p.element_size() for p in params),
        "file_size_bytes": weight_file_bytes(src.path),
        "load_s": load_s,
        # one sampled batch of --batch images, all steps
        "latency_ms_p50": p50,
        "latency_ms_p90": percentile(batch_ms, 90),
        "latency_ms": batch_ms,
        "latency_ms_per_image_p50": p50 / cfg.batch,
        "latency_ms_per_image_p90": percentile(batch_ms, 90) / cfg.batch,
        "throughput": cfg.batch / (p50 / 1000.0),
        "throughput_unit": "images/s",
        "steps": plan.steps,
        "steps_from": plan.steps_from,
        "sampler": plan.sampler,
        "guidance_scale": plan.guidance,
        "evaluations_per_image": plan.steps * per_eval,
        # one sampling step's model call at --batch, and per denoiser evaluation (CFG batches two in one call)
        "step_ms_p50": percentile(step_ms, 50),
        "step_ms_p90": percentile(step_ms, 90),
        "eval_ms_p50": percentile(step_ms, 50) / per_eval,
        "eval_ms_p90": percentile(step_ms, 90) / per_eval,
        "space": dm.space,
        "sample_shape": list(dm.sample_shape),
        "decode_ms_per_token_p50": None,
        "decode_ms_per_token_p90": None,
        "generate_ms_per_token": None,
        "decode_tokens_per_s": None,
        "peak_memory_mb": memory.peak / 2**20,
        "memory_method": memory.method,
        "quality": {},
        "notes": notes,
    }
    return record, sampler, inputs


def _quality(samples: Any, reference: Any) -> dict[str, float]:
    """MSE and PSNR against the baseline's samples; PSNR is left out when the samples are identical (infinite)."""
    import math

    from distillkit.distill.denoise_training import sample_errors

    errors = sample_errors(samples, reference)
    return {k: v for k, v in errors.items() if math.isfinite(v)}


def run_diffusion_bench(
    cfg: BenchConfig, entries: list[tuple[mf.Source, bool]], names: list[str], device: Any
) -> dict[str, Any]:
    """Measure diffusers models (``entries``: (source, is the --against baseline), the baseline first) and
    return the report, printed, plotted and written as the transformers bench does."""
    import torch

    from distillkit.bench.measure import check_writable, device_name, software_versions, trim_heap
    from distillkit.bench.report import build_report, print_table, safe_ratio, write_plot, write_report

    _check_flags(cfg)
    for path in (cfg.plot, cfg.out):
        if path:
            check_writable(path)
    guidance = _guidance_scale(entries)
    srcs = [s for s, _ in entries]
    prompts, prompts_from = prompt_texts(cfg, srcs)
    torch.manual_seed(cfg.seed)
    # warm-up, untimed: one-time costs (imports, thread pools, allocator) must not land on the first model
    _, warm, _ = measure(
        _fast(cfg),
        srcs[0],
        names[0],
        device,
        is_model=not entries[0][1],
        others=srcs[1:],
        guidance=guidance,
        inputs=None,
        baseline=names[0],
        prompts=prompts,
        prompts_from=prompts_from,
    )
    del warm
    trim_heap()
    records: list[dict[str, Any]] = []
    inputs: Inputs | None = None
    quality: Quality | None = None
    for i, ((src, is_teacher), name) in enumerate(zip(entries, names, strict=True)):
        sys.stderr.write(f"bench: {name}\n")
        record, sampler, inputs = measure(
            cfg,
            src,
            name,
            device,
            is_model=not is_teacher,
            others=[s for j, s in enumerate(srcs) if j != i],
            guidance=guidance,
            inputs=inputs,
            baseline=names[0],
            prompts=prompts,
            prompts_from=prompts_from,
        )
        record["role"] = "teacher" if is_teacher else "model"
        if quality is None:
            quality = Quality(inputs, max(cfg.batch, QUALITY_SAMPLES), device)
            record["quality"] = quality.of_baseline(sampler)
        else:
            record["quality"] = quality.of_model(sampler)
        records.append(record)
        del sampler
        trim_heap()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = records[0]
    n_dist = distribution_samples(cfg)
    notes = [
        f"quality: MSE/PSNR of {QUALITY_SAMPLES} samples against {base['name']}'s {base['steps']}-step samples "
        f"from the same noise (seed {cfg.seed + 1}); PSNR peak = max - min of the baseline's samples",
        f"fd: Fréchet distance of {n_dist} samples per model (seed {cfg.seed + 2}) to {base['name']}'s, on the "
        "features of a fixed random conv net (distillkit.models.sample_features; not comparable to published FID)",
        f"same_steps_*: {base['name']} itself sampled at the model's step count from the same noises (the "
        "same-cost comparison)",
    ]
    video = len(base["sample_shape"]) == 4
    if video:
        frames = base["sample_shape"][1]
        notes.append(
            f"video samples {base['sample_shape']} (C, frames, height, width, latent): MSE/PSNR over whole videos; "
            f"fd over frames, each of the {frames} frames of a video one sample ({n_dist * frames} per model)"
        )
    report = build_report(
        cfg,
        records,
        baseline=base["name"],
        device=device_name(device),
        device_type=device.type,
        versions=software_versions(),
        notes=notes,
        data_info=None,
    )
    for m in records[1:]:
        report["ratios"][m["name"]].update(
            step_speedup=safe_ratio(base["step_ms_p50"], m["step_ms_p50"]),
            evaluations_ratio=safe_ratio(m["evaluations_per_image"], base["evaluations_per_image"]),
        )
    report["diffusion"] = {
        "quality_samples": QUALITY_SAMPLES,
        "quality_seed": cfg.seed + 1,
        "distribution_samples": n_dist,
        "distribution_seed": cfg.seed + 2,
        "distribution_measure": "frechet distance, fixed random conv features (distillkit.models.sample_features)",
        "reference": base["name"],
        "reference_steps": base["steps"],
        "video_shape": base["sample_shape"][1:] if video else None,
        "guidance_scale": guidance,
        "prompts": prompts if inputs is not None and inputs.prompts is not None else None,
        "prompts_from": prompts_from if inputs is not None and inputs.prompts is not None else None,
    }
    print_table(report)
    _side_by_side(records)
    if cfg.plot:
        report["plot"] = write_plot(report, cfg.plot)
    if cfg.out:
        write_report(report, cfg.out)
    return report


def _side_by_side(records: list[dict[str, Any]]) -> None:
    """Each model beside the baseline run at the model's own step count (stderr)."""
    from rich.table import Table

    from distillkit.progress import stderr_console

    rows = [m for m in records[1:] if "same_steps_mse" in m["quality"]]
    if not rows:
        return
    base = records[0]
    table = Table(title=f"against {base['name']} at {base['steps']} steps: each model vs {base['name']} at its steps")
    for col in (
        "model",
        "steps",
        "MSE",
        "PSNR dB",
        "FD",
        f"{base['name']} MSE",
        f"{base['name']} PSNR dB",
        f"{base['name']} FD",
    ):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in rows:
        q = m["quality"]
        table.add_row(
            m["name"],
            str(m["steps"]),
            *(f"{q[k]:.4g}" if k in q else "-" for k in ("mse", "psnr", "fd")),
            *(f"{q[k]:.4g}" if k in q else "-" for k in ("same_steps_mse", "same_steps_psnr", "same_steps_fd")),
        )
    stderr_console().print(table)


def _fast(cfg: BenchConfig) -> BenchConfig:
    import dataclasses

    return dataclasses.replace(cfg, repeats=1, warmup=0)
