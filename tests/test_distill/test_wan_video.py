"""Video flow-matching teachers (a Wan-style WanTransformer3DModel in a WanPipeline with
FlowMatchEulerDiscreteScheduler) in ``distill --method``: loading with ``--video-shape``, the Euler solver against the
pipeline, the block-sparse self-attention of a Wan student against a plain-torch masked attention (values and
gradients), and end-to-end runs whose students beat the teacher at the same step count and reload with plain
diffusers."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from distillkit.config import DistillConfig
from distillkit.errors import ConfigError, ModelError
from distillkit.models.diffusion import load_diffusion
from distillkit.models.flow import FlowSchedule, euler_sample
from tests.test_distill import flow_tiny, wan_tiny

SHAPE = wan_tiny.VIDEO_SHAPE
SHAPE_FLAG = ",".join(map(str, SHAPE))
FAST = dict(batch_size=8, max_samples=32, eval_samples=16, warmup=0.0, lr=1e-3, video_shape=SHAPE_FLAG)
BLOCK = 16  # the tiny grid is 3 frames x 4 x 4 patches: one block per frame


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return wan_tiny.tiny_wan_pipeline(tmp_path_factory.mktemp("wan"))[1]


@pytest.fixture(scope="module")
def wan_model_dir(tmp_path_factory):
    return wan_tiny.tiny_wan_model_dir(tmp_path_factory.mktemp("wanm"))[1]


_eval_noise, _mse = flow_tiny.eval_noise, flow_tiny.mse


# --------------------------------------------------------------------------------------------
# Loading and the solver


def test_load_video_teacher(wan, wan_model_dir):
    for path, layout in ((wan, "pipeline"), (wan_model_dir, "model")):
        dm = load_diffusion(path, video_shape=SHAPE)
        assert dm.flow and dm.video and dm.layout == layout and dm.class_name == "WanTransformer3DModel"
        assert dm.sample_shape == (4, *SHAPE) and dm.video_shape == SHAPE and not dm.conditional
    assert load_diffusion(wan, video_shape=SHAPE).space == "latent"  # the pipeline holds a VAE
    assert load_diffusion(wan_model_dir, video_shape=SHAPE).space == "pixel"


def test_video_setups_are_refused(wan, wan_model_dir, tmp_path):
    from diffusers import UniPCMultistepScheduler

    cases = [
        (dict(path=wan), ConfigError, "how large a video"),
        (dict(path=wan, video_shape=(3, 7, 8)), ConfigError, "patches"),
        (dict(path=wan, video_shape=(3, 8, 80)), ConfigError, "rotary table"),
        (dict(path=flow_tiny.tiny_sd3_model_dir(tmp_path / "sd3")[1], video_shape=SHAPE), ConfigError, "holds a SD3"),
        (
            dict(path=wan_tiny.tiny_wan_model_dir(tmp_path / "i2v", image_dim=8)[1], video_shape=SHAPE),
            ModelError,
            "image",
        ),
    ]
    # a Wan 2.2 pipeline with a second (low-noise) expert
    two = tmp_path / "two"
    import shutil

    shutil.copytree(wan, two)
    index = json.loads((two / "model_index.json").read_text())
    index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
    (two / "model_index.json").write_text(json.dumps(index))
    cases.append((dict(path=two, video_shape=SHAPE), ModelError, "Wan 2.2"))
    # Wan checkpoints ship UniPC on flow sigmas: the hint says which Euler scheduler to save instead
    unipc = tmp_path / "unipc"
    shutil.copytree(wan_model_dir, unipc)
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0).save_pretrained(
        unipc / "scheduler"
    )
    cases.append((dict(path=unipc, video_shape=SHAPE), ModelError, "pairs a WanTransformer3DModel"))
    for kwargs, err, text in cases:
        with pytest.raises(err, match=text) as e:
            load_diffusion(kwargs.pop("path"), **kwargs)
        assert e.value.hint
    assert "FlowMatchEulerDiscreteScheduler(shift=" in e.value.hint


def test_euler_sample_matches_wan_pipeline(wan):
    """distillkit's Euler solver on [B, C, F, H, W] latents = WanPipeline's own call with the saved scheduler."""
    dm = load_diffusion(wan, video_shape=SHAPE)
    pipe = wan_tiny.load_pipeline(wan)
    noise = torch.randn(2, *dm.sample_shape, generator=torch.Generator().manual_seed(0))
    for steps in (1, 3):
        with torch.no_grad():
            ours = euler_sample(dm.model, FlowSchedule(dm.scheduler), noise, steps)
        torch.testing.assert_close(ours, wan_tiny.pipeline_sample(pipe, noise, steps), rtol=1e-5, atol=1e-5)
    assert float(ours.std()) > 0.1


# --------------------------------------------------------------------------------------------
# Block-sparse self-attention of the Wan transformer against plain torch


def _wan_rotary(x, freqs_cos, freqs_sin):
    """Wan's rotary position embedding in plain torch: channel pairs (2i, 2i+1) rotated by the i-th angle."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).float()


