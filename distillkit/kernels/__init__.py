"""distillkit's kernels (installed as ``distillkit.kernels``), loaded lazily so importing this package pulls in
neither torch nor Triton: ``distillkit.kernels.block_sparse_attention(q, k, v, mask, block_size=...)``,
``distillkit.kernels.fused_kd_loss(student_hidden, student_head, teacher_hidden, teacher_head, labels, ...)``."""

from __future__ import annotations

import importlib

# public name -> subpackage that defines it
_LAZY = {
    "block_sparse_attention": ".block_sparse_attention",
    "fused_kd_loss": ".kd_loss",
    "fused_kd_loss_topk": ".kd_loss",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
