"""``prune_model``: load, score, slice, optionally recover by distillation, and write the artifact.

Transformers are pruned through the student builder (:func:`distillkit.models.student.plan_student` with importance
``scores`` and :func:`~distillkit.models.student.build_student` with that plan): pruning is building a narrower,
shallower copy whose index sets an importance criterion chose. Every layer keeps the same sizes, so the config stays
a standard one that ``from_pretrained`` reloads. ResNet-style CNNs go through :mod:`distillkit.prune.resnet`.

Sizes. An amount in [0, 1) removes that share (rounded to ``--round-to`` for MLP and hidden widths), a whole number
keeps that many. Attention heads stay consistent with grouped-query attention: whole key/value groups are removed
(``groups``) or the same number of query heads from each group (``per-group``); ``auto`` takes whole groups when the
head count allows it. Llama-style configs keep the head size (an explicit ``head_dim``), so ``--hidden`` narrows only
the residual stream (Minitron). GPT-2/BERT/ViT configs tie the attention width to the hidden size (head size =
hidden / heads), so there fewer heads also narrow the hidden size to heads x head size, and ``--hidden`` alone
shrinks every head.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distillkit import manifest as mf
from distillkit.errors import ConfigError, warn
from distillkit.prune.config import STRUCTURES, PruneConfig

TRANSFORMER_FAMILIES = ("llama", "gpt2", "bert", "vit")
SUPPORTED = "llama (Llama, Mistral, Qwen2, Qwen3), gpt2, bert (BERT, RoBERTa, XLM-R), vit, resnet (--channels)"
_TRANSFORMER_KINDS = ("mlp", "heads", "hidden", "layers")


# ----------------------------------------------------------------------------------------------------------------
# Sizes


def kept_size(n: int, amount: float, round_to: int, what: str, flag: str) -> int:
    """How many of ``n`` structures stay for an amount (ratio removed in [0, 1), or a whole number kept)."""
    if amount == 0:
        return n
    if amount >= 1:
        k = int(amount)
        if k > n:
            raise ConfigError(f"--{flag} {k} keeps more than the model's {n} {what}s", hint=f"use at most {n}")
        return k
    raw = n * (1 - amount)
    k = int(round(raw / round_to)) * round_to if round_to > 1 else int(round(raw))
    if k < 1:
        raise ConfigError(
            f"--{flag} {amount} would remove every {what} of a layer (it has {n})",
            hint="use a smaller ratio" + (" or a smaller --round-to" if round_to > 1 else ""),
        )
    return min(k, n)


def _round_heads(n: int, kv: int, amount: float, heads: int, mode: str) -> int:
    """A head ratio's count moved to the nearest count the key/value groups allow (fewer heads on a tie, so that a
    ratio still removes something); ``heads`` unchanged when it is valid or no smaller valid count exists."""
    group = n // kv

    def valid(h: int) -> bool:
        return (mode != "per-group" and h % group == 0) or (mode != "groups" and h % kv == 0)

    if not 0 < amount < 1 or heads == n or valid(heads):
        return heads
    raw = n * (1 - amount)
    candidates = [h for h in range(1, n) if valid(h)]
    return min(candidates, key=lambda h: (abs(h - raw), h)) if candidates else heads


def resolve_sizes(
    cfg: PruneConfig, model_config: Any, amounts: dict[str, float], notes: list[str] | None = None
) -> tuple[dict[str, int], bool]:
    """The pruned sizes as a full student spec, and whether heads keep their size apart from hidden (Llama-style).

    A head ratio whose count the key/value groups cannot hold is rounded to the nearest count they can; what was
    rounded is appended to ``notes`` (for the caller to show once).
    """
    from distillkit.models import arch
    from distillkit.models.spec import teacher_sizes

    fam = arch.family(model_config)
    t = teacher_sizes(model_config)
    spec = dict(t)
    spec["intermediate"] = kept_size(t["intermediate"], amounts["mlp"], cfg.round_to, "MLP channel", "mlp")
    spec["layers"] = kept_size(t["layers"], amounts["layers"], 1, "layer", "layers")
    heads = kept_size(t["heads"], amounts["heads"], 1, "attention head", "heads")
    kv, group = t["kv_heads"], t["heads"] // t["kv_heads"]
    rounded = _round_heads(t["heads"], kv, amounts["heads"], heads, cfg.head_mode)
    if rounded != heads and notes is not None:
        notes.append(
            f"--heads {amounts['heads']:g} would keep {heads} of the {t['heads']} query heads per layer, which the "
            f"{kv} key/value groups ({group} query heads each) cannot hold; keeping {rounded} heads instead "
            f"(removing {1 - rounded / t['heads']:.0%})"
        )
    heads = rounded
    if heads != t["heads"]:
        mode = cfg.head_mode
        if mode == "auto":
            mode = "groups" if heads % group == 0 else "per-group"
        if mode == "groups":
            if heads % group:
                raise ConfigError(
                    f"{heads} query heads are not a whole number of key/value groups ({group} query heads each)",
                    hint=f"choose a head count that is a multiple of {group}, or --head-mode per-group",
                )
            kv = heads // group
        elif heads % kv:
            raise ConfigError(
                f"{heads} query heads cannot be divided evenly over the {kv} key/value groups",
                hint=f"choose a head count that is a multiple of {group} (whole groups) or of {kv} (the same number "
                "per group)",
            )
    spec["heads"], spec["kv_heads"] = heads, kv
    if fam == "llama":
        spec["hidden"] = kept_size(t["hidden"], amounts["hidden"], cfg.round_to, "hidden channel", "hidden")
        return spec, True
    d = arch.head_dim(model_config)
    if amounts["hidden"]:
        step = math.lcm(cfg.round_to, heads) if amounts["hidden"] < 1 else 1
        spec["hidden"] = kept_size(t["hidden"], amounts["hidden"], step, "hidden channel", "hidden")
        if spec["hidden"] > heads * d:
            raise ConfigError(
                f"{fam} ties the hidden size to heads x head size: {heads} heads of {d} hold at most "
                f"{heads * d} channels, not {spec['hidden']}",
                hint="prune --hidden at least as much as --heads",
            )
    elif heads != t["heads"]:
        spec["hidden"] = heads * d  # the head size stays; the residual stream narrows with the heads
    return spec, False


def _param_count(build: Callable[[], Any]) -> int:
    import torch

    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Data


def _batches(cfg: PruneConfig, loaded: Any) -> tuple[list[dict], list[dict], dict[str, Any]]:
    from distillkit.data.calibration import calibration_batches

    return calibration_batches(cfg, loaded)


def _quality(model: Any, batches: list[dict], loaded: Any, reference: Any, device: Any) -> dict[str, float]:
    from distillkit.data.calibration import held_out_quality

    return held_out_quality(model, batches, loaded, reference, device)


# ----------------------------------------------------------------------------------------------------------------
# The run


def _check_request(cfg: PruneConfig, fam: str) -> list[str]:
    if fam not in (*TRANSFORMER_FAMILIES, "resnet"):
        raise ConfigError(f"pruning {fam} models is not supported", hint=f"supported: {SUPPORTED}")
    requested = cfg.requested()
    if fam == "resnet":
        wrong = [s for s in requested if s != "channels"]
        if wrong:
            raise ConfigError(
                f"--{wrong[0]} is for transformers; a ResNet is pruned with --channels",
                hint="pass e.g. --channels 0.5",
            )
    elif "channels" in requested:
        raise ConfigError(
            "--channels is for ResNet-style CNNs", hint="prune a transformer with --mlp, --heads, --hidden, --layers"
        )
    if cfg.target_params is not None and not requested:
        requested = ["channels"] if fam == "resnet" else ["mlp"]
    return requested


def _amounts(cfg: PruneConfig, requested: list[str], ratio: float | None) -> dict[str, float]:
    """Each structure's amount: as given, or the one solved ratio for every requested structure."""
    if ratio is None:
        return {s: float(getattr(cfg, s)) for s in STRUCTURES}
    return {s: (ratio if s in requested else 0.0) for s in STRUCTURES}


