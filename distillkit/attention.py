"""The one door to the attention kernels: block-sparse attention on the best backend for the device.

``block_sparse_attention(q, k, v, mask, block_size=...)`` runs the Triton op on CUDA, and FlexAttention or the
naive fp32 reference elsewhere. On top of it sit the integrations: a transformers attention implementation
(``attn_implementation="distillkit_block_sparse"``, registered by :func:`register_transformers_attention`) and a
diffusers attention processor (:class:`BlockSparseAttnProcessor`). Importing this module does not import torch.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

from distillkit.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch

BACKENDS = ("auto", "triton", "flex", "naive")
TRANSFORMERS_IMPLEMENTATION = "distillkit_block_sparse"
# Where the mask spec and block size live on a transformers config (saved into config.json with the model).
CONFIG_SPEC_KEY = "distillkit_sparse_attention"
CONFIG_BLOCK_KEY = "distillkit_sparse_block_size"


def _pow2(n: int) -> bool:
    return n >= 16 and not n & (n - 1)


def _triton_usable(q: torch.Tensor, block_size: int) -> bool:
    if not (_pow2(q.shape[-1]) and _pow2(block_size)):
        return False
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(q: torch.Tensor, block_size: int, backend: str = "auto") -> str:
    """The backend a call with ``q`` on its device would use: ``auto`` picks Triton on CUDA (for power-of-two head
    dims and block sizes >= 16), the naive reference on CPU, FlexAttention on other accelerators."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    if backend == "triton" and not _triton_usable(q, block_size):
        raise ConfigError(
            "the Triton block-sparse kernel needs triton, a CUDA device (or TRITON_INTERPRET=1 on CPU) and "
            f"power-of-two head dim and block size >= 16 (got D={q.shape[-1]}, block {block_size}, {q.device})",
            "use backend='auto' to fall back to FlexAttention or the naive reference",
        )
    if backend != "auto":
        return backend
    if q.device.type == "cuda":
        return "triton" if _triton_usable(q, block_size) else "flex"
    return "naive" if q.device.type == "cpu" else "flex"


