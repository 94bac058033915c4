"""Zero-cost scores of a candidate student: DisWOT and the baselines it is compared against.

Every score is a function ``score(ctx, model) -> {"score": float, <term>: float, ...}``, registered in
:data:`distillkit.registry.SCORES`; higher is better for every one. ``ctx`` is a :class:`ScoreContext` holding
the teacher, one calibration batch and what the scores cache about the teacher. No candidate is trained.

**The head view.** DisWOT and the gradient baselines need a classifier: the output layer's input features
``X [N, H]``, its logits ``Z [N, C]`` and targets ``y [N]``, over the ``N`` positions that count:

- causal LM: the LM head at every real position but the last, predicting the next token;
- masked LM: the LM head at the masked positions (labels != -100), predicting the original tokens;
- sequence / image classification: the classifier (``classifier`` or ``score``) per example, predicting the
  batch labels or, without labels, the teacher's predictions;
- feature extraction (sentence encoders): these have no head, so the word-embedding matrix serves as a tied LM
  head and each real token predicts itself (``Z = X E^T``, over up to 256 evenly strided real tokens); for DisWOT
  the logits are taken over a vocabulary sample (every target token plus seeded random rows, 4,096 in all) with
  the softmax normaliser estimated from it (:func:`vocabulary_sample`); ViT backbones have none and get no
  semantic term.

**DisWOT** (Dong et al., CVPR 2023), adapted to transformers:

- *semantic*: the gradient of the cross-entropy with respect to the head's weight rows of the batch's classes
  (for LMs the up to 256 most frequent target tokens of the batch), ``G = (softmax(Z) - onehot(y))[:, U]^T X / N``
  ``[|U|, H]``, computed in closed form (no backward pass). Its class-by-class correlation ``G G^T`` ``[|U|, |U|]``
  does not depend on the width ``H``, so teacher and student compare directly;
- *relation*: the Gram matrix of final hidden states, per example (pooled) for encoders and classifiers, per
  token (up to 256, evenly strided) for LMs; or linear CKA (``relation="cka"``).

Matrices are row-L2-normalised and compared by ``1 - ||A - B||_F / (2 sqrt(rows))``, a similarity in [0, 1]
that is 1 only for equal matrices. The score is semantic + relation (at most 2, reached by the teacher itself).

Baselines: ``params`` (parameter count), ``flops`` (matmul FLOPs of one forward on the batch, counted by
``torch.utils.flop_counter``), ``naswot`` (Mellor et al. 2021: ``log det(K + I)`` of the Hamming-similarity
kernel of the MLP activation patterns per example), ``gradnorm`` (sum of per-tensor gradient norms of the
head's cross-entropy) and ``synflow`` (Tanaka et al. 2020: ``sum |theta * dR/dtheta|`` with every weight made
positive and ``R`` the sum of the logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distillkit.registry import SCORES

IGNORE_INDEX = -100
MAX_CLASSES = 256
MAX_TOKENS = 256
VOCAB_SAMPLE = 4096


@dataclass
class HeadView:
    """What a model's output layer saw on the batch (see the module docstring). ``x``/``z`` keep their graph."""

    x: Any  # [N, H] head inputs, or None without a head
    z: Any  # [N, C] logits, or None; [N, |S|] over the vocabulary sample ``columns`` when that is set
    y: Any  # [N] targets, or None
    relation: Any  # [M, H] final hidden states for the relation term
    columns: Any = None  # [|S|] sorted vocabulary ids of z's columns (a sample), or None: z covers every class
    column_log_weights: Any = None  # [|S|] log of how many vocabulary rows each sampled column stands for


@dataclass
class ScoreContext:
    """The teacher, one calibration batch (on the scoring device) and per-teacher caches."""

    teacher: Any
    batch: dict[str, Any]
    task: str
    pooling: str = "mean"
    relation: str = "gram"
    cache: dict[str, Any] = field(default_factory=dict)

    def teacher_view(self) -> HeadView:
        if "teacher_view" not in self.cache:
            import torch

            with torch.no_grad():
                self.cache["teacher_view"] = head_view(self.teacher, self, targets=None, sample_vocabulary=True)
        return self.cache["teacher_view"]

    def targets(self) -> Any:
        return self.teacher_view().y

    def classes(self) -> Any:
        """The head rows the semantic term compares: every class, or the most frequent target tokens."""
        if "classes" not in self.cache:
            import torch

            view = self.teacher_view()
            if view.z is None:
                self.cache["classes"] = None
            elif self.task in ("sequence-classification", "image-classification"):
                self.cache["classes"] = torch.arange(min(view.z.shape[-1], 4 * MAX_CLASSES), device=view.z.device)
            else:
                ids, counts = torch.unique(view.y, return_counts=True)
                order = torch.sort(counts, descending=True, stable=True).indices[:MAX_CLASSES]
                self.cache["classes"] = torch.sort(ids[order]).values
        return self.cache["classes"]