def _solve_ratio(count: Callable[[float], int], target: int) -> float:
    """The one ratio whose pruned parameter count is closest to ``target`` (bisection; counts fall with the ratio)."""
    lo, hi = 0.0, 0.999
    if count(lo) <= target:
        return 0.0

    def safe(r: float) -> int | None:
        try:
            return count(r)
        except ConfigError:
            return None

    while safe(hi) is None and hi > 1e-3:
        hi *= 0.98
    smallest = safe(hi)
    if smallest is None or smallest > target:
        raise ConfigError(
            f"pruning cannot reach {target:,} parameters (the smallest reachable is {smallest or count(0):,})",
            hint="prune more structures (--mlp, --heads, --hidden, --layers) or raise --target-params",
        )
    for _ in range(40):
        mid = (lo + hi) / 2
        c = safe(mid)
        if c is None or c <= target:
            hi = mid
        else:
            lo = mid
    c_lo, c_hi = count(lo), count(hi)
    return lo if abs(c_lo - target) < abs(c_hi - target) else hi


def _validated(config: Any) -> Any:
    """Run transformers' own config validators now, so a size it refuses fails before any work, not at save time."""
    validate = getattr(config, "validate", None)
    if callable(validate):
        try:
            validate()
        except Exception as e:  # noqa: BLE001 - transformers' strict-dataclass validators raise their own classes
            reason = str(e).strip().splitlines()[-1].strip().removeprefix("ValueError: ")
            raise ConfigError(
                f"transformers refuses the pruned {config.model_type} config: {reason}",
                hint="choose other amounts; a Llama config needs a head count that divides the hidden size",
            ) from None
    return config


