"""Does on-policy distillation help? A small, self-contained CPU benchmark (``python -m distillkit.distill.onpolicy_compare``).

A random-init teacher would make any comparison meaningless, so the script

1. builds a word-level tokenizer (the most frequent words of the embedded corpus, :mod:`distillkit.data`) and
   trains a small GPT-2 teacher on the corpus with next-token cross-entropy;
2. for each of ``--seeds`` distillation seeds, distils two students initialised from the teacher (same seed, loss,
   data and schedule) with ``distillkit.distill.run_distill``: ``--mode offline`` and ``--mode on-policy`` (GKD).
   The fixed data is small by default: ``--train-rows`` (100) rows of the corpus's training side, revisited for
   many epochs, the regime in which an offline student learns the teacher only on those prefixes ("On Teacher
   Hacking in Language Model Distillation"); ``--train-rows 0`` distils on the whole corpus instead;
3. samples continuations from each student at temperature 1 (full softmax, stopping at end-of-sequence exactly as
   on-policy training does) after prompts from that seed's held-out split, ``--eval-rounds`` samples per prompt,
   and measures the per-token reverse KL(p_student || p_teacher) at T=1 over the generated tokens: how far each
   student's own samples stray from what the teacher would say there (the quantity on-policy training targets).

``--budget steps`` gives both students the same optimizer steps; an on-policy batch then supervises fewer tokens
(only the generated ones, ``N`` per row instead of ``L``). ``--budget tokens`` gives the on-policy student as many
steps as it needs to be supervised on (about) as many tokens as the offline one; the supervised token counts of
both are reported either way. Token-matched runs also give the on-policy student more optimizer steps, and on the
whole corpus that alone accounts for its lead: an offline student given the same number of steps does as well
(README, "On-policy distillation"), so the default is the equal-steps comparison.

It prints one JSON line: per-seed numbers, their mean and standard deviation, and the paired difference
(on-policy minus offline; negative means on-policy is closer to the teacher). A benchmark (minutes on a CPU),
not a test.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def build_tokenizer(texts: list[str], size: int) -> Any:
    """A lower-cased WordLevel tokenizer over the ``size - 4`` most frequent words (+ pad, bos, eos, unk)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts = collections.Counter(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower()))
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = specials + [w for w, _ in counts.most_common(size - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def train_teacher(directory: Path, *, vocab: int, steps: int, seq: int, seed: int) -> None:
    """Train a 4-layer GPT-2 (hidden 128) on the embedded corpus and save it with its tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from distillkit.data import DataSpec, load_corpus, prepare_data

    tok = build_tokenizer(load_corpus(), vocab)
    data = prepare_data(DataSpec(data=None, max_length=seq, seed=seed), tok, "causal-lm")
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=seq * 2, n_embd=128, n_layer=4, n_head=4, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        rows = torch.randint(0, len(data.train), (32,), generator=g).tolist()
        batch = data.collate_fn([data.train[i] for i in rows])
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"teacher step {step}: loss {loss.item():.3f}", file=sys.stderr)
    model.eval().save_pretrained(directory)
    tok.save_pretrained(directory)


def write_train_rows(path: Path, *, rows: int, seed: int) -> None:
    """The first ``rows`` training rows of the corpus split for ``seed`` as JSON lines (a small fixed dataset).

    The rows come from the training side of the same row split :func:`held_out_prompts` reads its prompts from the
    other side of, so the evaluation prompts stay unseen.
    """
    from distillkit.data import DataSpec, load_corpus
    from distillkit.data.prepare import split_indices

    corpus = load_corpus()
    train, _ = split_indices(len(corpus), DataSpec().eval_split, seed)
    with path.open("w") as f:
        for i in train[:rows]:
            f.write(json.dumps({"text": corpus[i]}) + "\n")


def held_out_prompts(tok: Any, *, data: str | None, seq: int, prompt: int, seed: int, limit: int) -> Any:
    """The first ``prompt`` tokens of up to ``limit`` eval blocks [n, prompt] of the split ``run_distill`` makes.

    The split depends on the seed (:func:`distillkit.data.prepare.split_indices`), so it must be the distillation
    run's own ``seed``: any other seed would hand back blocks that run trained on.
    """
    import torch

    from distillkit.data import DataSpec, prepare_data

    held_out = prepare_data(DataSpec(data=data, max_length=seq, seed=seed), tok, "causal-lm").eval
    rows = min(limit, len(held_out))
    return torch.stack([held_out[i]["input_ids"][:prompt] for i in range(rows)])


def own_sample_reverse_kl(
    student: Any,
    teacher: Any,
    prompts: Any,
    *,
    new_tokens: int,
    seed: int,
    eos_token_id: int | None,
    pad_token_id: int,
    batch_size: int = 16,
) -> tuple[float, int]:
    """Sum of per-token KL(p_S || p_T) at T=1 over the tokens ``student`` samples after ``prompts`` [n, P].

    The samples are drawn as on-policy training draws them (:func:`generate_continuations`: temperature 1, full
    softmax, eval mode, stopping at ``eos_token_id``); a row's tokens after its first EOS are padding and do not
    count. Returns (sum of KL over counted tokens, number of counted tokens).
    """
    import torch

    from distillkit.distill.functional import reverse_kl
    from distillkit.distill.onpolicy import generate_continuations, student_batch

    student.eval()
    teacher.eval()
    total, count = 0.0, 0
    for b in range(0, prompts.shape[0], batch_size):
        seq_ids, valid = generate_continuations(
            student, prompts[b : b + batch_size], max_new_tokens=new_tokens, temperature=1.0, seed=seed + b,
            pad_token_id=pad_token_id, eos_token_id=eos_token_id,
        )  # fmt: skip
        batch = student_batch({}, seq_ids, valid)
        with torch.no_grad():
            inputs = {"input_ids": seq_ids, "attention_mask": batch["attention_mask"]}
            s_logits, t_logits = student(**inputs).logits, teacher(**inputs).logits
            total += float(reverse_kl(s_logits, t_logits, batch["kd_mask"], temperature=1.0, reduction="sum"))
        count += int(batch["kd_mask"].sum())
    return total, count


def evaluate_student(student_dir: str, teacher_dir: str, args: argparse.Namespace, seed: int) -> dict[str, float]:
    """Reverse KL on the student's own samples: ``args.eval_rounds`` sampling seeds over the held-out prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    prompts = held_out_prompts(tok, data=None, seq=args.seq, prompt=args.prompt, seed=seed, limit=args.eval_prompts)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    total, count = 0.0, 0
    for r in range(args.eval_rounds):
        s, c = own_sample_reverse_kl(
            student, teacher, prompts, new_tokens=args.new_tokens, seed=1_000_000 * (r + 1) + seed,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        total, count = total + s, count + c
    return {"reverse_kl_on_own_samples": total / max(count, 1), "eval_sample_tokens": count}


def supervised_tokens(manifest: dict[str, Any], cfg: Any) -> int:
    """Tokens whose teacher distribution the student was trained on (packed blocks: every position counts)."""
    m = manifest["metrics"]
    fixed = (cfg.optim.steps - m.get("onpolicy_batches", 0)) * cfg.optim.batch_size * cfg.data.max_length
    return int(fixed + m.get("onpolicy_generated_tokens", 0))


def onpolicy_steps(args: argparse.Namespace) -> int:
    """Steps at which the on-policy student is supervised on about as many tokens as the offline one.

    A fixed batch supervises ``L`` tokens a row and a generated one at most ``N``; EOS stops make it fewer, so this
    is a slight under-estimate, and the reported counts say how close the budgets came.
    """
    if args.budget == "steps":
        return args.steps
    per_step = (1 - args.fraction) * args.seq + args.fraction * args.new_tokens
    return max(args.steps, round(args.steps * args.seq / per_step))


def _stats(values: list[float]) -> dict[str, float]:
    import statistics

    return {
        "mean": round(statistics.fmean(values), 5),
        "std": round(statistics.stdev(values), 5) if len(values) > 1 else 0.0,
    }


def compare(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from distillkit.config import DistillConfig
    from distillkit.distill.engine import run_distill

    t0 = time.perf_counter()
    teacher_dir = work / "teacher"
    if not (teacher_dir / "config.json").is_file():  # a --work dir keeps the teacher for further comparisons
        train_teacher(teacher_dir, vocab=args.vocab, steps=args.teacher_steps, seq=args.seq, seed=args.seed)
    result: dict[str, Any] = {"teacher_train_s": round(time.perf_counter() - t0, 1), "runs": []}
    common = dict(
        teacher=str(teacher_dir), student=args.student, batch_size=16, lr=args.lr, max_length=args.seq,
        losses=(args.loss,), temperature=args.temperature, eval_batches=2, device="cpu",
        max_new_tokens=args.new_tokens, prompt_length=args.prompt, gen_temperature=args.gen_temperature,
    )  # fmt: skip
    for seed in range(args.seed, args.seed + args.seeds):
        run: dict[str, Any] = {"seed": seed}
        data = None
        if args.train_rows:  # per seed: the rows must avoid the held-out side of this seed's split
            data = str(work / f"train-rows-{args.train_rows}-seed{seed}.jsonl")
            write_train_rows(Path(data), rows=args.train_rows, seed=seed)
        for mode, steps in (("offline", args.steps), ("on-policy", onpolicy_steps(args))):
            t = time.perf_counter()
            cfg = DistillConfig.of(
                **common, data=data, seed=seed, steps=steps, mode=mode, student_data_fraction=args.fraction
            )
            out = work / f"{mode}-{seed}"
            manifest = run_distill(cfg, out=str(out), overwrite=True)
            run[mode] = {
                **evaluate_student(str(out), str(teacher_dir), args, seed),
                "steps": steps,
                "supervised_tokens": supervised_tokens(manifest, cfg),
                "eval_kl_to_teacher": manifest["metrics"].get("student_kl_to_teacher", float("nan")),
                "eval_perplexity": manifest["metrics"].get("student_perplexity", float("nan")),
                "s": round(time.perf_counter() - t, 1),
            }
        run["diff"] = run["on-policy"]["reverse_kl_on_own_samples"] - run["offline"]["reverse_kl_on_own_samples"]
        print(f"seed {seed}: {json.dumps(run)}", file=sys.stderr)
        result["runs"].append(run)
    runs = result["runs"]
    for mode in ("offline", "on-policy"):
        result[mode] = {
            key: _stats([r[mode][key] for r in runs])
            for key in ("reverse_kl_on_own_samples", "eval_kl_to_teacher", "supervised_tokens")
        }
    result["diff_onpolicy_minus_offline"] = _stats([r["diff"] for r in runs])
    result["onpolicy_wins"] = sum(r["diff"] < 0 for r in runs)
    result["settings"] = vars(args)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--teacher-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=300, help="Offline steps (and on-policy steps with --budget steps).")
    p.add_argument("--budget", choices=("steps", "tokens"), default="steps")
    p.add_argument("--fraction", type=float, default=0.5, help="GKD lambda: share of batches the student writes.")
    p.add_argument("--loss", default="reverse_kl")
    p.add_argument("--temperature", type=float, default=1.0, help="Training temperature (the evaluation is at 1).")
    p.add_argument("--gen-temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--train-rows",
        type=int,
        default=100,
        help="Distil on only this many corpus rows, a small fixed dataset revisited for many epochs (0: all rows).",
    )
    p.add_argument("--student", default="layers=1", help="Student spec, initialised from the teacher.")
    p.add_argument("--eval-prompts", type=int, default=160, help="Held-out prompts (the split has about 160).")
    p.add_argument("--eval-rounds", type=int, default=4, help="Samples per prompt.")
    p.add_argument("--seeds", type=int, default=3, help="Distillation seeds (mean and spread are reported).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="Keep the models here (default: a temporary directory).")
    args = p.parse_args(argv)
    if args.work:
        result = compare(Path(args.work), args)
    else:
        with tempfile.TemporaryDirectory() as d:
            result = compare(Path(d), args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
