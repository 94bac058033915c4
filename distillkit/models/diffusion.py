"""diffusers denoisers: detect and load a teacher, call it one way, build its student, sample with DDIM.

What distillkit accepts as a diffusers teacher (``--teacher DIR``):

- a **pipeline directory**: ``model_index.json`` with the denoiser in ``unet/`` or ``transformer/`` and the
  scheduler in ``scheduler/`` (e.g. ``DDPMPipeline.save_pretrained``); other components (``vae``, ...) are
  copied into the output unchanged. A pipeline with a ``vae`` is a latent model: samples are compared in
  latent space and never decoded.
- a **model directory**: ``config.json`` whose ``_class_name`` is ``UNet2DModel``, ``UNet2DConditionModel``,
  ``DiTTransformer2DModel``, ``Transformer2DModel``, ``SD3Transformer2DModel``, ``WanTransformer3DModel`` or
  ``FluxTransformer2DModel``, with its scheduler in ``DIR/scheduler/`` or as
  ``DIR/scheduler_config.json`` beside the model config.

Conditioning is by class label: ``UNet2DModel`` / ``UNet2DConditionModel`` with ``num_class_embeds`` and
DiT (``num_embeds_ada_norm`` classes); or by text: a pipeline whose ``unet`` is a cross-attention
``UNet2DConditionModel`` beside a ``text_encoder`` and ``tokenizer`` (Stable-Diffusion layout). Prompts are encoded
once (:func:`encode_prompts`, as StableDiffusionPipeline does: padded to the tokenizer's max length, the text
encoder's last hidden state) and the embeddings [B, L, D] take the place of labels everywhere; the unconditional
branch of guidance is the empty prompt's embedding. A cross-attention UNet without a text encoder is refused. The null
(unconditional) class of classifier-free guidance is DiT's extra label row (id ``num_embeds_ada_norm``) and,
for a class-conditional UNet, its last embedding (id ``num_class_embeds - 1``), which then is not sampled as a
class; the UNet must have been trained with that label dropout for guidance to mean anything.

Flow-matching transformers (``SD3Transformer2DModel``, ``FluxTransformer2DModel`` or the video
``WanTransformer3DModel``, with
``FlowMatchEulerDiscreteScheduler``, velocity prediction) are sampled with Euler on the scheduler's own sigma grid
(:mod:`distillkit.models.flow`); they are conditioned on zero text embeddings (a pipeline saved without its text
encoders), and a pipeline with text encoders is refused. A video transformer's config has no sample size: the latent
``(frames, height, width)`` it samples is given to :func:`load_diffusion` (``--video-shape``), and its samples are
[C, F, H, W]. Wan 2.2's two-expert (``transformer_2``) and per-token-timestep (``expand_timesteps``) pipelines and
image-conditioned Wan transformers are refused by name.

Flux-style transformers (``FluxTransformer2DModel`` in a ``FluxPipeline``) sample [C, H, W] latents of a size given at
load time (``--image-size``, default FluxPipeline's 128 x 128); :func:`flux_denoise` packs them into 2x2 patches with
their rotary ids as the pipeline does, and a guidance-distilled one (``guidance_embeds``) gets an embedded guidance
scale. Their scheduler's resolution-dependent shift (``use_dynamic_shifting``) is reproduced; image-conditioned Flux
pipelines (Kontext, Fill, Control, ...) and transformers are refused by name.

Sampling of DDPM-family models here is deterministic DDIM (eta 0) with ``trailing`` timestep spacing, so that a few-step run starts
from pure noise; :func:`ddim_step` reproduces ``DDIMScheduler.step`` (clip_sample included) for any pair of
timesteps per sample, which training needs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillkit.errors import ConfigError, ModelError

MODEL_CLASSES = (
    "UNet2DModel",
    "UNet2DConditionModel",
    "DiTTransformer2DModel",
    "Transformer2DModel",
    "SD3Transformer2DModel",
    "WanTransformer3DModel",
    "FluxTransformer2DModel",
)
# flow-matching transformers (velocity prediction, FlowMatchEulerDiscreteScheduler); see distillkit.models.flow
FLOW_MODEL_CLASSES = ("SD3Transformer2DModel", "WanTransformer3DModel", "FluxTransformer2DModel")
# Flux-style transformers: packed 2x2 latents, rotary ids, FluxPipeline's sigma grid and resolution-dependent shift
FLUX_MODEL_CLASSES = ("FluxTransformer2DModel",)
# the one Flux pipeline distillkit samples as FluxPipeline does; Kontext / Fill / Control / img2img / ControlNet /
# Redux pipelines condition on images and are refused by name
FLUX_PIPELINE = "FluxPipeline"
# FluxPipeline's default size: default_sample_size 128 latents (1024 x 1024 pixels through its 8x VAE)
FLUX_DEFAULT_SIZE = (128, 128)
# video denoisers: samples [C, F, H, W] of a latent size given at load time (their config does not hold one)
VIDEO_MODEL_CLASSES = ("WanTransformer3DModel",)
# pipeline components of a text-conditioned flow pipeline, which distillkit does not encode prompts with yet
FLOW_TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
DENOISER_FOLDERS = ("unet", "transformer")
SCHEDULER_DIR = "scheduler"
SCHEDULER_CONFIG = "scheduler_config.json"


# flow-matching schedulers (velocity prediction on a straight path; sampled by models/flow.py)
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def is_flow_scheduler(scheduler: Any) -> bool:
    return type(scheduler).__name__ in FLOW_SCHEDULERS


def check_flow_scheduler(scheduler: Any, path: str, *, flux: bool = False) -> None:
    """Refuse scheduler settings distillkit's Euler solver does not reproduce, by name (a Flux teacher's
    resolution-dependent shift is reproduced, as FluxPipeline computes it)."""
    cfg = scheduler.config
    dynamic = getattr(cfg, "use_dynamic_shifting", False) and not flux
    bad = [
        (dynamic, "use_dynamic_shifting", "a resolution-dependent shift (mu)"),
        (getattr(cfg, "stochastic_sampling", False), "stochastic_sampling", "stochastic sampling"),
        (getattr(cfg, "invert_sigmas", False), "invert_sigmas", "inverted sigmas"),
    ]
    for on, key, what in bad:
        if on:
            raise ModelError(
                f"the scheduler of {path} uses {what} ({key}=true), which distillkit's Euler solver does not reproduce",
                hint=f"set {key}=false in its scheduler_config.json",
            )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_diffusers_dir(path: str | Path) -> bool:
    """True for a diffusers pipeline or supported model directory; reads at most two small JSON files (no torch)."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / "model_index.json").is_file():
        return True
    cfg = _read_json(p / "config.json") if (p / "config.json").is_file() else None
    return bool(cfg) and cfg.get("_class_name") in MODEL_CLASSES


