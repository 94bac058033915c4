"""``distill --eval-data``: quality on held-out text, measured on the artifact as saved and reloaded.

For an embedding model (feature-extraction): ``heldout_spearman`` (Spearman correlation of the student's and the
teacher's pairwise cosine similarities over the whole set), ``heldout_nn_agreement`` (same nearest neighbour) and
``heldout_embedding_cosine``. For a causal LM: ``heldout_perplexity`` beside ``heldout_teacher_perplexity``,
``heldout_top1_agreement`` and ``heldout_top5_overlap``. The untrained student is measured the same way before
training (``initial_student_heldout_*``), so the manifest shows what training bought.

The default set is ``builtin:quotes`` (short quotations and jokes: another domain than the default training corpus
``builtin:english``); ``none`` turns it off. Other tasks have no held-out text measure and skip it.
"""

from __future__ import annotations

from typing import Any

from distillkit.data.corpus import BUILTIN_PREFIX, DEFAULT_HELDOUT
from distillkit.data.heldout import HeldOut, is_none, read_heldout
from distillkit.errors import ConfigError

HELDOUT_TASKS = ("feature-extraction", "causal-lm")
DEFAULT_EVAL_DATA = BUILTIN_PREFIX + DEFAULT_HELDOUT


class HeldOutEval:
    """The held-out texts and the teacher's side of every measure, computed once."""

    def __init__(
        self,
        data: HeldOut,
        task: str,
        teacher: Any,
        tokenizer: Any,
        *,
        pooling: str,
        max_length: int,
        teacher_comparable: bool = True,
    ):
        from distillkit.evaluate import heldout_embeddings, heldout_lm_reference

        self.data, self.task, self.tokenizer = data, task, tokenizer
        self.pooling, self.max_length = pooling, max_length
        self.reference: Any = None
        if teacher_comparable:
            if task == "feature-extraction":
                self.reference = heldout_embeddings(
                    teacher, data.texts, tokenizer, pooling=pooling, max_length=max_length
                )
            else:
                self.reference = heldout_lm_reference(teacher, data.texts, tokenizer, max_length=max_length)

    def measure(self, model: Any) -> dict[str, float]:
        """``heldout_*`` metrics of ``model``."""
        from distillkit.evaluate import embedding_geometry, heldout_embeddings, heldout_lm

        if self.task == "feature-extraction":
            if self.reference is None:
                return {}
            emb = heldout_embeddings(
                model, self.data.texts, self.tokenizer, pooling=self.pooling, max_length=self.max_length
            )
            m = embedding_geometry(emb, self.reference)
        else:
            m = heldout_lm(model, self.data.texts, self.tokenizer, max_length=self.max_length, reference=self.reference)
            m.pop("tokens", None)
        return {f"heldout_{k}": v for k, v in m.items()}

    def info(self) -> dict[str, Any]:
        return {**self.data.info(), "max_length": self.max_length, "measured_on": "the saved artifact, reloaded"}


def resolve_eval_data(spec: str | None, task: str) -> str | None:
    """The held-out set ``distill`` measures on: ``spec``, else the default for the task; None for no measure."""
    if spec is not None and is_none(spec):
        return None
    if task not in HELDOUT_TASKS:
        if spec is not None:
            raise ConfigError(
                f"--eval-data measures embedding models and causal LMs, but the teacher is a {task} model",
                hint="drop --eval-data (held-out quality of this task comes from --eval-split)",
            )
        return None
    return spec or DEFAULT_EVAL_DATA


def build_heldout_eval(spec: str | None, task: str, teacher: Any, tokenizer: Any, **kwargs: Any) -> HeldOutEval | None:
    """The :class:`HeldOutEval` for ``--eval-data spec`` (``kwargs`` as for it); None when there is nothing to measure."""
    name = resolve_eval_data(spec, task)
    return None if name is None else HeldOutEval(read_heldout(name), task, teacher, tokenizer, **kwargs)
