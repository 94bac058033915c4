"""Student spec parsing and the architecture accessors it relies on (configs only, no weights)."""

from __future__ import annotations

import pytest
from transformers import BertConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen3Config, T5Config, ViTConfig

from distillkit.errors import ConfigError, ModelError
from distillkit.models import arch
from distillkit.models.spec import is_spec, parse_student_spec, resolve_spec


def llama_cfg():
    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip


def gpt2_cfg():
    return GPT2Config(vocab_size=128, n_embd=64, n_layer=4, n_head=4, n_positions=128)


def bert_cfg():
    return BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)


def vit_cfg():
    return ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=32)


def test_is_spec():
    assert is_spec("layers=3")
    assert is_spec("layers=6,hidden=256")
    assert not is_spec("./students/small")
    assert not is_spec("org/model-name")


@pytest.mark.parametrize(
    "make, text, expected",
    [
        (llama_cfg, "layers=3", dict(layers=3, hidden=64, heads=4, kv_heads=2, intermediate=128)),
        (llama_cfg, "layers=2,hidden=32,heads=2,kv_heads=1,intermediate=64",
         dict(layers=2, hidden=32, heads=2, kv_heads=1, intermediate=64)),
        (llama_cfg, " layers = 2 , hidden=32 ", dict(layers=2, hidden=32, heads=4, kv_heads=2, intermediate=128)),
        # kv_heads defaults to the teacher's 2 when it divides heads, else to the largest divisor of heads below it.
        (llama_cfg, "hidden=32,heads=2", dict(layers=4, hidden=32, heads=2, kv_heads=2, intermediate=128)),
        (llama_cfg, "hidden=48,heads=3", dict(layers=4, hidden=48, heads=3, kv_heads=1, intermediate=128)),
        # GPT-2's implicit intermediate is 4 x 64; without GQA kv_heads follows heads.
        (gpt2_cfg, "heads=2,hidden=32", dict(layers=4, hidden=32, heads=2, kv_heads=2, intermediate=256)),
        (bert_cfg, "layers=1,intermediate=32", dict(layers=1, hidden=64, heads=4, kv_heads=4, intermediate=32)),
        (vit_cfg, "hidden=48", dict(layers=4, hidden=48, heads=4, kv_heads=4, intermediate=128)),
    ],
)  # fmt: skip
def test_valid_specs(make, text, expected):
    assert parse_student_spec(text, make()) == expected


def test_decoupled_head_dim_does_not_need_heads_to_divide_hidden():
    # Qwen3-style: head_dim is explicit (32) and independent of hidden/heads, so hidden=40 is fine.
    cfg = Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_hidden_layers=2)
    assert parse_student_spec("hidden=40,heads=2,kv_heads=1", cfg)["hidden"] == 40


@pytest.mark.parametrize(
    "make, text, message, hint",
    [
        (llama_cfg, "depth=3", "unknown student spec key 'depth'", "layers, hidden, heads, kv_heads, intermediate"),
        (llama_cfg, "layers=two", "layers=two is not an integer", "layers=4"),
        (llama_cfg, "layers=2.5", "layers=2.5 is not an integer", "whole number"),
        (llama_cfg, "layers=0", "layers=0 must be positive", "layers=1"),
        (llama_cfg, "hidden=-8", "hidden=-8 must be positive", "hidden=1"),
        (llama_cfg, "layers", "malformed student spec entry 'layers'", "key=value"),
        (llama_cfg, "layers=2,,hidden=32", "malformed student spec entry ''", "key=value"),
        (llama_cfg, "=3", "malformed", "key=value"),
        (llama_cfg, "layers=3=4", "malformed", "key=value"),
        (llama_cfg, "", "the student spec is empty", "key=value"),
        (llama_cfg, "layers=2,layers=3", "'layers' is given twice", "once"),
        (llama_cfg, "hidden=50", "heads=4 does not divide hidden=50", "e.g. hidden=48 or hidden=52"),
        (bert_cfg, "hidden=40,heads=3", "heads=3 does not divide hidden=40", "with hidden=40 use heads=4"),
        (llama_cfg, "hidden=48,heads=3,kv_heads=2", "kv_heads=2 does not divide heads=3", "kv_heads"),
        (llama_cfg, "hidden=60", "odd head size", "even"),
        (gpt2_cfg, "kv_heads=2", "grouped-query attention, and gpt2 models have none", "drop kv_heads"),
        (bert_cfg, "kv_heads=4", "grouped-query attention, and bert models have none", "drop kv_heads"),
        (vit_cfg, "kv_heads=1", "vit models have none", "drop kv_heads"),
        (llama_cfg, "layers=5", "layers=5 is larger than the teacher's 4", "layers=4 or less"),
        (llama_cfg, "hidden=128", "hidden=128 is larger than the teacher's 64", "hidden=64 or less"),
        (llama_cfg, "heads=8", "heads=8 is larger than the teacher's 4", "heads=4 or less"),
        (llama_cfg, "kv_heads=4", "kv_heads=4 is larger than the teacher's 2", "kv_heads=2 or less"),
        (gpt2_cfg, "intermediate=512", "intermediate=512 is larger than the teacher's 256", "intermediate=256"),
        # Fewer heads at the same hidden size would need heads wider than any teacher head.
        (bert_cfg, "heads=2", "head size of 32, larger than the teacher's 16", "with hidden=64 use heads=4"),
        (T5Config, "layers=2", "student specs are not supported for t5 models", "llama, gpt2, bert, vit"),
    ],
)
def test_spec_errors(make, text, message, hint):
    with pytest.raises(ConfigError) as info:
        parse_student_spec(text, make())
    err = info.value
    assert message in err.message
    assert hint in err.hint
    assert "\n" not in err.message and "\n" not in err.hint


