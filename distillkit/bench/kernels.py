"""``distillkit bench --kernel NAME``: the GPU kernel benchmarks, each against its baselines in the same run.

The measurements live beside the kernels (``distillkit.kernels.<op>.bench``); this module runs one, prints a table
on stderr and returns the report. Torch-free at import: ``KERNELS`` feeds ``--help``.
"""

from __future__ import annotations

import importlib
import time
from typing import Any

# name -> (module, function, what it compares)
KERNELS: dict[str, tuple[str, str, str]] = {
    "kd-loss": (
        "distillkit.kernels.kd_loss.bench",
        "bench_kd_loss",
        "fused linear + KD loss vs the naive fp32 loss and Liger-Kernel (8192 tokens, hidden 2048/4096, vocab 128,256)",
    ),
    "block-sparse-attention": (
        "distillkit.kernels.block_sparse_attention.bench",
        "bench_block_sparse_attention",
        "block-sparse attention vs dense SDPA (flash) and FlexAttention, T 8192/32768, densities 100-5%",
    ),
}


def kernel_help() -> str:
    return "; ".join(f"{k}: {v[2]}" for k, v in KERNELS.items())


def run_kernel_bench(name: str, command: str | None = None) -> dict[str, Any]:
    """Run the named kernel benchmark (needs CUDA; the benchmark raises a ConfigError otherwise)."""
    from distillkit.errors import ConfigError

    if name not in KERNELS:
        raise ConfigError(f"unknown kernel {name!r}", hint=f"choose one of: {', '.join(KERNELS)}")
    module, func, _ = KERNELS[name]
    fn = getattr(importlib.import_module(module), func)
    t0 = time.perf_counter()
    rows = fn()
    report = {
        "kernel": name,
        "device": rows[0].get("device") if rows else None,
        "rows": rows,
        "command": command,
        "seconds": time.perf_counter() - t0,
    }
    _print(name, rows)
    return report


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def _print(name: str, rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from distillkit.progress import stderr_console

    if not rows:
        return
    t = Table(title=f"distillkit bench --kernel {name} on {rows[0].get('device')}", title_justify="left")
    if name == "kd-loss":
        cols = [
            "impl",
            "status",
            "ms",
            "peak_extra_gib",
            "speedup_vs_naive",
            "speedup_vs_liger",
            "memory_ratio_vs_liger",
        ]
        for c in cols:
            t.add_column(c)
        for r in rows:
            t.add_row(*[_fmt(r.get(c)) for c in cols])
    else:
        cols = [
            "T",
            "density",
            "pass",
            "ours ms",
            "flex ms",
            "sdpa ms",
            "ours TFLOP/s",
            "vs sdpa",
            "vs flex",
            "of ideal",
        ]
        for c in cols:
            t.add_column(c, justify="right")
        for r in rows:
            ms, tf = r.get("ms", {}), r.get("tflops", {})
            t.add_row(
                str(r.get("seq_len")),
                f"{r.get('density', 0):.0%}",
                str(r.get("pass")),
                _fmt(ms.get("block_sparse")),
                _fmt(ms.get("flex")),
                _fmt(ms.get("sdpa_flash")),
                _fmt(tf.get("block_sparse")),
                _fmt(r.get("speedup_vs_sdpa")),
                _fmt(r.get("speedup_vs_flex")),
                _fmt(r.get("ideal_fraction")),
            )
    stderr_console().print(t)
