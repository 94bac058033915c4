"""Block-sparse attention: naive reference vs dense SDPA, Triton (interpreter on CPU) vs the naive fp32 reference,
forward and all three gradients; mask builders; the torch.library op under compile/export; integrations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillkit.errors import ConfigError
from distillkit.kernels.block_sparse_attention import masks
from distillkit.kernels.block_sparse_attention.naive import naive_block_sparse_attention

# Output/gradient tolerances against the fp32 reference, per input dtype (the kernel accumulates in fp32).
TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (real shapes)")


def _qkv(B, H, Hkv, T, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda h: torch.randn(B, h, T, D, generator=g).to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return make(H), make(Hkv), make(Hkv)


def _random_mask(B, H, nb, density, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, H, nb, nb, generator=g) < density).to(device)


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def _ref(q, k, v, mask, bs, causal, scale=None):
    """The naive reference on fp32 copies of the inputs: (out, (dq, dk, dv)) as a function of dout."""
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = naive_block_sparse_attention(qf, kf, vf, mask, block_size=bs, causal=causal, scale=scale)
    return out, (qf, kf, vf)


def _close(a, b, tol, what):
    err = (a.float() - b.float()).abs().max().item()
    scale = max(1.0, b.float().abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


# ------------------------------------------------------------------------------------------------- naive reference


@pytest.mark.parametrize("causal", [False, True])
def test_naive_all_kept_equals_dense_sdpa(causal):
    q, k, v = _qkv(2, 4, 2, 37, 16)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    out = naive_block_sparse_attention(q, k, v, mask, block_size=16, causal=causal)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_naive_masked_block_equals_dense_with_token_mask():
    q, k, v = _qkv(1, 2, 2, 40, 16, seed=3)
    mask = _random_mask(1, 2, 3, 0.6, seed=1)
    mask[..., 0, :] = False  # rows of block 0 see nothing
    out = naive_block_sparse_attention(q, k, v, mask, block_size=16)
    tok = mask.repeat_interleave(16, -2).repeat_interleave(16, -1)[..., :40, :40]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=tok)
    rows = tok.any(-1)
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[0, :, :16], torch.zeros(2, 16, 16)), "fully masked rows must be zeros"
    g = torch.autograd.grad(out.sum(), q)[0]
    assert torch.isfinite(g).all() and torch.equal(g[0, :, :16], torch.zeros(2, 16, 16))


# --------------------------------------------------------------------------------------- Triton (interpreter) kernels


def _check_triton(B, H, Hkv, T, D, bs, mask, causal, dtype, seed=0, scale=None):
    from distillkit.attention import block_sparse_attention

    q, k, v = _qkv(B, H, Hkv, T, D, dtype=dtype, seed=seed)
    out = block_sparse_attention(q, k, v, mask, block_size=bs, causal=causal, scale=scale, backend="triton")
    assert out.dtype == dtype and out.shape == (B, H, T, D)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 7)).to(dtype)
    grads = _grads(out, (q, k, v), dout)
    ref, ref_inputs = _ref(q, k, v, mask, bs, causal, scale)
    ref_grads = _grads(ref, ref_inputs, dout.float())
    tol = TOL[dtype]
    _close(out, ref, tol, "out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert g.dtype == dtype and g.shape == r.shape
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        _close(g, r, tol * 4, name)
    return out, grads


@pytest.mark.parametrize(
    "B,H,Hkv,T,D,bs,causal",
    [
        (1, 2, 2, 64, 64, 16, False),  # exact blocks
        (2, 2, 1, 50, 64, 16, False),  # ragged last block, GQA 2:1
        (1, 4, 2, 40, 32, 16, True),  # causal, ragged, GQA
        (1, 2, 2, 80, 64, 32, True),  # bigger blocks, ragged
    ],
)
def test_triton_matches_naive_fp32(B, H, Hkv, T, D, bs, causal):
    nb = math.ceil(T / bs)
    mask = _random_mask(B, H, nb, 0.5, seed=T)
    mask |= torch.eye(nb, dtype=torch.bool)  # keep most rows populated; empty rows are tested separately
    _check_triton(B, H, Hkv, T, D, bs, mask, causal, torch.float32, seed=T + D)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_inputs(dtype):
    mask = _random_mask(1, 2, 3, 0.6, seed=5) | torch.eye(3, dtype=torch.bool)
    _check_triton(1, 2, 1, 45, 64, 16, mask, True, dtype, seed=11)


def test_triton_all_kept_equals_dense_sdpa():
    from distillkit.attention import block_sparse_attention

    q, k, v = _qkv(1, 2, 1, 48, 64, seed=2)
    out = block_sparse_attention(q, k, v, "dense", block_size=16, causal=True, backend="triton")
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    g = torch.autograd.grad(out.square().sum(), (q, k, v))
    gr = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(g, gr, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_triton_fully_masked_rows_give_zeros_not_nan():
    mask = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    mask[0, 0, 1, :] = False  # head 0, query block 1: no key at all
    mask[0, 1, :, 2] = False  # head 1: nobody attends key block 2, whose dK/dV must then be zero
    out, (dq, dk, dv) = _check_triton(1, 2, 2, 40, 64, 16, mask, False, torch.float32, seed=4)
    assert torch.equal(out[0, 0, 16:32], torch.zeros(16, 64))
    assert torch.equal(dq[0, 0, 16:32], torch.zeros(16, 64))
    assert torch.equal(dk[0, 1, 32:], torch.zeros(8, 64)) and torch.equal(dv[0, 1, 32:], torch.zeros(8, 64))


def test_triton_broadcast_mask_and_custom_scale():
    mask = _random_mask(1, 1, 4, 0.5, seed=9) | torch.eye(4, dtype=torch.bool)
    _check_triton(2, 2, 2, 64, 64, 16, mask, False, torch.float32, seed=3, scale=0.3)


def test_bad_inputs_are_config_errors():
    from distillkit.attention import block_sparse_attention

    q, k, v = _qkv(1, 2, 2, 32, 64)
    with pytest.raises(ConfigError, match="does not fit"):
        block_sparse_attention(q, k, v, torch.ones(1, 1, 3, 3, dtype=torch.bool), block_size=16, backend="naive")
    with pytest.raises(ConfigError, match="unknown attention backend"):
        block_sparse_attention(q, k, v, "dense", block_size=16, backend="cuda")
    q3, k3, v3 = _qkv(1, 3, 2, 32, 64)
    with pytest.raises(ConfigError, match="do not fit"):
        block_sparse_attention(q3, k3, v3, "dense", block_size=16, backend="triton")


# ---------------------------------------------------------------------------------------------------- mask builders


def test_static_builders():
    assert torch.equal(masks.causal_block_mask(40, 16), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]]).bool())
    # window 16 tokens with blocks of 16: neighbours are 1 token apart, blocks two apart are 17 apart.
    w = masks.sliding_window_block_mask(64, 16, 16)
    assert torch.equal(w, (torch.arange(4)[:, None] - torch.arange(4)).abs() <= 1)
    assert torch.equal(
        masks.sliding_window_block_mask(64, 16, 17), (torch.arange(4)[:, None] - torch.arange(4)).abs() <= 2
    )
    s = masks.strided_block_mask(96, 16, 3, global_blocks=1)
    assert s.shape == (6, 6) and s[0].all() and s[:, 0].all()
    assert s[4, 1] and not s[4, 2] and s[5, 2] and not s[5, 3]


def test_video_tile_mask_matches_token_level_definition():
    F_, H_, W_, tile, bs = 4, 4, 4, (1, 2, 2), 8
    m = masks.video_tile_block_mask(F_, H_, W_, tile=tile, block_size=bs, seq_len=70)  # 64 video + 6 text tokens
    # Token-level reference: tile coordinates, Chebyshev distance <= 1, then any-pooling into blocks.
    f, h, w = torch.meshgrid(torch.arange(F_), torch.arange(H_), torch.arange(W_), indexing="ij")
    tc = torch.stack([f // 1, h // 2, w // 2], -1).reshape(-1, 3)
    tok = ((tc[:, None] - tc[None]).abs().amax(-1) <= 1).float()
    full = torch.ones(70, 70)
    full[:64, :64] = tok
    ref = F.max_pool2d(F.pad(full, (0, 2, 0, 2))[None, None], bs)[0, 0].bool()
    assert m.shape == (9, 9) and torch.equal(m, ref)
    assert not m[0, 7]  # frame 0 and frame 3 are 3 tiles apart


def test_parse_mask_spec():
    p = masks.parse_mask_spec
    assert p("causal") == masks.MaskSpec("causal")
    assert p("window:256") == masks.MaskSpec("window", 256)
    assert p("topk:0.1") == masks.MaskSpec("topk", 0.1) and p("topk:4") == masks.MaskSpec("topk", 4)
    assert p("cdf:0.9").value == 0.9 and p("cdf:0.9").adaptive
    assert p("strided:4,2") == masks.MaskSpec("strided", 4, (2,))
    assert p("tiles:8,16,16") == masks.MaskSpec("tiles", None, (8, 16, 16), (1, 16, 16))
    assert p("tiles:8,16,16:2,4,4").tile == (2, 4, 4)
    for bad in ("", "sparse", "topk:1.5", "topk:0", "cdf:1.2", "window:x", "causal:3", "tiles:1,2", "window"):
        with pytest.raises(ConfigError):
            p(bad)
    from distillkit.config import DistillConfig

    assert (
        DistillConfig.of(teacher="t", sparse_attention="cdf:0.9", sparse_block_size=32).diffusion.sparse_attention
        == "cdf:0.9"
    )
    for bad in ({"sparse_attention": "topk:2.5"}, {"sparse_block_size": 48}, {"sparse_block_size": 8}):
        with pytest.raises(ConfigError):
            DistillConfig.of(teacher="t", **bad)


def test_adaptive_topk_and_cdf_keep_the_right_blocks():
    # 4 blocks of 16 tokens, D 16. Query block i is aligned with key block (i + 1) % 4 by construction.
    bs, nb, D = 16, 4, 16
    dirs = torch.eye(D)[:nb] * 8.0
    q = dirs.repeat_interleave(bs, 0)[None, None]  # query block i points along e_i
    k = torch.zeros(nb * bs, D)
    for j in range(nb):
        k[j * bs : (j + 1) * bs] = dirs[(j - 1) % nb]  # key block j points along e_{j-1}
    k = k[None, None]
    top1 = masks.adaptive_block_mask(q, k, bs, topk=1)
    expect = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        expect[i, (i + 1) % nb] = True
    assert torch.equal(top1[0, 0], expect | torch.eye(nb, dtype=torch.bool))
    # The aligned block holds almost all the estimated mass: cdf 0.9 keeps it alone (+ the diagonal).
    probs = masks.block_scores(q, k, bs)
    assert probs[0, 0, 0, 1] > 0.9
    assert torch.equal(masks.adaptive_block_mask(q, k, bs, cdf=0.9)[0, 0], top1[0, 0])
    # cdf 1.0 keeps every block with nonzero mass; topk 0.5 keeps ceil(0.5 * 4) = 2 per row (+ diagonal).
    assert masks.adaptive_block_mask(q, k, bs, cdf=1.0).all()
    assert (masks.adaptive_block_mask(q, k, bs, topk=0.5).sum(-1) >= 2).all()
    # causal never keeps a block above the diagonal; GQA k with fewer heads broadcasts.
    qc = torch.randn(1, 4, 64, D)
    kc = torch.randn(1, 2, 64, D)
    mc = masks.adaptive_block_mask(qc, kc, bs, topk=2, causal=True)
    assert mc.shape == (1, 4, nb, nb) and not (mc & ~torch.ones(nb, nb, dtype=torch.bool).tril()).any()
    cnt = mc.sum(-1)
    assert (cnt[..., 0] == 1).all() and ((cnt[..., 1:] >= 2) & (cnt[..., 1:] <= 3)).all()  # top 2 (+ diagonal)


def test_block_index_lists():
    mask = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1]]).bool()[None, None]
    idx = masks.block_index(mask)
    assert idx.row_cnt.tolist() == [[[2, 0, 3]]] and idx.row_idx[0, 0, 0, :2].tolist() == [0, 2]
    assert idx.col_cnt.tolist() == [[[2, 1, 2]]] and idx.col_idx[0, 0, 1, :1].tolist() == [2]
    assert masks.block_index(mask, causal=True).row_cnt.tolist() == [[[1, 0, 3]]]


# ------------------------------------------------------------------------------------------------- the library op


def _op_inputs(T=40, bs=16):
    q, k, v = _qkv(1, 2, 1, T, 32, seed=21)
    idx = masks.block_index(_random_mask(1, 2, math.ceil(T / bs), 0.7, seed=2) | torch.eye(math.ceil(T / bs)).bool())
    return q, k, v, idx


def test_custom_op_opcheck():
    q, k, v, idx = _op_inputs()
    args = (q, k, v, idx.row_idx, idx.row_cnt, idx.col_idx, idx.col_cnt, 16, True, 0.2)
    torch.library.opcheck(
        torch.ops.distillkit.block_sparse_attention_fwd.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_compile_fullgraph_and_export_trace_the_op():
    from distillkit.kernels.block_sparse_attention.op import block_sparse_attention_forward as _bsa_fwd

    q, k, v, idx = _op_inputs()

    def f(q, k, v, ri, rc, ci, cc):
        return _bsa_fwd(q, k, v, ri, rc, ci, cc, 16, False, 0.25)[0]

    ins = (q, k, v, idx.row_idx, idx.row_cnt, idx.col_idx, idx.col_cnt)
    eager = f(*ins)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*ins)
    torch.testing.assert_close(compiled, eager)
    g_c = torch.autograd.grad(compiled.sum(), (q, k, v))
    g_e = torch.autograd.grad(eager.sum(), (q, k, v))
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b)

    class M(torch.nn.Module):
        def forward(self, q, k, v, ri, rc, ci, cc):
            return f(q, k, v, ri, rc, ci, cc)

    ep = torch.export.export(M(), tuple(t.detach() for t in ins))
    assert any("block_sparse_attention_fwd" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(*(t.detach() for t in ins)), eager.detach())


def test_public_op_is_distillkit_kernels_attribute():
    import distillkit.kernels as dk

    q, k, v = _qkv(1, 2, 2, 32, 64, seed=8)
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    out = dk.block_sparse_attention(q, k, v, mask, block_size=16)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=2e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_backend_forward_matches_naive():
    from distillkit.attention import block_sparse_attention

    q, k, v = (t.detach() for t in _qkv(1, 4, 2, 40, 16, seed=6))  # ragged: 40 tokens in blocks of 16
    mask = _random_mask(1, 4, 3, 0.5, seed=3) | torch.eye(3, dtype=torch.bool)
    mask[0, 1, 1] = False
    for causal in (False, True):
        out = block_sparse_attention(q, k, v, mask, block_size=16, causal=causal, backend="flex")
        ref = naive_block_sparse_attention(q, k, v, mask, block_size=16, causal=causal)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="no backward on CPU"):
        block_sparse_attention(q.requires_grad_(), k, v, mask, block_size=16, backend="flex")


# ---------------------------------------------------------------------------------------------------- GPU, real shapes


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,causal", [(64, False), (128, True)])
def test_gpu_triton_matches_naive_real_shapes(dtype, D, causal):
    from distillkit.kernels.block_sparse_attention.op import block_sparse_attention

    B, H, Hkv, T, bs = 1, 8, 2, 2048 + 77, 64
    q, k, v = _qkv(B, H, Hkv, T, D, dtype=dtype, device="cuda", seed=1)
    nb = math.ceil(T / bs)
    mask = _random_mask(B, H, nb, 0.25, seed=1, device="cuda")
    mask[:, :, 3] = False
    out = block_sparse_attention(q, k, v, mask, block_size=bs, causal=causal)
    dout = torch.randn_like(out)
    grads = _grads(out, (q, k, v), dout)
    ref, ref_inputs = _ref(q, k, v, mask, bs, causal)
    ref_grads = _grads(ref, ref_inputs, dout.float())
    _close(out, ref, TOL[dtype] / 2, "out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert torch.isfinite(g).all()
        _close(g, r, TOL[dtype], name)
    assert torch.equal(out[:, :, 3 * bs : 4 * bs], torch.zeros_like(out[:, :, 3 * bs : 4 * bs]))


@pytest.mark.gpu
@needs_cuda
def test_gpu_all_kept_equals_flash_sdpa():
    from distillkit.kernels.block_sparse_attention.op import block_sparse_attention

    q, k, v = _qkv(2, 16, 16, 4096, 128, dtype=torch.bfloat16, device="cuda", seed=2)
    out = block_sparse_attention(q, k, v, "dense", block_size=128, causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    _close(out, ref, 2e-2, "out")


# ------------------------------------------------------------------------------------------------------ integrations


def _llama_copy(path, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()


def _ids(B=2, T=40, seed=0):
    return torch.randint(3, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def test_transformers_all_kept_equals_sdpa_and_eager(llama):
    from distillkit.attention import enable_sparse_attention

    _, path = llama
    ids = _ids()
    with torch.no_grad():
        dense = _llama_copy(path)(ids).logits
        eager = _llama_copy(path, "eager")(ids).logits
        for spec in ("dense", "causal"):  # both keep every block a causal model can use
            sparse_model = enable_sparse_attention(_llama_copy(path), spec, block_size=16)
            assert sparse_model.config._attn_implementation == "distillkit_block_sparse"
            out = sparse_model(ids).logits
            torch.testing.assert_close(out, dense, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(out, eager, atol=2e-5, rtol=2e-5)


def test_transformers_sparse_mask_changes_output_and_matches_layerwise_reference(llama):
    from distillkit.attention import enable_sparse_attention, transformers_block_sparse_attention

    _, path = llama
    ids = _ids(B=1, T=48, seed=1)
    model = enable_sparse_attention(_llama_copy(path), "window:8", block_size=16)
    with torch.no_grad():
        dense = _llama_copy(path)(ids).logits
        sparse = model(ids).logits
    # A 3-block sequence with window 8 drops block pair (2, 0): later tokens lose context, early ones do not.
    torch.testing.assert_close(sparse[:, :32], dense[:, :32], atol=2e-5, rtol=2e-5)
    assert (sparse[:, 32:] - dense[:, 32:]).abs().max() > 1e-3
    # The attention function on one layer equals the naive reference with the window block mask.
    attn = model.model.layers[0].self_attn
    q, k, v = _qkv(1, 4, 2, 48, 16, seed=5)
    out, weights = transformers_block_sparse_attention(attn, q, k, v, None, scaling=0.25)
    mask = masks.sliding_window_block_mask(48, 16, 8)[None, None]
    ref = naive_block_sparse_attention(q, k, v, mask, block_size=16, causal=True, scale=0.25)
    assert weights is None and out.shape == (1, 48, 4, 16)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-6, rtol=1e-6)


def test_transformers_padding_rules(llama):
    from distillkit.attention import enable_sparse_attention
    from distillkit.errors import ModelError

    _, path = llama
    ids = _ids(B=2, T=32, seed=2)
    model = enable_sparse_attention(_llama_copy(path), "causal", block_size=16)
    dense_model = _llama_copy(path)
    right = torch.ones(2, 32, dtype=torch.long)
    right[1, 20:] = 0  # right padding: real tokens never see the pads after them
    with torch.no_grad():
        out = model(ids, attention_mask=right).logits
        ref = dense_model(ids, attention_mask=right).logits
    torch.testing.assert_close(out[0], ref[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out[1, :20], ref[1, :20], atol=2e-5, rtol=2e-5)
    left = right.flip(-1)
    with pytest.raises(ModelError, match="padding"), torch.no_grad():
        model(ids, attention_mask=left)


def test_transformers_generation_decodes_dense_after_sparse_prefill(llama):
    from distillkit.attention import enable_sparse_attention

    _, path = llama
    ids = _ids(B=1, T=20, seed=3)
    model = enable_sparse_attention(_llama_copy(path), "causal", block_size=16)
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=5, do_sample=False)
        want = _llama_copy(path).generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)


def test_diffusers_processor_self_attention_sparse_cross_attention_dense():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from distillkit.attention import BlockSparseAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16, cross_attention_dim=24).eval()
    self_attn = Attention(query_dim=32, heads=2, dim_head=16).eval()
    x = torch.randn(2, 40, 32)
    ctx = torch.randn(2, 7, 24)
    with torch.no_grad():
        # cross-attention falls back to dense
        dense_cross = AttnProcessor2_0()(attn, x, encoder_hidden_states=ctx)
        torch.testing.assert_close(BlockSparseAttnProcessor("topk:1", block_size=16)(attn, x, ctx), dense_cross)
        # self-attention: "dense" equals SDPA; "topk:1" equals the naive reference on the projections
        dense_self = AttnProcessor2_0()(self_attn, x)
        torch.testing.assert_close(BlockSparseAttnProcessor("dense", block_size=16)(self_attn, x), dense_self)
        proc = BlockSparseAttnProcessor("topk:1", block_size=16)
        got = proc(self_attn, x)
        q = self_attn.to_q(x).view(2, 40, 2, 16).transpose(1, 2)
        k = self_attn.to_k(x).view(2, 40, 2, 16).transpose(1, 2)
        v = self_attn.to_v(x).view(2, 40, 2, 16).transpose(1, 2)
        mask = masks.adaptive_block_mask(q, k, 16, topk=1)
        ref = naive_block_sparse_attention(q, k, v, mask, block_size=16)
        ref = self_attn.to_out[0](ref.transpose(1, 2).reshape(2, 40, 32))
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
        assert (got - dense_self).abs().max() > 1e-3
    with pytest.raises(ConfigError):
        BlockSparseAttnProcessor("bogus")


def test_distill_with_sparse_attention_records_the_spec(llama, tmp_path, capsys):
    import json

    from distillkit.attention import enable_sparse_attention, sparse_settings
    from distillkit.cli.app import main
    from tests.tiny import _WORDS

    _, path = llama
    data = tmp_path / "text.txt"
    words = _WORDS[11:]
    data.write_text("\n".join(" ".join(words[(5 * i + j) % len(words)] for j in range(30)) for i in range(80)))
    out = tmp_path / "student"
    args = ["distill", "--teacher", str(path), "--student", "layers=1", "--data", str(data), "--steps", "2"]
    args += [
        "--max-length",
        "48",
        "--batch-size",
        "2",
        "--eval-split",
        "0.1",
        "--sparse-attention",
        "window:8",
        "--sparse-block-size",
        "16",
    ]
    code = main([*args, "--out", str(out)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    manifest = json.loads(cap.out.strip().splitlines()[-1])
    assert manifest["config"]["sparse_attention"] == "window:8" and manifest["config"]["sparse_block_size"] == 16
    config = json.loads((out / "config.json").read_text())
    assert config["distillkit_sparse_attention"] == "window:8" and config["distillkit_sparse_block_size"] == 16
    # A reload reproduces the sparse student: same settings, and it differs from the dense reading of the weights.
    reloaded = _llama_copy(out)
    assert sparse_settings(reloaded.config) == ("window:8", 16)
    ids = _ids(B=1, T=48, seed=4)
    with torch.no_grad():
        dense = reloaded(ids).logits
        sparse = enable_sparse_attention(_llama_copy(out), *sparse_settings(reloaded.config))(ids).logits
    torch.testing.assert_close(sparse[:, :32], dense[:, :32], atol=2e-5, rtol=2e-5)
    assert (sparse[:, 32:] - dense[:, 32:]).abs().max() > 1e-4
    # bench loads the artifact with the attention it was trained with, and measures the same logits.
    from distillkit.bench.config import BenchConfig
    from distillkit.bench.engine import load_for_bench
    from distillkit.manifest import read_source

    bench_model = load_for_bench(
        BenchConfig(models=(str(out),), device="cpu"), read_source(str(out)), torch.device("cpu")
    )
    assert bench_model.model.config._attn_implementation == "distillkit_block_sparse"
    with torch.no_grad():
        torch.testing.assert_close(bench_model.model(ids).logits, sparse, atol=2e-5, rtol=2e-5)
    # A bad spec is a one-line error with exit 1 and no artifact.
    bad = tmp_path / "bad"
    assert main([*args[:-4], "--sparse-attention", "sparse:3", "--out", str(bad)]) == 1
    assert "unknown sparse attention mask" in capsys.readouterr().err and not bad.exists()


def test_bench_density_masks_and_cpu_refusal():
    from distillkit.errors import DependencyError
    from distillkit.kernels.block_sparse_attention.bench import bench_block_sparse_attention, density_mask

    m = density_mask(1, 2, 20, 0.1, device="cpu")
    assert m.shape == (1, 2, 20, 20) and (m.sum(-1) == 2).all() and m.diagonal(dim1=-2, dim2=-1).all()
    assert (
        density_mask(1, 1, 20, 1.0, device="cpu").all()
        and (density_mask(1, 1, 20, 0.01, device="cpu").sum(-1) == 1).all()
    )
    if not torch.cuda.is_available():
        with pytest.raises(DependencyError, match="CUDA"):
            bench_block_sparse_attention(seq_lens=(256,))


@pytest.mark.gpu
@needs_cuda
def test_gpu_bench_runs_small():
    from distillkit.kernels.block_sparse_attention.bench import bench_block_sparse_attention

    rows = bench_block_sparse_attention(seq_lens=(1024,), heads=2, densities=(1.0, 0.25), warmup=1, repeats=2)
    assert len(rows) == 4 and all(r["ms"]["block_sparse"] > 0 for r in rows)
    assert {r["kept_fraction"] for r in rows} == {1.0, 0.25}


def test_static_spec_index_is_cached_and_matches_the_bool_mask():
    from distillkit.attention import _static_index, block_sparse_attention

    q, k, v = _qkv(1, 2, 2, 40, 32, seed=12)
    _static_index.cache_clear()
    a = block_sparse_attention(q, k, v, "window:10", block_size=16, causal=True, backend="triton")
    b = block_sparse_attention(q, k, v, "window:10", block_size=16, causal=True, backend="triton")
    assert _static_index.cache_info().hits == 1 and _static_index.cache_info().misses == 1
    ref = naive_block_sparse_attention(q, k, v, masks.sliding_window_block_mask(40, 16, 10), block_size=16, causal=True)
    torch.testing.assert_close(a, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(b, a)


def test_kernels_package_and_spec_parsing_stay_torch_free():
    import subprocess
    import sys

    code = (
        "import sys, distillkit.kernels, distillkit.attention\n"
        "from distillkit.kernels.block_sparse_attention import parse_mask_spec\n"
        "assert parse_mask_spec('topk:0.25').value == 0.25\n"
        "assert 'torch' not in sys.modules and 'triton' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