def is_diffusers_teacher(arg: str) -> bool:
    """Cheap check (no torch) for the CLI: is ``arg`` a diffusers pipeline/model dir or an artifact of one?"""
    if arg == "-":
        return False
    p = Path(arg).expanduser()
    if p.is_file() and p.name.endswith(".json"):
        p = p.parent
    return is_diffusers_dir(p)


@dataclass
class DiffusionModel:
    """A loaded denoiser and what is needed to sample from it.

    ``sample_shape`` is ``(C, H, W)`` of one sample (``(C, F, H, W)`` for a video model); ``num_classes`` is None
    for an unconditional model; ``null_class`` is the label id of "no class" for classifier-free guidance (None
    when there is none).
    """

    model: Any
    scheduler: Any
    path: str
    layout: str  # "pipeline" | "model"
    class_name: str
    subfolder: str | None  # the denoiser's folder inside a pipeline
    sample_shape: tuple[int, ...]
    num_classes: int | None = None
    null_class: int | None = None
    space: str = "pixel"  # "pixel" | "latent"
    pipeline_index: dict[str, Any] = field(default_factory=dict)
    # text conditioning (cross-attention UNet of a pipeline): the frozen text encoder and its tokenizer, and the
    # empty prompt's embedding [L, D], the unconditional branch of classifier-free guidance
    text_encoder: Any = None
    tokenizer: Any = None
    null_embedding: Any = None

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None or self.text_conditioned

    @property
    def text_conditioned(self) -> bool:
        return self.text_encoder is not None

    @property
    def null_condition(self) -> Any:
        """What guidance feeds the unconditional branch: the null class id, or the empty-prompt embedding [L, D]."""
        return self.null_embedding if self.text_conditioned else self.null_class

    @property
    def flow(self) -> bool:
        """A flow-matching model: velocity prediction on FlowMatchEulerDiscreteScheduler's straight path."""
        return is_flow_scheduler(self.scheduler)

    @property
    def video(self) -> bool:
        """A video denoiser: samples [C, F, H, W]."""
        return self.class_name in VIDEO_MODEL_CLASSES

    @property
    def flux(self) -> bool:
        """A Flux-style transformer: samples [C, H, W] are packed into 2x2 patches for the model."""
        return self.class_name in FLUX_MODEL_CLASSES

    @property
    def video_shape(self) -> tuple[int, int, int] | None:
        """The latent (frames, height, width) of a video model's samples; None for an image model."""
        return tuple(self.sample_shape[1:]) if self.video else None  # type: ignore[return-value]

    @property
    def prediction_type(self) -> str:
        return "flow (velocity)" if self.flow else self.scheduler.config.prediction_type


