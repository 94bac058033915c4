"""``SearchConfig``: what ``distillkit search-student`` searches for, under which budget, scored how."""

from __future__ import annotations

import math
from dataclasses import dataclass

from distillkit.config import BaseConfig, require

SEARCH_INIT = ("teacher", "random")
RELATIONS = ("gram", "cka")


@dataclass(frozen=True)
class SearchConfig(BaseConfig):
    """Everything that defines a student search run (``distillkit search-student``).

    Budgets: ``params`` is a fraction of the teacher's parameter count, ``max_params`` an absolute count,
    ``max_latency_ms`` a forward-pass latency of a ``[latency_batch, latency_seq]`` input measured on ``device``.
    At least one budget is required; several combine (a candidate must meet every one).
    """

    teacher: str = ""
    # budget
    params: float | None = None
    max_params: int | None = None
    max_latency_ms: float | None = None
    latency_batch: int = 1
    latency_seq: int = 128
    # space and scoring
    space: str | None = None
    score: str = "diswot"
    report: tuple[str, ...] = ("params",)
    init: str = "teacher"
    relation: str = "gram"
    # evolution
    candidates: int = 100
    population: int = 16
    tournament: int = 4
    crossover: float = 0.5
    time_budget: float | None = None
    seed: int = 0
    # calibration data
    task: str | None = None
    data: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    max_length: int = 32
    max_samples: int | None = None
    batch_size: int = 8
    # placement and loading
    device: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        from distillkit.registry import SCORES

        require(bool(self.teacher), "a teacher is required", "pass the teacher model as the first argument")
        require(
            self.params is not None or self.max_params is not None or self.max_latency_ms is not None,
            "search-student needs a budget",
            "pass --params 0.25 (a fraction of the teacher), --max-params N, or --max-latency-ms X",
        )
        require(
            self.params is None or self.max_params is None,
            "--params and --max-params both set a parameter budget",
            "give only one of them",
        )
        if self.params is not None:
            require(
                isinstance(self.params, (int, float)) and 0.0 < self.params <= 1.0,
                f"--params must be a fraction of the teacher's size in (0, 1] (got {self.params})",
                "pass e.g. --params 0.25, or --max-params N for an absolute count",
            )
        if self.max_params is not None:
            require(
                isinstance(self.max_params, int) and self.max_params > 0,
                f"--max-params must be a positive integer (got {self.max_params})",
                "pass e.g. --max-params 20000000",
            )
        if self.max_latency_ms is not None:
            require(
                self.max_latency_ms > 0 and math.isfinite(self.max_latency_ms),
                f"--max-latency-ms must be > 0 (got {self.max_latency_ms})",
                "pass e.g. --max-latency-ms 20",
            )
        for name, value, lo in (
            ("--batch", self.latency_batch, 1),
            ("--seq", self.latency_seq, 1),
            ("--candidates", self.candidates, 1),
            ("--population", self.population, 2),
            ("--tournament", self.tournament, 1),
            ("--max-length", self.max_length, 2),
            ("--batch-size", self.batch_size, 2),
        ):
            require(
                isinstance(value, int) and not isinstance(value, bool) and value >= lo,
                f"{name} must be an integer >= {lo} (got {value})",
                f"pass {name} {max(lo, 2)} or more",
            )
        require(
            self.tournament <= self.population,
            f"--tournament {self.tournament} is larger than --population {self.population}",
            "a tournament samples from the population; use a smaller --tournament",
        )
        require(0.0 <= self.crossover <= 1.0, f"--crossover must be in [0, 1] (got {self.crossover})", "e.g. 0.5")
        require(
            self.time_budget is None or self.time_budget > 0,
            f"--time-budget must be > 0 seconds (got {self.time_budget})",
            "omit it to stop after --candidates",
        )
        require(
            self.init in SEARCH_INIT, f"--init must be one of {', '.join(SEARCH_INIT)}", "pass --init teacher or random"
        )
        require(
            self.relation in RELATIONS,
            f"--relation must be one of {', '.join(RELATIONS)}",
            "gram (row-normalised Gram matrices) or cka (linear CKA)",
        )
        require(self.max_samples is None or self.max_samples > 0, "max samples must be > 0", "omit it to use all data")
        for name in (self.score, *self.report):
            SCORES.get(name)  # raises ConfigError listing the registered scores