def _builders(cfg: PruneConfig, model: Any, requested: list[str]) -> tuple[Callable, Callable]:
    """``config_for(amounts)`` -> the pruned config, and ``count(ratio)`` -> its parameter count."""
    from distillkit.models import arch

    if arch.family(model.config) == "resnet":
        from distillkit.prune import resnet

        def config_for(amounts: dict[str, float]) -> Any:
            return _validated(resnet.pruned_config(model.config, amounts["channels"], cfg.round_to))

        def count(r: float) -> int:
            new = config_for(_amounts(cfg, requested, r))
            return _param_count(lambda: type(model)(new))

        return config_for, count
    from distillkit.models.student import construct_model, student_config

    def config_for(amounts: dict[str, float]) -> Any:
        spec, keep = resolve_sizes(cfg, model.config, amounts)
        return _validated(student_config(model.config, spec, keep_head_dim=keep))

    def count(r: float) -> int:
        new = config_for(_amounts(cfg, requested, r))
        return _param_count(lambda: construct_model(type(model), new, model))

    return config_for, count


def prune_module(cfg: PruneConfig, ctx: Any) -> tuple[Any, dict[str, Any]]:
    """Prune the model of an :class:`~distillkit.prune.importance.ImportanceContext` in memory.

    Returns a new model (the original is left untouched) and what was decided: ``sizes`` before/after, ``amounts``
    per structure, ``kept_layers``, block ``layer_importance`` and, with ``target_params``, the ``solved_ratio``.
    """
    import torch

    from distillkit.models import arch
    from distillkit.prune.importance import block_importance
    from distillkit.registry import IMPORTANCES

    model = ctx.model
    fam = arch.family(model.config)
    requested = _check_request(cfg, fam)
    is_resnet = fam == "resnet"
    n_before = sum(p.numel() for p in model.parameters())
    ratio = None
    config_for, count = _builders(cfg, model, requested)
    target = None
    if cfg.target_params is not None:
        target = int(cfg.target_params * n_before) if cfg.target_params < 1 else int(cfg.target_params)
        ratio = _solve_ratio(count, target)
    amounts = _amounts(cfg, requested, ratio)

    extra: dict[str, Any] = {"importance": cfg.importance, "amounts": amounts}
    if target is not None:
        extra.update(target_params=target, solved_ratio=ratio)
    if is_resnet:
        from distillkit.prune import resnet

        new_cfg = config_for(amounts)
        changed = new_cfg.hidden_sizes != model.config.hidden_sizes
        scores = IMPORTANCES.get(cfg.importance).obj(ctx) if changed else None
        keep = resnet.plan_channels(model.config, new_cfg, scores)
        pruned = resnet.prune_resnet(model, new_cfg, keep)
        extra["sizes"] = {
            "before": {"embedding_size": model.config.embedding_size, "hidden_sizes": list(model.config.hidden_sizes)},
            "after": {"embedding_size": new_cfg.embedding_size, "hidden_sizes": list(new_cfg.hidden_sizes)},
        }
    else:
        from distillkit.models.spec import teacher_sizes
        from distillkit.models.student import StructureScores, build_student, plan_student

        config_for(amounts)  # transformers validates the config before any work
        notes: list[str] = []
        spec, keep_head_dim = resolve_sizes(cfg, model.config, amounts, notes)
        for note in notes:
            warn(note)
        if notes:
            extra["notes"] = notes
        before = teacher_sizes(model.config)
        scores = StructureScores()
        if any(spec[k] != before[k] for k in ("hidden", "heads", "kv_heads", "intermediate")):
            scores = IMPORTANCES.get(cfg.importance).obj(ctx)
        if spec["layers"] != before["layers"]:
            scores.layers = block_importance(ctx, cfg.layer_importance)
            extra["layer_importance"] = {"metric": cfg.layer_importance, "scores": scores.layers.tolist()}
        with torch.no_grad():
            plan = plan_student(model, spec, scores=scores, keep_head_dim=keep_head_dim)
            pruned = build_student(model, spec, plan=plan, keep_head_dim=keep_head_dim).eval()
        extra["sizes"] = {"before": before, "after": spec}
        extra["kept_layers"] = plan.layers
        extra["head_mode"] = cfg.head_mode
    return pruned, extra


