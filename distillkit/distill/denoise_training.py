"""Training and measuring pieces shared by the DDPM/DDIM (``diffusion``) and flow-matching (``flow``) distillation
methods: the optimisation loop, the trainable copy a student starts from, block-sparse attention processors, progress,
and the sample-error and timing measures of the evaluation.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from distillkit.config import DistillConfig
from distillkit.errors import TrainingError


def apply_sparse_attention(model: Any, sparse: tuple[str, int] | None) -> int:
    """Put block-sparse self-attention processors into every attention layer of ``model`` (diffusers ``Attention``,
    or Wan's ``WanAttention``; see :func:`distillkit.attention.set_diffusers_sparse_attention`); ``sparse`` is
    ``(spec, block_size)`` or None (nothing changes). Returns how many layers there are."""
    if sparse is None:
        return 0
    from distillkit.attention import set_diffusers_sparse_attention

    return set_diffusers_sparse_attention(model, sparse[0], sparse[1])


class ProgressBar:
    """Progress on stderr: a rich bar on a terminal, periodic plain lines in a log (distillkit.progress)."""

    def __init__(self, label: str, total: int, unit: str = "step"):
        from distillkit.progress import Progress

        self.progress = Progress(label, total, unit=unit)

    def __enter__(self) -> ProgressBar:
        self.progress.__enter__()
        return self

    def update(self, done: int, info: str = "") -> None:
        self.progress.update(done, info)

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)


def train_student(
    student: torch.nn.Module, loss_fn: Any, cfg: DistillConfig, label: str, on_step: Any = None
) -> list[float]:
    """AdamW with warmup + cosine decay over ``cfg.optim.steps``; ``loss_fn(step)`` returns the scalar loss."""
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps(), cfg.optim.steps)
    losses: list[float] = []
    with ProgressBar(label, cfg.optim.steps) as bar:
        for step in range(cfg.optim.steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(step)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the {label} loss became {loss.item()} at step {step + 1}", hint="lower --lr and run again"
                )
            loss.backward()
            if cfg.optim.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            opt.step()
            sched.step()
            if on_step is not None:
                on_step()
            losses.append(loss.item())
            bar.update(step + 1, f"loss {loss.item():.4g}")
    return losses


def trainable_copy(model: Any) -> Any:
    """A deep copy of ``model`` with every parameter trainable (a student or target network to start from)."""
    import copy

    return copy.deepcopy(model).requires_grad_(True)


def sample_errors(samples: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """MSE and PSNR (dB, peak = max - min of ``reference``) of ``samples`` against ``reference`` [N, C, H, W]."""
    mse = float(((samples.double() - reference.double()) ** 2).mean())
    peak = float(reference.max() - reference.min())
    return {"mse": mse, "psnr": 10 * math.log10(peak**2 / mse) if mse > 0 else float("inf")}


def ms_per_call(fn: Any, repeats: int = 3) -> float:
    """Mean wall-clock milliseconds of ``repeats`` calls of ``fn`` after one untimed call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) * 1000 / repeats