# --------------------------------------------------------------------------------------------------------------
# What the head sees


def _head_module(model: Any, task: str) -> Any:
    from torch import nn

    if task in ("causal-lm", "masked-lm"):
        return model.get_output_embeddings()
    if task in ("sequence-classification", "image-classification"):
        for name in ("classifier", "score"):
            module = getattr(model, name, None)
            if module is not None:
                if hasattr(module, "out_proj"):  # RoBERTa-style heads end in out_proj
                    return module.out_proj
                if isinstance(module, nn.Sequential):  # ResNet: Flatten, Linear
                    linears = [m for m in module if isinstance(m, nn.Linear)]
                    return linears[-1] if linears else None
                return module
    return None


def _token_rows(ctx: ScoreContext, hidden: Any) -> Any:
    """Up to MAX_TOKENS real token states ``[M, H]``, evenly strided, from ``[B, T, H]``."""
    import torch

    mask = ctx.batch.get("attention_mask")
    flat = hidden[mask.bool()] if mask is not None else hidden.reshape(-1, hidden.shape[-1])
    if flat.shape[0] > MAX_TOKENS:
        idx = torch.linspace(0, flat.shape[0] - 1, MAX_TOKENS, device=flat.device).round().long()
        flat = flat[idx]
    return flat


def vocabulary_sample(ctx: ScoreContext, targets: Any, vocab: int) -> tuple[Any, Any]:
    """The embedding-as-head columns: every target token, plus seeded random rows up to ``VOCAB_SAMPLE`` in all.

    Returns (sorted vocabulary ids ``[|S|]``, log weights ``[|S|]``): 0 for a target token, ``log((V - |B|) / |R|)``
    for each of the ``|R|`` random rows, which stand for all ``V - |B|`` non-target rows. ``logsumexp(z_S + w)`` is
    then the log of an unbiased estimate of the softmax normaliser over all ``V`` rows. The same sample serves the
    teacher and every candidate (it depends only on the batch), and a vocabulary of at most ``VOCAB_SAMPLE`` rows is
    taken whole (exact).
    """
    import math

    import torch

    key = ("vocabulary_sample", vocab)
    if key not in ctx.cache:
        if vocab <= VOCAB_SAMPLE:
            ctx.cache[key] = (None, None)
        else:
            batch_ids = torch.unique(targets.cpu())
            order = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))
            others = order[~torch.isin(order, batch_ids)][: max(VOCAB_SAMPLE - batch_ids.numel(), 1)]
            columns, where = torch.sort(torch.cat([batch_ids, others]))
            log_w = torch.zeros(columns.numel(), dtype=torch.float64)
            log_w[where >= batch_ids.numel()] = math.log((vocab - batch_ids.numel()) / others.numel())
            ctx.cache[key] = (columns.to(targets.device), log_w.to(targets.device))
    return ctx.cache[key]


