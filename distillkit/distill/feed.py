"""Where each training batch and its teacher features come from: the engine's one hook for the LLM modes.

The engine asks a :class:`Feed` for every micro-batch (``next_batch``) and for the teacher's features on it
(``teacher_features``). :class:`OfflineFeed` is the default and is exactly the plain loop: the next fixed-data
batch and a forward pass of the live teacher. The other feeds live beside their mode:

- ``--mode on-policy``: :class:`distillkit.distill.onpolicy.OnPolicyFeed` swaps some batches for the student's
  own generations;
- ``--teacher-cache DIR``: :class:`distillkit.distill.teacher_cache.CachedTeacherFeed` reads top-k logits from
  disk instead of running a teacher;
- ``--cross-tokenizer uld``: :class:`distillkit.distill.cross_tokenizer.CrossTokenizerFeed` re-tokenises the
  batch's text for a teacher with another vocabulary.

``--mode sequence`` changes the data once before training (:mod:`distillkit.distill.sequence`) and then uses
the offline feed.
"""

from __future__ import annotations

from typing import Any

from distillkit.errors import ConfigError


def check_modes(cfg: Any, task: str) -> None:
    """Refuse LLM modes for tasks that do not generate text (the config cannot see the task)."""
    used = [
        name
        for name, on in (
            (f"--mode {cfg.llm.mode}", cfg.llm.mode != "offline"),
            ("--teacher-cache", bool(cfg.llm.teacher_cache)),
            ("--cross-tokenizer", bool(cfg.llm.cross_tokenizer)),
        )
        if on
    ]
    if used and task != "causal-lm":
        raise ConfigError(
            f"{', '.join(used)} is for causal language models, but the teacher is a {task} model",
            hint="drop it, or distil a causal LM teacher (…ForCausalLM)",
        )


class OfflineFeed:
    """Fixed data and the live teacher: the plain distillation loop."""

    def __init__(self, teacher: Any, task: str, device: Any):
        self.teacher, self.task, self.device = teacher, task, device

    def next_batch(self, batches: Any, step: int, micro: int) -> dict[str, Any]:
        from distillkit.models.forward import to_device

        return to_device(batches.next(), self.device, non_blocking=True)

    def teacher_features(self, batch: dict[str, Any], needs: set[str], blocks: list[int], pooling: str) -> Any:
        from distillkit.distill.features import student_features

        feats, _ = student_features(self.teacher.model, batch, self.task, needs, blocks, pooling)
        return feats

    def eval_teacher(self) -> Any:
        """The teacher model that evaluation compares against (None when there is no comparable one)."""
        return self.teacher.model

    def metrics(self) -> dict[str, Any]:
        return {}
