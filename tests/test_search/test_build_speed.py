"""The fast student builder the search uses equals the plain one: same plan, same weights, same outputs, same ties."""

from __future__ import annotations

import pytest
import torch

from distillkit.models.student import (
    SliceCache,
    _teacher_state_for,
    build_student,
    plan_student,
    weight_scores,
)
from distillkit.models.student import construct_model as _construct
from tests.tiny import sample_inputs, tiny_bert, tiny_bert_mlm, tiny_gpt2, tiny_llama, tiny_vit

SPECS = [
    {"layers": 1, "hidden": 16, "heads": 2, "kv_heads": 1, "intermediate": 24},
    {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "intermediate": 40},
    {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 1, "intermediate": 64},
]


def _reference_build(teacher, spec):
    """The builder before the search's speed-ups: seeded class initialisation, then the teacher's weights."""
    from distillkit.models.student import student_config
    from distillkit.models.student import student_spec as _as_spec

    spec = _as_spec(spec, teacher.config, False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = _construct(type(teacher), student_config(teacher.config, spec), teacher)
    plan = plan_student(teacher, spec)
    with torch.no_grad():
        student.load_state_dict(_teacher_state_for(student, teacher, plan), strict=True)
    return student.eval()


def _teachers():
    return {
        "llama": tiny_llama()[0],
        "gpt2": tiny_gpt2()[0],
        "bert": tiny_bert()[0],
        "bert-mlm": tiny_bert_mlm()[0],
        "vit": tiny_vit()[0],
    }


@pytest.fixture(scope="module")
def teachers():
    return _teachers()


def _fit(teacher, spec):
    from distillkit.models.arch import family
    from distillkit.models.spec import teacher_sizes

    sizes = teacher_sizes(teacher.config)
    out = {k: min(v, sizes[k]) for k, v in spec.items()}
    if family(teacher.config) != "llama":
        out["kv_heads"] = out["heads"]
    return out


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "bert-mlm", "vit"])
def test_weight_scores_give_the_default_plan(teachers, name):
    teacher = teachers[name].eval()
    scores = weight_scores(teacher)
    for spec in SPECS:
        spec = _fit(teacher, spec)
        a, b = plan_student(teacher, spec), plan_student(teacher, spec, scores=scores)
        assert a.layers == b.layers and a.heads == b.heads and a.kv_heads == b.kv_heads
        assert torch.equal(a.hidden, b.hidden)
        for x, y in zip(
            a.mlp + a.q_features + a.kv_features + a.head_dims,
            b.mlp + b.q_features + b.kv_features + b.head_dims,
            strict=True,
        ):
            assert torch.equal(x, y)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "bert-mlm", "vit"])
def test_uninitialised_construction_is_bit_identical(teachers, name):
    teacher = teachers[name].eval()
    scores = weight_scores(teacher)
    cache = SliceCache(keep=2)
    # every spec twice: the second build reads the sliced embeddings and heads from the cache
    for spec in [*SPECS, *SPECS]:
        spec = _fit(teacher, spec)
        ref = _reference_build(teacher, spec)
        rng = torch.get_rng_state()
        fast = build_student(teacher, spec, plan=plan_student(teacher, spec, scores=scores), cache=cache).eval()
        assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
        ref_state, fast_state = ref.state_dict(), fast.state_dict()
        assert list(ref_state) == list(fast_state)
        for key in ref_state:
            assert torch.equal(ref_state[key], fast_state[key]), key
        # non-persistent buffers (rotary inv_freq, position ids) are computed, not initialised
        ref_buf = dict(ref.named_buffers())
        for key, buf in fast.named_buffers():
            assert torch.equal(buf, ref_buf[key]), key
        # tied weights stay tied: the same parameter set and the same count
        assert [n for n, _ in ref.named_parameters()] == [n for n, _ in fast.named_parameters()]
        assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in fast.parameters())
        inputs = sample_inputs(teacher, batch=2, length=8)
        with torch.no_grad():
            a, b = ref(**inputs), fast(**inputs)
        key = "logits" if "logits" in a else "last_hidden_state"
        assert a[key].shape == b[key].shape
        assert torch.equal(a[key], b[key])


def test_slice_cache_keeps_the_last_hidden_sets_and_students_do_not_share_its_tensors(teachers):
    teacher = teachers["llama"].eval()
    scores = weight_scores(teacher)
    cache = SliceCache(keep=2)
    built = []
    for hidden in (16, 32, 64, 32):
        spec = {"layers": 1, "hidden": hidden, "heads": hidden // 16, "kv_heads": 1, "intermediate": 24}
        built.append(build_student(teacher, spec, plan=plan_student(teacher, spec, scores=scores), cache=cache))
    assert len(cache.sets) == 2  # 16 was evicted when 64 came; 32 was a hit
    emb = built[-1].model.embed_tokens.weight
    before = emb.detach().clone()
    with torch.no_grad():
        emb.add_(1.0)  # training a student must not touch the cache (nor the teacher)
    again = build_student(
        teacher,
        {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1, "intermediate": 24},
        cache=cache,
        plan=plan_student(
            teacher, {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1, "intermediate": 24}, scores=scores
        ),
    )
    assert torch.equal(again.model.embed_tokens.weight, before)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_shared_build_scores_like_a_copy_and_leaves_teacher_and_cache_untouched(teachers, name):
    """``share=True`` (the search's candidates) aliases instead of copying; no score may write through the alias."""
    from distillkit.registry import SCORES
    from distillkit.search.scores import ScoreContext

    teacher = teachers[name].eval().requires_grad_(False)
    scores = weight_scores(teacher)
    cache = SliceCache(keep=2)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    task = "feature-extraction" if name == "bert" else "causal-lm"
    ctx = ScoreContext(teacher, sample_inputs(teacher, batch=4, length=8), task)
    for spec in SPECS[:2]:
        spec = _fit(teacher, spec)
        plan = plan_student(teacher, spec, scores=scores)
        copied = build_student(teacher, spec, plan=plan).eval()
        shared = build_student(teacher, spec, plan=plan, cache=cache, share=True).eval()
        cached = {(h, k): v.clone() for h, s in cache.sets.items() for k, v in s.items()}
        assert [n for n, _ in copied.named_parameters()] == [n for n, _ in shared.named_parameters()]  # ties kept
        assert sum(p.numel() for p in copied.parameters()) == sum(p.numel() for p in shared.parameters())
        teacher_ptrs = {t.data_ptr() for t in teacher.state_dict().values()}
        cache_ptrs = {t.data_ptr() for s in cache.sets.values() for t in s.values()}
        aliased = [p for p in shared.parameters() if p.data_ptr() in teacher_ptrs | cache_ptrs]
        assert aliased  # at least the embeddings come from the cache without a copy
        for entry in SCORES:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                a = entry.obj(ctx, copied)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                b = entry.obj(ctx, shared)
            assert a == pytest.approx(b, rel=1e-9, abs=1e-12), entry.name
        for key, value in teacher.state_dict().items():
            assert torch.equal(value, teacher_before[key]), key
        for h, s in cache.sets.items():
            for key, value in s.items():
                assert torch.equal(value, cached[h, key]), key
