"""Tiny Flux-style teachers built from configs: a FluxTransformer2DModel with Flux's dynamic-shifting
FlowMatchEulerDiscreteScheduler, saved as a FluxPipeline without VAE or text encoders (zero text conditioning), or as
a model directory with its scheduler in ``scheduler/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.test_distill import flow_tiny

# what DiffusionPipeline.from_pretrained must be told for a Flux pipeline saved without these components
ABSENT = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "image_encoder", "feature_extractor")
CHANNELS = 4  # latent channels; the transformer sees 2x2 packed patches of 4 * CHANNELS
# latent (height, width): 4 x 4 packed tokens; SPARSE_SIZE: 8 x 8 tokens, four blocks of 16 (two token rows each)
IMAGE_SIZE = (8, 8)
SPARSE_SIZE = (16, 16)
# FLUX.1's scheduler_config.json: resolution-dependent shift
SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0, use_dynamic_shifting=True
)


def tiny_flux(*, seed: int = 0, guidance_embeds: bool = False, **overrides: Any) -> tuple[Any, Any]:
    """(FluxTransformer2DModel: one double and one single block of 2 heads x 8 (rotary axes 2, 2, 4), joint/pooled
    dims 16, ``guidance_embeds`` for a Flux-dev-style model; Flux's FlowMatchEulerDiscreteScheduler)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    kwargs: dict[str, Any] = dict(
        patch_size=1,
        in_channels=4 * CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    kwargs.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(**kwargs)
    return model.eval(), FlowMatchEulerDiscreteScheduler(**SCHEDULER)


def tiny_flux_pipeline(save_dir: str | Path, *, seed: int = 0, **overrides: Any) -> tuple[Any, str]:
    """A FluxPipeline directory holding only the tiny transformer and its scheduler."""
    from diffusers import FluxPipeline

    model, scheduler = tiny_flux(seed=seed, **overrides)
    pipe = FluxPipeline(transformer=model, scheduler=scheduler, **{k: None for k in ABSENT})
    path = Path(save_dir) / "flux"
    pipe.save_pretrained(path)
    return pipe, str(path)


def tiny_flux_model_dir(save_dir: str | Path, *, seed: int = 0, **overrides: Any) -> tuple[Any, str]:
    """The tiny transformer as a model directory, its scheduler in ``scheduler/``."""
    return flow_tiny.save_model_dir(*tiny_flux(seed=seed, **overrides), Path(save_dir) / "flux-model")


def load_pipeline(path: str | Path) -> Any:
    return flow_tiny.load_pipeline(path, ABSENT)


def pipeline_sample(pipe: Any, noise: Any, steps: int, guidance_scale: float = 1.0) -> Any:
    """FluxPipeline's own sampling (zero text conditioning) from latents ``noise`` [B, C, H, W], packed as the
    pipeline packs them; returns the unpacked latents [B, C, H, W]."""
    import torch

    b, c, h, w = noise.shape
    cfg = pipe.transformer.config
    out = pipe(
        prompt_embeds=torch.zeros(b, 1, cfg.joint_attention_dim),
        pooled_prompt_embeds=torch.zeros(b, cfg.pooled_projection_dim),
        guidance_scale=guidance_scale,
        num_inference_steps=steps,
        latents=pipe._pack_latents(noise.clone(), b, c, h, w),
        height=h * pipe.vae_scale_factor,
        width=w * pipe.vae_scale_factor,
        output_type="latent",
    )
    return pipe._unpack_latents(out.images, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)
