"""The distillation training loop, on accelerate.

One process or many (``accelerate launch`` / ``torchrun``: DDP, FSDP through an accelerate
config) run the same code. The teacher stays in eval mode under ``no_grad`` and is never wrapped;
the student and the losses' trainable modules (projections) are one module, so DDP sees every
parameter the loss touches.

Batches are cut by this module, not by a sampler: for epoch ``e`` the example order is a fixed
permutation of ``seed + e``; micro-batch ``j`` takes the ``j``-th slice of ``batch_size *
world_size`` indices and process ``r`` its ``r``-th part. The data position is therefore just
``(epoch, micro_batch)``, which makes ``--resume`` exact.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillkit.config import DistillConfig
from distillkit.distill.features import loss_mask, student_features
from distillkit.errors import ConfigError, ModelError, OutputError, TrainingError
from distillkit.manifest import (
    Manifest,
    atomic_artifact,
    check_output,
    describe_input,
    finalize_artifact,
    history_of,
    read_source,
    release_output,
    releases_locks,
    work_dir,
)
from distillkit.models.save import save_student

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"


# --------------------------------------------------------------------------------------------
# Student + losses as one module


class DistillModule(nn.Module):
    """The trainable side: the student and the losses' extra modules.

    ``forward(batch, teacher_features, progress)`` returns the total loss and its parts, so that
    DDP/FSDP see every parameter that receives a gradient.
    """

    def __init__(self, student: nn.Module, losses: list[tuple[str, float, Any]], task: str, pooling: str, alpha: float):
        super().__init__()
        self.student = student
        self.extras = nn.ModuleDict()
        self._losses = losses
        for i, (name, _, loss) in enumerate(losses):
            for key, module in loss.modules().items():
                self.extras[f"{i}_{name}_{key}"] = module
        self.task = task
        self.pooling = pooling
        self.alpha = alpha
        self.needs = set().union(*(loss.needs for _, _, loss in losses))
        self.student_blocks = sorted({b for _, _, loss in losses for b in loss.layers()[0]})

    def forward(self, batch: dict[str, Any], teacher_features: Any, progress: float) -> tuple[torch.Tensor, dict]:
        if self.alpha >= 1:  # --alpha 1: the hard-label loss alone; no distillation term, no teacher features
            _, hard = student_features(self.student, batch, self.task, set(), [], self.pooling, with_labels=True)
            return hard, {"hard": hard.detach()}
        if getattr(self, "fused", None) is not None:  # --fused-loss: no logits (distillkit.distill.fused)
            return self.fused(self.student, batch, teacher_features, progress)
        feats, hard = student_features(
            self.student, batch, self.task, self.needs, self.student_blocks, self.pooling, with_labels=self.alpha > 0
        )
        mask = loss_mask(batch, self.task)
        parts: dict[str, torch.Tensor] = {}
        kd = torch.zeros((), device=next(self.student.parameters()).device)
        for name, weight, loss in self._losses:
            value = loss(feats, teacher_features, mask, progress=progress)
            parts[name] = value.detach()
            kd = kd + weight * value
        total = kd
        if self.alpha > 0:
            parts["hard"] = hard.detach()
            total = self.alpha * hard + (1 - self.alpha) * kd
        return total, parts


# --------------------------------------------------------------------------------------------
# Batching


GROUP_WINDOW = 32  # --group-by-length sorts windows of this many global batches


def example_lengths(dataset: Any) -> list[int] | None:
    """Tokens per training example, or None when the examples are not token sequences or all share one length."""
    ids = getattr(dataset, "input_ids", None)  # data.prepare's TokenizedDataset keeps its token lists
    if not isinstance(ids, list) or not ids:
        return None
    lengths = [len(x) for x in ids]
    return lengths if len(set(lengths)) > 1 else None


def group_by_length(order: list[int], lengths: list[int], global_batch: int, g: torch.Generator) -> list[int]:
    """``order`` regrouped so each global batch holds examples of similar length: windows of
    :data:`GROUP_WINDOW` batches are sorted by length (longest first), cut into batches, and the full batches are
    shuffled with ``g``; a trailing partial batch stays last (the epoch drops it)."""
    window = global_batch * GROUP_WINDOW
    ranked: list[int] = []
    for start in range(0, len(order), window):
        ranked += sorted(order[start : start + window], key=lambda i: -lengths[i])
    n_full = len(ranked) // global_batch
    batches = [ranked[b * global_batch : (b + 1) * global_batch] for b in range(n_full)]
    shuffled = [batches[b] for b in torch.randperm(n_full, generator=g).tolist()]
    return [i for batch in shuffled for i in batch] + ranked[n_full * global_batch :]


class EpochBatches:
    """Deterministic micro-batches for one process; the position is ``(epoch, index)``. With ``lengths``, each
    epoch's order is grouped by length (:func:`group_by_length`)."""

    def __init__(
        self,
        dataset: Any,
        collate_fn: Any,
        batch_size: int,
        seed: int,
        rank: int,
        world: int,
        lengths: list[int] | None = None,
    ):
        self.dataset, self.collate_fn, self.lengths = dataset, collate_fn, lengths
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.global_batch = batch_size * world
        self.per_epoch = len(dataset) // self.global_batch
        if self.per_epoch < 1:
            from distillkit.errors import DataError

            raise DataError(
                f"the training split has {len(dataset)} examples, fewer than one global batch of {self.global_batch}",
                hint="lower --batch-size or give more --data",
            )
        self.epoch, self.index = 0, 0
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.dataset), generator=g).tolist()
            if self.lengths is not None:
                order = group_by_length(order, self.lengths, self.global_batch, g)
            self._order = order
        return self._order

    def next(self) -> dict[str, Any]:
        if self.index >= self.per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        order = self._epoch_order()
        start = self.index * self.global_batch + self.rank * self.batch_size
        self.last_indices = order[start : start + self.batch_size]  # the teacher cache is keyed by example
        items = [self.dataset[i] for i in self.last_indices]
        self.index += 1
        return self.collate_fn(items)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


