"""Building students: configs, exact copies of teacher layers and channels, reload parity, init quality."""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
)

from distillkit.errors import ConfigError
from distillkit.models.student import build_student, plan_student, select_layers, student_config
from tests.tiny import sample_inputs

AUTO = {
    "llama": AutoModelForCausalLM,
    "gpt2": AutoModelForCausalLM,
    "bert": AutoModel,
    "bert_mlm": AutoModelForMaskedLM,
    "bert_cls": AutoModelForSequenceClassification,
    "vit": AutoModelForImageClassification,
    "vit_model": AutoModel,
}
# A spec that narrows every width (and depth) each family supports.
NARROW = {
    "llama": "layers=3,hidden=32,heads=2,kv_heads=1,intermediate=64",
    "gpt2": "layers=3,hidden=32,heads=2,intermediate=128",
    "bert": "layers=2,hidden=32,intermediate=64",
    "bert_mlm": "layers=2,hidden=32,intermediate=64",
    "bert_cls": "layers=2,hidden=48,heads=3,intermediate=96",
    "vit": "layers=2,hidden=48,intermediate=64",
    "vit_model": "layers=2,hidden=32,heads=2,intermediate=64",
}
LAYER_KEY = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h))\.(\d+)\.(.+)$")


def outputs(model, inputs):
    """Every floating output tensor of a forward pass, by name."""
    with torch.no_grad():
        out = model(**inputs)
    return {k: v for k, v in out.items() if torch.is_tensor(v) and v.is_floating_point()}


def main_output(model, inputs):
    out = outputs(model, inputs)
    return out["logits"] if "logits" in out else out["last_hidden_state"]


