"""Tiny flow-matching teachers built from configs: an SD3Transformer2DModel with a FlowMatchEulerDiscreteScheduler,
saved as a StableDiffusion3Pipeline without VAE or text encoders (zero text conditioning), or as a model
directory with its scheduler in ``scheduler/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# what DiffusionPipeline.from_pretrained must be told for a pipeline saved without these components
ABSENT = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


def tiny_sd3(*, seed: int = 0, shift: float = 3.0, **overrides: Any) -> tuple[Any, Any]:
    """(SD3Transformer2DModel on 4x8x8 latents: patch 2 (16 tokens), 2 joint blocks of 2 heads x 8, joint/pooled
    dims 16; its FlowMatchEulerDiscreteScheduler with ``shift``)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    kwargs: dict[str, Any] = dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=8,
    )
    kwargs.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(**kwargs)
    return model.eval(), FlowMatchEulerDiscreteScheduler(shift=shift)


def tiny_sd3_pipeline(save_dir: str | Path, *, seed: int = 0, shift: float = 3.0, **overrides: Any) -> tuple[Any, str]:
    """A StableDiffusion3Pipeline directory holding only the tiny transformer and its scheduler."""
    from diffusers import StableDiffusion3Pipeline

    model, scheduler = tiny_sd3(seed=seed, shift=shift, **overrides)
    pipe = StableDiffusion3Pipeline(transformer=model, scheduler=scheduler, **{k: None for k in ABSENT})
    path = Path(save_dir) / "sd3"
    pipe.save_pretrained(path)
    return pipe, str(path)


def tiny_sd3_model_dir(save_dir: str | Path, *, seed: int = 0, shift: float = 3.0, **overrides: Any) -> tuple[Any, str]:
    """The tiny transformer as a model directory, its scheduler in ``scheduler/``."""
    return save_model_dir(*tiny_sd3(seed=seed, shift=shift, **overrides), Path(save_dir) / "sd3-model")


def save_model_dir(model: Any, scheduler: Any, path: Path) -> tuple[Any, str]:
    """``model`` saved as a model directory at ``path``, its scheduler in ``scheduler/``."""
    model.save_pretrained(path)
    scheduler.save_pretrained(path / "scheduler")
    return model, str(path)


def load_pipeline(path: str | Path, absent: tuple[str, ...] = ABSENT) -> Any:
    """DiffusionPipeline.from_pretrained of a pipeline saved without the ``absent`` components."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(path), **{k: None for k in absent})


def eval_noise(dm: Any, cfg: Any) -> Any:
    """The noises distill's evaluation samples from (seed + 1), [eval_samples, *sample_shape]."""
    import torch

    gen = torch.Generator().manual_seed(cfg.optim.seed + 1)
    return torch.randn(cfg.diffusion.eval_samples, *dm.sample_shape, generator=gen)


def mse(a: Any, b: Any) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


def pipeline_sample(pipe: Any, noise: Any, steps: int) -> Any:
    """The pipeline's own sampling (zero text conditioning, no guidance) from latents ``noise``; returns latents."""
    import torch

    b = noise.shape[0]
    cfg = pipe.transformer.config
    out = pipe(
        prompt_embeds=torch.zeros(b, 1, cfg.joint_attention_dim),
        pooled_prompt_embeds=torch.zeros(b, cfg.pooled_projection_dim),
        guidance_scale=1.0,
        num_inference_steps=steps,
        latents=noise.clone(),
        height=noise.shape[-2] * pipe.vae_scale_factor,
        width=noise.shape[-1] * pipe.vae_scale_factor,
        output_type="latent",
    )
    return out.images


def sparse_progressive(teacher: str, out: Path, spec: str, block: int, **fast: Any) -> dict[str, Any]:
    """``distill --method progressive`` 4 -> 2 steps of ``teacher`` with a block-sparse student (``spec``, ``block``)
    into ``out``; returns the manifest after checking it records the spec and the student beats the teacher's own
    2 steps."""
    from distillkit.config import DistillConfig
    from distillkit.distill.diffusion import run_diffusion_distill

    cfg = DistillConfig.of(
        teacher=teacher,
        method="progressive",
        teacher_steps=4,
        target_steps=2,
        steps=10,
        sparse_attention=spec,
        sparse_block_size=block,
        **fast,
    )
    m = run_diffusion_distill(cfg, out=str(out))
    assert m["extra"]["sparse_attention"] == {"spec": spec, "block_size": block}
    assert m["metrics"]["student_mse"] < m["metrics"]["baseline_mse"], m["metrics"]
    return m
