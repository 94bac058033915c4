"""``bench --speculative``: a student as a draft for its teacher with transformers' assisted generation."""

from __future__ import annotations

import json

import torch

from distillkit.bench.config import BenchConfig
from distillkit.bench.speculative import count_drafts, measure_speculative
from distillkit.cli.app import main


def test_teacher_drafting_for_itself_accepts_every_token(models):
    _, teacher = models["teacher"]
    cfg = BenchConfig(models=(teacher,), decode_tokens=12, repeats=1, warmup=0, device="cpu")
    r = measure_speculative(cfg, teacher, teacher)
    assert r["outputs_match"] is True
    assert r["proposed"] > 0 and r["accepted"] == r["proposed"] and r["acceptance_rate"] == 1.0
    # every pass verifies the whole draft and adds one token of its own
    assert r["tokens_per_teacher_pass"] >= 2.0
    assert r["speedup"] > 0 and r["teacher_s"] > 0 and r["assisted_s"] > 0


def test_counts_agree_with_the_tokens_produced(models):
    teacher_model, _ = models["teacher"]
    draft_model, _ = models["student"]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 128, (1, 10), generator=g)
    kw = dict(do_sample=False, max_new_tokens=16, min_new_tokens=16, pad_token_id=2)
    with torch.no_grad():
        plain = teacher_model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
        with count_drafts() as c:
            out = teacher_model.generate(
                prompt, attention_mask=torch.ones_like(prompt), assistant_model=draft_model, **kw
            )
    assert torch.equal(out, plain)  # greedy assisted decoding is lossless
    assert 0 <= c["accepted"] <= c["proposed"] and c["rounds"] >= 1
    # each verification pass adds its accepted draft tokens plus one token of the teacher's
    # (the last pass may be cut by max_new_tokens)
    assert c["accepted"] + c["rounds"] >= 16 >= c["rounds"]
    # a differently initialised 2-layer draft disagrees with the teacher somewhere
    assert c["accepted"] < c["proposed"]
    # the patch is removed afterwards
    from transformers.generation import candidate_generator as cg

    assert cg.AssistedCandidateGenerator.get_candidates.__name__ == "get_candidates"


def test_bench_cli_reports_speculative(models, text_file, capsys):
    _, teacher = models["teacher"]
    _, student = models["student"]
    code = main(
        [
            "bench",
            student,
            "--speculative",
            teacher,
            "--data",
            str(text_file),
            "--seq",
            "16",
            "--decode-tokens",
            "8",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
        ]  # fmt: skip
    )
    cap = capsys.readouterr()
    assert code == 0, cap.err
    spec = json.loads(cap.out.strip().splitlines()[-1])["speculative"]
    assert len(spec) == 1 and spec[0]["draft"] == student and spec[0]["teacher"] == teacher
    r = spec[0]
    assert r["prompt_tokens"] == 16 and 1 <= r["prompts"] <= 8 and r["outputs_match"] is True
    assert 0.0 <= r["acceptance_rate"] <= 1.0 and r["acceptance_rate"] == r["accepted"] / r["proposed"]
    assert r["speedup"] == r["teacher_s"] / r["assisted_s"]
