"""``search_student``: find the student a teacher will distil best into, without training any candidate.

Regularised evolution (Real et al., 2019) over the :class:`~distillkit.search.space.SearchSpace`: a population
of ``population`` scored candidates starts from random ones (shrunk one dimension at a time until they fit the
parameter budget); each later candidate is a child of the winner of a tournament of ``tournament`` random
members (uniform crossover with a second winner with probability ``crossover``, then a one-dimension mutation);
the child joins the population and the oldest member leaves. Children over budget are rejected and redrawn;
already scored ones are not scored again. The run stops after ``candidates`` scored students, when the space
within budget is exhausted, or after ``time_budget`` seconds. Everything is drawn from ``random.Random(seed)``,
so a run without a time budget is reproducible.

The best candidate is written as an artifact initialised from the teacher exactly as
``distillkit distill --student SPEC`` initialises it, with the whole ranking in its manifest.
"""

from __future__ import annotations

import collections
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from distillkit.errors import ConfigError, DataError, ModelError
from distillkit.manifest import (
    Manifest,
    Source,
    atomic_artifact,
    check_output,
    describe_input,
    finalize_artifact,
    read_source,
    releases_locks,
)
from distillkit.models.student import SliceCache
from distillkit.progress import Progress
from distillkit.search.config import SearchConfig
from distillkit.search.scores import ScoreContext
from distillkit.search.space import SearchSpace, check_searchable, param_counter, spec_key, spec_short

DEFAULT_CALIBRATION_ROWS = 1000
LATENCY_REPEATS = 3