@dataclass
class TrainerState:
    """Everything beyond model/optimizer/RNG that a checkpoint must restore."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    last_loss: float = float("nan")
    data: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "index": 0})
    scheduler: dict[str, Any] = field(default_factory=dict)
    losses: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)
    # the settings the checkpoint was trained with (compared on --resume) and the changes --resume-changed made
    config: dict[str, Any] = field(default_factory=dict)
    resume_changes: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Setup


def _mixed_precision(cfg: DistillConfig, device_type: str) -> str:
    """The autocast precision: bf16 on GPUs that have it and, when asked, on CPUs with native bf16 matmuls
    (AVX512-BF16 / AMX); fp16 needs CUDA."""
    choice = cfg.optim.mixed_precision
    if choice == "auto":
        return "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if choice == "fp16" and device_type != "cuda":
        raise ConfigError(
            "--mixed-precision fp16 needs a CUDA device", hint="use --mixed-precision bf16 (or no) on a CPU"
        )
    if choice == "bf16" and device_type == "cpu" and not torch.cpu._is_avx512_bf16_supported():
        raise ConfigError(
            "--mixed-precision bf16 on a CPU needs native bf16 matrix products (AVX512-BF16 or AMX), which this CPU "
            "lacks: bf16 would be emulated and slower than fp32",
            hint="use --mixed-precision no (or auto) here",
        )
    return choice


def _build_accelerator(cfg: DistillConfig, project_dir: Path) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    from distillkit.models.load import resolve_device

    device = resolve_device(cfg.optim.device)
    mp = _mixed_precision(cfg, device.type)
    # accelerate keeps one process-wide state; a later run in the same process (the Python API, a prune/quantize
    # recovery run) may ask for another precision, which accelerate refuses unless that state is started afresh.
    # The process-group part (PartialState) is kept.
    if AcceleratorState._shared_state.get("_mixed_precision", mp) != mp:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        mixed_precision=mp,
        cpu=device.type == "cpu",
        log_with="tensorboard" if cfg.output.log_to == "tensorboard" else None,
        project_config=ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(project_dir / "tensorboard")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        step_scheduler_with_optimizer=False,
    )


def _teacher_dtype(cfg: DistillConfig, mixed_precision: str) -> str:
    if cfg.models.teacher_dtype:
        return cfg.models.teacher_dtype
    return {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision, "float32")


def load_student(cfg: DistillConfig, teacher: Any, device: Any) -> tuple[Any, dict[str, Any], Any]:
    """The student model, its description for the manifest, and its Source (None for a spec)."""
    from distillkit.models import load_model
    from distillkit.models.arch import check_vocab
    from distillkit.models.spec import is_spec, parse_student_spec
    from distillkit.models.student import build_student

    if is_spec(cfg.models.student) and cfg.llm.teacher_cache:
        from distillkit.distill.teacher_cache import spec_student_without_weights

        return (
            spec_student_without_weights(cfg, teacher, device),
            {"spec": cfg.models.student, "init": cfg.models.student_init},
            None,
        )
    if is_spec(cfg.models.student):
        spec = parse_student_spec(cfg.models.student, teacher.config)
        model = build_student(teacher.model, spec, init=cfg.models.student_init, seed=cfg.optim.seed).to(device).float()
        return model, {"spec": spec, "init": cfg.models.student_init}, None
    src = read_source(cfg.models.student)
    loaded = load_model(
        src,
        task=teacher.task,
        dtype="float32",
        device=str(device),
        allow_pickle=cfg.models.allow_pickle,
        trust_remote_code=cfg.models.trust_remote_code,
    )
    if not cfg.llm.cross_tokenizer:
        check_vocab(teacher.config, loaded.config)
    return loaded.model, describe_input(src.path, src.manifest), src


def _check_student(cfg: DistillConfig, task: str, teacher: Any, student: Any) -> None:
    """Refuse, before any data is read, sequences longer than either model's positions and a student with more
    parameters than its teacher.

    A larger student is refused rather than warned about: distillkit compresses, a spec student is already held to
    the teacher's size, and a larger model student is almost always --teacher and --student swapped, which would
    otherwise cost a full training run to find out.
    """
    from distillkit.models.load import check_max_length
    from distillkit.models.spec import is_spec

    if task != "image-classification":
        check_max_length(teacher.config, cfg.data.max_length, who=f"the teacher {teacher.path}")
        check_max_length(student.config, cfg.data.max_length, who=f"the student {cfg.models.student}")
    if cfg.llm.teacher_cache or is_spec(cfg.models.student):
        return  # a teacher skeleton has no real size; a spec student is checked against the teacher when parsed
    n_teacher = sum(p.numel() for p in teacher.model.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    if n_student > n_teacher:
        raise ConfigError(
            f"the student {cfg.models.student} has {n_student:,} parameters, more than the teacher {teacher.path} "
            f"({n_teacher:,})",
            hint="distillation here makes a model smaller: check that --teacher and --student are not swapped",
        )


def build_losses(
    cfg: DistillConfig, task: str, student_config: Any, teacher_config: Any
) -> list[tuple[str, float, Any]]:
    from distillkit.distill.losses import LossContext
    from distillkit.registry import LOSSES

    ctx = LossContext(
        temperature=cfg.loss.temperature,
        student_config=student_config,
        teacher_config=teacher_config,
        layer_map=cfg.loss.layer_map,
        jsd_beta=cfg.loss.jsd_beta,
        skew_lambda=cfg.loss.skew_lambda,
        taid_t_start=cfg.loss.taid_t_start,
        taid_t_end=cfg.loss.taid_t_end,
    )
    out = []
    for name, weight in cfg.loss_specs(task):
        entry = LOSSES.get(name)
        kind = entry.meta.get("kind")
        if task == "feature-extraction" and kind == "logits":
            raise ConfigError(
                f"loss {name} needs logits, but a {task} model has none",
                hint="use embedding_cosine, hidden_mse, hidden_cosine, minilm_attention or minilm_value",
            )
        if kind == "embedding" and task != "feature-extraction":
            raise ConfigError(
                f"loss {name} compares pooled embeddings and is for feature-extraction models",
                hint="use a logit loss such as forward_kl",
            )
        out.append((name, weight, entry.obj(ctx)))
    return out


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Checkpoints


def _save_checkpoint(
    accelerator: Any,
    module: Any,
    wd: Path,
    state: TrainerState,
    batches: EpochBatches,
    scheduler: Any,
    losses: list,
) -> None:
    # a checkpoint is what --resume trusts as "last good": non-finite weights must never replace one
    if not _weights_finite(accelerator, module):
        prev = checkpoint_step_in(wd)
        kept = (
            f"the checkpoint of step {prev} is kept in {wd}" if prev is not None else "there is no earlier checkpoint"
        )
        raise TrainingError(
            f"the weights became non-finite by step {state.step}; they were not saved, and {kept}",
            hint="lower --lr, or set --max-grad-norm (e.g. 1.0) to clip gradients; --resume continues from a kept "
            "checkpoint",
        )
    state.data = batches.state_dict()
    state.scheduler = scheduler.state_dict()
    state.losses = {f"{i}_{n}": loss.state_dict() for i, (n, _, loss) in enumerate(losses)}
    tmp = wd / f"{CHECKPOINT}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state.__dict__, default=float))
        final = wd / CHECKPOINT
        old = wd / f"{CHECKPOINT}.old"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _load_checkpoint(accelerator: Any, wd: Path) -> TrainerState:
    ckpt = wd / CHECKPOINT
    accelerator.load_state(str(ckpt))
    data = json.loads((ckpt / STATE_FILE).read_text())
    return TrainerState(**data)


def checkpoint_step(out: str | os.PathLike) -> int | None:
    """The step of the checkpoint an interrupted run left for ``out`` (None when there is none)."""
    return checkpoint_step_in(work_dir(out))


def checkpoint_step_in(wd: Path) -> int | None:
    f = wd / CHECKPOINT / STATE_FILE
    return json.loads(f.read_text())["step"] if f.is_file() else None


def _weights_finite(accelerator: Any, module: Any) -> bool:
    params = [p.detach() for p in module.parameters()]
    if not params:
        return True
    ok = torch.stack([torch.isfinite(p).all() for p in params]).all().float().reshape(1)
    if accelerator.num_processes > 1:  # FSDP shards: every process checks its own part
        ok = accelerator.reduce(ok, reduction="min")
    return bool(ok.item() > 0)


def _grads_finite(accelerator: Any, module: Any) -> tuple[bool, float]:
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    if not grads:
        return True, 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    return _finite(accelerator, norm), float(norm)


# --------------------------------------------------------------------------------------------
# --resume with other settings

# Settings the loop follows from the next step on, so --resume-changed may change them mid-run.
RESUMABLE_CHANGES = frozenset(
    {
        "steps",
        "grad_accum",
        "lr",
        "weight_decay",
        "warmup",
        "max_grad_norm",
        "temperature",
        "alpha",
        "jsd_beta",
        "skew_lambda",
        "taid_t_start",
        "taid_t_end",
        "teacher_dtype",
        "student_data_fraction",
        "gen_temperature",
    }
)
# Settings that do not change what is trained (evaluation, logging, checkpoints, placement, load permissions).
NOT_TRAINING = frozenset(
    {
        "eval_every",
        "eval_batches",
        "eval_data",
        "save_every",
        "log_to",
        "device",
        "allow_pickle",
        "trust_remote_code",
    }
)
# Everything else (student architecture, data and its order, losses and their modules, precision) is fixed
# by the checkpoint: its weights, optimizer state and data position mean nothing under other values.
_PATH_FIELDS = ("teacher", "student", "data", "teacher_cache", "sequence_cache", "labels", "prompts")


def resume_fingerprint(cfg: DistillConfig, world_size: int) -> dict[str, Any]:
    """The settings a checkpoint records, with local paths made absolute so another cwd compares equal."""
    d = cfg.to_dict()
    for k in _PATH_FIELDS:
        v = d.get(k)
        if isinstance(v, str) and v not in ("", "-") and Path(v).expanduser().exists():
            d[k] = os.path.realpath(Path(v).expanduser())
    d["world_size"] = world_size
    return d


def _show(v: Any) -> str:
    return json.dumps(v) if isinstance(v, list | dict) else str(v)


def resume_changes(cfg: DistillConfig, wd: Path, world_size: int, allow: bool) -> dict[str, list[Any]]:
    """Compare ``cfg`` with the settings saved with the checkpoint in ``wd``; ``{field: [old, new]}``.

    A change to a field that cannot change mid-run is refused; a change to one that can is refused too
    unless ``allow`` (``--resume-changed``), because the run would otherwise not be what its manifest says.
    """
    saved = json.loads((wd / CHECKPOINT / STATE_FILE).read_text()).get("config") or {}
    if not saved:  # a checkpoint from before settings were saved with it: nothing to compare
        return {}
    new = resume_fingerprint(cfg, world_size)
    diff = {k: [saved.get(k), new.get(k)] for k in sorted(set(saved) & set(new)) if saved[k] != new[k]}
    diff = {k: v for k, v in diff.items() if k not in NOT_TRAINING}
    fixed = {k: v for k, v in diff.items() if k not in RESUMABLE_CHANGES}
    shown = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in diff.items())
    step = checkpoint_step_in(wd)
    if fixed:
        raise ConfigError(
            f"--resume cannot continue the checkpoint of step {step} with other "
            f"{', '.join(fixed)} (they cannot change mid-run): {shown}",
            hint=f"rerun with the checkpoint's values, or delete {wd} and start over",
        )
    if diff and not allow:
        raise ConfigError(
            f"--resume would continue the checkpoint of step {step} with other settings: {shown}",
            hint="pass --resume-changed to continue with the new values (the manifest records the change), "
            "or rerun with the checkpoint's values",
        )
    return diff


def _apply_resumed_hyperparameters(cfg: DistillConfig, optimizer: Any, scheduler: Any) -> None:
    """Put the new --lr, --weight-decay and schedule into optimizer and scheduler state loaded from a checkpoint
    (which restored the old ones); the schedule is the new one, evaluated at the checkpoint's step."""
    groups = optimizer.param_groups
    groups[0]["weight_decay"] = cfg.optim.weight_decay  # group 0 decays; group 1 (norms, biases) never does
    scheduler.base_lrs = [cfg.optim.lr for _ in groups]
    for group, fn, base in zip(groups, scheduler.lr_lambdas, scheduler.base_lrs, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in groups]


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class StudentHooks:
    """Ways for another stage to train through this loop (quantized distillation does).

    ``prepare(student)`` runs on every process after the student is loaded and before training
    (it may swap modules, e.g. fake-quantized Linear layers) and returns the model to train;
    ``finish(student)`` runs on the main process with the trained, unwrapped student before it is
    saved, and may convert it in place.
    """

    prepare: Any = None
    finish: Any = None
    label: str = "distill"  # what progress lines on stderr are headed with, e.g. "qat"