def head_view(model: Any, ctx: ScoreContext, targets: Any, sample_vocabulary: bool = False) -> HeadView:
    """Run ``model`` on the calibration batch and collect its :class:`HeadView` (``targets`` None: the model's own).

    ``sample_vocabulary``: a sentence encoder's embedding-as-head logits are taken over :func:`vocabulary_sample`
    instead of the whole vocabulary (they would cost as much as the student's forward pass).
    """
    import torch

    from distillkit.models.capture import pool
    from distillkit.models.forward import model_inputs

    batch, task = ctx.batch, ctx.task
    head = _head_module(model, task)
    seen: dict[str, Any] = {}
    handle = None
    if head is not None:

        def hook(_m: Any, inputs: Any, output: Any) -> None:
            seen["x"], seen["z"] = inputs[0], output

        handle = head.register_forward_hook(hook)
    try:
        out = model(**model_inputs(model, batch), output_hidden_states=head is None)
    finally:
        if handle is not None:
            handle.remove()
    mask = batch.get("attention_mask")
    if task in ("causal-lm", "masked-lm"):
        x, z = seen["x"], seen["z"]
        ids = batch["input_ids"]
        if task == "causal-lm":
            valid = torch.ones_like(ids[:, 1:], dtype=torch.bool)
            if mask is not None:
                valid = mask[:, 1:].bool() & mask[:, :-1].bool()
            y = ids[:, 1:][valid]
            xs, zs = x[:, :-1][valid], z[:, :-1][valid]
        else:
            labels = batch.get("labels")
            valid = labels != IGNORE_INDEX if labels is not None else mask.bool()
            y = (labels if labels is not None else ids)[valid]
            xs, zs = x[valid], z[valid]
        return HeadView(xs.float(), zs.float(), targets if targets is not None else y, _token_rows(ctx, x).float())
    if task in ("sequence-classification", "image-classification"):
        x, z = seen["x"], seen["z"]
        if x.dim() == 3:  # a decoder's score head runs on every token; the model reads the last real one
            last = (mask.sum(1) - 1).clamp(min=0) if mask is not None else torch.full_like(x[:, 0, 0], -1).long()
            rows = torch.arange(x.shape[0], device=x.device)
            x, z = x[rows, last], z[rows, last]
        y = targets
        if y is None:
            labels = batch.get("labels")
            y = labels if labels is not None else z.argmax(-1)
        return HeadView(x.float(), z.float(), y, x.float())
    # feature extraction
    hidden = out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]
    relation = pool(hidden, mask, ctx.pooling).float()
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None) if emb is not None else None
    if "input_ids" not in batch or weight is None or weight.dim() != 2:
        return HeadView(None, None, None, relation)
    valid = mask.bool() if mask is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool)
    # The tied-head logits cost as much as the student's forward pass at full vocabulary; up to MAX_TOKENS
    # evenly strided tokens (the same ones for teacher and student) estimate the gradient rows well enough.
    xs, ys = hidden[valid], batch["input_ids"][valid]
    if xs.shape[0] > MAX_TOKENS:
        idx = torch.linspace(0, xs.shape[0] - 1, MAX_TOKENS, device=xs.device).round().long()
        xs, ys = xs[idx], ys[idx]
    xs = xs.float()
    if sample_vocabulary:
        columns, log_w = vocabulary_sample(ctx, ys, weight.shape[0])
        if columns is not None:
            return HeadView(xs, xs @ weight[columns].float().T, ys, relation, columns, log_w)
    return HeadView(xs, xs @ weight.float().T, ys, relation)


# --------------------------------------------------------------------------------------------------------------
# Matrix similarities


def matrix_similarity(a: Any, b: Any) -> float:
    """``1 - ||rownorm(a) - rownorm(b)||_F / (2 sqrt(rows))`` in [0, 1]; 1 iff the row directions agree."""
    import torch.nn.functional as F

    a, b = F.normalize(a.double(), dim=-1), F.normalize(b.double(), dim=-1)
    return float(1.0 - (a - b).norm() / (2.0 * a.shape[0] ** 0.5))


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA of two feature sets ``[M, H1]`` and ``[M, H2]`` over the same rows, in [0, 1]."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (x.T @ y).norm() ** 2
    denom = (x.T @ x).norm() * (y.T @ y).norm()
    return float(cross / denom) if float(denom) > 0 else 0.0


def semantic_matrix(view: HeadView, classes: Any) -> Any:
    """Class-by-class correlation ``G G^T`` of the head-weight gradient rows ``G [|U|, H]`` (closed form)."""
    import torch

    if view.columns is None:
        # softmax(z)[:, U] without a float64 copy of all C logits: the normaliser in float32 is accurate to ~1e-7.
        lse = torch.logsumexp(view.z.float(), dim=-1, keepdim=True)
        z_u = view.z[:, classes]
    else:  # a vocabulary sample: U is among its columns, the normaliser is estimated (vocabulary_sample)
        lse = torch.logsumexp(view.z.double() + view.column_log_weights, dim=-1, keepdim=True)
        z_u = view.z[:, torch.searchsorted(view.columns, classes)]
    p = torch.exp(z_u.double() - lse.double())
    onehot = (view.y.unsqueeze(1) == classes.unsqueeze(0)).double()
    g = (p - onehot).T @ view.x.double() / view.x.shape[0]
    return g @ g.T


def relation_similarity(ctx: ScoreContext, student: HeadView, teacher: HeadView) -> float:
    if ctx.relation == "cka":
        return linear_cka(student.relation, teacher.relation)
    s, t = student.relation.double(), teacher.relation.double()
    return matrix_similarity(s @ s.T, t @ t.T)


# --------------------------------------------------------------------------------------------------------------
# Scores


def _student_view(ctx: ScoreContext, model: Any, grad: bool = False, sample_vocabulary: bool = False) -> HeadView:
    import torch

    with torch.set_grad_enabled(grad):
        return head_view(model, ctx, targets=ctx.targets(), sample_vocabulary=sample_vocabulary)


