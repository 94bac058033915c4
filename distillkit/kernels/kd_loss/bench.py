"""Benchmark of the fused distillation loss on a CUDA GPU: time and peak extra memory, against baselines.

Three rows measured in the same run, each forward + backward of the loss alone on the same inputs
(student hidden [N, Hs] and head [V, Hs] requiring gradients, teacher hidden [N, Ht] and head
[V, Ht] constant):

- ``naive``: :func:`~distillkit.kernels.kd_loss.naive.naive_kd_loss`, full logits in float32;
- ``distillkit``: :func:`~distillkit.kernels.kd_loss.fused.fused_kd_loss` (Triton);
- ``liger``: Liger-Kernel's chunked ``LigerFusedLinearJSDLoss`` with beta = 0 (forward KL) and no
  hard-label weight, when ``liger_kernel`` is importable (an optional benchmark dependency).

Peak extra memory is ``torch.cuda.max_memory_allocated()`` during one forward + backward minus
what was allocated before it (the inputs), so it includes the gradients the call produces.
"""

from __future__ import annotations

import inspect
import statistics
from typing import Any

# the targets on an H100 at the default sizes (forward + backward)
TARGET_MS = 35.0
TARGET_GIB = 1.0


def _measure(step: Any, leaves: list[Any], warmup: int, iters: int) -> tuple[float, float, float]:
    """(median ms, peak extra GiB, loss) of ``step()`` -> loss followed by its backward."""
    import torch

    def once() -> float:
        for t in leaves:
            t.grad = None
        loss = step()
        loss.backward()
        return float(loss.detach())

    for _ in range(warmup):
        once()
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    value = once()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30
    times = []
    for _ in range(iters):
        for t in leaves:
            t.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        once()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), peak, value


def _liger_step(student_hidden: Any, student_head: Any, teacher_hidden: Any, teacher_head: Any, labels: Any) -> Any:
    """A closure running Liger's chunked fused-linear JSD as forward KL, or None when liger_kernel is missing."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return None
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=1.0)
    params = inspect.signature(loss_fn.forward).parameters
    # the bias arguments became optional only in later Liger releases
    extra = {k: None for k in ("student_bias", "teacher_bias") if k in params}

    def step() -> Any:
        return loss_fn(student_hidden, student_head, teacher_hidden, teacher_head, labels, **extra)

    return step


def bench_kd_loss(
    tokens: int = 8192,
    student_hidden: int = 2048,
    teacher_hidden: int = 4096,
    vocab: int = 128256,
    dtype: Any = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    warmup: int = 2,
    iters: int = 5,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time (median ms) and peak extra memory (GiB) of forward + backward for naive, distillkit and Liger.

    ``dtype`` defaults to torch.bfloat16. Each row: ``impl``, ``status`` ("ok", "not installed",
    "out of memory"), ``ms``, ``peak_extra_gib``, ``loss``, and the shared sizes and device; the
    distillkit row adds its ratios to the other rows (``speedup_vs_*``, ``memory_ratio_vs_*``: >1
    means distillkit is faster / smaller) and, on an H100, whether it meets the issue's targets.
    The Liger row is forward KL only; for other divergences it is skipped. Raises ConfigError
    without CUDA.
    """
    import torch

    from distillkit.errors import ConfigError
    from distillkit.kernels.kd_loss.fused import fused_kd_loss
    from distillkit.kernels.kd_loss.naive import naive_kd_loss

    if not torch.cuda.is_available():
        raise ConfigError(
            "the kd-loss kernel benchmark needs a CUDA GPU",
            hint="run it on a machine with an NVIDIA GPU; on CPU the tests in tests/kernels check correctness",
        )
    dtype = dtype or torch.bfloat16
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Any:
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    sh = randn(tokens, student_hidden).requires_grad_()
    sw = randn(vocab, student_hidden, scale=student_hidden**-0.5).requires_grad_()
    th = randn(tokens, teacher_hidden)
    tw = randn(vocab, teacher_hidden, scale=teacher_hidden**-0.5)
    labels = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    leaves = [sh, sw]
    common = {
        "device": torch.cuda.get_device_name(device),
        "tokens": tokens,
        "student_hidden": student_hidden,
        "teacher_hidden": teacher_hidden,
        "vocab": vocab,
        "dtype": str(dtype).replace("torch.", ""),
        "divergence": divergence,
    }
    candidates = [
        ("naive", lambda: naive_kd_loss(sh, sw, th, tw, divergence=divergence, temperature=temperature)),
        ("distillkit", lambda: fused_kd_loss(sh, sw, th, tw, divergence=divergence, temperature=temperature)),
    ]
    liger = _liger_step(sh, sw, th, tw, labels) if divergence == "forward_kl" and temperature == 1.0 else None
    rows: list[dict[str, Any]] = []
    for name, step in candidates + [("liger", liger)]:
        row: dict[str, Any] = {"impl": name, **common}
        if step is None:
            row["status"] = "not installed" if divergence == "forward_kl" else "not comparable (forward KL only)"
            rows.append(row)
            continue
        try:
            ms, gib, value = _measure(step, leaves, warmup, iters)
            row.update(status="ok", ms=round(ms, 3), peak_extra_gib=round(gib, 4), loss=value)
        except torch.cuda.OutOfMemoryError:
            row["status"] = "out of memory"
        for t in leaves:
            t.grad = None
        torch.cuda.empty_cache()
        rows.append(row)
    ours = rows[1]
    if ours.get("status") == "ok":
        for other in (rows[0], rows[2]):
            if other.get("status") == "ok":
                ours[f"speedup_vs_{other['impl']}"] = round(other["ms"] / ours["ms"], 3)
                ours[f"memory_ratio_vs_{other['impl']}"] = round(other["peak_extra_gib"] / ours["peak_extra_gib"], 3)
        if "H100" in common["device"] and (tokens, student_hidden, teacher_hidden, vocab) == (8192, 2048, 4096, 128256):
            ours["meets_target"] = ours["ms"] <= TARGET_MS and ours["peak_extra_gib"] <= TARGET_GIB
    return rows
