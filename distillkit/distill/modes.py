"""``build_feed``: the feed a run's config asks for (the engine's one call); the feeds themselves are
:class:`distillkit.distill.feed.OfflineFeed` and the mode modules beside it."""

from __future__ import annotations

from typing import Any

from distillkit.distill.feed import OfflineFeed


def build_feed(cfg: Any, *, task: str, teacher: Any, device: Any, data: Any, processor: Any, module: Any) -> Any:
    """The feed for ``cfg``; ``module`` is the (possibly wrapped) DistillModule whose student generates."""
    if cfg.llm.teacher_cache:
        from distillkit.distill.teacher_cache import CachedTeacherFeed

        return CachedTeacherFeed(cfg, teacher, task, device, data)
    if cfg.llm.cross_tokenizer:
        from distillkit.distill.cross_tokenizer import CrossTokenizerFeed

        return CrossTokenizerFeed(cfg, teacher, task, device, processor)
    if cfg.llm.mode == "on-policy":
        from distillkit.distill.onpolicy import OnPolicyFeed

        return OnPolicyFeed(cfg, teacher, task, device, processor, module)
    if task == "feature-extraction":  # a frozen teacher on fixed tokens: its outputs are computed once per example
        from distillkit.distill.memo import MemoTeacherFeed

        return MemoTeacherFeed(teacher, task, device)
    return OfflineFeed(teacher, task, device)