@SCORES.register(
    "diswot",
    help="DisWOT: semantic (class/token correlation of head-weight gradients) + relation (Gram or CKA of final "
    "hidden states) similarity to the teacher, each in [0, 1]",
    terms=("semantic", "relation"),
)
def diswot(ctx: ScoreContext, model: Any) -> dict[str, float]:
    teacher = ctx.teacher_view()
    student = _student_view(ctx, model, sample_vocabulary=True)
    relation = relation_similarity(ctx, student, teacher)
    out = {"relation": relation}
    classes = ctx.classes()
    if classes is not None and student.z is not None:
        if "teacher_semantic" not in ctx.cache:
            ctx.cache["teacher_semantic"] = semantic_matrix(teacher, classes)
        out["semantic"] = matrix_similarity(semantic_matrix(student, classes), ctx.cache["teacher_semantic"])
    out["score"] = out.get("semantic", 0.0) + relation
    return out


@SCORES.register("params", help="parameter count (bigger students distil better)")
def params(ctx: ScoreContext, model: Any) -> dict[str, float]:
    return {"score": float(sum(p.numel() for p in model.parameters()))}


@SCORES.register("flops", help="matmul FLOPs of one forward pass on the calibration batch")
def flops(ctx: ScoreContext, model: Any) -> dict[str, float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from distillkit.models.forward import model_inputs

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**model_inputs(model, ctx.batch))
    return {"score": float(counter.get_total_flops())}


def _activation_modules(model: Any) -> list[Any]:
    from torch import nn

    from distillkit.models.layout import split_layer_key

    kinds = (nn.ReLU, nn.GELU, nn.SiLU, nn.Mish, nn.LeakyReLU, nn.ELU)
    found = []
    for name, module in model.named_modules():
        if split_layer_key(name)[1] is None:
            continue  # only activations inside the blocks (not a pooler's tanh)
        if isinstance(module, kinds) or type(module).__module__.endswith("transformers.activations"):
            found.append(module)
    return found


@SCORES.register("naswot", help="NASWOT: log-determinant of the activation-pattern kernel over the batch's examples")
def naswot(ctx: ScoreContext, model: Any) -> dict[str, float]:
    import torch

    from distillkit.models.forward import model_inputs

    batch = ctx.batch
    mask = batch.get("attention_mask")
    first = next(iter(v for v in batch.values() if hasattr(v, "shape")))
    n = first.shape[0]
    kernel = torch.zeros(n, n, dtype=torch.float64, device=first.device)

    def hook(_m: Any, inputs: Any, _out: Any) -> None:
        x = inputs[0]
        on = (x > 0).double()
        off = 1.0 - on
        if mask is not None and x.dim() == 3 and x.shape[1] == mask.shape[1]:
            m = mask.to(x.device).double().unsqueeze(-1)
            on, off = on * m, off * m
        on, off = on.reshape(n, -1), off.reshape(n, -1)
        kernel.add_(on @ on.T + off @ off.T)

    handles = [m.register_forward_hook(hook) for m in _activation_modules(model)]
    try:
        with torch.no_grad():
            model(**model_inputs(model, batch))
    finally:
        for h in handles:
            h.remove()
    eye = torch.eye(n, dtype=torch.float64, device=kernel.device)
    return {"score": float(torch.linalg.slogdet(kernel + eye)[1])}


def _proxy_loss(ctx: ScoreContext, view: HeadView) -> Any:
    import torch.nn.functional as F

    if view.z is not None:
        return F.cross_entropy(view.z, view.y)
    return view.relation.pow(2).mean()  # no head at all (ViT backbone): the output energy


@SCORES.register("gradnorm", help="sum of the per-tensor gradient norms of the head's cross-entropy")
def gradnorm(ctx: ScoreContext, model: Any) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    with_grad = [p for p in model.parameters() if p.requires_grad]
    _proxy_loss(ctx, _student_view(ctx, model, grad=True)).backward()
    total = sum(float(p.grad.norm()) for p in with_grad if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return {"score": total}


@SCORES.register("synflow", help="SynFlow: sum |theta * dR/dtheta| with positive weights, R the sum of the logits")
def synflow(ctx: ScoreContext, model: Any) -> dict[str, float]:
    import torch

    params_ = [p for p in model.parameters() if p.requires_grad]
    # Swap in |theta| rather than taking it in place: a search's candidates share tensors with the teacher.
    originals = [p.data for p in params_]
    with torch.no_grad():
        for p in params_:
            p.data = p.data.abs()
    try:
        model.zero_grad(set_to_none=True)
        view = head_view(model, ctx, targets=ctx.targets())
        out = view.z if view.z is not None else view.relation
        out.double().sum().backward()
        total = sum(float((p.detach().double() * p.grad.double()).abs().sum()) for p in params_ if p.grad is not None)
    finally:
        for p, original in zip(params_, originals, strict=True):
            p.data = original
        model.zero_grad(set_to_none=True)
    return {"score": total}
