"""Benchmark of the Triton block-sparse attention against dense SDPA (flash backend) and FlexAttention.

For each sequence length and density, one random block mask with the same number of kept key blocks in every
query row (the diagonal always kept) is given to all three: our kernel walks it, FlexAttention gets the same
``BlockMask`` (kept blocks as full blocks), dense SDPA ignores it. FLOPs count the kept blocks only (``4 T_q T_k D``
per head forward, 2.5x that backward), so TFLOP/s is the useful work rate. Adaptive mask generation
(``topk`` from mean-pooled q/k) is timed on its own and reported as a fraction of the sparse forward.
"""

from __future__ import annotations

import math
from typing import Any

from distillkit.errors import DependencyError


def _ms(fn, warmup: int = 5, repeats: int = 20) -> float:
    """Median wall time of ``fn`` in milliseconds, measured with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def density_mask(batch: int, heads: int, nb: int, density: float, seed: int = 0, device: str = "cuda"):
    """``[B, H, nb, nb]`` bool with ``max(1, round(density * nb))`` kept key blocks per query row, the diagonal
    among them, the rest uniformly at random."""
    import torch

    keep = max(1, round(density * nb))
    g = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.rand(batch, heads, nb, nb, generator=g)
    scores.diagonal(dim1=-2, dim2=-1).fill_(2.0)  # the diagonal always ranks first
    idx = scores.topk(keep, dim=-1).indices
    mask = torch.zeros(batch, heads, nb, nb, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.to(device)


def bench_block_sparse_attention(
    seq_lens: tuple[int, ...] = (8192, 32768),
    heads: int = 16,
    head_dim: int = 128,
    densities: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1, 0.05),
    dtype: Any = None,
    batch: int = 1,
    block_size: int = 128,
    warmup: int = 5,
    repeats: int = 20,
) -> list[dict[str, Any]]:
    """Time forward and forward+backward of block-sparse attention, dense SDPA (flash) and FlexAttention.

    Returns one row per (seq_len, density, pass) with ``ms``, ``tflops`` (useful FLOPs over the kept blocks) and
    the speedups of the block-sparse kernel over SDPA and FlexAttention, the ideal ``1 / density`` speedup, and
    the adaptive mask generation time. ``dtype`` defaults to bf16. Needs a CUDA GPU.
    """
    import torch

    if not torch.cuda.is_available():
        raise DependencyError(
            "the block-sparse attention benchmark needs a CUDA GPU", hint="run it on a machine with an NVIDIA GPU"
        )
    from torch.nn.attention.flex_attention import flex_attention

    dtype = dtype or torch.bfloat16
    flex = torch.compile(flex_attention, dynamic=False)
    rows: list[dict[str, Any]] = []
    for T in seq_lens:
        rows += _bench_length(flex, T, heads, head_dim, densities, dtype, batch, block_size, warmup, repeats)
        torch.cuda.empty_cache()
    return rows


def _bench_length(flex, T, heads, head_dim, densities, dtype, batch, block_size, warmup, repeats):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .masks import adaptive_block_mask, block_index, flex_block_mask
    from .op import block_sparse_attention_forward

    nb = math.ceil(T / block_size)
    shape = (batch, heads, T, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device="cuda", dtype=dtype)
    scale = head_dim**-0.5

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    dense_flops = 4.0 * batch * heads * T * T * head_dim
    sdpa_ms = {"fwd": _ms(sdpa, warmup, repeats), "fwd+bwd": _ms(lambda: sdpa().backward(dout), warmup, repeats)}
    rows = []
    for density in densities:
        mask = density_mask(batch, heads, nb, density, seed=T)
        kept = mask.float().mean().item()
        idx = block_index(mask)
        bm = flex_block_mask(mask, T, block_size)

        def ours(idx=idx):
            return block_sparse_attention_forward(
                q, k, v, idx.row_idx, idx.row_cnt, idx.col_idx, idx.col_cnt, block_size, False, scale
            )[0]

        def flex_call(bm=bm):
            return flex(q, k, v, block_mask=bm, scale=scale)

        times = {
            "fwd": {"block_sparse": _ms(ours, warmup, repeats), "flex": _ms(flex_call, warmup, repeats)},
            "fwd+bwd": {
                "block_sparse": _ms(lambda: ours().backward(dout), warmup, repeats),
                "flex": _ms(lambda: flex_call().backward(dout), warmup, repeats),
            },
        }
        n_keep = max(1, round(density * nb))  # a whole count: topk=1.0 would mean one block
        with torch.no_grad():
            mask_ms = _ms(lambda n_keep=n_keep: adaptive_block_mask(q, k, block_size, topk=n_keep), warmup, repeats)
        for pass_name, t in times.items():
            factor = 1.0 if pass_name == "fwd" else 3.5  # backward does 2.5x the forward's matmul work
            useful = dense_flops * kept * factor
            rows.append(
                {
                    "device": torch.cuda.get_device_name(),
                    "seq_len": T,
                    "heads": heads,
                    "head_dim": head_dim,
                    "batch": batch,
                    "block_size": block_size,
                    "dtype": str(dtype).replace("torch.", ""),
                    "density": density,
                    "kept_fraction": round(kept, 4),
                    "pass": pass_name,
                    "ms": {"block_sparse": t["block_sparse"], "flex": t["flex"], "sdpa_flash": sdpa_ms[pass_name]},
                    "tflops": {
                        "block_sparse": useful / t["block_sparse"] / 1e9,
                        "flex": useful / t["flex"] / 1e9,
                        "sdpa_flash": dense_flops * factor / sdpa_ms[pass_name] / 1e9,
                    },
                    "speedup_vs_sdpa": sdpa_ms[pass_name] / t["block_sparse"],
                    "speedup_vs_flex": t["flex"] / t["block_sparse"],
                    "ideal_speedup": 1.0 / kept,
                    "ideal_fraction": sdpa_ms[pass_name] / t["block_sparse"] * kept,
                    "adaptive_mask_ms": mask_ms,
                    "adaptive_mask_fraction": mask_ms / times["fwd"]["block_sparse"],
                }
            )
        q.grad = k.grad = v.grad = None
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`bench_block_sparse_attention` rows."""
    head = "| T | density | pass | ours ms | ours TFLOP/s | SDPA ms | Flex ms | vs SDPA | ideal | vs Flex | mask ms |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['seq_len']} | {r['density']:.0%} | {r['pass']} | {r['ms']['block_sparse']:.2f} | "
            f"{r['tflops']['block_sparse']:.0f} | {r['ms']['sdpa_flash']:.2f} | {r['ms']['flex']:.2f} | "
            f"{r['speedup_vs_sdpa']:.2f}x | {r['ideal_speedup']:.1f}x | {r['speedup_vs_flex']:.2f}x | "
            f"{r['adaptive_mask_ms']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m distillkit.kernels.block_sparse_attention.bench
    import json

    results = bench_block_sparse_attention()
    print(format_table(results))
    print(json.dumps(results))