def _load(cfg: PruneConfig, src: mf.Source) -> tuple[Any, Any, Any]:
    """(device, the model to prune, the teacher or None), after the checks that need the model but no data."""
    from distillkit.models import arch
    from distillkit.models.load import load_model, resolve_device

    device = resolve_device(cfg.device)
    loaded = load_model(
        src,
        task=cfg.task,
        dtype="float32",
        device=str(device),
        allow_pickle=cfg.allow_pickle,
        trust_remote_code=cfg.trust_remote_code,
    )
    model = loaded.model.eval()
    fam = arch.family(model.config)
    _check_request(cfg, fam)
    is_resnet = fam == "resnet"
    if cfg.recover_steps and is_resnet and cfg.data is None:
        raise ConfigError(
            "recovering a ResNet needs image data", hint="pass --data IMAGE_FOLDER or drop --recover-steps"
        )
    if cfg.target_params is None:  # refuse impossible sizes before any data is read
        _builders(cfg, model, [])[0](_amounts(cfg, [], None))
    teacher = None
    if cfg.teacher:
        teacher = load_model(
            cfg.teacher,
            task=loaded.task,
            dtype="float32",
            device=str(device),
            allow_pickle=cfg.allow_pickle,
            trust_remote_code=cfg.trust_remote_code,
        )
        teacher.model.eval().requires_grad_(False)
    return device, loaded, teacher


