"""Tiny Wan-style video teachers built from configs: a WanTransformer3DModel with a FlowMatchEulerDiscreteScheduler,
saved as a WanPipeline with a tiny AutoencoderKLWan and without its text encoder (zero text conditioning), or as a
model directory with its scheduler in ``scheduler/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.test_distill import flow_tiny

# what DiffusionPipeline.from_pretrained must be told for a Wan pipeline saved without these components
ABSENT = ("text_encoder", "tokenizer", "transformer_2")
# latent (frames, height, width): patch (1, 2, 2) makes a 3 x 4 x 4 grid of 48 tokens, three blocks of 16
VIDEO_SHAPE = (3, 8, 8)
CHANNELS = 4


def tiny_wan(*, seed: int = 0, shift: float = 3.0, **overrides: Any) -> tuple[Any, Any]:
    """(WanTransformer3DModel on 4-channel latents: patch (1, 2, 2), 2 blocks of 2 heads x 12, text dim 16; its
    FlowMatchEulerDiscreteScheduler with ``shift``)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    kwargs: dict[str, Any] = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        rope_max_seq_len=32,
    )
    kwargs.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**kwargs)
    return model.eval(), FlowMatchEulerDiscreteScheduler(shift=shift)


def tiny_vae() -> Any:
    import torch
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKLWan(
            base_dim=4,
            z_dim=CHANNELS,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * CHANNELS,
            latents_std=[1.0] * CHANNELS,
        ).eval()


def tiny_wan_pipeline(save_dir: str | Path, *, seed: int = 0, shift: float = 3.0, **overrides: Any) -> tuple[Any, str]:
    """A WanPipeline directory holding the tiny transformer, a tiny VAE and the scheduler (no text encoder)."""
    from diffusers import WanPipeline

    model, scheduler = tiny_wan(seed=seed, shift=shift, **overrides)
    pipe = WanPipeline(transformer=model, scheduler=scheduler, vae=tiny_vae(), text_encoder=None, tokenizer=None)
    path = Path(save_dir) / "wan"
    pipe.save_pretrained(path)
    return pipe, str(path)


def tiny_wan_model_dir(save_dir: str | Path, *, seed: int = 0, shift: float = 3.0, **overrides: Any) -> tuple[Any, str]:
    """The tiny transformer as a model directory, its scheduler in ``scheduler/``."""
    return flow_tiny.save_model_dir(*tiny_wan(seed=seed, shift=shift, **overrides), Path(save_dir) / "wan-model")


def load_pipeline(path: str | Path) -> Any:
    return flow_tiny.load_pipeline(path, ABSENT)


def pipeline_sample(pipe: Any, noise: Any, steps: int) -> Any:
    """The pipeline's own sampling (zero text conditioning, no guidance) from latents ``noise`` [B, C, F, H, W];
    returns latents."""
    import torch

    b, _, f, h, w = noise.shape
    out = pipe(
        prompt_embeds=torch.zeros(b, 1, pipe.transformer.config.text_dim),
        guidance_scale=1.0,
        num_inference_steps=steps,
        latents=noise.clone(),
        num_frames=(f - 1) * pipe.vae_scale_factor_temporal + 1,
        height=h * pipe.vae_scale_factor_spatial,
        width=w * pipe.vae_scale_factor_spatial,
        output_type="latent",
    )
    return out.frames
