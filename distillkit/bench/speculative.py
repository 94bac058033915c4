"""A student as a draft model for speculative decoding (``distillkit bench STUDENT --speculative TEACHER``).

Measured with transformers' assisted generation (``teacher.generate(..., assistant_model=student)``), greedy,
batch 1 (what assisted generation supports), ``--decode-tokens`` new tokens per prompt:

- ``acceptance_rate``: draft tokens the teacher accepted / draft tokens proposed, summed over every
  verification round of every prompt (read from the candidate generator's ``get_candidates`` and
  ``update_candidate_strategy`` calls; transformers adapts the draft length between rounds, and what it proposed
  is what is counted);
- ``tokens_per_teacher_pass``: new tokens / teacher verification passes (1.0 means no gain);
- ``speedup``: median wall time of plain greedy ``teacher.generate`` / median time with the draft, over
  ``--repeats`` runs after ``--warmup``;
- ``outputs_match``: whether greedy assisted decoding returned exactly the teacher's tokens (it must: the
  method is lossless; a mismatch points at numerics, e.g. low precision).

Prompts are the first ``--seq`` tokens of the ``--data`` blocks (at most 8 prompts), or seeded random token ids
without ``--data`` (acceptance on random ids says little about real text: pass ``--data``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

from distillkit.errors import ModelError
from distillkit.progress import Progress

MAX_PROMPTS = 8


@contextlib.contextmanager
def count_drafts() -> Any:
    """Count proposed and accepted draft tokens of every assisted ``generate`` inside the block.

    Yields a dict with ``proposed``, ``accepted`` and ``rounds`` (teacher verification passes).
    """
    from transformers.generation import candidate_generator as cg

    counts = {"proposed": 0, "accepted": 0, "rounds": 0}
    cls = cg.AssistedCandidateGenerator
    get_candidates, update = cls.get_candidates, cls.update_candidate_strategy

    def counted_get(self: Any, input_ids: Any, *args: Any, **kwargs: Any) -> Any:
        out = get_candidates(self, input_ids, *args, **kwargs)
        counts["proposed"] += int(out[0].shape[1] - input_ids.shape[1])
        counts["rounds"] += 1
        return out

    def counted_update(self: Any, input_ids: Any, scores: Any, num_matches: int) -> Any:
        counts["accepted"] += int(num_matches)
        return update(self, input_ids, scores, num_matches)

    cls.get_candidates, cls.update_candidate_strategy = counted_get, counted_update
    try:
        yield counts
    finally:
        cls.get_candidates, cls.update_candidate_strategy = get_candidates, update


def _prompts(cfg: Any, processor: Any, vocab: int, device: Any) -> list[Any]:
    import torch

    if cfg.data:
        from distillkit.bench.engine import quality_batches

        batches, _ = quality_batches(cfg, processor, "causal-lm")
        rows = [row for b in batches for row in b["input_ids"]][:MAX_PROMPTS]
        return [row[None].to(device) for row in rows]
    g = torch.Generator().manual_seed(cfg.seed)
    return [torch.randint(3, vocab, (1, min(cfg.seq, 32)), generator=g).to(device) for _ in range(4)]


def _median_s(fn: Any, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_speculative(cfg: Any, draft: str, teacher: str) -> dict[str, Any]:
    """Acceptance rate and speedup of ``draft`` (a causal LM source) drafting for ``teacher`` (see module doc)."""
    import torch

    from distillkit.manifest import read_source
    from distillkit.models import load_model
    from distillkit.models.arch import vocab_size
    from distillkit.models.load import resolve_device

    device = resolve_device(cfg.device)
    dtype = cfg.dtype if cfg.dtype != "auto" else "float32"
    kw = dict(dtype=dtype, device=str(device), allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code)
    t_src, d_src = read_source(teacher), read_source(draft)
    big = load_model(t_src, task="causal-lm", **kw)
    small = load_model(d_src, task="causal-lm", **kw)
    if vocab_size(big.config) != vocab_size(small.config):
        raise ModelError(
            f"the draft's vocabulary ({vocab_size(small.config)}) differs from the teacher's "
            f"({vocab_size(big.config)})",
            hint="--speculative measures drafts that share the teacher's tokenizer",
        )
    big.model.eval()
    small.model.eval()
    prompts = _prompts(cfg, big.processor, vocab_size(big.config), device)
    n = cfg.decode_tokens
    gen = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=big.config.eos_token_id)

    # every generate call shows on stderr (a large teacher makes this tens of minutes); updating the progress
    # costs microseconds against a generate call of milliseconds or more, so it stays inside the timed span
    passes = 2 * (1 + cfg.warmup + cfg.repeats)
    bar = Progress("speculative", passes * len(prompts), unit="generate")

    def plain() -> list[Any]:
        out = []
        with torch.no_grad():
            for p in prompts:
                out.append(big.model.generate(p, attention_mask=torch.ones_like(p), **gen))
                bar.advance()
        return out

    def assisted() -> list[Any]:
        out = []
        with torch.no_grad():
            for p in prompts:
                out.append(big.model.generate(p, attention_mask=torch.ones_like(p), assistant_model=small.model, **gen))
                bar.advance()
        return out

    with bar:
        reference = plain()
        with count_drafts() as counts:
            drafted = assisted()
        match = all(torch.equal(a, b) for a, b in zip(reference, drafted, strict=True))
        new_tokens = sum(int(o.shape[1] - p.shape[1]) for o, p in zip(drafted, prompts, strict=True))
        t_plain = _median_s(plain, cfg.warmup, cfg.repeats)
        t_assisted = _median_s(assisted, cfg.warmup, cfg.repeats)
    return {
        "teacher": t_src.path,
        "draft": d_src.path,
        "prompts": len(prompts),
        "prompt_tokens": int(prompts[0].shape[1]),
        "new_tokens_per_prompt": n,
        "proposed": counts["proposed"],
        "accepted": counts["accepted"],
        "acceptance_rate": counts["accepted"] / max(counts["proposed"], 1),
        "teacher_passes": counts["rounds"],
        "tokens_per_teacher_pass": new_tokens / max(counts["rounds"], 1),
        "outputs_match": match,
        "teacher_s": t_plain,
        "assisted_s": t_assisted,
        "speedup": t_plain / max(t_assisted, 1e-12),
        "device": str(device),
        "dtype": dtype,
    }
