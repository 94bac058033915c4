"""Forward FLOPs of a transformer config, to compare a pruned model with its original (no torch import).

Counted per token at context length ``seq``, 2 FLOPs per multiply-add: every linear layer of every block (q, k, v,
o; the MLP's up/gate/down), the attention itself (``q @ k^T`` and ``p @ v`` against ``seq`` keys) and, for tasks
with token logits, the output head. Norms, activations, softmax and embeddings lookups are left out: they are a
small, width-linear share and do not change the comparison.
"""

from __future__ import annotations

from typing import Any

from distillkit.models import arch


def transformer_flops(cfg: Any, seq: int = 128, task: str | None = None) -> int:
    """Forward FLOPs per token of a Llama-, GPT-2-, BERT- or ViT-style config at context length ``seq``."""
    hidden, heads, kv, d = arch.hidden_size(cfg), arch.num_heads(cfg), arch.num_kv_heads(cfg), arch.head_dim(cfg)
    inter, layers = arch.intermediate_size(cfg), arch.num_layers(cfg)
    mlp_mats = 3 if arch.family(cfg) == "llama" else 2
    per_layer = (
        2 * hidden * heads * d  # q
        + 2 * 2 * hidden * kv * d  # k, v
        + 2 * heads * d * hidden  # o
        + 2 * 2 * seq * heads * d  # q k^T and p v
        + 2 * mlp_mats * hidden * inter
    )
    head = 2 * hidden * (arch.vocab_size(cfg) or 0) if task in ("causal-lm", "masked-lm") else 0
    return layers * per_layer + head