def _fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def calibration_batch(cfg: SearchConfig, processor: Any, task: str, device: Any) -> tuple[dict[str, Any], dict]:
    """One batch of ``cfg.batch_size`` examples of the training split (the same for a given seed), on ``device``."""
    from distillkit.data import DataSpec, prepare_data
    from distillkit.models.forward import to_device

    max_samples = cfg.max_samples if cfg.max_samples is not None else DEFAULT_CALIBRATION_ROWS
    data = prepare_data(
        DataSpec(
            data=cfg.data,
            text_column=cfg.text_column,
            label_column=cfg.label_column,
            eval_split=0.05,
            max_length=cfg.max_length,
            max_samples=max_samples,
            seed=cfg.seed,
        ),
        processor,
        task,
    )
    n = len(data.train)
    if n < cfg.batch_size:
        raise DataError(
            f"the calibration data gives {n} example(s), fewer than one batch of {cfg.batch_size}",
            hint="give more --data, or lower --batch-size",
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # masked-LM collators draw their masks from the global RNG
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        batch = data.collate_fn([data.train[i] for i in order[: cfg.batch_size]])
    return to_device(batch, device), data.info


def latency_inputs(model: Any, batch: int, seq: int, device: Any) -> dict[str, Any]:
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    if getattr(cfg, "vocab_size", None) is None:
        # ResNet configs record no image size; 224 is what their image processors resize to.
        size, channels = int(getattr(cfg, "image_size", 224)), int(getattr(cfg, "num_channels", 3))
        return {"pixel_values": torch.randn(batch, channels, size, size, generator=gen).to(device)}
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit is not None and seq > int(limit):
        raise ConfigError(
            f"--seq {seq} is longer than the teacher's {limit} positions", hint=f"pass --seq {limit} or less"
        )
    ids = torch.randint(0, int(cfg.vocab_size), (batch, seq), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def measure_latency_ms(model: Any, inputs: dict[str, Any], repeats: int = LATENCY_REPEATS) -> float:
    """Median wall time of ``repeats`` forward passes after one warm-up, in milliseconds."""

    def sync() -> None:
        if next(model.parameters()).device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    with torch.no_grad():
        model(**inputs)
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            model(**inputs)
            sync()
            times.append((time.perf_counter() - t) * 1000.0)
    return float(statistics.median(times))


class _Search:
    """The evolution's state: scored candidates, the aging population, counters."""

    def __init__(
        self, cfg: SearchConfig, space: SearchSpace, teacher: Any, ctx: ScoreContext, budget: int | None, device: Any
    ):
        from distillkit.registry import SCORES

        self.cfg, self.space, self.teacher, self.ctx, self.budget = cfg, space, teacher, ctx, budget
        self.device = device
        self.count = param_counter(teacher.model)
        self.rng = random.Random(cfg.seed)
        self.score_fn = SCORES.get(cfg.score).obj
        self.report = [(name, SCORES.get(name).obj) for name in cfg.report if name != cfg.score]
        self.records: dict[tuple[int, ...], dict[str, Any]] = {}
        self.rejected: set[tuple[int, ...]] = set()
        self.n_rejected = 0
        self.population: collections.deque[dict[str, Any]] = collections.deque()
        self.latency_inputs: dict[str, Any] | None = None
        self.score_s = 0.0
        self.structure: Any = None  # the teacher's weight rankings (a StructureScores), once per search
        self.slices = SliceCache()

    # --- budget ---------------------------------------------------------------------------------------------

    def fits(self, spec: dict[str, int]) -> bool:
        return self.budget is None or self.count(spec) <= self.budget

    def shrink(self, spec: dict[str, int]) -> dict[str, int]:
        """Lower one random dimension a step at a time until the candidate fits the parameter budget."""
        values = self.space.values
        dims = self.space.shrink_keys()
        while not self.fits(spec):
            options = []
            for key in dims:
                i = values[key].index(spec[key]) if spec[key] in values[key] else 0
                if i > 0:
                    lower = self.space.repair({**spec, key: values[key][i - 1]})
                    if lower is not None and spec_key(lower) != spec_key(spec):
                        options.append(lower)
            if not options:
                break
            spec = self.rng.choice(options)
        return spec

    def propose(self, make: Any, tries: int = 200) -> dict[str, int] | None:
        for _ in range(tries):
            spec = make()
            key = spec_key(spec)
            if key in self.records or key in self.rejected:
                continue
            if not self.fits(spec):
                self.rejected.add(key)
                self.n_rejected += 1
                continue
            return spec
        return None

    # --- evaluation -------------------------------------------------------------------------------------------

    def build(self, spec: dict[str, int], init: str, share: bool = True) -> Any:
        """The candidate ``spec`` at ``init``, as ``distill --student SPEC`` would build it (ResNets: stage students)."""
        from distillkit.models.student import build_student, plan_student, weight_scores

        if self.space.family == "resnet":
            from distillkit.search.cnn import build_resnet_student

            return build_resnet_student(self.teacher.model, spec, init=init, seed=self.cfg.seed)
        plan = None
        if init == "teacher":
            # The teacher's rankings do not depend on the candidate: rank once (inside the first candidate's time).
            if self.structure is None:
                self.structure = weight_scores(self.teacher.model)
            plan = plan_student(self.teacher.model, spec, scores=self.structure)
        # Candidates are only scored, never trained or changed in place: they share the teacher's and the cache's
        # tensors instead of copying them (the written student is built again without sharing).
        return build_student(
            self.teacher.model, spec, init=init, seed=self.cfg.seed, plan=plan, cache=self.slices, share=share
        )

    def evaluate(self, spec: dict[str, int]) -> dict[str, Any] | None:
        spec = self.space.validate(spec)
        t0 = time.perf_counter()
        model = self.build(spec, self.cfg.init).eval()
        record: dict[str, Any] = {"spec": spec, "student": self.space.spec_string(spec), "params": self.count(spec)}
        if self.cfg.max_latency_ms is not None:
            if self.latency_inputs is None:
                self.latency_inputs = latency_inputs(model, self.cfg.latency_batch, self.cfg.latency_seq, self.device)
            record["latency_ms"] = measure_latency_ms(model, self.latency_inputs)
            if record["latency_ms"] > self.cfg.max_latency_ms:
                self.rejected.add(spec_key(spec))
                self.n_rejected += 1
                return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            main = self.score_fn(self.ctx, model)
            record["score"] = main["score"]
            record["terms"] = {k: v for k, v in main.items() if k != "score"}
            record["scores"] = {self.cfg.score: main["score"]}
            for name, fn in self.report:
                record["scores"][name] = fn(self.ctx, model)["score"]
        record["seconds"] = time.perf_counter() - t0
        self.score_s += record["seconds"]
        record["order"] = len(self.records)
        self.records[spec_key(spec)] = record
        return record

    def tournament(self) -> dict[str, Any]:
        members = self.rng.sample(list(self.population), min(self.cfg.tournament, len(self.population)))
        return max(members, key=lambda r: (r["score"], -r["order"]))

    def run(self, console: Any) -> None:
        cfg, space = self.cfg, self.space
        start = time.perf_counter()

        def out_of_time() -> bool:
            return cfg.time_budget is not None and time.perf_counter() - start > cfg.time_budget

        stalls = 0
        # one progress line per interval, not per candidate: thousands of candidates would flood a log
        with Progress("search", cfg.candidates, unit="candidate", enabled=console is not None) as bar:
            while len(self.records) < cfg.candidates and not out_of_time() and stalls < 3:
                if len(self.population) < cfg.population:
                    spec = self.propose(lambda: self.shrink(space.sample(self.rng)))
                else:
                    spec = self.propose(self._child)
                if spec is None:
                    stalls += 1  # nothing new within budget: the space is (nearly) exhausted
                    continue
                record = self.evaluate(spec)
                if record is None:
                    continue
                stalls = 0
                self.population.append(record)
                if len(self.population) > cfg.population:
                    self.population.popleft()
                bar.update(
                    len(self.records),
                    info=f"{spec_short(record['spec'])} {_fmt_count(record['params'])} {cfg.score} {record['score']:.4f}",
                )

    def _child(self) -> dict[str, int]:
        parent = self.tournament()["spec"]
        if self.rng.random() < self.cfg.crossover:
            parent = self.space.crossover(parent, self.tournament()["spec"], self.rng)
        return self.space.mutate(parent, self.rng)

    def ranking(self) -> list[dict[str, Any]]:
        ordered = sorted(self.records.values(), key=lambda r: (-r["score"], r["params"], r["order"]))
        out = []
        for rank, r in enumerate(ordered, 1):
            entry = {"rank": rank, **{k: v for k, v in r.items() if k != "order"}}
            entry["seconds"] = round(entry["seconds"], 4)
            out.append(entry)
        return out


def _table(console: Any, ranking: list[dict[str, Any]], cfg: SearchConfig, limit: int = 20) -> None:
    from rich.table import Table

    terms = sorted({k for r in ranking for k in r["terms"]})
    extra = [n for n in cfg.report if n not in (cfg.score, "params")]
    table = Table(
        title=f"search-student: {len(ranking)} candidates ranked by {cfg.score}",
        caption="student: L layers, H hidden, A query/kv heads, I MLP width"
        if not ranking or "layers" in ranking[0]["spec"]
        else "student: D stage depths, W stage widths",
    )
    for col in ["rank", "student", "params", cfg.score, *terms, *extra]:
        table.add_column(col, justify="left" if col == "student" else "right")
    has_latency = any("latency_ms" in r for r in ranking)
    if has_latency:
        table.add_column("latency ms", justify="right")
    for r in ranking[:limit]:
        row = [str(r["rank"]), spec_short(r["spec"]), _fmt_count(r["params"]), f"{r['score']:.4f}"]
        row += [f"{r['terms'][t]:.4f}" if t in r["terms"] else "-" for t in terms]
        row += [_fmt_count(r["scores"][n]) if n in ("params", "flops") else f"{r['scores'][n]:.4g}" for n in extra]
        if has_latency:
            row.append(f"{r['latency_ms']:.1f}" if "latency_ms" in r else "-")
        table.add_row(*row)
    console.print(table, width=max(console.width, 150))
    if len(ranking) > limit:
        console.print(f"({len(ranking) - limit} more in the manifest's extra.ranking)")


def _param_budget(cfg: SearchConfig, space: SearchSpace, teacher_model: Any) -> tuple[int, int | None, Any]:
    """(teacher parameters, the student's parameter budget or None, the smallest candidate); a budget below the
    smallest candidate is refused."""
    teacher_params = sum(p.numel() for p in teacher_model.parameters())
    budget = cfg.max_params if cfg.max_params is not None else None
    if cfg.params is not None:
        budget = int(cfg.params * teacher_params)
    counter = param_counter(teacher_model)
    smallest = space.smallest(counter)
    if budget is not None and counter(smallest) > budget:
        raise ConfigError(
            f"the budget of {budget:,} parameters is below the smallest candidate, "
            f"{space.spec_string(smallest)} with {counter(smallest):,} parameters",
            hint=f"allow at least {counter(smallest):,} parameters "
            f"(--params {counter(smallest) / teacher_params:.3g} or more), or widen --space",
        )
    return teacher_params, budget, smallest


def _check_latency_budget(cfg: SearchConfig, search: Any, space: SearchSpace, smallest: Any, device: Any) -> None:
    """Refuse a --max-latency-ms that even the smallest candidate misses (measured once, before the search)."""
    if cfg.max_latency_ms is None:
        return
    tiny = search.build(smallest, "random").eval()
    lat = measure_latency_ms(tiny, latency_inputs(tiny, cfg.latency_batch, cfg.latency_seq, device))
    del tiny
    if lat > cfg.max_latency_ms:
        raise ConfigError(
            f"the latency budget of {cfg.max_latency_ms:g} ms is below the smallest candidate's "
            f"{lat:.1f} ms ({space.spec_string(smallest)}, batch {cfg.latency_batch} x {cfg.latency_seq} on {device})",
            hint=f"allow at least --max-latency-ms {lat * 1.1:.1f}, or lower --batch / --seq",
        )


@releases_locks
def search_student(
    cfg: SearchConfig, teacher_source: str | Source | None = None, *, out: str, overwrite: bool = False
) -> dict[str, Any]:
    """Search, write the best student (teacher-initialised) as the artifact ``out``, return its manifest."""
    from distillkit.models import load_config, load_model
    from distillkit.models.load import resolve_device
    from distillkit.models.save import save_student

    t_start = time.perf_counter()
    src = teacher_source if isinstance(teacher_source, Source) else read_source(teacher_source or cfg.teacher)
    out_path = check_output(out, overwrite, protect=[src.path, cfg.data])
    console = _console()
    config, src = load_config(src, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    check_searchable(config)
    from distillkit.models.load import check_max_length

    check_max_length(config, cfg.max_length, who=f"the teacher {src.path}")
    space = SearchSpace.from_teacher(config, cfg.space)  # refuse a bad --space before loading weights
    device = resolve_device(cfg.device)
    teacher = load_model(
        src,
        task=cfg.task,
        dtype="float32",
        device=str(device),
        allow_pickle=cfg.allow_pickle,
        trust_remote_code=cfg.trust_remote_code,
    )
    teacher.model.eval().requires_grad_(False)
    if teacher.processor is None:
        raise ModelError(
            f"the teacher {teacher.path} has no tokenizer or image processor saved with it",
            hint="save one with the model (tokenizer.save_pretrained(dir))",
        )
    load_s = time.perf_counter() - t_start
    teacher_params, budget, smallest = _param_budget(cfg, space, teacher.model)
    batch, data_info = calibration_batch(cfg, teacher.processor, teacher.task, device)
    ctx = ScoreContext(teacher.model, batch, teacher.task, pooling=teacher.pooling, relation=cfg.relation)
    search = _Search(cfg, space, teacher, ctx, budget, device)
    _check_latency_budget(cfg, search, space, smallest, device)
    console.print(
        f"[bold]search-student[/] {teacher.task}: teacher {config.model_type} {_fmt_count(teacher_params)} params; "
        f"budget {_fmt_count(budget) + ' params' if budget is not None else 'none on params'}"
        + (f", {cfg.max_latency_ms:g} ms" if cfg.max_latency_ms is not None else "")
        + f"; {space.size()} candidates in the space; scoring {cfg.candidates} by {cfg.score} "
        f"({cfg.init} init) on {device}",
        highlight=False,
    )
    t_search = time.perf_counter()
    search.run(console)
    search_s = time.perf_counter() - t_search
    ranking = search.ranking()
    if not ranking:
        raise ConfigError(
            "no candidate met the budget",
            hint="raise --max-latency-ms, or lower --batch / --seq",
        )
    _table(console, ranking, cfg)
    best = ranking[0]
    spec = best["spec"]

    student = search.build(spec, "teacher", share=False)
    search.slices = None  # the cached slices are not needed any more
    n_student = sum(p.numel() for p in student.parameters())
    metrics = {
        "score": best["score"],
        **{f"score_{k}": v for k, v in best["terms"].items()},
        "student_params": n_student,
        "teacher_params": teacher_params,
        "param_ratio": n_student / teacher_params,
        "candidates_scored": len(ranking),
        "candidates_rejected": search.n_rejected,
        "space_size": space.size(),
    }
    if "latency_ms" in best:
        metrics["student_latency_ms"] = best["latency_ms"]
    manifest = Manifest(
        stage="search-student",
        path=str(out_path),
        task=teacher.task,
        model_type=student.config.model_type,
        inputs={"teacher": describe_input(teacher.path, src.manifest)},
        config={
            **cfg.to_dict(),
            "student": space.spec_string(spec),
            "student_spec": spec,
            "student_init": "teacher",
            "budget_params": budget,
            "space_values": space.describe(),
        },
        metrics=metrics,
        timings={
            "load_s": load_s,
            "search_s": search_s,
            "score_s": search.score_s,
            "score_s_per_candidate": search.score_s / len(ranking),
        },
        extra={"ranking": ranking, "data": data_info, "pooling": teacher.pooling, "device": str(device)},
    )
    with atomic_artifact(out_path, overwrite) as tmp:
        save_student(student, teacher, Path(tmp))
        teacher.processor.save_pretrained(tmp)
        manifest.timings["total_s"] = time.perf_counter() - t_start
        finalize_artifact(tmp, manifest, out_path)
    console.print(
        f"[bold]best[/] {space.spec_string(spec)}: {_fmt_count(n_student)} params "
        f"({n_student / teacher_params:.1%} of the teacher), {cfg.score} {best['score']:.4f} -> {out_path}",
        highlight=False,
    )
    return manifest.to_dict()


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)
