"""Block-sparse attention: naive reference, mask builders and the Triton kernels.

``block_sparse_attention`` (the Triton op), ``naive_block_sparse_attention`` (the fp32 specification) and the
mask builders are loaded lazily, so importing this package pulls in neither torch nor Triton.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "block_sparse_attention": ".op",
    "naive_block_sparse_attention": ".naive",
    "MaskSpec": ".masks",
    "BlockIndex": ".masks",
    "parse_mask_spec": ".masks",
    "block_index": ".masks",
    "causal_block_mask": ".masks",
    "sliding_window_block_mask": ".masks",
    "strided_block_mask": ".masks",
    "video_tile_block_mask": ".masks",
    "adaptive_block_mask": ".masks",
    "dense_block_mask": ".masks",
    "flex_block_mask": ".masks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallableModule(type(importlib)):
    """Importing any submodule sets ``distillkit.kernels.block_sparse_attention`` to this package (Python binds
    subpackages on their parent), which would shadow the op of the same name; calling the package calls the op."""

    def __call__(self, *args, **kwargs):
        return self.__getattr__("block_sparse_attention")(*args, **kwargs)


import sys  # noqa: E402

sys.modules[__name__].__class__ = _CallableModule