@releases_locks
def run_distill(
    cfg: DistillConfig,
    *,
    out: str,
    overwrite: bool = False,
    resume: bool = False,
    hooks: StudentHooks | None = None,
    resume_changed: bool = False,
) -> dict | None:
    """Distil ``cfg.models.teacher`` into ``cfg.models.student``; write the artifact ``out``; return its manifest.

    ``resume_changed`` lets ``resume`` continue a checkpoint with other hyper-parameters (see
    :func:`resume_changes`). Returns None on processes other than the main one in multi-process runs.
    """
    t_start = time.perf_counter()
    if resume_changed and not resume:
        raise ConfigError("--resume-changed only applies to --resume", hint="add --resume, or drop --resume-changed")
    out_path = check_output(
        out,
        overwrite,
        protect=[cfg.models.teacher, cfg.models.student, cfg.data.data, cfg.llm.teacher_cache, cfg.llm.sequence_cache],
    )
    try:
        return _run_locked(cfg, out_path, overwrite, resume, resume_changed, hooks, t_start)
    finally:
        release_output(out_path)


def _run_locked(
    cfg: DistillConfig,
    out_path: Path,
    overwrite: bool,
    resume: bool,
    resume_changed: bool,
    hooks: StudentHooks | None,
    t_start: float,
) -> dict | None:
    wd = work_dir(out_path)
    has_ckpt = (wd / CHECKPOINT / STATE_FILE).is_file()
    if resume and not has_ckpt:
        raise ConfigError(
            f"--resume was given but there is no checkpoint for {out_path} (looked in {wd})",
            hint="run without --resume to start, and pass --save-every N to checkpoint",
        )
    if not resume and wd.exists() and has_ckpt:
        raise OutputError(
            f"an interrupted run left a checkpoint (step {checkpoint_step(out_path)}) in {wd}",
            hint="pass --resume to continue it, or delete that directory to start over",
        )

    accelerator = _build_accelerator(cfg, wd)
    changes = resume_changes(cfg, wd, accelerator.num_processes, resume_changed) if resume else {}
    if accelerator.is_main_process:
        if not resume and wd.exists():
            # scratch of an earlier run without a checkpoint (its metrics.jsonl, logs): never merged into this one
            shutil.rmtree(wd)
        wd.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        return _run(cfg, accelerator, out_path, wd, overwrite, resume, t_start, hooks or StudentHooks(), changes)
    except BaseException as e:
        # a failed run keeps its work directory only if there is a checkpoint to resume from
        kept = (wd / CHECKPOINT / STATE_FILE).is_file()
        if accelerator.is_main_process and not kept:
            shutil.rmtree(wd, ignore_errors=True)
        if accelerator.is_main_process and kept and isinstance(e, KeyboardInterrupt):
            sys.stderr.write(
                f"the checkpoint of step {checkpoint_step(out_path)} is kept in {wd}; "
                "rerun the same command with --resume to continue\n"
            )
        raise


