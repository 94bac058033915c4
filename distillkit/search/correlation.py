"""Rank-correlation benchmark: do zero-cost scores predict how well a student distils?

``python -m distillkit.search.correlation --teacher DIR --candidates 12 --steps 40 --out runs/search-corr``

Draws ``candidates`` distinct students from the teacher's search space (under an optional ``--params``
budget), scores every one with every registered score (on one calibration batch, as ``search-student`` does),
then distils each briefly with :func:`distillkit.distill.engine.run_distill` (same data, steps, batch and seed
for all) and measures its held-out quality:

- feature extraction: the correlation of the student's and teacher's in-batch similarity matrices
  (``similarity_corr``; width-agnostic, unlike the embedding cosine);
- causal / masked LM: minus the KL divergence to the teacher (``-kl_to_teacher``);
- classification: top-1 agreement with the teacher.

It prints (stderr) and writes (``--out``/``correlation.json`` and ``correlation.md``) Kendall's tau-b and
Spearman's rho between each score and that quality, computed here without scipy.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def _ranks(values: list[float]) -> list[float]:
    """Average ranks (1-based; ties share the mean of their positions)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def spearman_rho(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the average ranks (handles ties)."""
    return _pearson(_ranks(x), _ranks(y))


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b: (concordant - discordant) / sqrt((n0 - ties_x) (n0 - ties_y)) over all pairs."""
    concordant = discordant = ties_x = ties_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                ties_x += 1
                ties_y += 1
            elif dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    n0 = n * (n - 1) // 2
    denom = math.sqrt((n0 - ties_x) * (n0 - ties_y))
    return (concordant - discordant) / denom if denom > 0 else float("nan")


QUALITY = {
    "feature-extraction": ("student_similarity_corr", 1.0),
    "causal-lm": ("student_kl_to_teacher", -1.0),
    "masked-lm": ("student_kl_to_teacher", -1.0),
    "sequence-classification": ("student_top1_agreement", 1.0),
    "image-classification": ("student_top1_agreement", 1.0),
}


def _log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from distillkit.config import DistillConfig
    from distillkit.distill.engine import run_distill
    from distillkit.models import load_model
    from distillkit.models.student import build_student
    from distillkit.registry import SCORES
    from distillkit.search.config import SearchConfig
    from distillkit.search.engine import calibration_batch
    from distillkit.search.scores import ScoreContext
    from distillkit.search.space import ParamCounter, SearchSpace, spec_key

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_model(args.teacher, dtype="float32", device="cpu")
    teacher.model.eval().requires_grad_(False)
    task = teacher.task
    space = SearchSpace.from_teacher(teacher.config, args.space)
    if space.family == "resnet":
        from distillkit.errors import ConfigError

        raise ConfigError(
            "the rank-correlation benchmark distils each student from a --student spec, and ResNets have none",
            hint="use a transformer teacher (Llama-style, GPT-2, BERT-style or ViT)",
        )
    count = ParamCounter(teacher.model)
    t_params = sum(p.numel() for p in teacher.model.parameters())
    budget = int(args.params * t_params) if args.params else None
    rng = random.Random(args.seed)
    specs: dict[tuple[int, ...], dict[str, int]] = {}
    for _ in range(10000):
        if len(specs) >= args.candidates:
            break
        spec = space.sample(rng)
        if budget is None or count(spec) <= budget:
            specs.setdefault(spec_key(spec), spec)
    specs_list = sorted(specs.values(), key=count)
    _log(f"{len(specs_list)} candidates from a space of {space.size()}; teacher {t_params / 1e6:.2f}M params")

    scfg = SearchConfig(
        teacher=args.teacher,
        params=1.0,
        max_length=args.score_length,
        batch_size=args.score_batch,
        seed=args.seed,
        data=args.data,
    )
    batch, _ = calibration_batch(scfg, teacher.processor, task, torch.device("cpu"))
    score_names = args.scores.split(",") if args.scores else SCORES.names()
    rows = []
    for i, spec in enumerate(specs_list):
        row: dict[str, Any] = {"student": space.spec_string(spec), "params": count(spec), "scores": {}}
        for init in ("teacher", "random"):
            model = build_student(teacher.model, spec, init=init, seed=args.seed).eval()
            ctx = ScoreContext(teacher.model, batch, task, pooling=teacher.pooling)
            for name in score_names:
                if init == "random" and name != "diswot":
                    continue
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(args.seed)
                    t0 = time.perf_counter()
                    value = SCORES.get(name).obj(ctx, model)["score"]
                key = name if init == "teacher" else "diswot_random_init"
                row["scores"][key] = value
                row.setdefault("score_seconds", {})[key] = time.perf_counter() - t0
            del model
        rows.append(row)
        _log(f"[{i + 1}/{len(specs_list)}] scored {row['student']}")

    metric, sign = QUALITY[task]
    for i, row in enumerate(rows):
        t0 = time.perf_counter()
        cfg = DistillConfig.of(
            teacher=args.teacher,
            student=row["student"],
            data=args.data,
            steps=args.steps,
            batch_size=args.batch_size,
            max_length=args.max_length,
            lr=args.lr,
            seed=args.seed,
            eval_batches=args.eval_batches,
            device="cpu",
        )
        manifest = run_distill(cfg, out=str(out / f"student-{i}"), overwrite=True)
        row["quality"] = sign * manifest["metrics"][metric]
        row["initial_quality"] = sign * manifest["metrics"].get("initial_" + metric, float("nan"))
        row["distill_seconds"] = time.perf_counter() - t0
        if not args.keep:
            shutil.rmtree(out / f"student-{i}", ignore_errors=True)
        _log(f"[{i + 1}/{len(rows)}] {row['student']}: {metric} {manifest['metrics'][metric]:.4f}")

    quality = [r["quality"] for r in rows]
    table = {}
    for key in rows[0]["scores"]:
        values = [r["scores"][key] for r in rows]
        table[key] = {"kendall_tau": kendall_tau(values, quality), "spearman_rho": spearman_rho(values, quality)}
    result = {
        "teacher": args.teacher,
        "task": task,
        "quality": (("-" if sign < 0 else "") + metric),
        "config": vars(args),
        "candidates": rows,
        "correlation": table,
    }
    (out / "correlation.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = [
        f"| score | Kendall tau | Spearman rho |  (K={len(rows)}, quality: {result['quality']})",
        "|---|---|---|",
    ]
    lines[0] = "| score | Kendall tau | Spearman rho |"
    for key, v in sorted(table.items(), key=lambda kv: -kv[1]["kendall_tau"]):
        lines.append(f"| {key} | {v['kendall_tau']:.3f} | {v['spearman_rho']:.3f} |")
    (out / "correlation.md").write_text("\n".join(lines) + "\n")
    _log(f"K={len(rows)} candidates, quality = {result['quality']} after {args.steps} distillation steps")
    _log("\n".join(lines))
    return result


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options (``distillkit bench --search-correlation`` fills the same namespace)."""
    from distillkit.search.config import SearchConfig

    p = argparse.ArgumentParser(prog="python -m distillkit.search.correlation", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="teacher model directory")
    p.add_argument("--candidates", type=int, default=12, help="students to score and distil (default 12)")
    p.add_argument("--params", type=float, default=None, help="only students under this fraction of the teacher")
    p.add_argument("--space", default=None, help="--space constraints as for search-student")
    p.add_argument("--scores", default=None, help="comma-separated scores (default: every registered one)")
    p.add_argument("--data", default=None, help="data for scoring and distillation (default: builtin:english)")
    p.add_argument("--steps", type=int, default=40, help="distillation steps per candidate (default 40)")
    p.add_argument("--batch-size", type=int, default=16, help="distillation batch (default 16)")
    p.add_argument("--score-batch", type=int, default=8, help="calibration batch of the scores (default 8)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument(
        "--score-length",
        type=int,
        default=SearchConfig.max_length,
        help=f"tokens per calibration sequence (default {SearchConfig.max_length}, as search-student)",
    )
    p.add_argument("--lr", type=float, default=3e-4, help="distillation learning rate (default 3e-4)")
    p.add_argument("--eval-batches", type=int, default=20, help="held-out batches for quality (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the distilled students")
    p.add_argument("--out", default="runs/search-correlation", help="where results go")
    return p


def main(argv: list[str] | None = None) -> int:
    run_benchmark(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
