"""On-policy distillation (GKD): the student generates, the teacher scores its tokens, the student updates."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distillkit.cli.app import main
from distillkit.config import DistillConfig
from distillkit.distill import functional as F
from distillkit.distill.engine import DistillModule, build_losses
from distillkit.distill.onpolicy import OnPolicyFeed, student_batch
from distillkit.models.load import LoadedModel
from distillkit.models.student import build_student
from tests.test_distill.test_engine import markov_lines


class _FixedBatches:
    """Stands in for EpochBatches: always the same fixed-data batch."""

    def __init__(self, batch):
        self.batch = batch

    def next(self):
        return dict(self.batch)


def _setup(gpt2, fraction: float, loss: str = "reverse_kl"):
    from transformers import AutoTokenizer

    teacher_model, path = gpt2
    tok = AutoTokenizer.from_pretrained(path)
    cfg = DistillConfig.of(
        teacher=path,
        mode="on-policy",
        student_data_fraction=fraction,
        max_length=16,
        max_new_tokens=6,
        prompt_length=5,
        gen_temperature=1.0,
        losses=(loss,),
        temperature=1.0,
        seed=3,
    )
    student = build_student(teacher_model, "layers=1", init="teacher").train()
    losses = build_losses(cfg, "causal-lm", student.config, teacher_model.config)
    module = DistillModule(student, losses, "causal-lm", "mean", 0.0)
    teacher = LoadedModel(model=teacher_model, processor=tok, task="causal-lm", path=path)
    feed = OnPolicyFeed(cfg, teacher, "causal-lm", torch.device("cpu"), tok, module)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (3, 16), generator=g)
    fixed = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return cfg, module, feed, _FixedBatches(fixed), teacher_model


def test_student_batch_masks_only_generated_targets():
    seq = torch.arange(20).view(2, 10)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    b = student_batch({}, seq, valid)
    assert b["kd_mask"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1, 1, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1] * 10, [1] * 8 + [0, 0]]


def test_onpolicy_step_generates_scores_and_updates(gpt2):
    cfg, module, feed, batches, teacher = _setup(gpt2, fraction=1.0)
    fixed = batches.batch
    batch = feed.next_batch(batches, step=0, micro=0)
    # generated: prompt kept, 6 new tokens sampled by the student, and they are not the fixed data
    assert batch["input_ids"].shape == (3, 11)
    assert torch.equal(batch["input_ids"][:, :5], fixed["input_ids"][:, :5])
    assert not torch.equal(batch["input_ids"][:, 5:], fixed["input_ids"][:, 5:11])
    assert feed.batches_generated == 1 and 0 < feed.tokens_generated <= 18
    assert int(batch["kd_mask"].sum()) == feed.tokens_generated
    # same (seed, step, micro) -> same generations
    _, _, feed2, batches2, _ = _setup(gpt2, fraction=1.0)
    assert torch.equal(feed2.next_batch(batches2, step=0, micro=0)["input_ids"], batch["input_ids"])

    # the teacher scores exactly the generated tokens: reference = reverse KL over positions 4..9
    t_feats = feed.teacher_features(batch, {"logits"}, [], "mean")
    loss, parts = module(batch, t_feats, 0.0)
    with torch.no_grad():
        s_logits = module.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    valid = batch["kd_mask"][:, 4:10].bool()
    ref = F.reverse_kl(s_logits[:, 4:10], t_logits[:, 4:10], valid, temperature=1.0)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(loss) and loss.item() > 0

    # and the student updates from it
    before = [p.detach().clone() for p in module.student.parameters()]
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.parameters())
    opt.step()
    changed = sum(not torch.equal(a, p) for a, p in zip(before, module.student.parameters(), strict=True))
    assert changed > 0
    with torch.no_grad():
        after, _ = module(batch, t_feats, 0.0)
    assert after.item() < loss.item()


def test_fraction_zero_keeps_fixed_data(gpt2):
    _, _, feed, batches, _ = _setup(gpt2, fraction=0.0)
    batch = feed.next_batch(batches, step=0, micro=0)
    assert torch.equal(batch["input_ids"], batches.batch["input_ids"]) and "kd_mask" not in batch
    assert feed.metrics()["onpolicy_batches"] == 0


def test_onpolicy_cli_run_on_llama(llama, tmp_path, capsys):
    _, teacher = llama
    data = tmp_path / "text.txt"
    data.write_text("\n".join(markov_lines(30, seed=1)))
    args = [
        "distill", "--teacher", teacher, "--student", "layers=1", "--data", str(data), "--max-length", "16",
        "--batch-size", "4", "--steps", "4", "--lr", "1e-3", "--mode", "on-policy", "--student-data-fraction", "0.5",
        "--max-new-tokens", "4", "--loss", "jsd", "--out", str(tmp_path / "s"),
    ]  # fmt: skip
    code = main(args)
    cap = capsys.readouterr()
    assert code == 0, cap.err
    m = json.loads(cap.out.strip().splitlines()[-1])["metrics"]
    # seeded coins: the same runs pick the same batches; 4 steps at 0.5 generated at least one and not all
    assert 1 <= m["onpolicy_batches"] <= 3
    assert m["onpolicy_fraction_observed"] == m["onpolicy_batches"] / 4
    assert 0 < m["onpolicy_generated_tokens"] <= 16 * m["onpolicy_batches"]
    assert math.isfinite(m["final_train_loss"]) and m["final_train_loss"] > 0


def test_onpolicy_is_refused_for_encoders_and_with_alpha(bert, tmp_path, capsys):
    from distillkit.errors import ConfigError

    with pytest.raises(ConfigError, match="hard-label loss"):
        DistillConfig.of(teacher="x", mode="on-policy", alpha=0.5)
    with pytest.raises(ConfigError, match="student data fraction"):
        DistillConfig.of(teacher="x", mode="on-policy", student_data_fraction=1.5)
    _, path = bert
    code = main(["distill", "--teacher", path, "--mode", "on-policy", "--steps", "1", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 1 and "for causal language models" in err
    assert not (tmp_path / "b").exists()


def test_generation_is_without_dropout_and_restores_train_mode(gpt2):
    from distillkit.distill.onpolicy import generate_continuations
    from tests.tiny import tiny_gpt2

    # a student with heavy dropout, in train mode as the training loop keeps it
    model, _ = tiny_gpt2(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    model.train()
    prompt = torch.randint(3, 128, (4, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=8, temperature=1.0, seed=11, pad_token_id=0, eos_token_id=None)
    a, _ = generate_continuations(model, prompt, **kw)
    assert model.training  # restored
    b, _ = generate_continuations(model, prompt, **kw)
    model.eval()
    c, _ = generate_continuations(model, prompt, **kw)
    assert not model.training
    # same seed -> same samples; with dropout active they would differ between the train-mode and eval-mode calls
    assert torch.equal(a, b) and torch.equal(a, c)


def _own_sample_reference(student, teacher, prompts, new_tokens, seed, eos):
    """Plain loop: per row, KL(p_S || p_T) at the positions predicting tokens up to and including the first EOS."""
    from distillkit.distill.onpolicy import generate_continuations

    seq, _ = generate_continuations(
        student, prompts, max_new_tokens=new_tokens, temperature=1.0, seed=seed, pad_token_id=0, eos_token_id=eos
    )
    p = prompts.shape[1]
    with torch.no_grad():
        log_s = torch.log_softmax(student(input_ids=seq).logits.double(), -1)
        log_t = torch.log_softmax(teacher(input_ids=seq).logits.double(), -1)
    total, count = 0.0, 0
    for row in range(seq.shape[0]):
        for j in range(new_tokens):
            pos = p - 1 + j  # logits here predict generated token j
            total += float((log_s[row, pos].exp() * (log_s[row, pos] - log_t[row, pos])).sum())
            count += 1
            if eos is not None and int(seq[row, p + j]) == eos:
                break
    return total, count


def test_own_sample_reverse_kl_counts_tokens_up_to_eos(gpt2):
    from distillkit.distill.onpolicy import generate_continuations
    from distillkit.distill.onpolicy_compare import own_sample_reverse_kl

    teacher, _ = gpt2
    teacher.eval()
    student = build_student(teacher, "layers=1", init="teacher").eval()
    prompts = torch.randint(3, 128, (5, 4), generator=torch.Generator().manual_seed(2))
    # an "EOS" the student really samples: the 3rd new token of row 0 when nothing stops it
    free, _ = generate_continuations(
        student, prompts[:3], max_new_tokens=10, temperature=1.0, seed=7, pad_token_id=0, eos_token_id=None
    )
    eos = int(free[0, 4 + 2])
    kw = dict(new_tokens=10, seed=7, pad_token_id=0, batch_size=3)  # two generation batches: seeds 7 and 10
    total, count = own_sample_reverse_kl(student, teacher, prompts, eos_token_id=eos, **kw)
    ref = [_own_sample_reference(student, teacher, prompts[b : b + 3], 10, 7 + b, eos) for b in (0, 3)]
    assert count == sum(c for _, c in ref) and count < 50  # row 0 stops after 3 tokens: padding is not scored
    assert total == pytest.approx(sum(t for t, _ in ref), rel=1e-4, abs=1e-6)
    # without EOS every generated token counts
    total_all, count_all = own_sample_reverse_kl(student, teacher, prompts, eos_token_id=None, **kw)
    ref_all = [_own_sample_reference(student, teacher, prompts[b : b + 3], 10, 7 + b, None) for b in (0, 3)]
    assert count_all == 50 and total_all == pytest.approx(sum(t for t, _ in ref_all), rel=1e-4, abs=1e-6)
    assert total > 0


def test_held_out_prompts_come_from_the_distillation_runs_split(gpt2, tmp_path):
    from transformers import AutoTokenizer

    from distillkit.data import DataSpec, prepare_data
    from distillkit.distill.onpolicy_compare import held_out_prompts

    tok = AutoTokenizer.from_pretrained(gpt2[1])
    path = tmp_path / "text.txt"
    path.write_text("\n".join(markov_lines(200, seed=4)))
    run = prepare_data(DataSpec(data=str(path), max_length=16, seed=5), tok, "causal-lm")  # what run_distill sees
    prompts = held_out_prompts(tok, data=str(path), seq=16, prompt=6, seed=5, limit=1000)
    assert prompts.shape == (len(run.eval), 6)
    assert torch.equal(prompts, torch.stack([run.eval[i]["input_ids"][:6] for i in range(len(run.eval))]))
    # the old benchmark took the split of seed + 1: other blocks, some of them trained on
    other = held_out_prompts(tok, data=str(path), seq=16, prompt=6, seed=6, limit=1000)
    assert other.shape[0] == prompts.shape[0] and not torch.equal(other, prompts)


def test_token_budget_matches_supervised_tokens():
    import argparse

    from distillkit.distill.onpolicy_compare import onpolicy_steps, supervised_tokens

    args = argparse.Namespace(budget="tokens", steps=150, seq=32, new_tokens=16, fraction=0.5)
    assert onpolicy_steps(args) == 200  # 150 * 32 / (0.5 * 32 + 0.5 * 16)
    assert onpolicy_steps(argparse.Namespace(**{**vars(args), "budget": "steps"})) == 150
    assert onpolicy_steps(argparse.Namespace(**{**vars(args), "fraction": 1.0})) == 300
    cfg = DistillConfig.of(teacher="x", steps=200, batch_size=16, max_length=32)
    m = {"metrics": {"onpolicy_batches": 90, "onpolicy_generated_tokens": 20_000}}
    assert supervised_tokens(m, cfg) == 110 * 16 * 32 + 20_000
    assert supervised_tokens({"metrics": {}}, cfg) == 200 * 16 * 32


def test_small_fixed_dataset_rows_avoid_the_held_out_side_of_their_seed(tmp_path):
    import json

    from distillkit.data import DataSpec, load_corpus
    from distillkit.data.prepare import split_indices
    from distillkit.distill.onpolicy_compare import write_train_rows

    corpus = load_corpus()
    for seed in (0, 1):
        path = tmp_path / f"rows-{seed}.jsonl"
        write_train_rows(path, rows=50, seed=seed)
        rows = [json.loads(line)["text"] for line in path.read_text().splitlines()]
        train, held_out = split_indices(len(corpus), DataSpec().eval_split, seed)
        assert rows == [corpus[i] for i in train[:50]]
        assert not set(rows) & {corpus[i] for i in held_out}