def _reference_self_attention(attn, x, rotary, block_mask):
    """Masked softmax attention of a WanAttention in plain torch: token (i, j) kept when block (i // 16, j // 16)
    is; ``x`` [B, T, dim], ``block_mask`` [B or 1, H or 1, nb, nb]."""
    b, t, _ = x.shape
    heads = attn.heads
    q = attn.norm_q(x @ attn.to_q.weight.T + attn.to_q.bias).unflatten(2, (heads, -1))
    k = attn.norm_k(x @ attn.to_k.weight.T + attn.to_k.bias).unflatten(2, (heads, -1))
    v = (x @ attn.to_v.weight.T + attn.to_v.bias).unflatten(2, (heads, -1))
    q, k = _wan_rotary(q, *rotary), _wan_rotary(k, *rotary)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, D]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    keep = block_mask.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)[..., :t, :t]
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, t, -1)
    return out @ attn.to_out[0].weight.T + attn.to_out[0].bias


def _grads(module, x):
    return [x.grad.clone()] + [p.grad.clone() for p in module.parameters() if p.grad is not None]


def test_wan_sparse_self_attention_matches_masked_reference():
    """WanBlockSparseAttnProcessor on a Wan self-attention layer = plain masked attention (values and gradients of
    the input and every weight), for a static video-tile mask and an adaptive top-k mask."""
    from distillkit.attention import WanBlockSparseAttnProcessor
    from distillkit.kernels.block_sparse_attention.masks import adaptive_block_mask

    model, _ = wan_tiny.tiny_wan()
    attn = copy.deepcopy(model.blocks[0].attn1).requires_grad_(True)
    latents = torch.randn(2, 4, *SHAPE, generator=torch.Generator().manual_seed(1))
    rotary = model.rope(latents)
    tokens = SHAPE[0] * (SHAPE[1] // 2) * (SHAPE[2] // 2)
    # each frame is one tile and one block; a frame sees its neighbours only (tile radius 1): frames 0 and 2 never
    tiles = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)[None, None]
    for spec in ("tiles:3,4,4:1,4,4", "topk:1"):
        x = torch.randn(2, tokens, attn.inner_dim, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        attn.zero_grad()
        out = WanBlockSparseAttnProcessor(spec, block_size=BLOCK)(attn, x, rotary_emb=rotary)
        out.pow(2).sum().backward()
        got = _grads(attn, x)
        x.grad = None
        attn.zero_grad()
        if spec.startswith("tiles"):
            mask = tiles
        else:
            with torch.no_grad():
                heads = attn.heads
                q = _wan_rotary(attn.norm_q(attn.to_q(x)).unflatten(2, (heads, -1)), *rotary).transpose(1, 2)
                k = _wan_rotary(attn.norm_k(attn.to_k(x)).unflatten(2, (heads, -1)), *rotary).transpose(1, 2)
                mask = adaptive_block_mask(q, k, BLOCK, topk=1)
            # the best key block per query block, and the diagonal one: one or two of three, per head
            assert mask.sum(-1).le(2).all() and mask.diagonal(dim1=-2, dim2=-1).all()
        ref = _reference_self_attention(attn, x, rotary, mask)
        ref.pow(2).sum().backward()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(got, _grads(attn, x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        # the mask matters: dense attention gives another answer
        dense = _reference_self_attention(attn, x, rotary, torch.ones(1, 1, 3, 3, dtype=torch.bool))
        assert float((dense - ref).detach().abs().max()) > 1e-3
    # cross-attention is handed to diffusers' WanAttnProcessor unchanged
    cross = model.blocks[0].attn2
    ctx = torch.randn(2, 5, 16)
    with torch.no_grad():
        ctx_states = model.condition_embedder.text_embedder(ctx)
        q_in = torch.randn(2, tokens, cross.inner_dim)
        torch.testing.assert_close(
            WanBlockSparseAttnProcessor("topk:1", block_size=BLOCK)(cross, q_in, ctx_states), cross(q_in, ctx_states)
        )


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_sparse_wan_transformer_dense_mask_equals_model_and_flex_matches():
    """A whole Wan transformer with block-sparse processors: a dense mask gives the original model (values and
    gradients); FlexAttention (forward only on CPU) gives the naive reference's answer for a sparse mask."""
    from distillkit.attention import set_diffusers_sparse_attention
    from distillkit.models.diffusion import denoise

    model, _ = wan_tiny.tiny_wan()
    model.requires_grad_(True)
    sparse = copy.deepcopy(model)
    assert set_diffusers_sparse_attention(sparse, "dense", BLOCK) == 4  # attn1 and attn2 of two blocks
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, *SHAPE, generator=g), torch.tensor([900.0, 250.0])
    out, ref = denoise(sparse, x, t), denoise(model, x, t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    scale = max(float(q.grad.abs().max()) for q in model.parameters())
    for (name, p), q in zip(sparse.named_parameters(), model.parameters(), strict=True):
        # float32 noise of a sum over the whole output (gradients reach ~300; zero text makes some exactly 0)
        assert float((p.grad - q.grad).abs().max()) <= 1e-6 * scale, name
    naive, flex = copy.deepcopy(model), copy.deepcopy(model)
    set_diffusers_sparse_attention(naive, "tiles:3,4,4:1,4,4", BLOCK, backend="naive")
    set_diffusers_sparse_attention(flex, "tiles:3,4,4:1,4,4", BLOCK, backend="flex")
    with torch.no_grad():
        a, b = denoise(naive, x, t), denoise(flex, x, t)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert float((a - ref).abs().max()) > 1e-4


# --------------------------------------------------------------------------------------------
# End to end


def _pipeline_round_trip(out, dm, cfg, met):
    """The saved student is a WanPipeline that samples the distilled numbers in --target-steps with its scheduler."""
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"] and index["vae"][1] == "AutoencoderKLWan"
    pipe = wan_tiny.load_pipeline(out)
    assert type(pipe).__name__ == "WanPipeline"
    noise = _eval_noise(dm, cfg)
    with torch.no_grad():
        ref = euler_sample(dm.model, FlowSchedule(dm.scheduler), noise, cfg.diffusion.teacher_steps)
    mine = wan_tiny.pipeline_sample(pipe, noise, cfg.diffusion.target_steps)
    assert mine.shape == noise.shape
    assert _mse(mine, ref) == pytest.approx(met["student_mse"], rel=1e-4)


def test_reflow_video_student_beats_teacher_and_round_trips(wan, tmp_path):
    from distillkit.distill.diffusion import run_diffusion_distill

    cfg = DistillConfig.of(teacher=wan, method="reflow", teacher_steps=16, target_steps=1, steps=25, **FAST)
    out = tmp_path / "reflow"
    m = run_diffusion_distill(cfg, out=str(out))
    met = m["metrics"]
    assert met["student_mse"] < 0.5 * met["baseline_mse"], met
    assert m["extra"]["video_shape"] == list(SHAPE) and m["extra"]["num_inference_steps"] == 1
    _pipeline_round_trip(out, load_diffusion(wan, video_shape=SHAPE), cfg, met)
    assert "prompt_embeds=torch.zeros(B, 1, 16)" in (out / "README.md").read_text()


def test_dmd_video_student_beats_teacher(wan_model_dir, tmp_path):
    """A 1-step DMD2 generator of the video model beats the teacher's own single step; the model directory reloads
    with plain diffusers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from distillkit.distill.diffusion import run_diffusion_distill

    cfg = DistillConfig.of(
        teacher=wan_model_dir, method="dmd", teacher_steps=16, target_steps=1, steps=4, alpha=0.5, **FAST
    )
    out = tmp_path / "dmd"
    met = run_diffusion_distill(cfg, out=str(out))["metrics"]
    assert met["student_mse"] < 0.7 * met["baseline_mse"], met
    model = WanTransformer3DModel.from_pretrained(out).eval()
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    dm = load_diffusion(wan_model_dir, video_shape=SHAPE)
    noise = _eval_noise(dm, cfg)
    with torch.no_grad():
        ref = euler_sample(dm.model, FlowSchedule(dm.scheduler), noise, 16)
        mine = euler_sample(model, FlowSchedule(sched), noise, 1)
    assert _mse(mine, ref) == pytest.approx(met["student_mse"], rel=1e-4)


def test_sparse_progressive_video_student(wan, tmp_path):
    """Progressive distillation with a block-sparse (video tile) student: it beats the teacher at its step count,
    the spec is recorded, and the reloaded pipeline's transformer with the same processors gives its samples."""
    from distillkit.distill.denoise_training import apply_sparse_attention

    spec = "tiles:3,4,4:1,4,4"
    out = tmp_path / "sparse"
    met = flow_tiny.sparse_progressive(wan, out, spec, BLOCK, **FAST)["metrics"]
    cfg = DistillConfig.of(teacher=wan, method="progressive", target_steps=2, teacher_steps=4, **FAST)
    pipe = wan_tiny.load_pipeline(out)
    assert apply_sparse_attention(pipe.transformer, (spec, BLOCK)) == 4
    dm = load_diffusion(wan, video_shape=SHAPE)
    noise = _eval_noise(dm, cfg)
    with torch.no_grad():
        ref = euler_sample(dm.model, FlowSchedule(dm.scheduler), noise, 4)
    assert _mse(wan_tiny.pipeline_sample(pipe, noise, 2), ref) == pytest.approx(met["student_mse"], rel=1e-4)


def test_cli_video_distill(wan, tmp_path, capsys):
    from distillkit.cli.app import main

    out = tmp_path / "cli"
    args = ["distill", "--teacher", wan, "--method", "consistency", "--teacher-steps", "4", "--target-steps", "2"]
    fast = ["--steps", "2", "--max-samples", "4", "--eval-samples", "2", "--batch-size", "2"]
    assert main([*args, *fast, "--video-shape", SHAPE_FLAG, "--out", str(out)]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][-1]
    manifest = json.loads(line)
    assert manifest["extra"]["video_shape"] == list(SHAPE) and manifest["config"]["video_shape"] == SHAPE_FLAG
    assert main([*args, *fast, "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "--video-shape" in err and "hint" in err
    assert main([*args, "--video-shape", "3,8", "--out", str(tmp_path / "y")]) == 1
    assert "three positive integers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
