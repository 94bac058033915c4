"""Fused linear + distillation loss, chunked over tokens so the logits are never held whole."""