@dataclass
class _Models:
    """The teacher and student of a run, as loaded (step 1 of :func:`_run`)."""

    teacher: Any
    teacher_src: Any
    task: str
    student: Any
    student_desc: dict[str, Any]
    student_src: Any
    n_params_student: int  # counted before the hooks: quantized distillation adds quantizer scales, not weights
    load_s: float


@dataclass
class _Training:
    """What the training loop works with (step 3 of :func:`_run`)."""

    losses: list
    module: Any
    fused_loss: str
    teacher_blocks: list[int]
    optimizer: Any
    scheduler: Any
    batches: EpochBatches
    feed: Any
    pooling: str  # the teacher's (and so the student's) sentence pooling
    uses_teacher: bool  # False with --alpha 1: no step runs the teacher (evaluation still compares with it)


def _run(
    cfg: DistillConfig,
    accelerator: Any,
    out_path: Path,
    wd: Path,
    overwrite: bool,
    resume: bool,
    t_start: float,
    hooks: StudentHooks,
    changes: dict[str, list[Any]] | None = None,
) -> dict | None:
    """One distillation run, in the order a reader follows it: load the models, the data, build the training,
    restore a checkpoint, train, evaluate, write the artifact."""
    from accelerate.utils import set_seed

    console = _console(accelerator)
    set_seed(cfg.optim.seed)
    models = _load_models(cfg, accelerator, out_path, overwrite, hooks)
    processor, data, heldout = _load_data(cfg, models, wd, accelerator.device)
    training = _build_training(cfg, accelerator, models, data, processor)
    state = _start_or_resume(cfg, accelerator, wd, training, resume, changes, console)
    evaluate = _evaluator(cfg, accelerator, models, data, training, wd)
    _announce(console, cfg, accelerator, models, training, data)
    initial_eval = evaluate(state.step) if state.step == 0 else state.best.get("initial_eval", {})
    state.best["initial_eval"] = initial_eval
    if heldout is not None and state.step == 0 and accelerator.is_main_process:
        state.best["initial_heldout"] = heldout.measure(accelerator.unwrap_model(training.module).student)
        _show_heldout(console, "untrained student", state.best["initial_heldout"])

    _train(cfg, accelerator, training, state, wd, evaluate, hooks)
    if not _weights_finite(accelerator, training.module):
        raise TrainingError(
            f"the weights became non-finite by step {state.step}; no artifact was written",
            hint="lower --lr, or set --max-grad-norm (e.g. 1.0) to clip gradients",
        )
    final_eval = evaluate(state.step)
    accelerator.wait_for_everyone()
    if cfg.output.log_to == "tensorboard":
        accelerator.end_training()
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None
    student_model = accelerator.unwrap_model(training.module).student
    if hooks.finish is not None:
        hooks.finish(student_model)
    manifest = _manifest(cfg, accelerator, out_path, models, training, state, data, heldout, initial_eval, final_eval)
    _write_artifact(
        manifest,
        student_model,
        models,
        processor,
        heldout,
        wd,
        out_path,
        overwrite,
        t_start,
        console,
        accelerator.device,
    )
    accelerator.wait_for_everyone()
    return manifest.to_dict()


