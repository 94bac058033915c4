"""Flux-style teachers (a FluxTransformer2DModel in a FluxPipeline with Flux's dynamic-shifting
FlowMatchEulerDiscreteScheduler) in ``distill --method``: loading with ``--image-size`` and the variants refused by
name, the Euler solver against FluxPipeline's own call (packed latents, shift mu, embedded guidance), the block-sparse
joint attention of a Flux student against a plain-torch masked attention (values and gradients), and end-to-end runs
whose students beat the teacher at the same step count and reload with plain diffusers."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from distillkit.config import DistillConfig
from distillkit.errors import ConfigError, ModelError
from distillkit.models.diffusion import denoise, flux_image_ids, load_diffusion
from distillkit.models.flow import euler_sample, flow_schedule, flow_sigmas
from tests.test_distill import flow_tiny, flux_tiny

SIZE, SPARSE = flux_tiny.IMAGE_SIZE, flux_tiny.SPARSE_SIZE
FAST = dict(batch_size=8, max_samples=32, eval_samples=16, warmup=0.0, lr=1e-3, image_size="8,8")
BLOCK = 16  # the sparse grid is 8 x 8 packed tokens: four blocks of two token rows
GUIDANCE = 3.5


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A Flux-dev-style pipeline (guidance_embeds)."""
    return flux_tiny.tiny_flux_pipeline(tmp_path_factory.mktemp("flux"), guidance_embeds=True)[1]


@pytest.fixture(scope="module")
def flux_model_dir(tmp_path_factory):
    return flux_tiny.tiny_flux_model_dir(tmp_path_factory.mktemp("fluxm"))[1]


_eval_noise, _mse = flow_tiny.eval_noise, flow_tiny.mse


# --------------------------------------------------------------------------------------------
# Loading and the solver