def kl(teacher_logits, student_logits):
    t, s = F.log_softmax(teacher_logits.float(), -1), F.log_softmax(student_logits.float(), -1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean().item()


def changed_fields(a, b):
    da, db = a.to_dict(), b.to_dict()
    return {k for k in da.keys() | db.keys() if da.get(k) != db.get(k)}


def test_select_layers():
    assert select_layers(6, 3) == [0, 3, 5]
    assert select_layers(4, 2) == [0, 3]
    assert select_layers(4, 3) == [0, 2, 3]
    assert select_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert select_layers(12, 4) == [0, 4, 7, 11]
    assert select_layers(4, 4) == [0, 1, 2, 3]
    assert select_layers(5, 1) == [0]
    with pytest.raises(ConfigError):
        select_layers(4, 5)


@pytest.mark.parametrize(
    "name, spec, fields, values",
    [
        ("llama", "layers=2", {"num_hidden_layers"}, {"num_hidden_layers": 2}),
        ("llama", "hidden=32", {"hidden_size", "head_dim"}, {"head_dim": 8}),
        ("llama", "hidden=32,heads=2", {"hidden_size", "num_attention_heads"}, {"head_dim": 16}),
        (
            "llama",
            "kv_heads=1,intermediate=64",
            {"num_key_value_heads", "intermediate_size"},
            {"intermediate_size": 64},
        ),
        # GPT-2's implicit n_inner (4 x hidden) would shrink with hidden, so the kept 256 is written out.
        ("gpt2", "hidden=32", {"n_embd", "n_inner"}, {"n_embd": 32, "n_inner": 256}),
        ("gpt2", "intermediate=128", {"n_inner"}, {"n_inner": 128}),
        ("bert", "layers=1,hidden=48", {"num_hidden_layers", "hidden_size"}, {"hidden_size": 48}),
        ("vit", "hidden=48,heads=4", {"hidden_size", "pooler_output_size"}, {"pooler_output_size": 48}),
    ],
)
def test_student_config_changes_only_requested_fields(request, name, spec, fields, values):
    teacher, _ = request.getfixturevalue(name)
    before = teacher.config.to_dict()
    cfg = student_config(teacher.config, spec)
    assert changed_fields(teacher.config, cfg) == fields
    for key, value in values.items():
        assert getattr(cfg, key) == value
    assert teacher.config.to_dict() == before


def test_decoupled_head_dim_is_kept_and_layer_types_follow_layers():
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, layer_types=["full_attention", "sliding_attention"] * 2,
        sliding_window=16, use_sliding_window=True,
    )  # fmt: skip
    teacher = Qwen3ForCausalLM(cfg).eval()
    student = build_student(teacher, "layers=2,hidden=32,heads=2,kv_heads=1")
    assert student.config.head_dim == 32
    assert student.config.layer_types == ["full_attention", "sliding_attention"]  # teacher layers 0 and 3
    assert tuple(student.model.layers[0].self_attn.q_proj.weight.shape) == (64, 32)
    # q/k norms act per head dimension, which a decoupled head keeps whole.
    torch.testing.assert_close(
        student.model.layers[1].self_attn.k_norm.weight, teacher.model.layers[3].self_attn.k_norm.weight, atol=0, rtol=0
    )
    assert torch.isfinite(student(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_same_size_student_is_the_teacher(teacher):
    name, model, _ = teacher
    inputs = sample_inputs(model)
    student = build_student(model, f"layers={model.config.num_hidden_layers}").eval()
    assert type(student) is type(model)
    expected, got = outputs(model, inputs), outputs(student, inputs)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0)


def test_layer_only_student_copies_selected_layers_and_embeddings(teacher):
    name, model, _ = teacher
    student = build_student(model, "layers=2")
    assert student.config.num_hidden_layers == 2
    t_state, s_state = model.state_dict(), student.state_dict()
    copied_layers = set()
    for key, value in s_state.items():
        m = LAYER_KEY.match(key)
        if m is None:
            t_key = key  # embeddings, final norm, heads: the teacher's exactly
        else:
            t_key = f"{m.group(1)}.{[0, 3][int(m.group(2))]}.{m.group(3)}"
            copied_layers.add(int(m.group(2)))
        assert torch.equal(value, t_state[t_key]), key
    assert copied_layers == {0, 1}


def _llama_expected(T, plan):
    h = plan.hidden
    exp = {
        "model.embed_tokens.weight": T["model.embed_tokens.weight"][:, h],
        "lm_head.weight": T["lm_head.weight"][:, h],
        "model.norm.weight": T["model.norm.weight"][h],
    }
    for i, t in enumerate(plan.layers):
        q, kv, m = plan.q_features[i], plan.kv_features[i], plan.mlp[i]
        s, t = f"model.layers.{i}.", f"model.layers.{t}."
        exp[s + "self_attn.q_proj.weight"] = T[t + "self_attn.q_proj.weight"][q][:, h]
        exp[s + "self_attn.k_proj.weight"] = T[t + "self_attn.k_proj.weight"][kv][:, h]
        exp[s + "self_attn.v_proj.weight"] = T[t + "self_attn.v_proj.weight"][kv][:, h]
        exp[s + "self_attn.o_proj.weight"] = T[t + "self_attn.o_proj.weight"][h][:, q]
        exp[s + "mlp.gate_proj.weight"] = T[t + "mlp.gate_proj.weight"][m][:, h]
        exp[s + "mlp.up_proj.weight"] = T[t + "mlp.up_proj.weight"][m][:, h]
        exp[s + "mlp.down_proj.weight"] = T[t + "mlp.down_proj.weight"][h][:, m]
        exp[s + "input_layernorm.weight"] = T[t + "input_layernorm.weight"][h]
        exp[s + "post_attention_layernorm.weight"] = T[t + "post_attention_layernorm.weight"][h]
    return exp


def _gpt2_expected(T, plan):
    h = plan.hidden
    exp = {
        "transformer.wte.weight": T["transformer.wte.weight"][:, h],
        "transformer.wpe.weight": T["transformer.wpe.weight"][:, h],
        "lm_head.weight": T["lm_head.weight"][:, h],
    }
    for p in ("weight", "bias"):
        exp[f"transformer.ln_f.{p}"] = T[f"transformer.ln_f.{p}"][h]
    for i, t in enumerate(plan.layers):
        q, m = plan.q_features[i], plan.mlp[i]
        qkv = torch.cat([q, q + 64, q + 128])  # c_attn packs q|k|v, each 64 wide in the teacher
        s, t = f"transformer.h.{i}.", f"transformer.h.{t}."
        # Conv1D weights are [in, out].
        exp[s + "attn.c_attn.weight"] = T[t + "attn.c_attn.weight"][h][:, qkv]
        exp[s + "attn.c_attn.bias"] = T[t + "attn.c_attn.bias"][qkv]
        exp[s + "attn.c_proj.weight"] = T[t + "attn.c_proj.weight"][q][:, h]
        exp[s + "mlp.c_fc.weight"] = T[t + "mlp.c_fc.weight"][h][:, m]
        exp[s + "mlp.c_proj.weight"] = T[t + "mlp.c_proj.weight"][m][:, h]
        for p in ("weight", "bias"):
            exp[s + f"ln_1.{p}"] = T[t + f"ln_1.{p}"][h]
            exp[s + f"ln_2.{p}"] = T[t + f"ln_2.{p}"][h]
    return exp


def _bert_expected(T, plan):
    h = plan.hidden
    exp = {}
    for e in ("word", "position", "token_type"):
        exp[f"bert.embeddings.{e}_embeddings.weight"] = T[f"bert.embeddings.{e}_embeddings.weight"][:, h]
    exp["cls.predictions.transform.dense.weight"] = T["cls.predictions.transform.dense.weight"][h][:, h]
    exp["cls.predictions.decoder.weight"] = T["cls.predictions.decoder.weight"][:, h]
    exp["cls.predictions.bias"] = T["cls.predictions.bias"]
    for i, t in enumerate(plan.layers):
        q, m = plan.q_features[i], plan.mlp[i]
        s, t = f"bert.encoder.layer.{i}.", f"bert.encoder.layer.{t}."
        for proj in ("query", "key", "value"):
            exp[s + f"attention.self.{proj}.weight"] = T[t + f"attention.self.{proj}.weight"][q][:, h]
            exp[s + f"attention.self.{proj}.bias"] = T[t + f"attention.self.{proj}.bias"][q]
        exp[s + "attention.output.dense.weight"] = T[t + "attention.output.dense.weight"][h][:, q]
        exp[s + "intermediate.dense.weight"] = T[t + "intermediate.dense.weight"][m][:, h]
        exp[s + "output.dense.weight"] = T[t + "output.dense.weight"][h][:, m]
        exp[s + "output.LayerNorm.weight"] = T[t + "output.LayerNorm.weight"][h]
    return exp


def _vit_expected(T, plan):
    h = plan.hidden
    exp = {
        "vit.embeddings.cls_token": T["vit.embeddings.cls_token"][..., h],
        "vit.embeddings.position_embeddings": T["vit.embeddings.position_embeddings"][..., h],
        "vit.embeddings.patch_embeddings.projection.weight": T["vit.embeddings.patch_embeddings.projection.weight"][h],
        "vit.layernorm.weight": T["vit.layernorm.weight"][h],
        "classifier.weight": T["classifier.weight"][:, h],
        "classifier.bias": T["classifier.bias"],
    }
    for i, t in enumerate(plan.layers):
        q, m = plan.q_features[i], plan.mlp[i]
        s, t = f"vit.layers.{i}.", f"vit.layers.{t}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            exp[s + f"attention.{proj}.weight"] = T[t + f"attention.{proj}.weight"][q][:, h]
        exp[s + "attention.o_proj.weight"] = T[t + "attention.o_proj.weight"][h][:, q]
        exp[s + "mlp.fc1.weight"] = T[t + "mlp.fc1.weight"][m][:, h]
        exp[s + "mlp.fc2.weight"] = T[t + "mlp.fc2.weight"][h][:, m]
        exp[s + "layernorm_before.bias"] = T[t + "layernorm_before.bias"][h]
    return exp


@pytest.mark.parametrize(
    "name, expected",
    [("llama", _llama_expected), ("gpt2", _gpt2_expected), ("bert_mlm", _bert_expected), ("vit", _vit_expected)],
)
def test_narrow_student_weights_are_teacher_subtensors(request, name, expected):
    teacher, _ = request.getfixturevalue(name)
    spec = NARROW[name]
    plan = plan_student(teacher, spec)
    student = build_student(teacher, spec)
    S = student.state_dict()
    exp = expected(teacher.state_dict(), plan)
    assert len(exp) > 10
    for key, value in exp.items():
        assert S[key].shape == value.shape, key
        assert torch.equal(S[key], value), key
    # Index sets are sorted and unique, so kept channels keep the teacher's order.
    assert len(plan.hidden) == plan.spec["hidden"]
    assert torch.equal(plan.hidden, torch.unique(plan.hidden))
    for m in plan.mlp:
        assert torch.equal(m, torch.unique(m)) and len(m) == plan.spec["intermediate"]


def test_gqa_heads_are_chosen_as_whole_groups(llama):
    teacher, _ = llama
    plan = plan_student(teacher, "layers=3,heads=2,kv_heads=1,hidden=32")
    for heads, groups, q, kv in zip(plan.heads, plan.kv_heads, plan.q_features, plan.kv_features, strict=True):
        assert len(groups) == 1 and len(heads) == 2
        # Teacher group g holds query heads 2g and 2g + 1; both student heads come from the kept group.
        assert [h // 2 for h in heads] == [groups[0], groups[0]]
        assert torch.equal(q, torch.cat([torch.arange(16) + 16 * h for h in heads]))
        assert torch.equal(kv, torch.arange(16) + 16 * groups[0])
    # Two kv groups of one query head each: each student query head keeps its own teacher kv head.
    plan = plan_student(teacher, "heads=2,kv_heads=2,hidden=32")
    for heads, groups in zip(plan.heads, plan.kv_heads, strict=True):
        assert groups == [0, 1] and [h // 2 for h in heads] == [0, 1]


def test_ranking_keeps_strong_and_drops_dead_channels(llama):
    teacher = copy.deepcopy(llama[0])
    layer = teacher.model.layers[0]
    with torch.no_grad():
        # kv group 1 (query heads 2 and 3) of layer 0 dominates.
        layer.self_attn.k_proj.weight[16:] *= 3
        layer.self_attn.v_proj.weight[16:] *= 3
        layer.self_attn.q_proj.weight[32:] *= 3
        for block in teacher.model.layers:
            block.mlp.gate_proj.weight[5] = 0  # a dead MLP channel
            block.mlp.up_proj.weight[5] = 0
            block.mlp.down_proj.weight[:, 5] = 0
            block.mlp.up_proj.weight[7] *= 5  # a strong one
            block.input_layernorm.weight[9] = 0  # a dead hidden channel ...
            block.post_attention_layernorm.weight[9] = 0
        teacher.model.embed_tokens.weight[:, 9] = 0
        teacher.lm_head.weight[:, 9] = 0
        teacher.model.norm.weight[9] = 0
        teacher.model.embed_tokens.weight[:, 3] *= 10  # ... and a strong one
    plan = plan_student(teacher, "heads=2,kv_heads=1,hidden=32,intermediate=64")
    assert plan.kv_heads[0] == [1] and plan.heads[0] == [2, 3]
    assert all(5 not in m.tolist() and 7 in m.tolist() for m in plan.mlp)
    assert 9 not in plan.hidden.tolist() and 3 in plan.hidden.tolist()


def test_narrower_heads_keep_rotary_frequencies_and_top_dims(llama, bert_mlm):
    teacher = llama[0]
    plan = plan_student(teacher, "hidden=32")  # 4 heads of 8 instead of 16
    assert plan.head_dims[0][0].tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    student = build_student(teacher, "hidden=32")
    torch.testing.assert_close(
        student.model.rotary_emb.inv_freq, teacher.model.rotary_emb.inv_freq[::2], atol=0, rtol=0
    )
    # Absolute-position families keep each head's strongest dimensions.
    bert = copy.deepcopy(bert_mlm[0])
    attn = bert.bert.encoder.layer[0].attention.self
    with torch.no_grad():
        attn.query.weight[16 + 3] *= 20  # dim 3 of head 1
        attn.key.weight[16 + 3] *= 20
    plan = plan_student(bert, "hidden=32")
    assert 3 in plan.head_dims[0][1].tolist()
    assert torch.equal(plan.q_features[0][8:16], 16 + plan.head_dims[0][1])


@pytest.mark.parametrize("name", ["gpt2", "bert_mlm"])
def test_tied_embeddings_stay_tied(request, tmp_path, name):
    teacher, _ = request.getfixturevalue(name)
    student = build_student(teacher, NARROW[name])
    out, emb = student.get_output_embeddings().weight, student.get_input_embeddings().weight
    assert out.data_ptr() == emb.data_ptr()
    student.save_pretrained(tmp_path)
    reloaded = AUTO[name].from_pretrained(tmp_path)
    assert reloaded.get_output_embeddings().weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()


def test_narrow_student_reloads_with_identical_outputs(teacher, tmp_path):
    name, model, _ = teacher
    student = build_student(model, NARROW[name]).eval()
    student.save_pretrained(tmp_path)
    reloaded = AUTO[name].from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(student)
    assert reloaded.config.num_hidden_layers == student.config.num_hidden_layers
    assert reloaded.config.hidden_size == student.config.hidden_size
    inputs = sample_inputs(model)
    expected, got = outputs(student, inputs), outputs(reloaded, inputs)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert_mlm", "bert_cls", "vit"])
def test_teacher_init_is_closer_to_the_teacher_than_random_init(request, name):
    teacher, _ = request.getfixturevalue(name)
    spec = "layers=2,hidden=48,intermediate=96"
    inputs = sample_inputs(teacher, batch=4, length=16)
    target = main_output(teacher, inputs)
    from_teacher = kl(target, main_output(build_student(teacher, spec, init="teacher").eval(), inputs))
    at_random = kl(target, main_output(build_student(teacher, spec, init="random", seed=0).eval(), inputs))
    assert from_teacher < 0.7 * at_random, (from_teacher, at_random)


def test_random_init_is_seeded_and_leaves_global_rng_alone(gpt2):
    teacher = gpt2[0]
    state = torch.get_rng_state()
    a = build_student(teacher, "layers=2", init="random", seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_student(teacher, "layers=2", init="random", seed=0)
    c = build_student(teacher, "layers=2", init="random", seed=1)
    wa, wb, wc = (m.transformer.h[0].attn.c_attn.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert not torch.equal(wa, teacher.transformer.h[0].attn.c_attn.weight)


def test_student_follows_teacher_dtype_and_accepts_dict_specs(llama):
    teacher = copy.deepcopy(llama[0]).to(torch.bfloat16)
    student = build_student(teacher, {"layers": 2, "hidden": 32})
    assert next(student.parameters()).dtype == torch.bfloat16
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == 32
    assert not student.training


def test_unsupported_teacher_and_bad_init(gpt2):
    with pytest.raises(ConfigError) as info:
        build_student(SimpleNamespace(config=T5Config()), "layers=2")
    assert "t5" in info.value.message and "llama, gpt2, bert, vit" in info.value.hint
    with pytest.raises(ConfigError, match="unknown student init 'zeros'"):
        build_student(gpt2[0], "layers=2", init="zeros")
