"""Teacher outputs computed once per example: a step then costs the student's forward and backward only.

For an encoder (``feature-extraction``) distilled offline, the teacher is frozen, in eval mode, and sees the same
tokens every epoch, so its pooled embedding and hidden states for an example never change. :class:`MemoTeacherFeed`
runs the teacher only on the examples of a batch it has not seen yet and keeps, per example, the pooled embedding
(float32) and the hidden states of the teacher blocks the losses compare (unpadded, float16 to halve the memory).
From the second epoch on the teacher does no work at all. Memory: about ``H * 4`` bytes per example for the
embedding, plus ``tokens * H * 2`` bytes per cached block.

Features the memo cannot rebuild (q/k/v for the MiniLM relation losses, logits) send the whole batch to the live
teacher, so every loss works; the memo is purely a speed-up and a test checks that it changes no loss value beyond
float16 rounding of hidden states.
"""

from __future__ import annotations

from typing import Any

import torch

from distillkit.distill.feed import OfflineFeed

MEMO_NEEDS = frozenset({"embedding", "hidden_states"})


class MemoTeacherFeed(OfflineFeed):
    """:class:`OfflineFeed` whose teacher features come from a per-example memo after the first time."""

    def __init__(self, teacher: Any, task: str, device: Any):
        super().__init__(teacher, task, device)
        self.memo: dict[int, dict[str, Any]] = {}
        self.teacher_examples = 0  # examples the live teacher had to run on
        self._indices: list[int] | None = None

    def next_batch(self, batches: Any, step: int, micro: int) -> dict[str, Any]:
        batch = super().next_batch(batches, step, micro)
        self._indices = list(batches.last_indices)
        return batch

    def teacher_features(self, batch: dict[str, Any], needs: set[str], blocks: list[int], pooling: str) -> Any:
        from distillkit.distill.features import student_features
        from distillkit.distill.losses import Features

        indices, self._indices = self._indices, None
        mask = batch.get("attention_mask")
        right_padded = mask is not None and bool(mask[:, 0].all())
        if indices is None or not needs or not set(needs) <= MEMO_NEEDS or not right_padded:
            self.teacher_examples += int(batch["input_ids"].shape[0]) if "input_ids" in batch else 0
            return super().teacher_features(batch, needs, blocks, pooling)
        want_hidden = "hidden_states" in needs
        missing = [row for row, i in enumerate(indices) if i not in self.memo]
        if missing:
            rows = torch.tensor(missing, device=batch["attention_mask"].device)
            sub = {k: v.index_select(0, rows) if _per_example(v, len(indices)) else v for k, v in batch.items()}
            feats, _ = student_features(self.teacher.model, sub, self.task, set(needs) | {"embedding"}, blocks, pooling)
            lengths = sub["attention_mask"].sum(dim=1).tolist()
            for j, row in enumerate(missing):
                entry: dict[str, Any] = {"embedding": feats.embedding[j].float().clone()}
                if want_hidden:
                    n = int(lengths[j])
                    entry["hidden"] = {b: feats.hidden_states[b + 1][j, :n].half().clone() for b in blocks}
                self.memo[indices[row]] = entry
            self.teacher_examples += len(missing)
        entries = [self.memo[i] for i in indices]
        embedding = torch.stack([e["embedding"] for e in entries]).to(self.device)
        hidden = None
        if want_hidden:
            batch_len = batch["attention_mask"].shape[1]
            n_layers = self.teacher.config.num_hidden_layers
            states: list[Any] = [None] * (n_layers + 1)
            for b in blocks:
                width = entries[0]["hidden"][b].shape[-1]
                block = torch.zeros(len(entries), batch_len, width, device=self.device)
                for row, e in enumerate(entries):
                    h = e["hidden"][b]
                    block[row, : h.shape[0]] = h.to(device=self.device, dtype=block.dtype)
                states[b + 1] = block
            hidden = tuple(states)
        return Features(hidden_states=hidden, embedding=embedding)

    def metrics(self) -> dict[str, Any]:
        return {"teacher_memo_examples": len(self.memo), "teacher_forward_examples": self.teacher_examples}


def _per_example(value: Any, batch_size: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch_size
