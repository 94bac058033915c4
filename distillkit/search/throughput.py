"""Scoring throughput against distillation cost, on random teachers of real shapes.

``python -m distillkit.search.throughput --shape bert-base --tokenizer DIR --candidates 100 --out runs/tp``

Builds a teacher of the named shape with random weights (``--vocab`` overrides the vocabulary, e.g. to keep a
Llama-1B-shaped teacher's memory sane) and the tokenizer from ``--tokenizer``, runs ``search-student`` with
``--params`` (default 0.25) and ``--candidates``, then distils the chosen student at the distill defaults (batch 8,
128 tokens) for 1 and for ``--distill-steps`` steps and extrapolates the steady-state step time (the difference of the
two, per step) to 1000 steps. Reports (stderr and ``--out``/throughput.json) the search time, 1% of the extrapolated
distillation time and their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SHAPES = {
    "bert-base": dict(
        model_type="bert",
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        vocab_size=30522,
    ),
    "llama-1b": dict(  # Llama-3.2-1B
        model_type="llama",
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    ),
}


def build_teacher(shape: str, vocab: int | None, tokenizer: str, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    kwargs = dict(SHAPES[shape])
    model_type = kwargs.pop("model_type")
    if vocab:
        kwargs["vocab_size"] = vocab
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if model_type == "bert":
            model = BertModel(BertConfig(**kwargs))
        else:
            model = LlamaForCausalLM(LlamaConfig(**kwargs))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    from distillkit.search.config import SearchConfig

    p = argparse.ArgumentParser(prog="python -m distillkit.search.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--tokenizer", required=True, help="a directory holding a tokenizer with at most --vocab ids")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the shape's)")
    p.add_argument("--params", type=float, default=0.25)
    p.add_argument("--candidates", type=int, default=100)
    d = SearchConfig.__dataclass_fields__
    p.add_argument(
        "--score-batch", type=int, default=d["batch_size"].default, help="calibration batch (default: search-student's)"
    )
    p.add_argument(
        "--score-length",
        type=int,
        default=d["max_length"].default,
        help="calibration tokens (default: search-student's)",
    )
    p.add_argument("--distill-steps", type=int, default=4, help="steps of the timed distillation (at least 2)")
    p.add_argument("--out", default="runs/search-throughput")
    args = p.parse_args(argv)
    if args.distill_steps < 2:
        p.error("--distill-steps must be at least 2 (the first step is timed apart)")

    from distillkit.config import DistillConfig
    from distillkit.distill.engine import run_distill
    from distillkit.search.engine import search_student

    out = Path(args.out)
    teacher = out / f"teacher-{args.shape}"
    if not (teacher / "config.json").is_file():
        build_teacher(args.shape, args.vocab, args.tokenizer, teacher)
    cfg = SearchConfig(
        teacher=str(teacher),
        params=args.params,
        candidates=args.candidates,
        batch_size=args.score_batch,
        max_length=args.score_length,
        device="cpu",
    )
    t0 = time.perf_counter()
    found = search_student(cfg, out=str(out / "student"), overwrite=True)
    search_wall = time.perf_counter() - t0
    # The steady-state step: a 1-step run's training time (the first step pays one-off allocation and warm-up)
    # subtracted from a --distill-steps run's, so the 1000-step extrapolation does not multiply warm-up costs.
    train_s = {}
    for steps in (1, args.distill_steps):
        dcfg = DistillConfig.of(teacher=str(teacher), student=str(out / "student"), steps=steps, device="cpu")
        train_s[steps] = run_distill(dcfg, out=str(out / "distilled"), overwrite=True)["timings"]["train_s"]
    per_step = (train_s[args.distill_steps] - train_s[1]) / (args.distill_steps - 1)
    # The first candidate also pays the once-per-search teacher work (its forward pass, its weight rankings); a
    # run of fewer than 100 candidates is extrapolated from the others.
    rest = sorted(r["seconds"] for r in found["extra"]["ranking"])
    first = rest.pop()  # the slowest: the first candidate, which also ranked the teacher
    rest_mean = sum(rest) / len(rest) if rest else first
    search_100 = found["timings"]["search_s"] if len(rest) + 1 >= 100 else first + 99 * rest_mean
    result = {
        "shape": args.shape,
        "vocab": args.vocab or SHAPES[args.shape]["vocab_size"],
        "teacher_params": found["metrics"]["teacher_params"],
        "student": found["config"]["student"],
        "student_params": found["metrics"]["student_params"],
        "candidates_scored": found["metrics"]["candidates_scored"],
        "search_wall_s": search_wall,
        "search_s": found["timings"]["search_s"],
        "score_s_per_candidate": found["timings"]["score_s_per_candidate"],
        "distill_step_s": per_step,
        "distill_1000_steps_s_extrapolated": 1000 * per_step,
        "one_percent_s": 10 * per_step,
        "ratio_search_to_one_percent": found["timings"]["search_s"] / (10 * per_step),
        "slowest_candidate_s": first,
        "other_candidates_mean_s": rest_mean,
        "search_100_candidates_s": search_100,
        "ratio_100_candidates_to_one_percent": search_100 / (10 * per_step),
        "config": vars(args),
    }
    (out / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    sys.stderr.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
