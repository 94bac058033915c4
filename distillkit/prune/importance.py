"""Importance criteria for pruning: which heads, channels and layers matter least.

Each criterion is registered in :data:`distillkit.registry.IMPORTANCES` and maps an
:class:`ImportanceContext` to scores (higher = keep): a :class:`~distillkit.models.student.StructureScores` for
transformers, a ``{channel space: [channels]}`` dict for ResNet-style CNNs (see :mod:`distillkit.prune.resnet`).

- ``magnitude`` / ``magnitude_l1``: squared L2 (or L1) norm of every weight that reads or writes a structure.
- ``activation``: mean activation over calibration batches, as Minitron: per MLP channel the mean |input| of the
  down projection, per head the mean L2 norm of its attention output (the o-projection input), per hidden channel
  the mean |output| of every norm layer; per CNN channel the mean |BatchNorm output|.
- ``taylor``: first-order Taylor, ``sum |w * dL/dw|`` over calibration batches, where ``L`` is the KL to a
  teacher's soft targets (embedding cosine for encoders) when a teacher is given, else the task loss.

Block importance (which whole layers go) is separate, :func:`block_importance`: the angular distance between a
block's input and output, or the increase of the distance to the full model's outputs when the block is skipped.

Torch is imported inside functions: this module registers into a registry that ``--help`` reads.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from distillkit.progress import track
from distillkit.registry import IMPORTANCES


@dataclass
class ImportanceContext:
    """What a criterion may use: the model, calibration batches (dicts of tensors) and an optional teacher."""

    model: Any
    task: str
    batches: list[dict[str, Any]]
    device: Any = None
    teacher: Any = None
    pooling: str = "mean"
    teacher_pooling: str = "mean"


def _is_resnet(model: Any) -> bool:
    return getattr(model.config, "model_type", None) == "resnet"


def _from_saliency(model: Any, sal: dict[str, Any]) -> Any:
    """Per-parameter saliency tensors (same shapes as the parameters) summed into structure scores."""
    if _is_resnet(model):
        from distillkit.prune.resnet import scores_from_saliency

        return scores_from_saliency(model, sal)
    return transformer_scores(model, sal)


def transformer_scores(model: Any, sal: dict[str, Any]) -> Any:
    """Sum saliency over the dimensions a structure owns: MLP channel (``M``), query head (``Q``), key/value head
    (``KV``), hidden channel (``H``, each tensor normalised by its mean so every tensor gets an equal vote)."""
    import torch

    from distillkit.models import arch
    from distillkit.models.layout import split_layer_key, tensor_roles
    from distillkit.models.student import StructureScores

    cfg = model.config
    fam = arch.family(cfg)
    n_layers, heads, kv = arch.num_layers(cfg), arch.num_heads(cfg), arch.num_kv_heads(cfg)
    hidden_n, inter = arch.hidden_size(cfg), arch.intermediate_size(cfg)
    out = StructureScores(
        hidden=torch.zeros(hidden_n),
        heads=[torch.zeros(heads) for _ in range(n_layers)],
        kv_heads=[torch.zeros(kv) for _ in range(n_layers)],
        mlp=[torch.zeros(inter) for _ in range(n_layers)],
    )
    for key, s in sal.items():
        roles = tensor_roles(fam, key)
        if roles is None or s.dim() != len(roles):
            continue
        _, layer, _ = split_layer_key(key)
        for dim, role in enumerate(roles):
            n = s.shape[dim]
            v = s.detach().float().transpose(0, dim).reshape(n, -1).sum(1).cpu()
            if role == "H" and n == hidden_n:
                mean = v.mean()
                if mean > 0:
                    out.hidden += v / mean
            elif layer is None:
                continue
            elif role == "M":
                out.mlp[layer] += v
            elif role == "Q":
                out.heads[layer] += v.reshape(heads, -1).sum(1)
            elif role == "KV":
                out.kv_heads[layer] += v.reshape(kv, -1).sum(1)
            elif role == "QKV":
                q, k, val = v.split(n // 3)
                out.heads[layer] += q.reshape(heads, -1).sum(1)
                out.kv_heads[layer] += (k + val).reshape(kv, -1).sum(1)
    return out


@IMPORTANCES.register("magnitude", help="squared L2 norm of the weights that read or write a structure (no data)")
def magnitude(ctx: ImportanceContext) -> Any:
    return _from_saliency(ctx.model, {k: p.detach().float().pow(2) for k, p in ctx.model.named_parameters()})


@IMPORTANCES.register("magnitude_l1", help="L1 norm of the weights that read or write a structure (no data)")
def magnitude_l1(ctx: ImportanceContext) -> Any:
    return _from_saliency(ctx.model, {k: p.detach().float().abs() for k, p in ctx.model.named_parameters()})


@IMPORTANCES.register(
    "taylor",
    help="first-order Taylor |w * dL/dw| on calibration data (L: KL to --teacher's soft targets, else the task loss)",
)
def taylor(ctx: ImportanceContext) -> Any:
    import torch

    model = ctx.model
    params = {k: p for k, p in model.named_parameters() if p.is_floating_point()}
    sal = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    with torch.enable_grad():
        for batch in track(ctx.batches, "prune taylor", unit="batch"):
            loss = calibration_loss(ctx, batch)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (key, p), g in zip(params.items(), grads, strict=True):
                if g is not None:
                    sal[key] += (p.detach().float() * g.float()).abs()
    return _from_saliency(model, sal)


def calibration_loss(ctx: ImportanceContext, batch: dict[str, Any]) -> Any:
    """The scalar loss Taylor importance differentiates (see the module docs)."""
    import torch
    import torch.nn.functional as F

    from distillkit.models.capture import pool
    from distillkit.models.forward import model_inputs

    model, task, device = ctx.model, ctx.task, ctx.device
    out = model(**model_inputs(model, batch, device))
    mask = batch.get("attention_mask")
    mask = mask.to(device) if mask is not None else None
    if task == "feature-extraction":
        emb = pool(out.last_hidden_state, mask, ctx.pooling)
        if ctx.teacher is not None:
            with torch.no_grad():
                t_out = ctx.teacher(**model_inputs(ctx.teacher, batch, device))
            t_emb = pool(t_out.last_hidden_state, mask, ctx.teacher_pooling)
            if t_emb.shape[-1] == emb.shape[-1]:
                return (1 - F.cosine_similarity(emb, t_emb.float(), dim=-1)).mean()
        # No targets: the sensitivity of the embedding's energy to each weight.
        return 0.5 * emb.pow(2).sum(-1).mean()
    logits = out.logits.float()
    if ctx.teacher is not None:
        with torch.no_grad():
            t_logits = ctx.teacher(**model_inputs(ctx.teacher, batch, device)).logits.float()
        kl = (F.softmax(t_logits, -1) * (F.log_softmax(t_logits, -1) - F.log_softmax(logits, -1))).sum(-1)
        if kl.dim() == 2 and mask is not None:
            return (kl * mask).sum() / mask.sum().clamp_min(1)
        return kl.mean()
    labels = batch.get("labels")
    if task == "causal-lm":
        ids = batch["input_ids"].to(device)
        tgt = ids[:, 1:].clone()
        if mask is not None:
            tgt[mask[:, 1:] == 0] = -100
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
    if task == "masked-lm":
        target = labels.to(device) if labels is not None else batch["input_ids"].to(device)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
    target = labels.to(device) if labels is not None else logits.argmax(-1).detach()
    return F.cross_entropy(logits, target)


@IMPORTANCES.register(
    "activation", help="mean activation over calibration data (Minitron): MLP channels, head outputs, norm outputs"
)
def activation(ctx: ImportanceContext) -> Any:
    if _is_resnet(ctx.model):
        from distillkit.prune.resnet import activation_scores

        return activation_scores(ctx)
    return _transformer_activation(ctx)


def _masked_mean(x: Any, mask: Any) -> Any:
    """Mean of ``x`` ``[B, T, C]`` (or any ``[..., C]``) over every dimension but the last, real tokens only -> ``[C]``."""
    x = x.detach().float()
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        w = mask.to(x.device, x.dtype).unsqueeze(-1)
        return (x * w).sum((0, 1)).cpu() / max(float(w.sum()), 1.0)
    return x.reshape(-1, x.shape[-1]).mean(0).cpu()


def _transformer_activation(ctx: ImportanceContext) -> Any:
    import torch

    from distillkit.models import arch
    from distillkit.models.forward import model_inputs
    from distillkit.models.layout import PROJECTION_LAYOUTS, keys_by_layer
    from distillkit.models.student import StructureScores

    model = ctx.model
    cfg = model.config
    fam = arch.family(cfg)
    n_layers, heads, kv, d = arch.num_layers(cfg), arch.num_heads(cfg), arch.num_kv_heads(cfg), arch.head_dim(cfg)
    hidden_n = arch.hidden_size(cfg)
    modules = dict(model.named_modules())
    index = keys_by_layer(model.state_dict())
    scores = StructureScores(
        hidden=torch.zeros(hidden_n),
        heads=[torch.zeros(heads) for _ in range(n_layers)],
        kv_heads=[torch.zeros(kv) for _ in range(n_layers)],
        mlp=[torch.zeros(arch.intermediate_size(cfg)) for _ in range(n_layers)],
    )
    state: dict[str, Any] = {"mask": None}
    norm_sums: dict[str, Any] = {}
    handles = []

    def module_of(key: str) -> Any:
        return modules[key.rsplit(".", 1)[0]]

    def head_hook(layer: int):
        def hook(_m: Any, args: tuple) -> None:
            x = args[0]
            per_head = x.detach().float().reshape(*x.shape[:-1], heads, d).norm(dim=-1)
            scores.heads[layer] += _masked_mean(per_head, state["mask"])

        return hook

    def mlp_hook(layer: int):
        def hook(_m: Any, args: tuple) -> None:
            scores.mlp[layer] += _masked_mean(args[0].abs(), state["mask"])

        return hook

    def norm_hook(name: str):
        def hook(_m: Any, _args: tuple, output: Any) -> None:
            if torch.is_tensor(output) and output.shape[-1] == hidden_n:
                norm_sums[name] = norm_sums.get(name, 0) + _masked_mean(output.abs(), state["mask"])

        return hook

    try:
        for layer in range(n_layers):
            keys = index[layer]
            layout = next(lo for lo in PROJECTION_LAYOUTS[fam] if (lo.get("q") or lo.get("qkv")) in keys)
            handles.append(module_of(keys[layout["o"]]).register_forward_pre_hook(head_hook(layer)))
            handles.append(module_of(keys[layout["down"]]).register_forward_pre_hook(mlp_hook(layer)))
        for name, module in modules.items():
            kind = type(module).__name__.lower()
            if "norm" in kind and not re.search(r"(^|\.)[qk]_norm$", name):
                handles.append(module.register_forward_hook(norm_hook(name)))
        with torch.no_grad():
            for batch in track(ctx.batches, "prune activation", unit="batch"):
                state["mask"] = batch.get("attention_mask")
                model(**model_inputs(model, batch, ctx.device))
    finally:
        for h in handles:
            h.remove()
    for v in norm_sums.values():
        mean = v.mean()
        if mean > 0:
            scores.hidden += v / mean
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Block importance


def _blocks(model: Any) -> list[Any]:
    from torch import nn

    from distillkit.models import arch

    n = arch.num_layers(model.config)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and re.search(r"(^|\.)(layers|layer|h)$", name) and len(module) == n:
            return list(module)
    raise AssertionError("no block list found")  # pragma: no cover - supported families all have one


def _block_output(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output


def _compare(task: str, out: Any, ref: Any, mask: Any, pooling: str) -> float:
    """Distance of ``out`` from the full model's ``ref``: KL for logits, 1 - cosine for embeddings."""
    import torch.nn.functional as F

    from distillkit.models.capture import pool

    if task == "feature-extraction":
        e, r = pool(out.last_hidden_state.float(), mask, pooling), pool(ref.last_hidden_state.float(), mask, pooling)
        return float((1 - F.cosine_similarity(e, r, dim=-1)).mean())
    lp, rp = F.log_softmax(out.logits.float(), -1), F.log_softmax(ref.logits.float(), -1)
    kl = (rp.exp() * (rp - lp)).sum(-1)
    if kl.dim() == 2 and mask is not None:
        m = mask.to(kl.device, kl.dtype)
        return float((kl * m).sum() / m.sum().clamp_min(1))
    return float(kl.mean())


