"""``distill --fused-loss``: the causal-LM distillation loss from hidden states, without logits.

For a causal LM the engine normally runs both models to their ``[B, T, V]`` logits and compares
them. With the fused loss it stops both models at their last hidden state (the decoder's output,
after its final norm) and hands those, with each model's ``lm_head`` weight, to
:func:`distillkit.kernels.fused_kd_loss`, which computes the same divergence (and the hard-label
cross-entropy for ``--alpha``) chunk by chunk without ever holding the logits.

It applies when every loss is one logit divergence the kernel has (forward_kl, reverse_kl, jsd,
tvd, skew_kl, skew_reverse_kl, with any weight), the task is causal-lm with the plain offline
teacher, and both models' logits are exactly ``lm_head(last hidden state)`` (a linear head, no
logit soft-capping or scaling). ``auto`` uses it then, ``on`` refuses to run otherwise and says
what blocks it, ``off`` never uses it. The engine's side is three small hooks:
:func:`attach_fused_loss` after building the module, ``DistillModule.forward`` calling the attached
:class:`FusedLoss`, and :func:`distillkit.distill.features.last_hidden_features` answering ``student_features`` for the teacher.
"""

from __future__ import annotations

from typing import Any

from distillkit.distill.features import FUSED_NEED, decoder_and_head, last_hidden_features, loss_mask
from distillkit.errors import ConfigError

FUSED_LOSS_CHOICES = ("auto", "on", "off")
FUSED_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl")
# config keys of architectures whose logits are not a plain lm_head(hidden): soft-capping (Gemma 2/3),
# a logit scale (Cohere), a logit divisor (Granite)
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def fused_blocker(cfg: Any, task: str, losses: list[tuple[str, float, Any]], student: Any, teacher: Any) -> str | None:
    """Why the fused loss cannot replace the unfused one for this run, or None when it can."""
    if task != "causal-lm":
        return f"it is for causal LMs and the task is {task}"
    if cfg.loss.alpha >= 1:
        return "--alpha 1 trains on the hard labels alone: there is no distillation loss to fuse"
    for flag, on in (
        (f"--mode {cfg.llm.mode}", cfg.llm.mode != "offline"),
        ("--teacher-cache", bool(cfg.llm.teacher_cache)),
        ("--cross-tokenizer", bool(cfg.llm.cross_tokenizer)),
    ):
        if on:
            return f"it needs the live teacher on fixed data, and {flag} is set"
    if len(losses) != 1:
        return f"it computes one divergence and the run has {len(losses)} losses ({', '.join(n for n, _, _ in losses)})"
    name = losses[0][0]
    if name not in FUSED_DIVERGENCES:
        return f"loss {name} is not one of the fused divergences ({', '.join(FUSED_DIVERGENCES)})"
    for role, model in (("student", student), ("teacher", teacher)):
        try:
            _, head = decoder_and_head(model)
        except ConfigError as e:
            return f"the {role}: {e.message}"
        for key in _LOGIT_POSTPROCESSING:
            value = getattr(model.config, key, None)
            if value not in (None, 0, 0.0, 1, 1.0):
                return f"the {role}'s logits are post-processed ({key}={value}), not just its lm_head"
        if role == "student":
            vocab = head.out_features
        elif head.out_features != vocab:
            return f"the student's vocabulary ({vocab}) and the teacher's ({head.out_features}) differ"
    return None


class FusedLoss:
    """The distillation loss of a :class:`DistillModule` in fused form (set as ``module.fused``).

    ``__call__(student, batch, teacher_features, progress)`` returns ``(total, parts)`` exactly as
    ``DistillModule.forward`` does: ``parts`` holds the divergence under the loss name and, with
    ``alpha > 0``, the hard-label loss under ``"hard"``.
    """

    def __init__(self, name: str, weight: float, cfg: Any, teacher: Any):
        self.name, self.weight = name, weight
        self.alpha = float(cfg.loss.alpha)
        self.temperature = float(cfg.loss.temperature)
        self.beta = float(cfg.loss.jsd_beta)
        self.skew = float(cfg.loss.skew_lambda)
        _, self.teacher_head = decoder_and_head(teacher)

    def __call__(self, student: Any, batch: dict[str, Any], teacher_features: Any, progress: float) -> Any:
        import torch

        from distillkit.kernels.kd_loss.fused import fused_kd_loss_terms

        hidden = last_hidden_features(student, batch).last_hidden  # [B, T, Hs]
        _, head = decoder_and_head(student)
        batch_size, length, _ = hidden.shape
        mask = loss_mask(batch, "causal-lm")
        mask = torch.ones(batch_size, length, dtype=torch.bool, device=hidden.device) if mask is None else mask.bool()
        labels = None
        if self.alpha > 0 and "labels" in batch:
            # the model's own loss: position t predicts token t + 1, the last position predicts nothing
            labels = torch.full_like(batch["labels"], -100)
            labels[:, :-1] = batch["labels"][:, 1:]
            labels = labels.reshape(-1)
        teacher_hidden = teacher_features.last_hidden
        total, kd, ce = fused_kd_loss_terms(
            hidden.reshape(batch_size * length, -1),
            head.weight,
            teacher_hidden.reshape(batch_size * length, -1),
            self.teacher_head.weight,
            labels,
            student_bias=head.bias,
            teacher_bias=self.teacher_head.bias,
            divergence=self.name,
            beta=self.beta,
            skew=self.skew,
            temperature=self.temperature,
            kd_scale=(1.0 - self.alpha) * self.weight,
            ce_scale=self.alpha if labels is not None else 0.0,
            mask=mask.reshape(-1),
            # Triton on GPUs; on CPU torch math per chunk (never the slow Triton interpreter in training)
            backend="auto" if hidden.is_cuda else "torch",
        )
        parts = {self.name: kd}
        if labels is not None:
            parts["hard"] = ce
        return total, parts


def resolve_fused_loss(
    cfg: Any, task: str, losses: list[tuple[str, float, Any]], student: Any, teacher: Any
) -> FusedLoss | None:
    """The fused loss for this run per ``cfg.loss.fused_loss`` (None: the unfused path); ConfigError for ``on``."""
    choice = cfg.loss.fused_loss
    if choice not in FUSED_LOSS_CHOICES:
        raise ConfigError(f"--fused-loss must be one of {', '.join(FUSED_LOSS_CHOICES)} (got {choice!r})")
    if choice == "off":
        return None
    reason = fused_blocker(cfg, task, losses, student, teacher)
    if reason is not None:
        if choice == "on":
            raise ConfigError(
                f"--fused-loss on cannot be used: {reason}",
                hint="use --fused-loss auto (falls back to the unfused loss) or off, or a single logit "
                f"divergence loss ({', '.join(FUSED_DIVERGENCES)}) on a causal LM",
            )
        return None
    name, weight, _ = losses[0]
    return FusedLoss(name, weight, cfg, teacher)


def attach_fused_loss(module: Any, cfg: Any, task: str, teacher: Any) -> str:
    """Switch a DistillModule to the fused loss when ``cfg.loss.fused_loss`` allows; returns "on" or "off" for the manifest."""
    fused = resolve_fused_loss(cfg, task, module._losses, module.student, teacher)
    module.fused = fused
    if fused is None:
        return "off"
    # both models then produce only their last hidden state (see student_features)
    module.needs = {FUSED_NEED}
    return "on"
