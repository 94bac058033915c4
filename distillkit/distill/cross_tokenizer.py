"""Cross-tokenizer distillation (``--cross-tokenizer uld``): a teacher and a student with different vocabularies.

Method: Universal Logit Distillation (ULD; Boizard et al., 2024, "Towards Cross-Tokenizer Distillation: the
Universal Logit Distillation Loss for LLMs"). What is matched, exactly:

1. **Text, re-tokenised.** The data is tokenised with the *student's* tokenizer (the student must be an existing
   model directory with its own tokenizer; a spec student derived from the teacher shares its vocabulary).
   Each student row ``[T]`` is decoded to text and encoded again with the *teacher's* tokenizer (no added
   special tokens), truncated / padded to ``T``.
2. **Positions, by index.** Student position ``i`` is paired with teacher position ``i``, for ``i`` below both
   sequences' lengths (as in ULD, which aligns by position after truncating to the shorter one). Words that
   split into a different number of tokens shift the pairing; ULD accepts this approximation, and so do we.
3. **Distributions, up to a relabelling of tokens.** With no shared token ids, ULD compares the *sorted*
   probability vectors: p_S and p_T at ``--temperature`` are each sorted in decreasing order, the shorter one
   is zero-padded to ``max(V_S, V_T)``, and the loss per position is ``sum_r |p_S(r) - p_T(r)|`` (the closed
   form of the Wasserstein-1 distance between the two distributions when every token-to-token move costs the
   same). It is averaged over paired positions and multiplied by ``temperature**2`` like the other divergences.

ULD trains with the student's own next-token cross-entropy plus the ULD term; here that is ``--alpha``:
``alpha * CE + (1 - alpha) * ULD`` (default alpha 0: ULD only). Teacher agreement metrics are skipped in
evaluation, since token ids are not comparable.
"""

from __future__ import annotations

from typing import Any

from distillkit.distill.feed import OfflineFeed
from distillkit.distill.losses import Loss
from distillkit.errors import ConfigError, ModelError