def _load_models(cfg: DistillConfig, accelerator: Any, out_path: Path, overwrite: bool, hooks: StudentHooks) -> _Models:
    from distillkit.distill.feed import check_modes
    from distillkit.models import load_model

    t0 = time.perf_counter()
    teacher_src = read_source(cfg.models.teacher)
    device = accelerator.device
    if cfg.llm.teacher_cache:  # LLM modes: top-k logits on disk stand in for the teacher's weights
        from distillkit.distill.teacher_cache import load_teacher_skeleton

        teacher = load_teacher_skeleton(cfg, teacher_src, _teacher_dtype(cfg, accelerator.mixed_precision))
    else:
        teacher = load_model(
            teacher_src,
            task=cfg.models.task,
            dtype=_teacher_dtype(cfg, accelerator.mixed_precision),
            device=str(device),
            allow_pickle=cfg.models.allow_pickle,
            trust_remote_code=cfg.models.trust_remote_code,
        )
    teacher.model.eval().requires_grad_(False)
    task = teacher.task
    check_modes(cfg, task)
    student, student_desc, student_src = load_student(cfg, teacher, device)
    _check_student(cfg, task, teacher, student)
    if student_src is not None and student_src.is_local:  # a student from stdin is only known now
        check_output(out_path, overwrite, protect=[student_src.path])
    if cfg.models.student_init == "random" and student_src is not None:
        raise ConfigError(
            "--student-init random applies to a student spec, not to an existing model",
            hint="pass --student layers=N,... or drop --student-init",
        )
    if cfg.optim.freeze_embeddings:  # refused here, before any data is read, when the student has no token table
        _freeze_embeddings(student, task)
    n_params = _count_params(student)
    if hooks.prepare is not None:
        student = hooks.prepare(student)
    if cfg.diffusion.sparse_attention:  # sparsity-aware: train with the attention the student will run with
        from distillkit.attention import enable_sparse_attention

        student = enable_sparse_attention(student, cfg.diffusion.sparse_attention, cfg.diffusion.sparse_block_size)
    student.train()
    return _Models(teacher, teacher_src, task, student, student_desc, student_src, n_params, time.perf_counter() - t0)


def _load_data(cfg: DistillConfig, models: _Models, wd: Path, device: Any) -> tuple[Any, Any, Any]:
    """(processor, data, held-out evaluation or None). The data is tokenised with the teacher's tokenizer, since the
    vocabularies are shared (with --cross-tokenizer, the student's; the teacher re-tokenises the text)."""
    from distillkit.data import DataSpec, prepare_data
    from distillkit.distill.heldout import build_heldout_eval

    teacher, task = models.teacher, models.task
    processor = teacher.processor
    if cfg.llm.cross_tokenizer:
        from distillkit.distill.cross_tokenizer import student_tokenizer

        processor = student_tokenizer(cfg, models.student_src, task)
    if processor is None:
        raise ModelError(
            f"the teacher {teacher.path} has no tokenizer or image processor saved with it",
            hint="save one with the model (tokenizer.save_pretrained(dir))",
        )
    d = cfg.data
    spec = DataSpec(
        data=d.data,
        text_column=d.text_column,
        label_column=d.label_column,
        eval_split=d.eval_split,
        max_length=d.max_length,
        max_samples=d.max_samples,
        seed=cfg.optim.seed,
    )
    data = prepare_data(spec, processor, task)
    if (
        cfg.loss.alpha > 0
        and task in ("sequence-classification", "image-classification", "masked-lm")
        and not _has_labels(data.train)
    ):
        raise ConfigError(
            f"--alpha {cfg.loss.alpha} mixes in a hard-label loss, but the data has no labels",
            hint="pass --label-column, or --alpha 0 for pure distillation",
        )
    if cfg.loss.alpha > 0 and task == "feature-extraction":
        raise ConfigError(
            "--alpha needs labels, and a feature-extraction model has no label head", hint="use --alpha 0"
        )
    heldout = build_heldout_eval(
        d.eval_data,
        task,
        teacher.model,
        processor,
        pooling=teacher.pooling,
        max_length=d.max_length,
        # no teacher outputs to compare with: another tokenizer, or a teacher cache (the teacher has no weights here)
        teacher_comparable=not cfg.llm.cross_tokenizer and not cfg.llm.teacher_cache,
    )
    if cfg.llm.mode == "sequence":  # train on teacher completions cached on disk
        from distillkit.distill.sequence import sequence_data

        data = sequence_data(cfg, teacher, processor, data, wd, device)
    return processor, data, heldout