def _size_metrics(cfg: PruneConfig, model: Any, pruned: Any, task: str, is_resnet: bool, quality: dict) -> dict:
    """Quality before/after and the parameter (and, for transformers, FLOP) counts of both models."""
    n_before = sum(p.numel() for p in model.parameters())
    n_after = sum(p.numel() for p in pruned.parameters())
    metrics: dict[str, Any] = {
        "quality_before": quality["before"],
        "quality_after_prune": quality["after_prune"],
        "params_before": n_before,
        "params_after": n_after,
        "param_ratio": n_after / n_before,
    }
    if not is_resnet:
        from distillkit.prune.flops import transformer_flops

        f0 = transformer_flops(model.config, cfg.max_length, task)
        f1 = transformer_flops(pruned.config, cfg.max_length, task)
        metrics.update(flops_per_token_before=f0, flops_per_token_after=f1, flop_ratio=f1 / f0)
    return metrics


@mf.releases_locks
def prune_model(cfg: PruneConfig, source: str | mf.Source, out: str, overwrite: bool = False) -> dict[str, Any]:
    """Prune ``source`` as ``cfg`` says into the artifact directory ``out``; returns its manifest dict.

    The manifest's metrics hold ``quality_before``, ``quality_after_prune`` and (with ``recover_steps``)
    ``quality_after_recovery``: :func:`distillkit.evaluate.evaluate_quality` on held-out data against the
    unpruned model, plus parameter (and for transformers FLOP) counts before and after.
    """
    import torch

    from distillkit.models import arch
    from distillkit.prune.importance import ImportanceContext

    t_start = time.perf_counter()
    src = source if isinstance(source, mf.Source) else mf.read_source(source)
    final = mf.check_output(out, overwrite, protect=[src.path, cfg.teacher, cfg.data])
    if not cfg.requested() and cfg.target_params is None:  # before any loading: there is nothing to do
        raise ConfigError(
            "nothing to prune: no structure amount was given, or every amount is 0",
            hint="pass at least one of --mlp, --heads, --hidden, --layers (e.g. --mlp 0.3), --channels for a "
            "ResNet, or --target-params",
        )
    device, loaded, teacher = _load(cfg, src)
    model = loaded.model
    is_resnet = arch.family(model.config) == "resnet"
    t_loaded = time.perf_counter()

    calib, evals, data_info = _batches(cfg, loaded)
    ctx = ImportanceContext(
        model=model,
        task=loaded.task,
        batches=calib,
        device=device,
        teacher=teacher.model if teacher is not None else None,
        pooling=loaded.pooling,
        teacher_pooling=teacher.pooling if teacher is not None else loaded.pooling,
    )
    t0 = time.perf_counter()
    pruned, extra = prune_module(cfg, ctx)
    extra["calibration"] = data_info
    target = extra.get("target_params")
    amounts = extra.pop("amounts")
    t_pruned = time.perf_counter()

    with torch.random.fork_rng(devices=[]):
        q_before = _quality(model, evals, loaded, model, device)
        q_pruned = _quality(pruned, evals, loaded, model, device)
    metrics = _size_metrics(cfg, model, pruned, loaded.task, is_resnet, {"before": q_before, "after_prune": q_pruned})
    if target is not None:
        metrics["target_params"] = extra.pop("target_params")
    final_model = pruned
    timings = {"load_s": t_loaded - t_start, "prune_s": t_pruned - t0}
    final.parent.mkdir(parents=True, exist_ok=True)
    if cfg.recover_steps:
        t_rec = time.perf_counter()
        final_model, recovery = _recover(cfg, src, loaded, pruned, final, device)
        with torch.random.fork_rng(devices=[]):
            metrics["quality_after_recovery"] = _quality(final_model, evals, loaded, model, device)
        extra["recovery"] = recovery
        timings["recover_s"] = time.perf_counter() - t_rec
    for stage in ("before", "after_prune", "after_recovery"):
        for k, v in metrics.get(f"quality_{stage}", {}).items():
            metrics[f"{stage}_{k}"] = v

    with mf.atomic_artifact(final, overwrite) as tmp:
        _save(final_model, loaded, tmp)
        manifest = mf.Manifest(
            stage="prune",
            path=str(final),
            task=loaded.task,
            model_type=getattr(final_model.config, "model_type", None),
            inputs={
                "model": mf.describe_input(src.path, src.manifest),
                **({"teacher": mf.describe_input(teacher.path, None)} if teacher is not None else {}),
            },
            config={**cfg.to_dict(), "resolved_amounts": amounts},
            metrics=metrics,
            timings={**timings, "total_s": time.perf_counter() - t_start},
            history=mf.history_of(src),
            extra={**extra, "pooling": loaded.pooling},
        )
        mf.finalize_artifact(tmp, manifest, final)
    _report(manifest)
    return manifest.to_dict()