def _flex(q, k, v, mask, block_size, causal, scale):
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from distillkit.kernels.block_sparse_attention.masks import flex_block_mask

    if q.device.type == "cpu" and any(t.requires_grad for t in (q, k, v)):
        raise ConfigError(
            "FlexAttention has no backward on CPU", "use backend='naive' (or 'triton' under TRITON_INTERPRET=1)"
        )
    bm = flex_block_mask(mask, q.shape[2], block_size, causal)
    out = flex_attention(q, k, v, block_mask=bm, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    # FlexAttention leaves rows with no kept key at zero already; nan_to_num guards older releases.
    return torch.nan_to_num(out)


@functools.lru_cache(maxsize=64)
def _static_index(spec: Any, seq_len: int, block_size: int, causal: bool, device: str) -> Any:
    import torch

    from distillkit.kernels.block_sparse_attention.masks import block_index

    meta = torch.empty(1, 1, seq_len, 1, device=device)  # static builders read only the length and device
    return block_index(spec.build(meta, meta, block_size, causal=causal), causal=causal)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Any,
    *,
    block_size: int,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Block-sparse attention on the backend for q's device (see :func:`resolve_backend`).

    ``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]``; ``mask`` a bool block mask ``[B or 1, H or 1, nb, nb]`` with
    ``nb = ceil(T / block_size)``, a ``MaskSpec`` or a spec string (``"topk:0.1"``, ``"window:256"``...).
    Returns ``[B, H, T, D]`` in q's dtype. FlexAttention has no backward on CPU; ``auto`` never picks it there.
    """
    from distillkit.kernels.block_sparse_attention.masks import MaskSpec, check_block_mask, parse_mask_spec

    name = resolve_backend(q, block_size, backend)
    if isinstance(mask, str):
        mask = parse_mask_spec(mask)
    if name == "triton":
        from distillkit.kernels.block_sparse_attention.op import block_sparse_attention as triton_op

        if isinstance(mask, MaskSpec) and not mask.adaptive:
            # Static masks depend only on the length: compress once, not in every layer of every step.
            mask = _static_index(mask, q.shape[2], block_size, causal, str(q.device))
        return triton_op(q, k, v, mask, block_size=block_size, causal=causal, scale=scale)
    if isinstance(mask, MaskSpec):
        mask = mask.build(q, k, block_size, causal=causal)
    mask = check_block_mask(mask, q.shape[0], q.shape[1], q.shape[2], block_size).to(q.device)
    if name == "flex":
        return _flex(q, k, v, mask, block_size, causal, scale)
    from distillkit.kernels.block_sparse_attention.naive import naive_block_sparse_attention

    return naive_block_sparse_attention(q, k, v, mask, block_size=block_size, causal=causal, scale=scale)


# ----------------------------------------------------------------------------------------------- transformers


def sparse_settings(config: Any) -> tuple[str, int] | None:
    """``(spec, block_size)`` recorded on a transformers config (public keys, or the ``_``-prefixed runtime ones)."""
    spec = getattr(config, CONFIG_SPEC_KEY, None) or getattr(config, "_" + CONFIG_SPEC_KEY, None)
    if not spec:
        return None
    block = getattr(config, CONFIG_BLOCK_KEY, None) or getattr(config, "_" + CONFIG_BLOCK_KEY, None) or 64
    return str(spec), int(block)


def _padding_is_harmless(attention_mask: torch.Tensor, causal: bool) -> bool:
    """True when the model's mask adds nothing beyond (causal) block-sparse attention for the real query tokens:
    no mask at all, or right padding under a causal mask (real tokens never see the pads that follow them)."""
    import torch

    keep = (
        attention_mask
        if attention_mask.dtype == torch.bool
        else attention_mask > torch.finfo(attention_mask.dtype).min / 2
    )
    Tq, Tk = keep.shape[-2:]
    expected = torch.ones(Tq, Tk, dtype=torch.bool, device=keep.device)
    if causal:
        expected = expected.tril()
    real_query = keep.diagonal(dim1=-2, dim2=-1)[..., None]  # a pad query does not attend itself
    return bool(((keep == expected) | ~real_query).all())


def transformers_block_sparse_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query [B, H, T, D]``, ``key, value [B, Hkv, S, D]`` -> ``([B, T, H, D],
    None)``. The mask spec and block size come from ``module.config`` (see :func:`sparse_settings`).

    Decoding steps (``T != S``, with a KV cache) run dense SDPA: the block pattern is defined for square
    self-attention. Left padding or a non-causal padding mask cannot be expressed by block lists and is refused.
    """
    import torch

    settings = sparse_settings(getattr(module, "config", None))
    if settings is None:
        raise ConfigError(
            f"attn_implementation={TRANSFORMERS_IMPLEMENTATION!r} needs a mask spec on the model config",
            f"set config.{CONFIG_SPEC_KEY} = 'topk:0.25' (and {CONFIG_BLOCK_KEY})",
        )
    spec, block_size = settings
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    if dropout and module.training:
        raise ConfigError(
            "block-sparse attention has no attention dropout", "set the model's attention dropout to 0 to use it"
        )
    if query.shape[2] != key.shape[2]:
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        Tq, Tk = query.shape[2], key.shape[2]
        if attention_mask is None and causal and Tq > 1:
            # New queries sit at the end of the cached keys: causal aligned bottom-right, not SDPA's top-left.
            attention_mask = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device).tril(Tk - Tq)
        rep = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
        out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=attention_mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    if attention_mask is not None and not _padding_is_harmless(attention_mask, causal):
        raise ModelError(
            "block-sparse attention cannot apply this padding mask (left padding, or padding in a bidirectional model)",
            "pad on the right with a causal model, or pass unpadded sequences of one length",
        )
    out = block_sparse_attention(query, key, value, spec, block_size=block_size, causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register_transformers_attention() -> str:
    """Register ``distillkit_block_sparse`` with transformers (attention function + its mask function); idempotent.
    Returns the implementation name to pass as ``attn_implementation``."""
    from transformers import AttentionInterface

    AttentionInterface.register(TRANSFORMERS_IMPLEMENTATION, transformers_block_sparse_attention)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        # A bool mask (or None when it is purely causal) is what the padding check above understands.
        ALL_MASK_ATTENTION_FUNCTIONS.register(TRANSFORMERS_IMPLEMENTATION, sdpa_mask)
    except ImportError:  # older transformers build masks without a per-implementation registry
        pass
    return TRANSFORMERS_IMPLEMENTATION


def enable_sparse_attention(model: Any, spec: str, block_size: int = 64) -> Any:
    """Switch a loaded transformers model to block-sparse attention with ``spec`` (recorded on its config, so
    ``save_pretrained`` writes it into config.json). Returns the model."""
    from distillkit.kernels.block_sparse_attention.masks import parse_mask_spec

    parse_mask_spec(spec)
    name = register_transformers_attention()
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise ModelError(
            f"{type(model).__name__} is not a transformers model with selectable attention",
            "--sparse-attention works with transformers models that support attn_implementation",
        )
    setattr(config, CONFIG_SPEC_KEY, spec)
    setattr(config, CONFIG_BLOCK_KEY, int(block_size))
    try:
        model.set_attn_implementation(name)
    except (ValueError, KeyError) as exc:
        raise ModelError(
            f"{type(model).__name__} cannot switch to block-sparse attention: {exc}",
            "use a model whose attention goes through transformers' AttentionInterface (Llama, Qwen, Mistral...)",
        ) from None
    return model


# -------------------------------------------------------------------------------------------------- diffusers


class BlockSparseAttnProcessor:
    """diffusers attention processor: block-sparse self-attention with ``spec`` (see ``parse_mask_spec``).

    Use ``unet.set_attn_processor(BlockSparseAttnProcessor("topk:0.25", block_size=16))``. Self-attention over
    the image/video tokens runs block-sparse; cross-attention (text context) and calls with an attention mask run
    dense SDPA, since a short text context is cheap and has no block structure worth skipping.
    """

    def __init__(self, spec: str, block_size: int = 64, backend: str = "auto"):
        from distillkit.kernels.block_sparse_attention.masks import parse_mask_spec

        if block_size < 1:
            raise ConfigError(f"block size must be >= 1 (got {block_size})", "pass e.g. block_size=64")
        if backend not in BACKENDS:
            raise ConfigError(f"unknown attention backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
        self.mask_spec = parse_mask_spec(spec)
        self.spec = spec
        self.block_size = int(block_size)
        self.backend = backend

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        import torch.nn.functional as F

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        self_attention = encoder_hidden_states is None
        batch, src_len, _ = hidden_states.shape if self_attention else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, src_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if self_attention and attention_mask is None:
            out = block_sparse_attention(
                query, key, value, self.mask_spec, block_size=self.block_size, scale=attn.scale, backend=self.backend
            )
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class WanBlockSparseAttnProcessor(BlockSparseAttnProcessor):
    """Block-sparse self-attention for diffusers' ``WanAttention`` (the Wan video transformer's attention module).

    Self-attention over the video tokens (Wan's ``attn1``: rotary position embedding, no mask) runs block-sparse
    through :func:`block_sparse_attention`; cross-attention to the text (``attn2``) and calls with a mask are handed
    to diffusers' own ``WanAttnProcessor`` unchanged. Use ``transformer.set_attn_processor(
    WanBlockSparseAttnProcessor("tiles:21,30,52:3,6,8", block_size=64))``; tokens are in Wan's
    ``[frames, height, width]`` patch raster order, so ``tiles:F,H,W`` takes the patch grid.
    """

    def __call__(  # type: ignore[override]
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            return WanAttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # [B, T, H, D], as WanAttnProcessor lays them out
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            # Wan's rotary table is [1, T, 1, D] with each frequency repeated for the (even, odd) channel pair:
            # diffusers' generic real-valued rotation on the [T, D] table is the same arithmetic
            freqs = (rotary_emb[0][0, :, 0], rotary_emb[1][0, :, 0])
            query = apply_rotary_emb(query, freqs, use_real=True, use_real_unbind_dim=-1, sequence_dim=1)
            key = apply_rotary_emb(key, freqs, use_real=True, use_real_unbind_dim=-1, sequence_dim=1)
        out = block_sparse_attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            self.mask_spec,
            block_size=self.block_size,
            backend=self.backend,
        )
        hidden_states = out.transpose(1, 2).flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


class FluxBlockSparseAttnProcessor(BlockSparseAttnProcessor):
    """Block-sparse joint attention for diffusers' ``FluxAttention`` (Flux's double- and single-stream blocks).

    Flux attends over the joint sequence ``[text, image]``. The mask spec applies to the **image tokens only**:
    image queries see the image keys of the kept blocks and every text key; text queries see every key. For the
    kernel the sequence is reordered ``[image, text]`` (after the rotary embedding, so nothing else changes): image
    blocks start at token 0, where ``tiles:1,H,W[:1,TH,TW]`` takes the packed latent grid (``H, W`` = latent
    height / 2, width / 2) in raster order, and the text (with a ragged last image block) forms the trailing dense
    blocks. A single-stream block sees the joint sequence without its split: the text length is recorded by the
    forward pre-hook :func:`set_diffusers_sparse_attention` puts on the transformer (:attr:`text_tokens`).
    Calls with an attention mask are handed to diffusers' ``FluxAttnProcessor`` unchanged.
    """

    text_tokens: int | None = None

    def record_text_tokens(self, _module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the transformer: remember how many text tokens lead the joint sequence."""
        states = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        self.text_tokens = None if states is None else int(states.shape[1])

    def image_mask(self, q: torch.Tensor, k: torch.Tensor, n_image: int) -> torch.Tensor:
        """The block mask ``[B or 1, H or 1, nb, nb]`` of ``q, k`` [B, H, T, D] ordered ``[image, text]``: the
        spec's mask over the whole image blocks, everything kept for the text (and a ragged last image block)."""
        import torch

        from distillkit.kernels.block_sparse_attention.masks import num_blocks

        bs = self.block_size
        image = self.mask_spec.build(q[:, :, :n_image], k[:, :, :n_image], bs)
        whole = n_image // bs
        nb = num_blocks(q.shape[2], bs)
        mask = torch.ones(*image.shape[:2], nb, nb, dtype=torch.bool, device=q.device)
        mask[..., :whole, :whole] = image[..., :whole, :whole]
        return mask

    def __call__(  # type: ignore[override]
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Any:
        import torch
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        if attention_mask is not None:
            return FluxAttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        joint = encoder_hidden_states is not None
        text = int(encoder_hidden_states.shape[1]) if joint else self.text_tokens
        if text is None:
            raise ModelError(
                "a single-stream FluxAttention was called without the transformer's text length",
                "install the processor with distillkit.attention.set_diffusers_sparse_attention(transformer, ...)",
            )

        def heads(x: torch.Tensor, proj: str, norm: str | None) -> torch.Tensor:
            y = getattr(attn, proj)(x).unflatten(-1, (-1, attn.head_dim))
            return getattr(attn, norm)(y) if norm else y

        if getattr(attn, "fused_projections", False):
            raise ModelError(
                "block-sparse Flux attention reads the separate q/k/v projections",
                "call unfuse_qkv_projections() first",
            )
        q, k = heads(hidden_states, "to_q", "norm_q"), heads(hidden_states, "to_k", "norm_k")
        v = heads(hidden_states, "to_v", None)
        if joint:
            q = torch.cat([heads(encoder_hidden_states, "add_q_proj", "norm_added_q"), q], dim=1)
            k = torch.cat([heads(encoder_hidden_states, "add_k_proj", "norm_added_k"), k], dim=1)
            v = torch.cat([heads(encoder_hidden_states, "add_v_proj", None), v], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        # [B, T, H, D] in [text, image] order -> [B, H, T, D] in [image, text] order
        q, k, v = (torch.cat([x[:, text:], x[:, :text]], dim=1).transpose(1, 2) for x in (q, k, v))
        n_image = q.shape[2] - text
        mask = self.image_mask(q, k, n_image)
        out = block_sparse_attention(q, k, v, mask, block_size=self.block_size, backend=self.backend).transpose(1, 2)
        out = torch.cat([out[:, n_image:], out[:, :n_image]], dim=1).flatten(2, 3).to(q.dtype)
        if not joint:
            return out
        context, image = out[:, :text], out[:, text:]
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(context.contiguous())


def set_diffusers_sparse_attention(model: Any, spec: str, block_size: int = 64, backend: str = "auto") -> int:
    """Give every attention layer of a diffusers denoiser block-sparse self-attention with ``spec``: diffusers'
    ``Attention`` (UNet, DiT, SD3) gets :class:`BlockSparseAttnProcessor`, Wan's ``WanAttention``
    :class:`WanBlockSparseAttnProcessor` (cross-attention stays dense in both), Flux's ``FluxAttention``
    :class:`FluxBlockSparseAttnProcessor` (sparse over the image tokens of the joint attention; ``model`` must then
    be the whole transformer, which gets a forward pre-hook recording the text length). Works where the model has
    no ``set_attn_processor`` (UNet2DModel, DiT). Returns how many layers were switched."""
    from diffusers.models.attention_processor import Attention

    kinds = ("WanAttention", "FluxAttention")
    layers = [m for m in model.modules() if isinstance(m, Attention) or type(m).__name__ in kinds]
    if not layers:
        raise ConfigError("--sparse-attention needs a model with attention layers", "drop --sparse-attention")
    plain = BlockSparseAttnProcessor(spec, block_size=block_size, backend=backend)
    wan = WanBlockSparseAttnProcessor(spec, block_size=block_size, backend=backend)
    flux = FluxBlockSparseAttnProcessor(spec, block_size=block_size, backend=backend)
    if any(type(m).__name__ == "FluxAttention" for m in layers):
        # (a hook of an earlier call only updates its own processor, which no layer uses any more)
        model.register_forward_pre_hook(flux.record_text_tokens, with_kwargs=True)
    for layer in layers:
        name = type(layer).__name__
        layer.set_processor(plain if isinstance(layer, Attention) else wan if name == "WanAttention" else flux)
    return len(layers)