def _freeze_embeddings(student: Any, task: str) -> None:
    """``--freeze-embeddings``: the student's input token-embedding table gets no gradient (a tied output head shares
    the tensor, so it is frozen too)."""
    get = getattr(student, "get_input_embeddings", None)
    table = get() if callable(get) else None  # a ViT answers with its patch projection, not an Embedding
    if not isinstance(table, torch.nn.Embedding):
        raise ConfigError(
            f"--freeze-embeddings needs a student with a token-embedding table; this {task} student has none",
            hint="drop --freeze-embeddings",
        )
    table.weight.requires_grad_(False)


def _build_training(cfg: DistillConfig, accelerator: Any, models: _Models, data: Any, processor: Any) -> _Training:
    """Losses, the module that computes them, the optimiser and its schedule, the batches and the teacher feed."""
    from transformers import get_cosine_schedule_with_warmup

    from distillkit.distill.fused import attach_fused_loss
    from distillkit.distill.modes import build_feed

    teacher, task, student, device = models.teacher, models.task, models.student, accelerator.device
    if cfg.llm.cross_tokenizer:
        from distillkit.distill.cross_tokenizer import build_cross_losses

        losses = build_cross_losses(cfg, task)
    else:
        losses = build_losses(cfg, task, student.config, teacher.config)
    module = DistillModule(student, losses, task, teacher.pooling, cfg.loss.alpha).to(device)
    fused_loss = attach_fused_loss(module, cfg, task, teacher.model)
    teacher_blocks = sorted({b for _, _, loss in losses for b in loss.layers()[1]})

    decay, no_decay = [], []
    for n, p in module.named_parameters():
        if not p.requires_grad:  # frozen: no optimiser state
            continue
        skip = p.ndim < 2 or "norm" in n.lower() or n.endswith(".bias") or getattr(p, "_no_weight_decay", False)
        (no_decay if skip else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr,
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps(), cfg.optim.steps)
    module, optimizer = accelerator.prepare(module, optimizer)
    batches = EpochBatches(
        data.train,
        data.collate_fn,
        cfg.optim.batch_size,
        cfg.optim.seed,
        accelerator.process_index,
        accelerator.num_processes,
        lengths=example_lengths(data.train) if cfg.data.group_by_length else None,
    )
    feed = build_feed(cfg, task=task, teacher=teacher, device=device, data=data, processor=processor, module=module)
    return _Training(
        losses,
        module,
        fused_loss,
        teacher_blocks,
        optimizer,
        scheduler,
        batches,
        feed,
        teacher.pooling,
        cfg.loss.alpha < 1,
    )


def _start_or_resume(
    cfg: DistillConfig,
    accelerator: Any,
    wd: Path,
    training: _Training,
    resume: bool,
    changes: dict[str, list[Any]] | None,
    console: Any,
) -> TrainerState:
    """A fresh state, or the checkpoint's (batches, schedule and loss states restored; --resume-changed applied)."""
    state = TrainerState()
    if resume:
        state = _load_checkpoint(accelerator, wd)
        training.batches.load_state_dict(state.data)
        training.scheduler.load_state_dict(state.scheduler)
        for i, (n, _, loss) in enumerate(training.losses):
            loss.load_state_dict(state.losses.get(f"{i}_{n}", {}))
        _trim_log(wd / METRICS_FILE, state.step)
        if state.step > cfg.optim.steps:
            raise ConfigError(
                f"the checkpoint is at step {state.step}, beyond --steps {cfg.optim.steps}",
                hint=f"pass --steps {state.step} or more",
            )
        if changes:
            _apply_resumed_hyperparameters(cfg, training.optimizer, training.scheduler)
            state.resume_changes.append({"step": state.step, "changes": changes})
            shown = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items())
            console.print(f"[bold]resume-changed[/]: from step {state.step} on, {shown}")
        console.print(f"[bold]resuming[/] from step {state.step} of {cfg.optim.steps}")
    state.config = resume_fingerprint(cfg, accelerator.num_processes)
    if cfg.output.log_to == "tensorboard":
        accelerator.init_trackers("distill", config={k: str(v) for k, v in cfg.to_dict().items()})
    return state


def _evaluator(
    cfg: DistillConfig, accelerator: Any, models: _Models, data: Any, training: _Training, wd: Path
) -> Callable[[int], dict[str, float]]:
    """``evaluate(step)``: the student's quality on the eval split (logged to the metrics file)."""
    eval_loader = _eval_batches(data, cfg)
    device = accelerator.device

    def evaluate(step: int) -> dict[str, float]:
        from distillkit.evaluate import evaluate_quality

        # a fixed seed makes eval batches (masked-LM masking) identical every time and leaves training RNG untouched
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.optim.seed)
            m = evaluate_quality(
                accelerator.unwrap_model(training.module).student,
                eval_loader(),
                models.task,
                teacher=training.feed.eval_teacher(),
                pooling=models.teacher.pooling,
                device=device,
                max_batches=cfg.output.eval_batches,
            )
        _log(accelerator, wd / METRICS_FILE, {"step": step, "eval": m}, cfg)
        return m

    return evaluate


