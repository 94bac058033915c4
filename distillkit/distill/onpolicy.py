"""On-policy distillation (``--mode on-policy``): generalized KD (GKD, Agarwal et al. 2024; DistillSpec).

Logit distillation on fixed data only teaches the student on prefixes it would never write itself, and lets it
exploit its teacher there ("On Teacher Hacking in Language Model Distillation", 2025). GKD mixes in the
student's own text: for every micro-batch, with probability ``--student-data-fraction`` the fixed batch
``[B, L]`` is replaced by

1. the prompt: its first ``P = --prompt-length`` tokens (default ``L // 2``),
2. ``N = --max-new-tokens`` tokens sampled from the current student at ``--gen-temperature`` (full softmax, no
   top-k/top-p; ``generate`` with the KV cache, in eval mode and without gradients),

and the teacher scores the new sequence ``[B, P + N]`` token by token with the configured divergence(s)
(any registered logit loss: ``forward_kl``, ``reverse_kl``, ``jsd``, ...). Only the generated tokens count:
the loss mask ``kd_mask`` selects the positions ``P - 1 .. P + N - 2`` whose logits predict them (up to and
including a generated end-of-sequence token; what follows it is padding). Gradients flow through the
student's scoring forward pass, not through the sampling, as in GKD.

The coin and the sampling are seeded by ``(seed, step, micro-batch)`` inside a forked RNG, so runs are
reproducible, ``--resume`` redoes the same generations and the training RNG is untouched.
"""

from __future__ import annotations

from typing import Any

from distillkit.distill.feed import OfflineFeed


def mix_seed(seed: int, step: int, micro: int) -> int:
    """The sampling seed of one (step, micro-batch) of a run seeded ``seed``: what on-policy and sequence modes use."""
    return (seed * 1_000_003 + step * 9_973 + micro) % (2**63 - 1)


def generate_continuations(
    model: Any,
    prompt: Any,
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    pad_token_id: int,
    eos_token_id: int | None,
) -> tuple[Any, Any]:
    """Sample ``max_new_tokens`` after ``prompt`` [B, P] with the KV cache.

    Returns (sequences [B, P + N], valid [B, N] bool: generated tokens up to and including the first EOS).
    """
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[prompt.device] if prompt.device.type == "cuda" else []):
            torch.manual_seed(seed)
            with torch.no_grad():
                seq = model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    do_sample=True,
                    temperature=temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=0,
                    use_cache=True,
                    pad_token_id=pad_token_id,
                    eos_token_id=eos_token_id,
                )
    finally:
        model.train(was_training)
    p = prompt.shape[1]
    new = seq[:, p:]
    if new.shape[1] < max_new_tokens:  # every row ended early: pad to the fixed width
        fill = new.new_full((new.shape[0], max_new_tokens - new.shape[1]), pad_token_id)
        new = torch.cat([new, fill], dim=1)
        seq = torch.cat([prompt, new], dim=1)
    valid = torch.ones_like(new, dtype=torch.bool)
    if eos_token_id is not None:
        is_eos = new == eos_token_id
        # positions strictly after the first EOS are padding
        after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        valid = ~after
    return seq, valid


def student_batch(prompt_batch: dict[str, Any], seq: Any, valid: Any) -> dict[str, Any]:
    """The training batch for generated sequences: model inputs plus ``kd_mask`` on the generated targets.

    ``seq`` [B, P + N], ``valid`` [B, N]; ``kd_mask`` [B, P + N] is 1 at positions ``P - 1 + j`` for valid ``j``
    (the logits at position t predict token t + 1).
    """
    import torch

    b, total = seq.shape
    n = valid.shape[1]
    p = total - n
    attention = torch.ones_like(seq)
    attention[:, p:] = valid.long()
    kd_mask = torch.zeros_like(seq)
    kd_mask[:, p - 1 : p - 1 + n] = valid.long()
    return {"input_ids": seq, "attention_mask": attention, "kd_mask": kd_mask}


class OnPolicyFeed(OfflineFeed):
    """GKD mixing: fixed batches, or (with probability ``student_data_fraction``) the student's generations."""

    def __init__(self, cfg: Any, teacher: Any, task: str, device: Any, processor: Any, module: Any):
        super().__init__(teacher, task, device)
        self.cfg, self.module = cfg, module
        tok = getattr(processor, "tokenizer", processor)
        self.eos = getattr(tok, "eos_token_id", None)
        pad = getattr(tok, "pad_token_id", None)
        self.pad = pad if pad is not None else (self.eos if self.eos is not None else 0)
        self.batches_total = 0
        self.batches_generated = 0
        self.tokens_generated = 0

    def _student(self) -> Any:
        inner = getattr(self.module, "module", self.module)  # DDP wraps the DistillModule
        return inner.student

    def next_batch(self, batches: Any, step: int, micro: int) -> dict[str, Any]:
        import torch

        batch = super().next_batch(batches, step, micro)
        self.batches_total += 1
        seed = mix_seed(self.cfg.optim.seed, step, micro)
        coin = torch.rand((), generator=torch.Generator().manual_seed(seed)).item()
        if coin >= self.cfg.llm.student_data_fraction:
            return batch
        prompt = batch["input_ids"][:, : self.cfg.prompt_tokens()]
        seq, valid = generate_continuations(
            self._student(),
            prompt,
            max_new_tokens=self.cfg.llm.max_new_tokens,
            temperature=self.cfg.llm.gen_temperature,
            seed=seed,
            pad_token_id=self.pad,
            eos_token_id=self.eos,
        )
        self.batches_generated += 1
        self.tokens_generated += int(valid.sum())
        return student_batch(batch, seq, valid)

    def metrics(self) -> dict[str, Any]:
        return {
            "onpolicy_batches": self.batches_generated,
            "onpolicy_fraction_observed": self.batches_generated / max(self.batches_total, 1),
            "onpolicy_generated_tokens": self.tokens_generated,
        }