def test_resolve_spec_dicts_from_code():
    # A resolved spec round-trips: student search hands dicts with kv_heads == heads for non-GQA families.
    full = parse_student_spec("layers=2,hidden=32", bert_cfg())
    assert resolve_spec(full, bert_cfg()) == full
    assert resolve_spec({"layers": 2}, llama_cfg()) == dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128)
    with pytest.raises(ConfigError, match="not an integer"):
        resolve_spec({"layers": True}, llama_cfg())
    with pytest.raises(ConfigError, match="grouped-query"):
        resolve_spec({"heads": 4, "kv_heads": 2}, bert_cfg())


def test_accessors_across_naming_schemes():
    gpt2 = GPT2Config(n_embd=96, n_layer=3, n_head=6, n_inner=None, vocab_size=300)
    assert (arch.num_layers(gpt2), arch.hidden_size(gpt2), arch.num_heads(gpt2)) == (3, 96, 6)
    assert (arch.num_kv_heads(gpt2), arch.head_dim(gpt2), arch.intermediate_size(gpt2)) == (6, 16, 384)
    assert arch.vocab_size(gpt2) == 300
    assert arch.intermediate_size(GPT2Config(n_embd=96, n_head=6, n_inner=100)) == 100
    llama = llama_cfg()
    assert (arch.num_kv_heads(llama), arch.head_dim(llama), arch.intermediate_size(llama)) == (2, 16, 128)
    qwen3 = Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=32)
    assert arch.head_dim(qwen3) == 32
    assert arch.vocab_size(vit_cfg()) is None


@pytest.mark.parametrize(
    "cfg, fam",
    [
        (llama_cfg(), "llama"),
        (MistralConfig(), "llama"),
        (Qwen3Config(), "llama"),
        (gpt2_cfg(), "gpt2"),
        (bert_cfg(), "bert"),
        (vit_cfg(), "vit"),
        (T5Config(), "t5"),
    ],
)
def test_family(cfg, fam):
    assert arch.family(cfg) == fam
    assert (fam in arch.SUPPORTED_FAMILIES) == (fam != "t5")


def test_check_vocab_names_both_sizes():
    with pytest.raises(ModelError) as info:
        arch.check_vocab(LlamaConfig(vocab_size=32000), GPT2Config(vocab_size=50257))
    assert info.value.message == "teacher and student vocabularies differ (teacher 32000, student 50257)"
    assert info.value.hint
    arch.check_vocab(llama_cfg(), gpt2_cfg())  # both 128
    arch.check_vocab(vit_cfg(), vit_cfg())  # no vocabulary on either side


def test_fractional_values_are_fractions_of_the_teacher():
    from distillkit.models.spec import parse_student_spec

    cfg = llama_cfg()
    spec = parse_student_spec("layers=0.5,hidden=0.5,heads=0.5,kv_heads=0.5,intermediate=0.25", cfg)
    assert spec["layers"] == cfg.num_hidden_layers // 2
    assert spec["hidden"] == cfg.hidden_size // 2
    assert spec["heads"] == cfg.num_attention_heads // 2
    assert spec["kv_heads"] == max(1, cfg.num_key_value_heads // 2)
    assert spec["intermediate"] == cfg.intermediate_size // 4
    assert spec["hidden"] // spec["heads"] == cfg.hidden_size // cfg.num_attention_heads
