"""Quality metrics shared by ``distill`` (held-out evaluation) and ``bench``.

Token metrics count only real tokens (attention mask) and labelled positions (labels != -100).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

IGNORE_INDEX = -100


def _pool(hidden: Any, mask: Any, mode: str) -> Any:
    from distillkit.models.capture import pool

    return pool(hidden, mask, mode)


def _token_logits(model: Any, batch: dict[str, Any], device: Any) -> Any:
    import torch

    from distillkit.models.forward import model_inputs

    with torch.no_grad():
        return model(**model_inputs(model, batch, device)).logits.float()


def _embedding(model: Any, batch: dict[str, Any], device: Any, pooling: str) -> Any:
    import torch

    from distillkit.models.forward import model_inputs

    with torch.no_grad():
        out = model(**model_inputs(model, batch, device))
    hidden = out.last_hidden_state.float()
    mask = batch.get("attention_mask")
    return _pool(hidden, mask.to(device) if mask is not None else None, pooling)


def evaluate_quality(
    model: Any,
    batches: Iterable[dict[str, Any]],
    task: str,
    *,
    teacher: Any = None,
    pooling: str = "mean",
    teacher_pooling: str | None = None,
    device: Any = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Quality of ``model`` on ``batches`` and, with a ``teacher``, its agreement with it.

    Returns (as applicable to the task): ``perplexity``/``teacher_perplexity`` (causal LM, masked LM
    over masked tokens), ``accuracy``/``teacher_accuracy`` (classification with labels, masked LM),
    ``top1_agreement`` and ``kl_to_teacher`` (mean KL(teacher || model) per token or example at T=1),
    ``embedding_cosine`` (mean cosine of pooled embeddings, same width only) and ``similarity_corr``
    (Pearson correlation of the in-batch cosine-similarity matrices; width-agnostic) for encoders.
    """
    import torch
    import torch.nn.functional as F

    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if teacher is not None:
        teacher.eval()
    sums: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        sums[key] = sums.get(key, 0.0) + float(value)

    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        labels = batch.get("labels")
        labels = labels.to(device) if labels is not None else None
        if task == "feature-extraction":
            e_s = _embedding(model, batch, device, pooling)
            add("n_examples", e_s.shape[0])
            if teacher is not None:
                e_t = _embedding(teacher, batch, device, teacher_pooling or pooling)
                if e_s.shape[-1] == e_t.shape[-1]:
                    add("cos_sum", F.cosine_similarity(e_s, e_t, dim=-1).sum())
                if e_s.shape[0] > 2:
                    s_s = F.normalize(e_s, dim=-1) @ F.normalize(e_s, dim=-1).T
                    s_t = F.normalize(e_t, dim=-1) @ F.normalize(e_t, dim=-1).T
                    off = ~torch.eye(e_s.shape[0], dtype=torch.bool, device=e_s.device)
                    a, b = s_s[off], s_t[off]
                    a, b = a - a.mean(), b - b.mean()
                    corr = (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12)
                    add("corr_sum", corr * e_s.shape[0])
                    add("corr_n", e_s.shape[0])
            continue

        logits = _token_logits(model, batch, device)
        t_logits = _token_logits(teacher, batch, device) if teacher is not None else None
        if task == "causal-lm":
            # position t predicts token t+1
            mask = batch.get("attention_mask")
            mask = (mask.to(device) if mask is not None else torch.ones(logits.shape[:2], device=device)).bool()
            tgt = labels[:, 1:] if labels is not None else batch["input_ids"].to(device)[:, 1:]
            valid = mask[:, 1:] & mask[:, :-1] & (tgt != IGNORE_INDEX)
            lg = logits[:, :-1][valid]
            y = tgt[valid]
            add("nll_sum", F.cross_entropy(lg, y, reduction="sum"))
            add("n_tokens", y.numel())
            if t_logits is not None:
                tl = t_logits[:, :-1][valid]
                add("t_nll_sum", F.cross_entropy(tl, y, reduction="sum"))
                _agree(add, lg, tl)
        elif task == "masked-lm":
            mask = batch.get("attention_mask")
            mask = (mask.to(device) if mask is not None else torch.ones(logits.shape[:2], device=device)).bool()
            if labels is not None:
                lab = labels != IGNORE_INDEX
                add("nll_sum", F.cross_entropy(logits[lab], labels[lab], reduction="sum"))
                add("correct", (logits[lab].argmax(-1) == labels[lab]).sum())
                add("n_tokens", lab.sum())
                if t_logits is not None:
                    add("t_nll_sum", F.cross_entropy(t_logits[lab], labels[lab], reduction="sum"))
                    add("t_correct", (t_logits[lab].argmax(-1) == labels[lab]).sum())
            if t_logits is not None:
                _agree(add, logits[mask], t_logits[mask])
        else:  # sequence / image classification: logits [B, C]
            if labels is not None:
                add("correct", (logits.argmax(-1) == labels).sum())
                add("n_labelled", labels.numel())
                if t_logits is not None:
                    add("t_correct", (t_logits.argmax(-1) == labels).sum())
            if t_logits is not None:
                _agree(add, logits, t_logits)

    if was_training:
        model.train()
    return _finish(sums, task)


def _agree(add: Any, s_logits: Any, t_logits: Any) -> None:
    import torch.nn.functional as F

    if s_logits.shape[-1] != t_logits.shape[-1]:
        return
    add("agree", (s_logits.argmax(-1) == t_logits.argmax(-1)).sum())
    t_logp = F.log_softmax(t_logits, -1)
    kl = (t_logp.exp() * (t_logp - F.log_softmax(s_logits, -1))).sum(-1)
    add("kl_sum", kl.sum())
    add("n_compared", kl.numel())


def _finish(s: dict[str, float], task: str) -> dict[str, float]:
    m: dict[str, float] = {}
    if s.get("n_tokens"):
        m["perplexity"] = math.exp(min(s["nll_sum"] / s["n_tokens"], 50.0))
        if "t_nll_sum" in s:
            m["teacher_perplexity"] = math.exp(min(s["t_nll_sum"] / s["n_tokens"], 50.0))
        if task == "masked-lm":
            m["accuracy"] = s.get("correct", 0.0) / s["n_tokens"]
            if "t_correct" in s:
                m["teacher_accuracy"] = s["t_correct"] / s["n_tokens"]
        m["eval_tokens"] = s["n_tokens"]
    if s.get("n_labelled"):
        m["accuracy"] = s.get("correct", 0.0) / s["n_labelled"]
        if "t_correct" in s:
            m["teacher_accuracy"] = s["t_correct"] / s["n_labelled"]
    if s.get("n_compared"):
        m["top1_agreement"] = s["agree"] / s["n_compared"]
        m["kl_to_teacher"] = s["kl_sum"] / s["n_compared"]
    if s.get("n_examples"):
        if "cos_sum" in s:
            m["embedding_cosine"] = s["cos_sum"] / s["n_examples"]
        if s.get("corr_n"):
            m["similarity_corr"] = s["corr_sum"] / s["corr_n"]
        m["eval_examples"] = s["n_examples"]
    return m