def _model_class(name: str) -> Any:
    import diffusers

    return getattr(diffusers, name)


def _denoiser_dir(path: Path) -> tuple[str, Path, str | None, dict[str, Any]]:
    """(class name, directory, pipeline subfolder, model_index) of the denoiser under ``path``."""
    index = _read_json(path / "model_index.json") if (path / "model_index.json").is_file() else None
    if index is not None:
        for sub in DENOISER_FOLDERS:
            cfg = _read_json(path / sub / "config.json")
            if cfg is not None and cfg.get("_class_name") in MODEL_CLASSES:
                return cfg["_class_name"], path / sub, sub, index
        raise ModelError(
            f"the pipeline {path} has no supported denoiser in unet/ or transformer/",
            hint=f"distillkit distils {', '.join(MODEL_CLASSES)}",
        )
    cfg = _read_json(path / "config.json")
    name = (cfg or {}).get("_class_name")
    if name not in MODEL_CLASSES:
        raise ModelError(
            f"{path} is not a diffusers pipeline or a supported diffusers model (config _class_name {name!r})",
            hint=f"pass a pipeline directory (model_index.json) or a model directory of {', '.join(MODEL_CLASSES)}",
        )
    return name, path, None, {}


def _scheduler_dir(path: Path, layout: str) -> Path:
    if (path / SCHEDULER_DIR / SCHEDULER_CONFIG).is_file():
        return path / SCHEDULER_DIR
    if layout == "model" and (path / SCHEDULER_CONFIG).is_file():
        return path
    raise ModelError(
        f"{path} has no scheduler (looked for {SCHEDULER_DIR}/{SCHEDULER_CONFIG} and {SCHEDULER_CONFIG})",
        hint="save the teacher's scheduler with scheduler.save_pretrained(DIR / 'scheduler')",
    )