def _announce(
    console: Any, cfg: DistillConfig, accelerator: Any, models: _Models, training: _Training, data: Any
) -> None:
    n_t, n_s = _count_params(models.teacher.model), models.n_params_student
    console.print(
        f"[bold]distill[/] {models.task}: teacher {models.teacher.config.model_type} {n_t / 1e6:.2f}M params -> "
        f"student {n_s / 1e6:.2f}M ({n_s / n_t:.1%}); losses "
        + ", ".join(f"{n}:{w:g}" for n, w, _ in training.losses)
        + f"; {len(data.train)} train / {len(data.eval)} eval examples; "
        f"{accelerator.num_processes} process(es) on {accelerator.device}"
    )


def _train(
    cfg: DistillConfig,
    accelerator: Any,
    training: _Training,
    state: TrainerState,
    wd: Path,
    evaluate: Callable[[int], dict[str, float]],
    hooks: StudentHooks,
) -> None:
    """Steps until ``--steps``, with the periodic evaluations and checkpoints; ``state`` is updated in place."""
    t = training
    train_t0 = time.perf_counter() - state.elapsed
    with _progress(accelerator, cfg.optim.steps, state.step, hooks.label) as bar:
        while state.step < cfg.optim.steps:
            step_loss, parts_sum, step_tokens = _train_step(cfg, accelerator, t, state, wd)
            state.step += 1
            state.tokens += step_tokens
            state.last_loss = step_loss
            state.elapsed = time.perf_counter() - train_t0
            bar(state.step, step_loss, state.tokens / max(state.elapsed, 1e-9))
            record = {
                "step": state.step,
                "loss": step_loss,
                "lr": t.scheduler.get_last_lr()[0],
                **{f"loss/{k}": v for k, v in parts_sum.items()},
                "tokens": state.tokens,
            }
            _log(accelerator, wd / METRICS_FILE, record, cfg)
            if cfg.output.eval_every and state.step % cfg.output.eval_every == 0 and state.step < cfg.optim.steps:
                evaluate(state.step)
            if cfg.output.save_every and state.step % cfg.output.save_every == 0 and state.step < cfg.optim.steps:
                _save_checkpoint(accelerator, t.module, wd, state, t.batches, t.scheduler, t.losses)


def _train_step(
    cfg: DistillConfig, accelerator: Any, t: _Training, state: TrainerState, wd: Path
) -> tuple[float, dict[str, float], int]:
    """One optimiser step over ``--grad-accum`` micro-batches -> (loss, loss parts, tokens). A non-finite loss or
    gradient stops the run with the last good checkpoint kept (it never reaches the weights)."""
    progress = state.step / cfg.optim.steps
    step_start = t.batches.state_dict()  # a failed step is redone from here on --resume
    accum = cfg.optim.grad_accum
    t.optimizer.zero_grad(set_to_none=True)
    step_loss, parts_sum, step_tokens = 0.0, {}, 0
    for micro in range(accum):
        batch = t.feed.next_batch(t.batches, state.step, micro)
        t_feats = None
        if t.uses_teacher:
            with torch.no_grad(), accelerator.autocast():
                t_feats = t.feed.teacher_features(
                    batch, module_needs(t.module, accelerator), t.teacher_blocks, t.pooling
                )
        sync = micro == accum - 1
        ctx = accelerator.no_sync(t.module) if not sync and accelerator.num_processes > 1 else _null()
        with ctx, accelerator.autocast():
            loss, parts = t.module(batch, t_feats, progress)
        if not _finite(accelerator, loss):
            _stop_non_finite(
                accelerator, t.module, wd, state, t.batches, step_start, t.scheduler, t.losses, "loss", loss.item()
            )
        accelerator.backward(loss / accum)
        step_loss += loss.item() / accum
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v.item() / accum
        step_tokens += _tokens(batch) * accelerator.num_processes
    # with fp16 the grad scaler skips overflowing steps itself; otherwise a non-finite gradient must never
    # reach the weights and a checkpoint, with clipping on or off
    finite, norm_value = True, 0.0
    if cfg.optim.max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(t.module.parameters(), cfg.optim.max_grad_norm)
        if norm is not None and accelerator.scaler is None:
            norm_value = float(norm)
            finite = math.isfinite(norm_value)
    elif accelerator.scaler is None:
        finite, norm_value = _grads_finite(accelerator, t.module)
    if not finite:
        _stop_non_finite(
            accelerator, t.module, wd, state, t.batches, step_start, t.scheduler, t.losses, "gradient norm", norm_value
        )
    t.optimizer.step()
    t.scheduler.step()
    return step_loss, parts_sum, step_tokens


def _manifest(
    cfg: DistillConfig,
    accelerator: Any,
    out_path: Path,
    models: _Models,
    training: _Training,
    state: TrainerState,
    data: Any,
    heldout: Any,
    initial_eval: dict[str, float],
    final_eval: dict[str, float],
) -> Manifest:
    teacher = models.teacher
    n_t, n_s = _count_params(teacher.model), models.n_params_student
    student_model = accelerator.unwrap_model(training.module).student
    metrics = {
        **{f"student_{k}" if not k.startswith("teacher_") else k: v for k, v in final_eval.items()},
        **{f"initial_student_{k}": v for k, v in initial_eval.items() if not k.startswith("teacher_")},
        **{f"initial_student_{k}": v for k, v in state.best.get("initial_heldout", {}).items()},
        "final_train_loss": state.last_loss,
        "steps": state.step,
        "train_tokens": state.tokens,
        "teacher_params": n_t,
        "student_params": n_s,
        "param_ratio": n_s / n_t,
        **training.feed.metrics(),
    }
    train_s = state.elapsed
    return Manifest(
        stage="distill",
        path=str(out_path),
        task=models.task,
        model_type=student_model.config.model_type,
        inputs={"teacher": describe_input(teacher.path, models.teacher_src.manifest), "student": models.student_desc},
        config={
            **cfg.to_dict(),
            "resolved_losses": [[n, w] for n, w, _ in training.losses],
            "resolved_fused_loss": training.fused_loss,
            "world_size": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
        },
        metrics=metrics,
        timings={"load_s": models.load_s, "train_s": train_s, "tokens_per_s": state.tokens / max(train_s, 1e-9)},
        history=history_of(models.student_src),
        extra={
            "data": data.info,
            **({"eval_data": heldout.info()} if heldout is not None else {}),
            "pooling": teacher.pooling,
            # config holds the values of the last stretch; these say what ran before each --resume-changed
            **({"resume_changes": state.resume_changes} if state.resume_changes else {}),
        },
    )