def test_load_flux_and_refusals(flux, flux_model_dir, tmp_path):
    for path, layout in ((flux, "pipeline"), (flux_model_dir, "model")):
        dm = load_diffusion(path, image_size=SIZE)
        assert dm.flow and dm.flux and dm.layout == layout and dm.class_name == "FluxTransformer2DModel"
        assert dm.sample_shape == (4, *SIZE) and not dm.conditional and not dm.video
    assert load_diffusion(flux_model_dir).sample_shape == (4, 128, 128)  # FluxPipeline's default 1024 x 1024
    kontext = tmp_path / "kontext"
    shutil.copytree(flux, kontext)
    index = json.loads((kontext / "model_index.json").read_text())
    (kontext / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    texts = tmp_path / "texts"
    shutil.copytree(flux, texts)
    (texts / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": ["transformers", "T5EncoderModel"]}))
    fill = flux_tiny.tiny_flux_model_dir(tmp_path / "fill", in_channels=32, out_channels=16)[1]
    cases = [
        (dict(path=flux, image_size=(8, 7)), ConfigError, "2x2 latent patches"),
        (dict(path=flow_tiny.tiny_sd3_model_dir(tmp_path / "sd3")[1], image_size=SIZE), ConfigError, "holds a SD3"),
        (dict(path=kontext), ModelError, "FluxKontextPipeline, an image-conditioned"),
        (dict(path=fill, image_size=SIZE), ModelError, "in_channels 32 != out_channels 16"),
        (dict(path=texts, image_size=SIZE), ModelError, "text-conditioned flow pipeline"),
    ]
    for kwargs, err, text in cases:
        with pytest.raises(err, match=text) as e:
            load_diffusion(kwargs.pop("path"), **kwargs)
        assert e.value.hint


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_euler_sample_matches_flux_pipeline(tmp_path, guidance_embeds):
    """distillkit's Euler solver on unpacked latents = FluxPipeline's own call (packing, sigma grid with the shift mu
    of the image's token count, embedded guidance) with the saved scheduler."""
    _, path = flux_tiny.tiny_flux_pipeline(tmp_path, guidance_embeds=guidance_embeds)
    dm = load_diffusion(path, image_size=SIZE)
    sch = flow_schedule(dm, GUIDANCE)
    assert sch.guidance == (GUIDANCE if guidance_embeds else None)
    pipe = flux_tiny.load_pipeline(path)
    noise = torch.randn(2, *dm.sample_shape, generator=torch.Generator().manual_seed(0))
    for steps in (1, 3):
        with torch.no_grad():
            ours = euler_sample(dm.model, sch, noise, steps)
        theirs = flux_tiny.pipeline_sample(pipe, noise, steps, guidance_scale=GUIDANCE)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert float(ours.std()) > 0.1
    # the grid is FluxPipeline's linspace(1, 1/3, 3) through the exponential shift of mu, not the static shift 3
    mu = sch.mu
    assert mu == pytest.approx(0.5 + (16 - 256) * 0.65 / 3840)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = dm.scheduler.config
    theirs_mu = calculate_shift(16, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    assert mu == pytest.approx(theirs_mu, rel=1e-12)
    grid = [1.0, 2 / 3, 1 / 3]
    expected = [torch.e**mu / (torch.e**mu + (1 / s - 1)) for s in grid] + [0.0]
    assert sch.sigmas(3) == pytest.approx(expected, rel=1e-6)
    assert sch.sigmas(3) != pytest.approx(flow_sigmas(dm.scheduler.__class__(shift=3.0), 3))
    if guidance_embeds:  # the embedded guidance reaches the model
        x, t = noise, torch.tensor([500.0, 500.0])
        with torch.no_grad():
            assert (
                float((denoise(dm.model, x, t, guidance=1.0) - denoise(dm.model, x, t, guidance=4.0)).abs().max())
                > 1e-4
            )
        with pytest.raises(ConfigError, match="guidance_embeds"):
            denoise(dm.model, x, t)


# --------------------------------------------------------------------------------------------
# Block-sparse joint attention against plain torch


def _rotary(x, cos, sin):
    """Flux's rotary embedding in plain torch: channel pairs (2i, 2i+1) of x [B, T, H, D] rotated by angle i."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[None, :, None, 0::2], sin[None, :, None, 0::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)


def _reference(attn, x, text, rotary, image_blocks, ctx=None):
    """Masked softmax attention of a FluxAttention in plain torch over the joint sequence [text, image]: an image
    query and an image key (both in whole blocks) meet iff their block pair is kept in ``image_blocks``
    [B or 1, H or 1, nb, nb]; every pair with a text token is kept. ``x`` [B, N, dim] the image tokens (with ``ctx``
    [B, L, dim] the text of a double-stream block) or the joint tokens (single-stream, ``text`` of them first)."""
    d = attn.head_dim

    def proj(lin, norm, z):
        y = (z @ lin.weight.T + lin.bias).unflatten(-1, (-1, d))
        return norm(y) if norm is not None else y

    q, k, v = proj(attn.to_q, attn.norm_q, x), proj(attn.to_k, attn.norm_k, x), proj(attn.to_v, None, x)
    if ctx is not None:
        q = torch.cat([proj(attn.add_q_proj, attn.norm_added_q, ctx), q], 1)
        k = torch.cat([proj(attn.add_k_proj, attn.norm_added_k, ctx), k], 1)
        v = torch.cat([proj(attn.add_v_proj, None, ctx), v], 1)
    q, k = _rotary(q, *rotary), _rotary(k, *rotary)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, D]
    t = q.shape[2]
    n = (t - text) // BLOCK * BLOCK
    keep = torch.ones(*image_blocks.shape[:2], t, t, dtype=torch.bool)
    tokens = image_blocks.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)
    keep[..., text : text + n, text : text + n] = tokens[..., :n, :n]
    scores = (q @ k.transpose(-1, -2) / d**0.5).masked_fill(~keep, float("-inf"))
    out = (torch.softmax(scores, -1) @ v).transpose(1, 2).flatten(2)
    if ctx is None:
        return out
    lin, ctx_lin = attn.to_out[0], attn.to_add_out
    return out[:, text:] @ lin.weight.T + lin.bias, out[:, :text] @ ctx_lin.weight.T + ctx_lin.bias


def _outputs(out):
    """A double-stream block's (image, text) outputs, or a single-stream block's one, as a tuple."""
    return out if isinstance(out, tuple) else (out,)


def test_flux_sparse_attention_matches_masked_reference():
    """FluxBlockSparseAttnProcessor on Flux's double- and single-stream attention = plain masked attention over
    the joint sequence (values and gradients of the inputs and every weight), sparse over image tokens only, for a
    static tile mask on the packed latent grid and an adaptive top-k mask."""
    from distillkit.attention import FluxBlockSparseAttnProcessor
    from distillkit.kernels.block_sparse_attention.masks import adaptive_block_mask

    model, _ = flux_tiny.tiny_flux()
    text, n = 3, (SPARSE[0] // 2) * (SPARSE[1] // 2)  # 3 text tokens, 64 image tokens
    ids = torch.cat([torch.zeros(text, 3), flux_image_ids(*SPARSE)])  # FluxPipeline's txt_ids and img_ids
    rotary = model.pos_embed(ids)
    rows = torch.arange(4)
    bands = ((rows[:, None] - rows[None, :]).abs() <= 1)[None, None]  # tiles of two token rows, radius 1
    g = torch.Generator().manual_seed(2)
    for block, double in ((model.transformer_blocks[0], True), (model.single_transformer_blocks[0], False)):
        attn = copy.deepcopy(block.attn).requires_grad_(True)
        dim = attn.query_dim
        for spec in ("tiles:1,8,8:1,2,8", "topk:0.25"):
            x = torch.randn(2, n if double else text + n, dim, generator=g).requires_grad_(True)
            ctx = torch.randn(2, text, dim, generator=g).requires_grad_(True) if double else None
            proc = FluxBlockSparseAttnProcessor(spec, block_size=BLOCK)
            proc.text_tokens = None if double else text
            out = _outputs(proc(attn, x, ctx, image_rotary_emb=rotary))
            loss = sum(o.pow(2).sum() for o in out)
            inputs = [x] + ([ctx] if double else [])
            got = torch.autograd.grad(loss, inputs + list(attn.parameters()), allow_unused=True)
            if spec.startswith("tiles"):
                mask = bands
            else:
                with torch.no_grad():  # the top-k blocks of the image queries and keys, after the rotary embedding
                    img = x if double else x[:, text:]
                    q = _rotary(attn.norm_q(attn.to_q(img).unflatten(-1, (-1, 8))), *[r[text:] for r in rotary])
                    k = _rotary(attn.norm_k(attn.to_k(img).unflatten(-1, (-1, 8))), *[r[text:] for r in rotary])
                    mask = adaptive_block_mask(q.transpose(1, 2), k.transpose(1, 2), BLOCK, topk=0.25)
                assert not mask.all()
            ref = _outputs(_reference(attn, x, text, rotary, mask, ctx))
            ref_loss = sum(o.pow(2).sum() for o in ref)
            want = torch.autograd.grad(ref_loss, inputs + list(attn.parameters()), allow_unused=True)
            for a, b in zip(out, ref, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            for a, b in zip(got, want, strict=True):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
            # the mask matters: dense attention over the image gives another answer
            dense = _outputs(_reference(attn, x, text, rotary, torch.ones(1, 1, 4, 4, dtype=torch.bool), ctx))
            assert max(float((a - b).detach().abs().max()) for a, b in zip(dense, ref, strict=True)) > 1e-3


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_sparse_flux_transformer_dense_mask_equals_model():
    """A whole Flux transformer with block-sparse processors: a dense mask gives the original model (values and
    gradients); a tile mask changes it; a deep copy (a progressive round's student) keeps its text-length hook."""
    from distillkit.attention import set_diffusers_sparse_attention

    model, _ = flux_tiny.tiny_flux(guidance_embeds=True)
    model.requires_grad_(True)
    sparse = copy.deepcopy(model)
    assert set_diffusers_sparse_attention(sparse, "dense", BLOCK) == 2  # one double- and one single-stream block
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, *SPARSE, generator=g), torch.tensor([900.0, 250.0])
    out, ref = denoise(sparse, x, t, guidance=GUIDANCE), denoise(model, x, t, guidance=GUIDANCE)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    scale = max(float(q.grad.abs().max()) for q in model.parameters() if q.grad is not None)
    for (name, p), q in zip(sparse.named_parameters(), model.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert float((p.grad - q.grad).abs().max()) <= 1e-5 * scale, name
    tiles = copy.deepcopy(model)
    set_diffusers_sparse_attention(tiles, "tiles:1,8,8:1,2,8", BLOCK)
    with torch.no_grad():
        a = denoise(tiles, x, t, guidance=GUIDANCE)
        assert float((a - ref).abs().max()) > 1e-4
        torch.testing.assert_close(denoise(copy.deepcopy(tiles), x, t, guidance=GUIDANCE), a)


# --------------------------------------------------------------------------------------------
# End to end


def _pipeline_round_trip(out, dm, cfg, met, guidance=1.0):
    """The saved student is a FluxPipeline that samples the distilled numbers in --target-steps with its scheduler."""
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    pipe = flux_tiny.load_pipeline(out)
    assert type(pipe).__name__ == "FluxPipeline" and pipe.scheduler.config.use_dynamic_shifting
    noise = _eval_noise(dm, cfg)
    with torch.no_grad():
        ref = euler_sample(dm.model, flow_schedule(dm, guidance), noise, cfg.diffusion.teacher_steps)
    return pipe, noise, ref


def test_reflow_flux_dev_student_beats_teacher_and_round_trips(flux, tmp_path):
    from distillkit.distill.diffusion import run_diffusion_distill

    cfg = DistillConfig.of(
        teacher=flux, method="reflow", teacher_steps=16, target_steps=1, steps=25, guidance_scale=GUIDANCE, **FAST
    )
    out = tmp_path / "reflow"
    m = run_diffusion_distill(cfg, out=str(out))
    met = m["metrics"]
    assert met["student_mse"] < 0.5 * met["baseline_mse"], met
    assert m["extra"]["image_size"] == list(SIZE) and m["extra"]["flux_guidance"] == GUIDANCE
    dm = load_diffusion(flux, image_size=SIZE)
    pipe, noise, ref = _pipeline_round_trip(out, dm, cfg, met, GUIDANCE)
    mine = flux_tiny.pipeline_sample(pipe, noise, 1, guidance_scale=GUIDANCE)
    assert _mse(mine, ref) == pytest.approx(met["student_mse"], rel=1e-4)
    # another embedded guidance is another model: the recorded one matters
    assert _mse(flux_tiny.pipeline_sample(pipe, noise, 1, guidance_scale=1.0), ref) != pytest.approx(
        met["student_mse"], rel=1e-3
    )
    card = (out / "README.md").read_text()
    assert "prompt_embeds=torch.zeros(B, 1, 16)" in card and "guidance_scale=3.5" in card


def test_sparse_progressive_flux_student(tmp_path):
    """Progressive distillation with a block-sparse (image tile) Flux student: it beats the teacher at its step
    count, and the reloaded pipeline's transformer with the same processors gives its samples."""
    from distillkit.distill.denoise_training import apply_sparse_attention

    _, flux = flux_tiny.tiny_flux_pipeline(tmp_path / "teacher")
    spec = "tiles:1,8,8:1,2,8"
    fast = {**FAST, "image_size": ",".join(map(str, SPARSE)), "max_samples": 16}
    out = tmp_path / "sparse"
    m = flow_tiny.sparse_progressive(flux, out, spec, BLOCK, **fast)
    met = m["metrics"]
    assert m["extra"]["flux_guidance"] is None and m["extra"]["image_size"] == list(SPARSE)
    cfg = DistillConfig.of(teacher=flux, method="progressive", target_steps=2, teacher_steps=4, **fast)
    dm = load_diffusion(flux, image_size=SPARSE)
    pipe, noise, ref = _pipeline_round_trip(out, dm, cfg, met)
    assert apply_sparse_attention(pipe.transformer, (spec, BLOCK)) == 2
    assert _mse(flux_tiny.pipeline_sample(pipe, noise, 2), ref) == pytest.approx(met["student_mse"], rel=1e-4)


def test_dmd_flux_model_dir_and_cli(flux_model_dir, tmp_path, capsys):
    """A 1-step DMD2 generator from the command line (--image-size) beats the teacher's own single step; the model
    directory reloads with plain diffusers; a wrong --image-size is one line with a hint."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from distillkit.cli.app import main

    out = tmp_path / "dmd"
    args = ["distill", "--teacher", flux_model_dir, "--method", "dmd", "--teacher-steps", "16", "--target-steps", "1"]
    fast = ["--steps", "4", "--alpha", "0.5", "--max-samples", "32", "--eval-samples", "16", "--batch-size", "8"]
    fast += ["--lr", "1e-3", "--warmup", "0"]
    assert main([*args, *fast, "--image-size", "8,8", "--out", str(out)]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][-1]
    manifest = json.loads(line)
    met = manifest["metrics"]
    assert manifest["config"]["image_size"] == "8,8" and met["student_steps"] == 1
    assert met["student_mse"] < 0.7 * met["baseline_mse"], met
    model = FluxTransformer2DModel.from_pretrained(out).eval()
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    dm = load_diffusion(flux_model_dir, image_size=SIZE)
    cfg = DistillConfig.of(teacher=flux_model_dir, method="dmd", target_steps=1, **FAST)
    noise = _eval_noise(dm, cfg)
    with torch.no_grad():
        ref = euler_sample(dm.model, flow_schedule(dm), noise, 16)
        mine = euler_sample(model, flow_schedule(dm, scheduler=sched), noise, 1)
    assert _mse(mine, ref) == pytest.approx(met["student_mse"], rel=1e-4)
    assert main([*args, "--image-size", "8", "--out", str(tmp_path / "x")]) == 1
    assert "two positive integers" in capsys.readouterr().err
    assert main([*args, "--image-size", "8,9", "--out", str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err
    assert "2x2" in err and "hint" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