def block_importance(ctx: ImportanceContext, metric: str = "angular") -> Any:
    """``[L]`` importance of each block (higher = keep).

    ``angular``: mean over real tokens of ``arccos(cos(x_in, x_out)) / pi`` (0 for a block that changes nothing,
    ShortGPT / "unreasonable ineffectiveness of the deeper layers"). ``loss``: how far the outputs move from the
    full model's (KL, or 1 - cosine for embeddings) when the block is skipped (its output replaced by its input).
    """
    import torch
    import torch.nn.functional as F

    from distillkit.models.forward import model_inputs

    model = ctx.model
    blocks = _blocks(model)
    score = torch.zeros(len(blocks))
    state: dict[str, Any] = {}
    handles = []

    def grab_input(i: int):
        def hook(_m: Any, args: tuple, kwargs: dict) -> None:
            state[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def angular(i: int):
        def hook(_m: Any, _args: tuple, _kwargs: dict, output: Any) -> None:
            x, y = state[i].double(), _block_output(output).double()  # arccos is steep next to 1
            ang = torch.arccos(F.cosine_similarity(x, y, dim=-1).clamp(-1, 1)) / math.pi
            mask = state.get("mask")
            if mask is not None and tuple(ang.shape) == tuple(mask.shape):
                m = mask.to(ang.device, ang.dtype)
                score[i] += float((ang * m).sum() / m.sum().clamp_min(1))
            else:
                score[i] += float(ang.mean())

        return hook

    def skip(i: int):
        def hook(_m: Any, _args: tuple, _kwargs: dict, output: Any) -> Any:
            if state.get("skip") != i:
                return None
            return (state[i], *output[1:]) if isinstance(output, tuple) else state[i]

        return hook

    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(grab_input(i), with_kwargs=True))
            hook = angular(i) if metric == "angular" else skip(i)
            handles.append(block.register_forward_hook(hook, with_kwargs=True))
        with torch.no_grad():
            for batch in track(ctx.batches, f"prune layers ({metric})", unit="batch"):
                inputs = model_inputs(model, batch, ctx.device)
                mask = batch.get("attention_mask")
                state["mask"] = mask
                ref = model(**inputs)
                if metric == "angular":
                    continue
                for i in range(len(blocks)):
                    state["skip"] = i
                    score[i] += _compare(ctx.task, model(**inputs), ref, mask, ctx.pooling)
                state["skip"] = None
    finally:
        for h in handles:
            h.remove()
    return score / max(len(ctx.batches), 1)