def load_diffusion(
    path: str | Path,
    *,
    device: Any = "cpu",
    video_shape: tuple[int, int, int] | None = None,
    image_size: tuple[int, int] | None = None,
) -> DiffusionModel:
    """Load the denoiser (float32, eval mode) and scheduler of a diffusers pipeline or model directory.

    ``video_shape`` is the latent (frames, height, width) a video denoiser samples (required for one, refused for an
    image denoiser); ``image_size`` the latent (height, width) a Flux transformer samples (default
    :data:`FLUX_DEFAULT_SIZE`, refused for other denoisers, whose config holds their size)."""
    import torch

    path = Path(path)
    name, model_dir, sub, index = _denoiser_dir(path)
    for given, flag, classes, what in (
        (video_shape, "--video-shape", VIDEO_MODEL_CLASSES, "video denoisers"),
        (image_size, "--image-size", FLUX_MODEL_CLASSES, "Flux transformers"),
    ):
        if given is not None and name not in classes:
            raise ConfigError(
                f"{flag} sets the size of {what} ({', '.join(classes)}); {path} holds a {name}", hint=f"drop {flag}"
            )
    if name in FLUX_MODEL_CLASSES:
        _check_flux_pipeline(path, index)
    layout = "pipeline" if index else "model"
    sched_dir = _scheduler_dir(path, layout)
    from distillkit.models.load import check_safetensors

    # a truncated or corrupt weight file fails here by name, not as a Rust error from inside diffusers
    check_safetensors(model_dir)
    try:
        model = _model_class(name).from_pretrained(str(model_dir), torch_dtype=torch.float32)
        sched_name = (_read_json(sched_dir / SCHEDULER_CONFIG) or {}).get("_class_name", "DDPMScheduler")
        scheduler = _model_class(sched_name).from_pretrained(str(sched_dir))
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"cannot load the diffusers model in {path}: {str(e).splitlines()[0]}") from None
    cfg = model.config
    if (name in FLOW_MODEL_CLASSES) != is_flow_scheduler(scheduler):
        hint = (
            f"flow-matching transformers ({', '.join(FLOW_MODEL_CLASSES)}) sample with FlowMatchEulerDiscreteScheduler; "
            "UNet and DiT denoisers with a DDPM/DDIM-family scheduler"
        )
        if name in FLOW_MODEL_CLASSES and getattr(scheduler.config, "use_flow_sigmas", False):
            # Wan checkpoints ship UniPC on flow sigmas; Euler on the same shifted grid is its first-order solver
            hint = (
                "save FlowMatchEulerDiscreteScheduler(shift=<its flow_shift "
                f"{getattr(scheduler.config, 'flow_shift', '?')}>) into scheduler/ to distil it with Euler"
            )
        raise ModelError(f"{path} pairs a {name} with a {type(scheduler).__name__}", hint=hint)
    if name in FLOW_MODEL_CLASSES:
        check_flow_scheduler(scheduler, str(path), flux=name in FLUX_MODEL_CLASSES)
        texts = [k for k in FLOW_TEXT_COMPONENTS if (index.get(k) or [None])[0]]
        if texts:
            raise ModelError(
                f"{path} is a text-conditioned flow pipeline ({', '.join(texts)}); distillkit distils flow "
                "transformers with zero text conditioning only",
                hint="save the pipeline without its text encoders (text_encoder*=None) to distil it unconditionally",
            )
        channels = int(cfg.in_channels)
        if name in VIDEO_MODEL_CLASSES:
            size = _video_size(path, model, index, video_shape)
        elif name in FLUX_MODEL_CLASSES:
            size, channels = _flux_size(path, model, image_size), channels // 4
        else:
            size = _square(cfg.sample_size)
        model.to(device).eval().requires_grad_(False)
        return DiffusionModel(
            model=model,
            scheduler=scheduler,
            path=str(path.resolve()),
            layout=layout,
            class_name=name,
            subfolder=sub,
            sample_shape=(channels, *size),
            space="latent" if (index.get("vae") or [None])[0] else "pixel",
            pipeline_index=index,
        )
    if getattr(scheduler.config, "thresholding", False):
        raise ModelError(
            f"the scheduler of {path} uses dynamic thresholding, which distillkit's DDIM solver does not reproduce",
            hint="set thresholding=false in its scheduler_config.json",
        )
    if getattr(scheduler.config, "prediction_type", None) not in ("epsilon", "v_prediction", "sample"):
        raise ModelError(
            f"the scheduler of {path} has no epsilon / v_prediction / sample prediction type",
            hint="distillkit distils DDPM/DDIM-family models",
        )
    num_classes = null_class = None
    text_encoder = tokenizer = null_embedding = None
    if name in ("UNet2DModel", "UNet2DConditionModel"):
        blocks = [*cfg.down_block_types, *cfg.up_block_types, str(getattr(cfg, "mid_block_type", "") or "")]
        if any("CrossAttn" in b for b in blocks):
            text_encoder, tokenizer = _load_text_encoder(path, index, device)
            null_embedding = encode_prompts(text_encoder, tokenizer, [""])[0]
        if getattr(cfg, "class_embed_type", None) is not None:
            raise ModelError(
                f"{path} uses class_embed_type={cfg.class_embed_type!r}",
                hint="only label embeddings (num_class_embeds) are supported",
            )
        if cfg.num_class_embeds:
            num_classes = int(cfg.num_class_embeds)
            null_class = num_classes - 1 if name == "UNet2DConditionModel" and num_classes > 1 else None
        channels, size = int(cfg.in_channels), cfg.sample_size
    else:
        if getattr(cfg, "cross_attention_dim", None) or getattr(cfg, "patch_size", None) is None:
            raise ModelError(
                f"{path} is a {name} that is not a class-conditional DiT (patched, ada_norm_zero)",
                hint="distillkit distils DiT-style transformers",
            )
        num_classes = int(cfg.num_embeds_ada_norm)
        null_class = num_classes  # DiT's label embedding has one extra row for dropped labels
        channels, size = int(cfg.in_channels), cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    model.to(device).eval().requires_grad_(False)
    return DiffusionModel(
        model=model,
        scheduler=scheduler,
        path=str(path.resolve()),
        layout=layout,
        class_name=name,
        subfolder=sub,
        sample_shape=(channels, int(h), int(w)),
        num_classes=num_classes,
        null_class=null_class,
        # StableDiffusionPipeline saves an absent VAE as [null, null]
        space="latent" if (index.get("vae") or [None])[0] else "pixel",
        pipeline_index=index,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        null_embedding=null_embedding,
    )