def _save(model: Any, loaded: Any, directory: Path) -> None:
    """save_pretrained in the source checkpoint's dtype, its tokenizer/processor and sentence-transformers files."""
    from distillkit.models.save import save_student

    save_student(model, loaded, directory)
    if loaded.processor is not None:
        loaded.processor.save_pretrained(directory)


def _recover(cfg: PruneConfig, src: mf.Source, loaded: Any, pruned: Any, final: Path, device: Any):
    """Distil the original into the pruned model for ``recover_steps`` (``distillkit distill`` with it as teacher)."""
    import copy

    from distillkit.config import DistillConfig
    from distillkit.distill.engine import StudentHooks, run_distill
    from distillkit.models.load import auto_class

    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.prune-", dir=final.parent))
    try:
        _save(copy.deepcopy(pruned), loaded, work / "pruned")
        dcfg = DistillConfig.of(
            teacher=src.path,
            student=str(work / "pruned"),
            task=loaded.task,
            data=cfg.data,
            text_column=cfg.text_column,
            label_column=cfg.label_column,
            eval_split=cfg.eval_split,
            max_length=cfg.max_length,
            max_samples=cfg.max_samples,
            steps=cfg.recover_steps,
            batch_size=cfg.batch_size,
            lr=cfg.recover_lr,
            seed=cfg.seed,
            device=cfg.device,
            eval_batches=cfg.eval_batches,
            eval_data="none",  # this stage measures its own artifact
            allow_pickle=cfg.allow_pickle,
            trust_remote_code=cfg.trust_remote_code,
        )
        result = run_distill(dcfg, out=str(work / "recovered"), hooks=StudentHooks(label="prune recover"))
        recovered = auto_class(loaded.task).from_pretrained(work / "recovered", dtype=next(pruned.parameters()).dtype)
        recovered.to(device).eval()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        "steps": cfg.recover_steps,
        "lr": cfg.recover_lr,
        "losses": (result or {}).get("config", {}).get("resolved_losses"),
        "final_train_loss": (result or {}).get("metrics", {}).get("final_train_loss"),
        "train_s": (result or {}).get("timings", {}).get("train_s"),
    }
    return recovered, summary


def _report(manifest: mf.Manifest) -> None:
    from distillkit.progress import stderr_console

    m = manifest.metrics
    console = stderr_console()
    line = f"[bold]pruned[/] -> {manifest.path}: {m['params_after']:,} of {m['params_before']:,} parameters"
    line += f" ({m['param_ratio']:.1%})"
    if "flop_ratio" in m:
        line += f", {m['flop_ratio']:.1%} of the FLOPs"
    console.print(line)
    for stage in ("quality_before", "quality_after_prune", "quality_after_recovery"):
        if m.get(stage):
            shown = ", ".join(f"{k} {v:.4g}" for k, v in m[stage].items() if isinstance(v, float))
            console.print(f"  {stage.removeprefix('quality_')}: {shown}")
