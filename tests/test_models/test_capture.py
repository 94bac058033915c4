"""q/k/v capture hooks reproduce the models' own attention; pooling honours the mask."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from distillkit.errors import ConfigError
from distillkit.models.capture import capture_qkv, pool
from tests.tiny import sample_inputs


def hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def probs_from(q, k, heads, mask, causal):
    """Attention probabilities ``[B, heads, T, T]`` from projections ``[B, T, heads * d]``."""
    b, t, width = q.shape
    d = width // heads
    q, k = (x.reshape(b, t, heads, d).transpose(1, 2) for x in (q, k))
    return masked_softmax(q @ k.transpose(-1, -2) / math.sqrt(d), mask, causal)


def masked_softmax(scores, mask, causal):
    t = scores.shape[-1]
    allowed = mask[:, None, None, :].bool()
    if causal:
        allowed = allowed & torch.ones(t, t, dtype=torch.bool).tril()
    return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1)


@pytest.mark.parametrize(
    "name, width, tokens", [("llama", 64, 8), ("gpt2", 64, 8), ("bert", 64, 8), ("bert_mlm", 64, 8), ("vit", 64, 17)]
)
def test_shapes_and_hooks_removed(request, name, width, tokens):
    model, _ = request.getfixturevalue(name)
    inputs = sample_inputs(model, batch=2, length=8)
    before = hook_count(model)
    with torch.no_grad(), capture_qkv(model, [0, -1]) as qkv:
        assert hook_count(model) > before
        model(**inputs)
    assert hook_count(model) == before
    assert sorted(qkv) == [-1, 0]
    for q, k, v in qkv.values():
        assert q.shape == k.shape == v.shape == (2, tokens, width)
    assert not torch.equal(qkv[0][0], qkv[-1][0])


def test_hooks_removed_on_error_and_bad_blocks_refused(gpt2):
    model = gpt2[0]
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="boom"), capture_qkv(model, [1, 2]):
        raise RuntimeError("boom")
    assert hook_count(model) == before
    with pytest.raises(ConfigError, match="block 4 does not exist in a model with 4 blocks"):
        with capture_qkv(model, [4]):
            pass
    assert hook_count(model) == before


def test_bert_scores_match_eager_attention(bert):
    model = AutoModel.from_pretrained(bert[1], attn_implementation="eager").eval()
    inputs = sample_inputs(model, batch=2, length=8)
    with torch.no_grad(), capture_qkv(model, [0, 2]) as qkv:
        out = model(**inputs, output_attentions=True)
    for block in (0, 2):
        q, k, _ = qkv[block]
        expected = probs_from(q, k, 4, inputs["attention_mask"], causal=False)
        torch.testing.assert_close(expected, out.attentions[block], atol=1e-6, rtol=1e-5)


def test_gpt2_split_of_packed_projection_matches_eager_attention(gpt2):
    model = AutoModelForCausalLM.from_pretrained(gpt2[1], attn_implementation="eager").eval()
    inputs = sample_inputs(model, batch=2, length=8)
    with torch.no_grad(), capture_qkv(model, [1]) as qkv:
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    q, k, v = qkv[1]
    block = model.transformer.h[1]
    with torch.no_grad():
        packed = block.attn.c_attn(block.ln_1(out.hidden_states[1]))
    torch.testing.assert_close(torch.cat([q, k, v], -1), packed, atol=0, rtol=0)
    expected = probs_from(q, k, 4, inputs["attention_mask"], causal=True)
    valid = inputs["attention_mask"].bool()[:, None, :, None]  # rows of padded queries are unspecified
    torch.testing.assert_close(expected * valid, out.attentions[1] * valid, atol=1e-6, rtol=1e-5)


def test_llama_projections_repeat_kv_and_match_eager_attention(llama):
    model = AutoModelForCausalLM.from_pretrained(llama[1], attn_implementation="eager").eval()
    inputs = sample_inputs(model, batch=2, length=8)
    with torch.no_grad(), capture_qkv(model, [2]) as qkv:
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    q, k, v = qkv[2]
    attn = model.model.layers[2].self_attn
    with torch.no_grad():
        x = model.model.layers[2].input_layernorm(out.hidden_states[2])
        raw_q, raw_k, raw_v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)  # k, v: [B, T, 2 * 16]
    torch.testing.assert_close(q, raw_q, atol=0, rtol=0)
    # Query heads 0, 1 use kv head 0 and heads 2, 3 kv head 1.
    for h in range(4):
        kv = h // 2
        torch.testing.assert_close(k[..., 16 * h : 16 * (h + 1)], raw_k[..., 16 * kv : 16 * (kv + 1)], atol=0, rtol=0)
        torch.testing.assert_close(v[..., 16 * h : 16 * (h + 1)], raw_v[..., 16 * kv : 16 * (kv + 1)], atol=0, rtol=0)
    # Captured q/k are before rotary embeddings: rotating them reproduces the model's attention.
    b, t, _ = q.shape
    qh, kh = (z.reshape(b, t, 4, 16).transpose(1, 2) for z in (q, k))
    positions = torch.arange(t)[None].expand(b, t)
    cos, sin = model.model.rotary_emb(x, positions)
    qh, kh = apply_rotary_pos_emb(qh, kh, cos, sin)
    expected = masked_softmax(qh @ kh.transpose(-1, -2) / 4.0, inputs["attention_mask"], causal=True)
    valid = inputs["attention_mask"].bool()[:, None, :, None]
    torch.testing.assert_close(expected * valid, out.attentions[2] * valid, atol=1e-6, rtol=1e-5)


def test_vit_query_is_the_projection_of_the_normed_block_input(vit):
    model = vit[0]
    inputs = sample_inputs(model, batch=2)
    with torch.no_grad(), capture_qkv(model, [3]) as qkv:
        out = model(**inputs, output_hidden_states=True)
    block = model.vit.layers[3]
    with torch.no_grad():
        x = block.layernorm_before(out.hidden_states[3])
    torch.testing.assert_close(qkv[3][0], block.attention.q_proj(x), atol=0, rtol=0)
    torch.testing.assert_close(qkv[3][2], block.attention.v_proj(x), atol=0, rtol=0)


def test_student_captures_keep_their_graph(gpt2):
    model = gpt2[0]
    inputs = sample_inputs(model)
    with capture_qkv(model, [0]) as qkv:
        model(**inputs)
    qkv[0][0].sum().backward()
    grad = model.transformer.h[0].attn.c_attn.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_pool():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    # hidden[0] = [[0, 1], [2, 3], [4, 5]], hidden[1] = [[6, 7], [8, 9], [10, 11]]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[1.0, 2.0], [6.0, 7.0]]))
    torch.testing.assert_close(pool(hidden, None, "mean"), torch.tensor([[2.0, 3.0], [8.0, 9.0]]))
    torch.testing.assert_close(pool(hidden, mask, "cls"), torch.tensor([[0.0, 1.0], [6.0, 7.0]]))
    torch.testing.assert_close(pool(-hidden, mask, "max"), torch.tensor([[0.0, -1.0], [-6.0, -7.0]]))
    torch.testing.assert_close(pool(hidden, mask, "max"), torch.tensor([[2.0, 3.0], [6.0, 7.0]]))
    empty = torch.zeros(2, 3, dtype=torch.long)
    torch.testing.assert_close(pool(hidden, empty, "mean"), torch.zeros(2, 2))
    torch.testing.assert_close(pool(hidden, empty, "max"), torch.zeros(2, 2))
    with pytest.raises(ConfigError, match="unknown pooling 'sum'"):
        pool(hidden, mask, "sum")