def _video_size(path: Path, model: Any, index: dict[str, Any], shape: tuple[int, int, int] | None) -> tuple[int, ...]:
    """The latent (frames, height, width) of a Wan-style video transformer, checked against its patches and rotary
    table; the Wan 2.2 and image-to-video variants distillkit does not sample are refused by name."""
    cfg = model.config
    if (index.get("transformer_2") or [None])[0] or index.get("expand_timesteps"):
        raise ModelError(
            f"{path} is a Wan 2.2 pipeline (two experts or per-token timesteps), which distillkit does not sample",
            hint="distil a single-transformer text-to-video pipeline (transformer_2=None, expand_timesteps=false)",
        )
    if cfg.image_dim is not None or cfg.added_kv_proj_dim is not None:
        raise ModelError(
            f"{path} holds an image-conditioned {type(model).__name__} (image_dim / added_kv_proj_dim)",
            hint="distillkit distils text-to-video transformers, conditioned on zero text embeddings",
        )
    if shape is None:
        raise ConfigError(
            f"{path} is a video model and its config does not say how large a video it samples",
            hint="pass --video-shape FRAMES,HEIGHT,WIDTH of the latent video (e.g. 21,60,104 for Wan's 81x480x832)",
        )
    patch = tuple(int(p) for p in cfg.patch_size)
    bad = [f"{n} {v} % {p}" for n, v, p in zip(("frames", "height", "width"), shape, patch, strict=True) if v % p]
    if bad:
        raise ConfigError(
            f"--video-shape {','.join(map(str, shape))} does not split into the {patch} patches "
            f"of {path} ({', '.join(bad)} != 0)",
            hint="pass a latent size that is a multiple of the patch size along every axis",
        )
    grid = [v // p for v, p in zip(shape, patch, strict=True)]
    if max(grid) > cfg.rope_max_seq_len:
        raise ConfigError(
            f"--video-shape {','.join(map(str, shape))} has {max(grid)} patches along an axis, more than the "
            f"transformer's rotary table ({cfg.rope_max_seq_len})",
            hint="pass a smaller --video-shape",
        )
    return tuple(int(v) for v in shape)


def _check_flux_pipeline(path: Path, index: dict[str, Any]) -> None:
    """Refuse the image-conditioned Flux pipelines (Kontext, Fill, Control, img2img, ...) by their class name."""
    cls = index.get("_class_name")
    if index and cls != FLUX_PIPELINE:
        raise ModelError(
            f"{path} is a {cls}, an image-conditioned Flux pipeline that distillkit does not sample",
            hint=f"distil a text-to-image {FLUX_PIPELINE} (saved without its text encoders)",
        )


def _flux_size(path: Path, model: Any, size: tuple[int, int] | None) -> tuple[int, int]:
    """The latent (height, width) of a Flux transformer's samples, checked against its 2x2 packing; image-conditioned
    transformers (Fill / Control: more input than output channels) and patched ones are refused by name."""
    cfg = model.config
    channels, out = int(cfg.in_channels), int(cfg.out_channels or cfg.in_channels)
    if channels != out:
        raise ModelError(
            f"{path} holds an image-conditioned {type(model).__name__} (in_channels {channels} != out_channels {out}, "
            "as Flux Fill / Control have)",
            hint=f"distillkit distils text-to-image Flux transformers ({FLUX_PIPELINE})",
        )
    if int(cfg.patch_size) != 1 or channels % 4:
        raise ModelError(
            f"{path} holds a {type(model).__name__} with patch_size {cfg.patch_size} and in_channels {channels}; "
            "FluxPipeline packs 2x2 latent patches into in_channels = 4 x latent channels with patch_size 1",
            hint="distil a FluxPipeline transformer",
        )
    h, w = size or FLUX_DEFAULT_SIZE
    if h % 2 or w % 2:
        raise ConfigError(
            f"--image-size {h},{w} does not split into Flux's 2x2 latent patches",
            hint="pass an even latent height and width (e.g. 128,128 for 1024x1024 pixels)",
        )
    return int(h), int(w)


def _square(size: Any) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(h), int(w)


def _load_text_encoder(path: Path, index: dict[str, Any], device: Any) -> tuple[Any, Any]:
    """The frozen float32 ``text_encoder`` and ``tokenizer`` of the pipeline ``path``, by their model_index classes."""
    import torch
    import transformers

    entries = {k: index.get(k) or [None, None] for k in ("text_encoder", "tokenizer")}
    if not index or any(v[0] is None or not (path / k).is_dir() for k, v in entries.items()):
        raise ModelError(
            f"{path} has a text-conditioned (cross-attention) UNet but no text_encoder/ and tokenizer/ beside it",
            hint="pass the whole pipeline directory (model_index.json with unet, text_encoder and tokenizer)",
        )
    from distillkit.models.load import check_safetensors

    check_safetensors(path / "text_encoder")
    try:
        encoder = getattr(transformers, entries["text_encoder"][1]).from_pretrained(
            str(path / "text_encoder"), torch_dtype=torch.float32
        )
        tokenizer = getattr(transformers, entries["tokenizer"][1]).from_pretrained(str(path / "tokenizer"))
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise ModelError(f"cannot load the text encoder of {path}: {str(e).splitlines()[0]}") from None
    encoder.to(device).eval().requires_grad_(False)
    return encoder, tokenizer


def encode_prompts(text_encoder: Any, tokenizer: Any, prompts: list[str], batch: int = 64) -> Any:
    """Prompt embeddings [P, L, D] (``L`` the tokenizer's max length, ``D`` the encoder's hidden size), as
    StableDiffusionPipeline computes ``prompt_embeds``: max-length padding, the last hidden state."""
    import torch

    device = next(text_encoder.parameters()).device
    use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            tok = tokenizer(
                prompts[i : i + batch],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            mask = tok.attention_mask.to(device) if use_mask else None
            out.append(text_encoder(tok.input_ids.to(device), attention_mask=mask)[0].float())
    return torch.cat(out)


def label_range(dm: DiffusionModel) -> int:
    """How many labels are real classes (the null class of a UNet is its last id and is excluded)."""
    if dm.num_classes is None:
        return 0
    if dm.null_class is not None and dm.null_class < dm.num_classes:
        return dm.num_classes - 1
    return dm.num_classes


# --------------------------------------------------------------------------------------------
# One call for every denoiser


def denoise(
    model: Any, x: Any, t: Any, labels: Any = None, timestep_cond: Any = None, guidance: float | None = None
) -> Any:
    """The raw model output for noisy samples ``x`` [B, C, H, W] (video: [B, C, F, H, W]) at integer timesteps ``t`` [B] (float
    ``sigma * num_train_timesteps`` for a flow transformer, which gets zero text conditioning and returns its velocity).

    ``labels`` [B] (int64) for class-conditional models, or prompt embeddings [B, L, D] (float) for a
    text-conditioned UNet2DConditionModel; ``timestep_cond`` [B, time_cond_proj_dim] for a
    guidance-distilled UNet2DConditionModel. Returns [B, C, H, W] in the scheduler's prediction type (a DiT
    that learns its variance returns 2C channels; the variance half is dropped, as DiTPipeline does).
    ``guidance`` is the embedded guidance scale of a guidance-distilled Flux transformer (``guidance_embeds``).
    """
    name = type(model).__name__
    if name in FLUX_MODEL_CLASSES:
        return flux_denoise(model, x, t, guidance)
    if name in FLOW_MODEL_CLASSES:
        return model(x, timestep=t, **null_text_condition(model, x.shape[0], x.device)).sample
    if name == "UNet2DModel":
        out = model(x, t, class_labels=labels).sample
    elif name == "UNet2DConditionModel":
        if labels is not None and labels.is_floating_point():
            states, labels = labels, None
        else:
            # no cross-attention blocks (checked at load), so the encoder states are never read
            states = x.new_zeros(x.shape[0], 1, model.config.cross_attention_dim or 1)
        out = model(x, t, encoder_hidden_states=states, class_labels=labels, timestep_cond=timestep_cond).sample
    else:
        out = model(x, timestep=t, class_labels=labels).sample
    if out.shape[1] == 2 * x.shape[1]:
        out = out[:, : x.shape[1]]
    return out


# --------------------------------------------------------------------------------------------
# DDIM on the scheduler's noise schedule


class NoiseSchedule:
    """The scheduler's ``alphas_cumprod`` and prediction type, with DDIM arithmetic for per-sample timesteps.

    ``alpha(t)`` is ``alphas_cumprod[t]`` for ``t >= 0`` and the scheduler's final alpha for ``t < 0`` (the
    step past the last one), exactly as ``DDIMScheduler.step`` indexes it.
    """

    def __init__(self, scheduler: Any, device: Any = "cpu"):
        import torch

        cfg = scheduler.config
        self.num_train_timesteps = int(cfg.num_train_timesteps)
        self.prediction_type = cfg.prediction_type
        self.clip = float(cfg.clip_sample_range) if getattr(cfg, "clip_sample", False) else None
        ac = scheduler.alphas_cumprod.to(torch.float32)
        final = 1.0 if getattr(cfg, "set_alpha_to_one", True) else float(ac[0])
        self.table = torch.cat([ac, torch.tensor([final])]).to(device)  # index -1 -> final alpha

    def alpha(self, t: Any) -> Any:
        """``[B]`` alphas_cumprod at integer timesteps ``t`` [B] (negative: the final alpha), as [B, 1, 1, 1]."""
        idx = t.long().clone()
        idx[idx < 0] = -1
        return self.table[idx].view(-1, 1, 1, 1)

    def x0_eps(self, out: Any, x: Any, t: Any) -> tuple[Any, Any]:
        """(x0, eps) predicted from the model output ``out`` at ``x``, ``t`` ([B, C, H, W] each); x0 is clipped
        when the scheduler clips, eps is not (``use_clipped_model_output=False``, the DDIM default)."""
        a = self.alpha(t)
        sa, sb = a.sqrt(), (1 - a).sqrt()
        if self.prediction_type == "epsilon":
            x0, eps = (x - sb * out) / sa, out
        elif self.prediction_type == "v_prediction":
            x0, eps = sa * x - sb * out, sa * out + sb * x
        else:
            x0, eps = out, (x - sa * out) / sb
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        return x0, eps

    def ddim(self, x0: Any, eps: Any, s: Any) -> Any:
        """The deterministic DDIM state at timestep ``s`` [B] from predictions (x0, eps)."""
        a = self.alpha(s)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def add_noise(self, x0: Any, noise: Any, t: Any) -> Any:
        a = self.alpha(t)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddim_pairs(num_train_timesteps: int, steps: int) -> list[tuple[int, int]]:
    """The ``(t, prev)`` timesteps of a ``steps``-step DDIM run with trailing spacing, as DDIMScheduler makes them:
    ``t`` from ``round(arange(T, 0, -T/steps)) - 1`` and ``prev = t - T // steps`` (negative: the final alpha)."""
    ratio = num_train_timesteps / steps
    # Python's round is half-to-even, like numpy's, so the grid is the scheduler's own
    ts = [round(num_train_timesteps - i * ratio) - 1 for i in range(steps)]
    return [(t, t - num_train_timesteps // steps) for t in ts]


def ddim_sampler_config(scheduler: Any) -> dict[str, Any]:
    """The DDIMScheduler config that :func:`ddim_sample` reproduces: the teacher's schedule, trailing spacing."""
    from diffusers import DDIMScheduler

    return dict(DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing").config)


def ddim_sample(
    model: Any,
    schedule: NoiseSchedule,
    noise: Any,
    steps: int,
    labels: Any = None,
    *,
    guidance: tuple[float, int] | None = None,
    timestep_cond: Any = None,
) -> Any:
    """``steps`` deterministic DDIM steps from ``noise`` [B, C, H, W]; returns x0 [B, C, H, W].

    ``guidance=(w, null)`` (``null`` a class id or the empty-prompt embedding [L, D]) runs classifier-free guidance (two evaluations per step:
    ``out = out_null + w * (out_cond - out_null)``); ``timestep_cond`` is passed to a guidance-distilled UNet.
    """
    import torch

    x = noise
    b = x.shape[0]
    for t, prev in ddim_pairs(schedule.num_train_timesteps, steps):
        tt = torch.full((b,), t, device=x.device, dtype=torch.long)
        out = guided_output(model, x, tt, labels, guidance, timestep_cond)
        x0, eps = schedule.x0_eps(out, x, tt)
        x = schedule.ddim(x0, eps, torch.full((b,), prev, device=x.device, dtype=torch.long))
    return x


def guided_output(model: Any, x: Any, t: Any, labels: Any, guidance: tuple[float, int] | None, timestep_cond=None):
    """The model output, with classifier-free guidance when ``guidance=(w, null)`` is given."""
    import torch

    if guidance is None:
        return denoise(model, x, t, labels, timestep_cond)
    w, null = guidance
    both = denoise(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([null_like(labels, null), labels]), None)
    out_null, out_cond = both.chunk(2)
    return out_null + w * (out_cond - out_null)


def null_like(labels: Any, null: Any) -> Any:
    """The unconditional input shaped like ``labels``: class ids [B] filled with the null class id, or prompt
    embeddings [B, L, D] each replaced by the empty-prompt embedding ``null`` [L, D]."""
    import torch

    if isinstance(null, torch.Tensor):
        return null.to(labels).expand_as(labels)
    return torch.full_like(labels, null)


def guidance_embedding(w: Any, dim: int) -> Any:
    """Sinusoidal embedding [B, dim] of guidance scales ``w`` [B], the ``timestep_cond`` of a guidance-distilled
    UNet: the same features diffusers' latent-consistency pipelines compute (of ``(w - 1) * 1000``), so the saved
    UNet is driven the same way there."""
    import torch

    half = dim // 2
    scale = math.log(10000.0) / max(half - 1, 1)
    freqs = torch.exp(-scale * torch.arange(half, dtype=torch.float32, device=w.device))
    arg = ((w.float() - 1.0) * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


# --------------------------------------------------------------------------------------------
# Students


def copy_student(dm: DiffusionModel, *, time_cond_proj_dim: int | None = None) -> Any:
    """A trainable float32 copy of the teacher's denoiser (step distillation keeps the architecture).

    With ``time_cond_proj_dim`` (guidance distillation, UNet2DConditionModel only) the copy gains diffusers'
    own ``timestep_cond`` projection, zero-initialised so that the student starts as the teacher's
    conditional model; the saved student then reloads with plain ``from_pretrained``.
    """
    import copy

    import torch

    if time_cond_proj_dim is None:
        student = copy.deepcopy(dm.model)
    else:
        if dm.class_name != "UNet2DConditionModel":
            raise ConfigError(
                f"guidance distillation stores the guidance embedding in UNet2DConditionModel's time_cond_proj_dim; "
                f"a {dm.class_name} has no such input",
                hint="use a class-conditional UNet2DConditionModel teacher",
            )
        cls = type(dm.model)
        config = {k: v for k, v in dict(dm.model.config).items() if not k.startswith("_")}
        config["time_cond_proj_dim"] = time_cond_proj_dim
        student = cls.from_config(config)
        missing, unexpected = student.load_state_dict(dm.model.state_dict(), strict=False)
        extra = [k for k in missing if "cond_proj" not in k]
        if extra or unexpected:
            raise ModelError(f"cannot initialise the guidance student from the teacher: {extra or unexpected}")
        with torch.no_grad():
            student.time_embedding.cond_proj.weight.zero_()
    student.float().requires_grad_(True)
    # eval mode while training: DiT's label embedding drops labels in train mode, and the student must see
    # the labels the teacher saw; the tiny and real denoisers here have no dropout otherwise
    student.eval()
    return student


def null_text_condition(model: Any, batch: int, device: Any = "cpu") -> dict[str, Any]:
    """The conditioning keywords a flow transformer without text encoders is sampled with: zero prompt embeddings
    [B, 1, D] (``D`` the SD3 / Flux ``joint_attention_dim`` or the Wan ``text_dim``) and, for SD3 and Flux, zero
    pooled projections [B, pooled_projection_dim] (Flux: also ``txt_ids`` [1, 3]). A pipeline call reproduces it
    with ``prompt_embeds=torch.zeros(B, 1, D)`` (SD3 / Flux also ``pooled_prompt_embeds=torch.zeros(B, P)``) and
    ``guidance_scale=1`` (Flux: the embedded guidance scale, or any value without ``guidance_embeds``); Wan pads prompt embeddings with zeros, so
    any length of zero embeddings gives the same cross-attention."""
    import torch

    cfg = model.config
    name = type(model).__name__
    if name in VIDEO_MODEL_CLASSES:
        return {"encoder_hidden_states": torch.zeros(batch, 1, int(cfg.text_dim), device=device)}
    cond = {
        "encoder_hidden_states": torch.zeros(batch, 1, int(cfg.joint_attention_dim), device=device),
        "pooled_projections": torch.zeros(batch, int(cfg.pooled_projection_dim), device=device),
    }
    if name in FLUX_MODEL_CLASSES:
        # one zero text token at rotary position (0, 0, 0), as FluxPipeline makes txt_ids for prompt_embeds [B, 1, D]
        cond["txt_ids"] = torch.zeros(1, 3, device=device)
    return cond


# --------------------------------------------------------------------------------------------
# Flux: packed latents


def pack_latents(x: Any) -> Any:
    """[B, C, H, W] latents -> [B, (H/2)(W/2), 4C] tokens of 2x2 patches, as ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Any, h: int, w: int) -> Any:
    """The inverse of :func:`pack_latents`: [B, (H/2)(W/2), 4C] -> [B, C, H, W]."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def flux_image_ids(h: int, w: int, device: Any = "cpu") -> Any:
    """Rotary position ids [(H/2)(W/2), 3] of the packed latent grid: ``(0, row, column)`` in raster order, as
    ``FluxPipeline._prepare_latent_image_ids``."""
    import torch

    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device)


def flux_denoise(model: Any, x: Any, t: Any, guidance: float | None = None) -> Any:
    """A Flux transformer's velocity [B, C, H, W] at latents ``x`` [B, C, H, W] and timesteps ``t`` [B]
    (``sigma * 1000``): packed as FluxPipeline packs them, zero text conditioning (:func:`null_text_condition`),
    the timestep and embedded guidance divided by 1000 as the pipeline passes them (the model multiplies back)."""
    import torch

    b, _, h, w = x.shape
    kwargs = null_text_condition(model, b, x.device)
    if model.config.guidance_embeds:
        if guidance is None:
            raise ConfigError(
                f"{type(model).__name__} is guidance-distilled (guidance_embeds) and needs an embedded guidance scale",
                hint="pass --guidance-scale (FluxPipeline's default is 3.5)",
            )
        kwargs["guidance"] = torch.full((b,), float(guidance), device=x.device)
    out = model(
        pack_latents(x),
        timestep=t.to(x.dtype) / 1000,
        img_ids=flux_image_ids(h, w, x.device),
        **kwargs,
    ).sample
    return unpack_latents(out, h, w)