def uld_loss(
    student_logits: Any, teacher_logits: Any, mask: Any = None, temperature: float = 1.0, reduction: str = "mean"
) -> Any:
    """ULD: L1 distance between sorted softened distributions, times ``temperature**2``.

    ``student_logits`` [..., V_S], ``teacher_logits`` [..., V_T] (vocabularies may differ), ``mask`` [...] (bool or
    0/1, 0 excludes a position). ``reduction``: "mean" over counted positions, "sum", or "none" ([...], 0 where
    masked).
    """
    import torch

    from distillkit.distill.functional import as_bool_mask, reduce_masked, upcast, zero_padding

    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must share their leading shape"
        )
    mask = as_bool_mask(mask, student_logits.shape[:-1], student_logits.device)
    s = zero_padding(upcast(student_logits), mask)
    t = zero_padding(upcast(teacher_logits.detach()).to(s.dtype), mask)
    p_s = torch.softmax(s / temperature, dim=-1).sort(dim=-1, descending=True).values
    p_t = torch.softmax(t / temperature, dim=-1).sort(dim=-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = torch.nn.functional.pad(p_s, (0, width - p_s.shape[-1]))
    p_t = torch.nn.functional.pad(p_t, (0, width - p_t.shape[-1]))
    per_position = (p_s - p_t).abs().sum(-1)
    return reduce_masked(per_position, mask, reduction) * temperature**2


class ULD(Loss):
    """Universal Logit Distillation between logits over different vocabularies (see the module docstring)."""

    name = "uld"
    needs = frozenset({"logits"})

    def __call__(self, s: Any, t: Any, mask: Any, *, progress: float) -> Any:
        if s.logits is None or t.logits is None:
            raise ValueError("the uld loss needs student and teacher logits")
        return uld_loss(s.logits, t.logits, mask, self.ctx.temperature)


def build_cross_losses(cfg: Any, task: str) -> list[tuple[str, float, Any]]:
    from distillkit.distill.losses import LossContext

    if cfg.loss.losses:
        raise ConfigError(
            f"--cross-tokenizer {cfg.llm.cross_tokenizer} has its own loss; --loss {', '.join(cfg.loss.losses)} compares "
            "token ids, which differ between the two vocabularies",
            hint="drop --loss (use --alpha to mix in the student's cross-entropy)",
        )
    return [("uld", 1.0, ULD(LossContext(temperature=cfg.loss.temperature)))]


def student_tokenizer(cfg: Any, student_src: Any, task: str) -> Any:
    """The student's own tokenizer, which cross-tokenizer runs tokenise the data with."""
    from distillkit.models.load import load_processor

    if student_src is None:
        raise ConfigError(
            "--cross-tokenizer needs a student with its own tokenizer, but a spec student shares the teacher's",
            hint="pass --student DIR, a model directory saved with its tokenizer",
        )
    tok = load_processor(student_src.path, task, trust_remote_code=cfg.models.trust_remote_code)
    if tok is None:
        raise ModelError(
            f"the student {student_src.path} has no tokenizer saved with it",
            hint="save one with the model (tokenizer.save_pretrained(dir))",
        )
    return tok


def retokenize(student_ids: Any, attention_mask: Any, student_tok: Any, teacher_tok: Any) -> tuple[Any, Any]:
    """Student rows [B, T] -> teacher ids [B, T] and their 0/1 mask [B, T]: decode, re-encode, cut or pad to T."""
    import torch

    b, length = student_ids.shape
    ids = torch.full((b, length), teacher_tok.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    # specials other than <unk> are markup of the student's tokenizer, not text; an unknown word stays one
    # word (the teacher's unknown token) so that it keeps its place in the position-by-index pairing
    drop = set(student_tok.all_special_ids) - {student_tok.unk_token_id}
    s_unk, t_unk = student_tok.unk_token, teacher_tok.unk_token
    for r in range(b):
        row = [i for i in student_ids[r][attention_mask[r].bool()].tolist() if i not in drop]
        text = student_tok.decode(row, skip_special_tokens=False)
        if s_unk and t_unk and s_unk != t_unk:
            text = text.replace(s_unk, t_unk)
        enc = teacher_tok(text, add_special_tokens=False)["input_ids"][:length]
        ids[r, : len(enc)] = torch.tensor(enc, dtype=torch.long)
        mask[r, : len(enc)] = 1
    return ids.to(student_ids.device), mask.to(student_ids.device)


class CrossTokenizerFeed(OfflineFeed):
    """Fixed data in the student's tokens; the teacher reads the same text in its own tokens."""

    def __init__(self, cfg: Any, teacher: Any, task: str, device: Any, processor: Any):
        super().__init__(teacher, task, device)
        if teacher.processor is None:
            raise ModelError(
                f"the teacher {teacher.path} has no tokenizer saved with it",
                hint="save one with the model (tokenizer.save_pretrained(dir))",
            )
        self.student_tok, self.teacher_tok = processor, teacher.processor
        self.paired, self.positions = 0, 0

    def teacher_features(self, batch: dict[str, Any], needs: set[str], blocks: list[int], pooling: str) -> Any:
        import torch

        from distillkit.distill.losses import Features

        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        ids, t_mask = retokenize(batch["input_ids"], mask, self.student_tok, self.teacher_tok)
        logits = self.teacher.model(input_ids=ids, attention_mask=t_mask).logits
        paired = mask.long() * t_mask
        batch["kd_mask"] = paired  # the loss counts positions both sides have
        self.paired += int(paired.sum())
        self.positions += int(mask.sum())
        return Features(logits=logits)

    def eval_teacher(self) -> Any:
        return None

    def metrics(self) -> dict[str, Any]:
        return {"cross_tokenizer_paired_fraction": self.paired / max(self.positions, 1)}
