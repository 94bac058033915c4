"""The bench report: ratios against the baseline, the rich table on stderr, the plot and the JSON file."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from pathlib import Path
from typing import Any

from distillkit.bench.config import BenchConfig
from distillkit.errors import DependencyError, OutputError

# Quality metrics the plot may use, best first, with the direction that is better.
PLOT_METRICS = (
    ("perplexity", "lower"),
    ("accuracy", "higher"),
    ("top1_agreement", "higher"),
    ("embedding_cosine", "higher"),
    ("similarity_corr", "higher"),
    ("mse", "lower"),  # diffusers models: MSE of their samples against the baseline's
)


def safe_ratio(num: Any, den: Any) -> float | None:
    if num is None or den is None or not math.isfinite(num) or not math.isfinite(den) or den == 0:
        return None
    return num / den


def ratios(model: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    """How ``model`` compares with ``base``. Speedups are base/model (> 1 is faster); the others model/base.

    A speed ratio that timing noise cannot support is None; :func:`speed_flags` says why."""
    flags = speed_flags(model, base)
    out = {
        "latency_speedup": safe_ratio(base["latency_ms_p50"], model["latency_ms_p50"]),
        "throughput_ratio": safe_ratio(model["throughput"], base["throughput"]),
        "decode_speedup": safe_ratio(base["decode_ms_per_token_p50"], model["decode_ms_per_token_p50"]),
        "param_ratio": safe_ratio(model["params"], base["params"]),
        "size_ratio": safe_ratio(model["file_size_bytes"], base["file_size_bytes"]),
        "memory_ratio": safe_ratio(model["peak_memory_mb"], base["peak_memory_mb"]),
    }
    for key in flags:
        out[key] = None
    return out


# When a speed ratio is a measurement and when it is noise (see speed_flags).
NOISE_FLOOR_MS = 0.05  # below ~50 us per call, timer resolution and Python dispatch dominate what is timed
MAX_SPREAD = 1.0  # (p90 - p10) / p50 above this: the runs disagree more than the median says anything
PLAUSIBLE_MARGIN = 4.0  # a speedup may beat the parameter (work) ratio by this much (kernels, runtimes, bits)


def _spread(record: dict[str, Any], key: str) -> float | None:
    """Relative spread of a timing: (p90 - p10) / p50 from the raw runs, else 2 (p90 - p50) / p50."""
    p50 = record.get(f"{key}_p50")
    if not p50 or not math.isfinite(p50):
        return None
    runs = record.get(key) if isinstance(record.get(key), list) else None
    if runs and len(runs) >= 3:
        import numpy as np

        lo, hi = np.percentile(np.asarray(runs, dtype=np.float64), [10, 90])
        return float(hi - lo) / p50
    p90 = record.get(f"{key}_p90")
    return 2 * (p90 - p50) / p50 if p90 is not None and math.isfinite(p90) else None


def speed_flags(model: dict[str, Any], base: dict[str, Any]) -> dict[str, str]:
    """Which speed ratios of ``model`` against ``base`` are noise rather than results, and why.

    A ratio is not reported (None, with the reason here) when
    1. either latency is below :data:`NOISE_FLOOR_MS`: the call is too short to time;
    2. either model's runs spread more than :data:`MAX_SPREAD` x its median: the medians are not stable enough to
       divide (a busy machine, a first-call compile);
    3. the speedup exceeds :data:`PLAUSIBLE_MARGIN` x the work ratio base params / model params (at least 1): no
       kernel or runtime makes the same work that much faster, so the baseline's timing was disturbed.
    Throughput is the inverse of latency and shares its verdict.
    """
    flags: dict[str, str] = {}
    work = safe_ratio(base.get("params"), model.get("params"))
    bound = PLAUSIBLE_MARGIN * max(1.0, work or 1.0)
    for key, field in (("latency_ms", "latency_speedup"), ("decode_ms_per_token", "decode_speedup")):
        b, m = base.get(f"{key}_p50"), model.get(f"{key}_p50")
        ratio = safe_ratio(b, m)
        if ratio is None:
            continue
        why = None
        if min(b, m) < NOISE_FLOOR_MS:
            why = (
                f"a latency ({min(b, m) * 1000:.1f} us) is below the {NOISE_FLOOR_MS * 1000:.0f} us noise floor; "
                "time a larger --batch/--seq"
            )
        else:
            spreads = {"baseline": _spread(base, key), "model": _spread(model, key)}
            noisy = {k: v for k, v in spreads.items() if v is not None and v > MAX_SPREAD}
            if noisy:
                who, v = max(noisy.items(), key=lambda kv: kv[1])
                why = (
                    f"the {who}'s runs spread {v:.1f}x their median (p10..p90), more than {MAX_SPREAD:g}x; "
                    "rerun with more --repeats on a quiet machine"
                )
            elif ratio > bound:
                why = (
                    f"{ratio:.3g}x is more than {PLAUSIBLE_MARGIN:g}x the parameter ratio allows "
                    f"({max(1.0, work or 1.0):.3g}x less work); the baseline's timing was probably disturbed"
                )
        if why is not None:
            flags[field] = f"{field} {ratio:.3g}x not reported: {why}"
            if field == "latency_speedup":
                flags["throughput_ratio"] = "throughput_ratio not reported: it is the inverse of latency_speedup"
    return flags


# Metrics measured against the reference model: the reference agrees with itself perfectly.
SELF_VALUES = {"top1_agreement": 1.0, "embedding_cosine": 1.0, "similarity_corr": 1.0}


def _quality(m: dict[str, Any], key: str, reference: str | None) -> float | None:
    q = m.get("quality") or {}
    if key in q:
        return q[key]
    return SELF_VALUES.get(key) if m["name"] == reference else None


def plot_metric(models: list[dict[str, Any]], reference: str | None = None) -> tuple[str, str] | None:
    """The first quality metric every model has (the reference's agreement with itself counts as 1), or None."""
    for key, better in PLOT_METRICS:
        if models and all(_quality(m, key, reference) is not None for m in models):
            return key, better
    return None


def build_report(
    cfg: BenchConfig,
    models: list[dict[str, Any]],
    *,
    baseline: str,
    device: str,
    device_type: str,
    versions: dict[str, str],
    notes: list[str],
    data_info: dict[str, Any] | None,
) -> dict[str, Any]:
    base = next(m for m in models if m["name"] == baseline)
    metric = plot_metric(models, baseline)
    return {
        "device": device,
        "device_type": device_type,
        "versions": versions,
        "command": cfg.command,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        "models": models,
        "baseline": baseline,
        "ratios": {m["name"]: ratios(m, base) for m in models if m["name"] != baseline},
        # why a speed ratio above is None: {model: {ratio: reason}}
        "ratio_flags": {m["name"]: flags for m in models if m["name"] != baseline and (flags := speed_flags(m, base))},
        "memory_method": base["memory_method"],
        "quality_metric": metric[0] if metric else None,
        "data": data_info,
        "notes": notes,
        "plot": None,
    }


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def print_table(report: dict[str, Any]) -> None:
    """A side-by-side table on stderr (people read stderr; stdout carries the JSON line)."""
    from rich.table import Table

    from distillkit.progress import stderr_console

    models = report["models"]
    quality_keys = sorted({k for m in models for k in (m.get("quality") or {}) if not k.startswith("eval_")})
    table = Table(title=f"distillkit bench on {report['device']} (baseline: {report['baseline']})")
    # diffusers models sample in steps instead of decoding tokens
    steps = any("steps" in m for m in models)
    step_cols = ("steps", "ms/eval") if steps else ("decode ms/tok",)
    for col in (
        "model",
        "params",
        "size MB",
        "load s",
        "p50 ms",
        "p90 ms",
        "throughput",
        *step_cols,
        "mem MB",
        *quality_keys,
        "speedup",
    ):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in models:
        r = report["ratios"].get(m["name"], {})
        size = m["file_size_bytes"] / 1e6 if m["file_size_bytes"] is not None else None
        table.add_row(
            m["name"],
            f"{m['params']:,}",
            _fmt(size),
            _fmt(m["load_s"]),
            _fmt(m["latency_ms_p50"]),
            _fmt(m["latency_ms_p90"]),
            f"{_fmt(m['throughput'])} {m['throughput_unit']}",
            *(
                (str(m.get("steps", "-")), _fmt(m.get("eval_ms_p50")))
                if steps
                else (_fmt(m["decode_ms_per_token_p50"]),)
            ),
            _fmt(m["peak_memory_mb"]),
            *(_fmt((m.get("quality") or {}).get(k), ".4g") for k in quality_keys),
            "baseline"
            if m["name"] == report["baseline"]
            else "noise"
            if "latency_speedup" in (report.get("ratio_flags") or {}).get(m["name"], {})
            else _fmt(r.get("latency_speedup"), ".2f") + "x",
        )
    console = stderr_console()
    if not console.is_terminal:
        console.width = max(console.width, 200)  # a log file has room; do not squeeze the numbers
    console.print(table)
    for note in report["notes"] + [f"{m['name']}: {n}" for m in models for n in m["notes"]]:
        console.print(f"note: {note}", markup=False, highlight=False)
    for name, flags in (report.get("ratio_flags") or {}).items():
        for reason in flags.values():
            console.print(f"warning: {name}: {reason}", markup=False, highlight=False)


def write_plot(report: dict[str, Any], path: str) -> str:
    """Quality vs latency, one labelled point per model (parameters vs latency without quality)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DependencyError("--plot needs matplotlib", hint="pip install 'distillkit[plot]'") from None
    out = Path(path).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    models = report["models"]
    reference = report["baseline"]
    metric = plot_metric(models, reference)
    xs = [m["latency_ms_p50"] for m in models]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    try:
        if metric is not None:
            key, better = metric
            ys = [_quality(m, key, reference) for m in models]
            ax.set_ylabel(f"{key} ({better} is better)")
            ax.set_title(f"quality vs latency on {report['device']}", fontsize=9)
        else:
            ys = [m["params"] for m in models]
            ax.set_ylabel("parameters")
            ax.set_title(f"parameters vs latency (no quality data: pass --data) on {report['device']}", fontsize=9)
        ax.scatter(xs, ys)
        for i, (m, x, y) in enumerate(zip(models, xs, ys, strict=True)):
            label = f"{m['name']} (reference)" if m["name"] == reference else m["name"]
            # alternate above/below so that models with close numbers stay readable
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5 if i % 2 == 0 else -12), fontsize=8)
        cfg = report["config"]
        what = "sampling latency p50 (ms) at batch" if "diffusion" in report else "prefill latency p50 (ms) at batch"
        ax.set_xlabel(f"{what} {cfg['batch']}" + ("" if "diffusion" in report else f", seq {cfg['seq']}"))
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}{out.suffix}")
        fig.savefig(tmp)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
    return str(out)


def write_report(report: dict[str, Any], path: str) -> str:
    """``--out``: the same JSON as the stdout line, written atomically."""
    out = Path(path).expanduser().absolute()
    if out.is_dir():
        raise OutputError(f"--out {out} is a directory", hint="pass a file name such as report.json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(report, sort_keys=True, default=str) + "\n")
        os.replace(tmp, out)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror}", hint="choose a writable --out") from None
    return str(out)
