"""Channel pruning of HF ResNet-style CNNs (``ResNetModel``, ``ResNetForImageClassification``).

Channels live in *spaces* (the stem, each stage's residual stream, each block's inner convs), defined in
:mod:`distillkit.models.resnet_layout`, which the student search shares.

``ResNetConfig`` can express one width per stage (``hidden_sizes``), the stem width (``embedding_size``), and inner
widths only as ``hidden_size // 4`` (bottleneck) or ``hidden_size`` (basic). So a ratio shrinks every stage and the
stem uniformly, and every block's inner channels follow its stage's width; *which* inner channels are kept is chosen
per block by importance.
"""

from __future__ import annotations

from typing import Any

from distillkit.errors import ConfigError
from distillkit.models.resnet_layout import slice_state, space_sizes, spaces_of, stem_coupled
from distillkit.progress import track


def _kept(width: int, ratio: float, round_to: int, what: str) -> int:
    if ratio == 0:
        return width
    raw = width * (1 - ratio)
    k = int(round(raw / round_to)) * round_to if round_to > 1 else int(round(raw))
    if k < 1:
        raise ConfigError(
            f"--channels {ratio} would remove every channel of {what} ({width} channels)",
            hint="use a smaller ratio" + (" or a smaller --round-to" if round_to > 1 else ""),
        )
    return min(k, width)


def pruned_config(cfg: Any, ratio: float, round_to: int = 1) -> Any:
    """The config with every stage (and the stem) ``ratio`` narrower, rounded to ``round_to`` channels."""
    import copy

    new = copy.deepcopy(cfg)
    new.hidden_sizes = [_kept(w, ratio, round_to, f"stage {s}") for s, w in enumerate(cfg.hidden_sizes)]
    if cfg.layer_type == "bottleneck":
        for s, w in enumerate(new.hidden_sizes):
            if w // 4 < 1:
                raise ConfigError(
                    f"--channels {ratio} leaves stage {s} {w} channels, fewer than the 4 a bottleneck block needs",
                    hint="use a smaller ratio",
                )
    new.embedding_size = new.hidden_sizes[0] if stem_coupled(cfg) else _kept(cfg.embedding_size, ratio, 1, "the stem")
    if stem_coupled(new) != stem_coupled(cfg):
        raise ConfigError(
            f"--channels {ratio} makes the stem and stage 0 equally wide ({new.embedding_size}), which would turn "
            "their projection shortcut into an identity",
            hint="use a slightly different ratio or --round-to",
        )
    return new


def scores_from_saliency(model: Any, sal: dict[str, Any]) -> dict[str, Any]:
    """Per-parameter saliency summed per channel space; every tensor's vote is normalised by its mean."""
    import torch

    cfg = model.config
    out = {name: torch.zeros(n) for name, n in space_sizes(cfg).items()}
    for key, s in sal.items():
        roles = spaces_of(cfg, key)
        if not roles or s.dim() != len(roles):
            continue
        for dim, space in enumerate(roles):
            if space is None:
                continue
            v = s.detach().float().transpose(0, dim).reshape(s.shape[dim], -1).sum(1).cpu()
            mean = v.mean()
            if mean > 0:
                out[space] += v / mean
    return out


def activation_scores(ctx: Any) -> dict[str, Any]:
    """Mean |BatchNorm output| per channel over the calibration batches, summed per channel space."""
    import torch

    from distillkit.models.forward import model_inputs

    model = ctx.model
    cfg = model.config
    out = {name: torch.zeros(n) for name, n in space_sizes(cfg).items()}
    sums: dict[str, Any] = {}
    handles = []

    def hook(space: str, name: str):
        def fn(_m: Any, _a: Any, output: Any) -> None:
            sums[name] = sums.get(name, 0) + output.detach().float().abs().mean((0, 2, 3)).cpu()
            spaces[name] = space

        return fn

    spaces: dict[str, str] = {}
    try:
        for name, module in model.named_modules():
            if "BatchNorm" in type(module).__name__:
                roles = spaces_of(cfg, f"{name}.weight")
                if roles:
                    handles.append(module.register_forward_hook(hook(roles[0], name)))
        with torch.no_grad():
            for batch in track(ctx.batches, "prune activation", unit="batch"):
                model(**model_inputs(model, batch, ctx.device))
    finally:
        for h in handles:
            h.remove()
    for name, v in sums.items():
        mean = v.mean()
        if mean > 0:
            out[spaces[name]] += v / mean
    return out


def plan_channels(cfg: Any, new_cfg: Any, scores: dict[str, Any] | None) -> dict[str, Any]:
    """Sorted kept indices of every channel space: the top channels by ``scores`` (all when none are removed)."""
    import torch

    from distillkit.models.student import top_indices

    old, new = space_sizes(cfg), space_sizes(new_cfg)
    keep = {}
    for space, n in old.items():
        k = new[space]
        keep[space] = torch.arange(n) if k == n or scores is None else top_indices(scores[space].float().cpu(), k)
    return keep


def prune_resnet(model: Any, new_cfg: Any, keep: dict[str, Any]) -> Any:
    """A model of ``model``'s class built from ``new_cfg``, holding the kept slices of every tensor."""
    import torch

    with torch.random.fork_rng(devices=[]):
        pruned = type(model)(new_cfg)
    pruned.load_state_dict(slice_state(model.config, model.state_dict(), keep), strict=True)
    param = next(model.parameters())
    return pruned.to(device=param.device, dtype=param.dtype).train(model.training)