def _write_artifact(
    manifest: Manifest,
    student_model: Any,
    models: _Models,
    processor: Any,
    heldout: Any,
    wd: Path,
    out_path: Path,
    overwrite: bool,
    t_start: float,
    console: Any,
    device: Any,
) -> None:
    """Save the student atomically; held-out quality is measured on what was written, reloaded the way the next
    stage will load it."""
    metrics_log = wd / METRICS_FILE
    # the lock stays until the work directory is gone too (run_distill releases it)
    with atomic_artifact(out_path, overwrite, keep_lock=True) as tmp:
        save_student(student_model, models.teacher, tmp)
        processor.save_pretrained(tmp)
        if heldout is not None:
            manifest.metrics.update(_heldout_of_saved(heldout, tmp, models.task, device))
            _show_heldout(console, "student (saved)", manifest.metrics)
        if metrics_log.exists():
            shutil.copy(metrics_log, tmp / METRICS_FILE)
        if (wd / "tensorboard").exists():
            shutil.copytree(wd / "tensorboard", tmp / "logs")
        manifest.timings["total_s"] = time.perf_counter() - t_start
        finalize_artifact(tmp, manifest, out_path)
    shutil.rmtree(wd, ignore_errors=True)
    _summary(console, manifest)


def _heldout_of_saved(heldout: Any, directory: Path, task: str, device: Any) -> dict[str, float]:
    from distillkit.models.load import load_model

    saved = load_model(str(directory), task=task, device=str(device))
    return heldout.measure(saved.model)


def _show_heldout(console: Any, who: str, metrics: dict[str, float]) -> None:
    shown = ", ".join(f"{k.removeprefix('heldout_')} {v:.4g}" for k, v in metrics.items() if k.startswith("heldout_"))
    if shown:
        console.print(f"[bold]held-out[/] {who}: {shown}")


def _stop_non_finite(
    accelerator: Any,
    module: Any,
    wd: Path,
    state: TrainerState,
    batches: EpochBatches,
    step_start: dict[str, int],
    scheduler: Any,
    losses: list,
    what: str,
    value: float,
) -> None:
    """Keep the last good state as a checkpoint and stop with an error that says where it is."""
    batches.load_state_dict(step_start)
    _save_checkpoint(accelerator, module, wd, state, batches, scheduler, losses)
    raise TrainingError(
        f"the {what} became {value} at step {state.step + 1}; training stopped and the last good state "
        f"(step {state.step}) is kept in {wd}",
        hint="rerun the same command with --resume to continue from it, or delete that directory and start "
        "again with a lower --lr (or with --max-grad-norm to clip gradients)",
    )


def module_needs(module: Any, accelerator: Any) -> set[str]:
    return accelerator.unwrap_model(module).needs


def _trim_log(path: Path, step: int) -> None:
    """Drop records written after the checkpoint, which the resumed run will write again."""
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def _has_labels(dataset: Any) -> bool:
    return len(dataset) > 0 and "labels" in dataset[0]


def _eval_batches(data: Any, cfg: DistillConfig) -> Any:
    def it():
        for i in range(0, len(data.eval), cfg.optim.batch_size):
            yield data.collate_fn([data.eval[j] for j in range(i, min(i + cfg.optim.batch_size, len(data.eval)))])

    return it


def _tokens(batch: dict[str, Any]) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "input_ids" in batch:
        return batch["input_ids"].numel()
    return len(next(iter(batch.values())))


def _finite(accelerator: Any, loss: torch.Tensor) -> bool:
    ok = torch.isfinite(loss.detach()).float().reshape(1)
    if accelerator.num_processes > 1:
        ok = accelerator.reduce(ok, reduction="min")
    return bool(ok.item() > 0)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return False


def _log(accelerator: Any, path: Path, record: dict[str, Any], cfg: DistillConfig) -> None:
    if not accelerator.is_main_process:
        return
    with open(path, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")
    if cfg.output.log_to == "tensorboard":
        flat = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
        flat.update({f"eval/{k}": v for k, v in record.get("eval", {}).items()})
        accelerator.log(flat, step=record["step"])


def _console(accelerator: Any) -> Any:
    from rich.console import Console

    return Console(stderr=True, quiet=not accelerator.is_main_process)


class _progress:
    """Step, loss, tokens/s and ETA on stderr (main process only): a bar on a terminal, plain lines in a log."""

    def __init__(self, accelerator: Any, total: int, start: int, label: str = "distill"):
        from distillkit.progress import Progress

        self.progress = Progress(label, total, unit="step", start=start, enabled=accelerator.is_main_process)

    def __enter__(self) -> Any:
        self.progress.__enter__()

        def update(step: int, loss: float, tps: float) -> None:
            self.progress.update(step, info=f"loss {loss:.4f} {tps:,.0f} tok/s")

        return update

    def __exit__(self, *exc: Any) -> bool:
        self.progress.__exit__(*exc)
        return False


def _summary(console: Any, manifest: Manifest) -> None:
    from rich.table import Table

    table = Table(title=f"distilled -> {manifest.path}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in sorted(manifest.metrics.items()):
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(table)
