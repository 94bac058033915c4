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


# --------------------------------------------------------------------------------------------
# Held-out evaluation on a list of texts (``--eval-data``): the whole set at once, not in-batch.

HELDOUT_TOPK = 5


def _text_batches(
    texts: list[str], tokenizer: Any, max_length: int, batch_size: int
) -> Iterable[tuple[list[int], Any]]:
    """Batches of (original indices, tokenised batch), shortest texts first so padding stays small."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        yield idx, dict(enc)


def heldout_embeddings(
    model: Any, texts: list[str], tokenizer: Any, *, pooling: str, max_length: int, batch_size: int = 64
) -> Any:
    """Pooled sentence embeddings [N, H] (float32, in ``texts`` order) of ``model`` for every text."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: Any = None
    for idx, batch in _text_batches(texts, tokenizer, max_length, batch_size):
        e = _embedding(model, batch, device, pooling).float().cpu()
        if out is None:
            out = torch.empty(len(texts), e.shape[-1])
        out[torch.tensor(idx)] = e
    if was_training:
        model.train()
    return out


def _ranks(x: Any) -> Any:
    import torch

    r = torch.empty_like(x, dtype=torch.float64)
    r[x.argsort()] = torch.arange(x.numel(), dtype=torch.float64)
    return r


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation of two 1-D tensors (ordinal ranks; ties among float similarities are negligible)."""
    ra, rb = _ranks(a.flatten()), _ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def embedding_geometry(student: Any, teacher: Any) -> dict[str, float]:
    """How well ``student`` [N, Hs] keeps the geometry of ``teacher`` [N, Ht] over a whole held-out set.

    - ``spearman``: Spearman correlation between the two models' cosine similarities over all N(N-1)/2 pairs;
    - ``nn_agreement``: fraction of records whose nearest other record (by cosine) is the same for both models;
    - ``embedding_cosine``: mean cosine between a record's two embeddings (equal widths only).
    """
    import torch
    import torch.nn.functional as F

    s, t = F.normalize(student.double(), dim=-1), F.normalize(teacher.double(), dim=-1)
    n = s.shape[0]
    sim_s, sim_t = s @ s.T, t @ t.T
    iu = torch.triu_indices(n, n, offset=1)
    out = {"spearman": spearman(sim_s[iu[0], iu[1]], sim_t[iu[0], iu[1]])}
    eye = torch.eye(n, dtype=torch.bool)
    nn_s = sim_s.masked_fill(eye, -2.0).argmax(dim=1)
    nn_t = sim_t.masked_fill(eye, -2.0).argmax(dim=1)
    out["nn_agreement"] = float((nn_s == nn_t).double().mean())
    if s.shape[-1] == t.shape[-1]:
        out["embedding_cosine"] = float((s * t).sum(-1).mean())
    return out


def _lm_positions(model: Any, batch: dict[str, Any], device: Any) -> tuple[Any, Any]:
    """Next-token logits at real positions [n, V] and their targets [n] (position t predicts token t+1)."""
    logits = _token_logits(model, batch, device)
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device).bool()
    valid = mask[:, 1:] & mask[:, :-1]
    return logits[:, :-1][valid], ids[:, 1:][valid]


def heldout_lm_reference(
    teacher: Any, texts: list[str], tokenizer: Any, *, max_length: int, batch_size: int = 16
) -> list[dict[str, Any]]:
    """What the causal-LM measures need of the teacher, per batch: its NLL sum, argmax and top-k ids."""
    import torch.nn.functional as F

    device = next(teacher.parameters()).device
    ref = []
    for _, batch in _text_batches(texts, tokenizer, max_length, batch_size):
        lg, y = _lm_positions(teacher, batch, device)
        ref.append(
            {
                "nll": float(F.cross_entropy(lg, y, reduction="sum")),
                "top1": lg.argmax(-1).cpu(),
                "topk": lg.topk(min(HELDOUT_TOPK, lg.shape[-1]), dim=-1).indices.cpu(),
            }
        )
    return ref


def heldout_lm(
    model: Any,
    texts: list[str],
    tokenizer: Any,
    *,
    max_length: int,
    reference: list[dict[str, Any]] | None = None,
    batch_size: int = 16,
) -> dict[str, float]:
    """Held-out ``perplexity`` of ``model`` and, with the teacher's ``reference``, ``teacher_perplexity``,
    ``top1_agreement`` (same next-token argmax) and ``top5_overlap`` (the share of the teacher's top-5 next tokens
    that are also in the model's top 5)."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = t_nll = agree = overlap = 0.0
    n = 0
    for b, (_, batch) in enumerate(_text_batches(texts, tokenizer, max_length, batch_size)):
        lg, y = _lm_positions(model, batch, device)
        nll += float(F.cross_entropy(lg, y, reduction="sum"))
        n += y.numel()
        if reference is not None:
            ref = reference[b]
            t_nll += ref["nll"]
            agree += float((lg.argmax(-1).cpu() == ref["top1"]).sum())
            k = ref["topk"].shape[-1]
            mine = lg.topk(k, dim=-1).indices.cpu()
            overlap += float((mine.unsqueeze(-1) == ref["topk"].unsqueeze(-2)).any(-1).sum()) / k
    if was_training:
        model.train()
    if n == 0:
        return {}
    out = {"perplexity": math.exp(min(nll / n, 50.0)), "tokens": float(n)}
    if reference is not None:
        out["teacher_perplexity"] = math.exp(min(t_nll / n, 50.0))
        out["top1_agreement"] = agree / n
        out[f"top{HELDOUT_TOPK}_overlap"] = overlap / n
    return out
