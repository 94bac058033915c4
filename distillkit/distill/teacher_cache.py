"""Cached teachers: write the teacher's top-k logits once, then distil without loading its weights.

``distillkit distill --cache-teacher DIR`` runs the teacher over every example of the training split (the
packed blocks that ``--data/--max-length/--max-samples/--eval-split/--seed`` define) and writes, per token
position, the ``k`` largest logits and their token ids, plus one "tail" logit:

- ``shard-NNNNN.safetensors``: ``values`` float16 ``[n, T, k]`` (sorted, largest first), ``indices`` int32
  ``[n, T, k]`` and ``tail`` float32 ``[n, T]`` for ``n <= --sequence-shard-size`` consecutive examples;
- ``index.json``: k, vocab, temperature, shard list, the data spec and a sha256 of the training tokens.

A later ``distillkit distill --teacher-cache DIR`` (same data flags) loads only the teacher's config and
tokenizer. It refuses a cache whose data spec or tokens differ from the run's with a clear error.

The mass outside the top-k (documented choice: a uniform tail). The teacher's distribution at the cached
temperature ``T`` is rebuilt as dense logits ``[B, T, V]``: the k stored logits at their ids and, at every other
id, the same tail logit ``c = T * (logsumexp_{j not in top-k}(z_j / T) - log(V - k))``. So every divergence sees
the teacher's exact top-k probabilities *and* its exact leftover mass, spread evenly over the other tokens
(finite everywhere, so reverse KL and JSD stay finite too). Because ``c`` depends on ``T``, a cache is tied to the
temperature it was written with; a run with another ``--temperature`` is refused. With ``k == vocab`` there is no
tail and the rebuilt logits are the teacher's logits rounded to float16: a float16 teacher
(``--teacher-dtype float16``) gives bit-identical losses (tested).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from distillkit.errors import ConfigError, DataError
from distillkit.manifest import releases_locks

FORMAT = "distillkit-teacher-cache"
VERSION = 1
INDEX = "index.json"


def data_spec(cfg: Any, *, seed: bool = True) -> dict[str, Any]:
    """The fields of ``cfg`` that decide the training rows (a :class:`DataSpec`'s arguments); a cache records them."""
    spec = {
        "data": cfg.data.data,
        "text_column": cfg.data.text_column,
        "eval_split": cfg.data.eval_split,
        "max_length": cfg.data.max_length,
        "max_samples": cfg.data.max_samples,
    }
    return {**spec, "seed": cfg.optim.seed} if seed else spec


def tokens_sha256(dataset: Any) -> str:
    """sha256 of the training examples' ``input_ids`` in index order (int64 bytes)."""
    import torch

    h = hashlib.sha256()
    for i in range(len(dataset)):
        h.update(torch.as_tensor(dataset[i]["input_ids"], dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def topk_with_tail(logits: Any, k: int, temperature: float) -> tuple[Any, Any, Any]:
    """``logits`` [..., V] -> (values [..., k] float16, indices [..., k] int32, tail [...] float32).

    ``tail`` is the one logit that, given to each of the ``V - k`` other tokens, keeps the teacher's leftover
    probability mass at ``temperature`` (``-inf`` when ``k == V``).
    """
    import torch

    z = logits.float()
    vocab = z.shape[-1]
    values, indices = torch.topk(z, k, dim=-1)  # sorted, largest first
    if k == vocab:
        tail = torch.full(z.shape[:-1], float("-inf"), dtype=torch.float32, device=z.device)
    else:
        rest = z.scatter(-1, indices, float("-inf"))
        tail = temperature * (torch.logsumexp(rest / temperature, dim=-1) - math.log(vocab - k))
    return values.to(torch.float16), indices.to(torch.int32), tail


def dense_logits(values: Any, indices: Any, tail: Any, vocab: int) -> Any:
    """Rebuild teacher logits [..., V] float32: stored values at ``indices`` [..., k], ``tail`` [...] elsewhere."""

    out = tail.float()[..., None].expand(*tail.shape, vocab).clone()
    return out.scatter_(-1, indices.long(), values.float())


@releases_locks
def write_teacher_cache(cfg: Any, directory: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Run the teacher over the training split; write top-``cfg.llm.cache_topk`` shards; return the index."""
    import torch
    from safetensors.torch import save_file

    from distillkit.data import DataSpec, prepare_data
    from distillkit.distill.feed import check_modes
    from distillkit.manifest import atomic_artifact, check_output, read_source
    from distillkit.models import load_model
    from distillkit.models.arch import vocab_size
    from distillkit.models.load import resolve_device
    from distillkit.progress import Progress

    if cfg.llm.teacher_cache or cfg.llm.mode != "offline" or cfg.llm.cross_tokenizer:
        raise ConfigError(
            "--cache-teacher writes a cache for plain offline distillation",
            hint="drop --teacher-cache, --mode and --cross-tokenizer when writing a cache",
        )
    out = check_output(directory, overwrite, protect=[cfg.models.teacher, cfg.data.data], owned=is_teacher_cache)
    device = resolve_device(cfg.optim.device)
    src = read_source(cfg.models.teacher)
    teacher = load_model(
        src,
        task=cfg.models.task,
        dtype=cfg.models.teacher_dtype or "float32",
        device=str(device),
        allow_pickle=cfg.models.allow_pickle,
        trust_remote_code=cfg.models.trust_remote_code,
    )
    check_modes(cfg.replace(teacher_cache=str(out)), teacher.task)
    teacher.model.eval().requires_grad_(False)
    vocab = vocab_size(teacher.config)
    if cfg.llm.cache_topk > vocab:
        raise ConfigError(
            f"--cache-topk {cfg.llm.cache_topk} is larger than the teacher's vocabulary ({vocab})",
            hint=f"pass --cache-topk {vocab} or less",
        )
    data = prepare_data(DataSpec(**data_spec(cfg)), teacher.processor, teacher.task)
    n = len(data.train)
    shard_size = cfg.llm.sequence_shard_size
    index: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "k": cfg.llm.cache_topk,
        "vocab": vocab,
        "temperature": cfg.loss.temperature,
        "n_examples": n,
        "seq_len": int(data.train[0]["input_ids"].shape[-1]),
        "shard_size": shard_size,
        "shards": [],
        "data": data_spec(cfg),
        "tokens_sha256": tokens_sha256(data.train),
        "teacher": src.path,
        "teacher_model_type": teacher.config.model_type,
        "teacher_dtype": str(next(teacher.model.parameters()).dtype).replace("torch.", ""),
        "tail": "uniform: one logit per position keeps the leftover mass at the cached temperature",
    }
    with (
        atomic_artifact(out, overwrite, owned=is_teacher_cache) as tmp,
        Progress("teacher cache", n, unit="example") as bar,
    ):
        for s, start in enumerate(range(0, n, shard_size)):
            rows = list(range(start, min(start + shard_size, n)))
            parts: list[tuple[Any, Any, Any]] = []
            for b in range(0, len(rows), cfg.optim.batch_size):
                batch = data.collate_fn([data.train[i] for i in rows[b : b + cfg.optim.batch_size]])
                with torch.no_grad():
                    logits = teacher.model(
                        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                    ).logits
                parts.append(topk_with_tail(logits, cfg.llm.cache_topk, cfg.loss.temperature))
                bar.update(start + min(b + cfg.optim.batch_size, len(rows)))
            name = f"shard-{s:05d}.safetensors"
            save_file(
                {
                    "values": torch.cat([p[0] for p in parts]).cpu().contiguous(),
                    "indices": torch.cat([p[1] for p in parts]).cpu().contiguous(),
                    "tail": torch.cat([p[2] for p in parts]).cpu().contiguous(),
                },
                str(tmp / name),
            )
            index["shards"].append({"file": name, "start": start, "n": len(rows)})
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    index["path"] = str(out)
    return index


def is_teacher_cache(directory: Path) -> bool:
    """Whether ``directory`` is a teacher cache (which --overwrite may replace like an artifact)."""
    try:
        return json.loads((Path(directory) / INDEX).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_index(directory: str) -> dict[str, Any]:
    path = Path(directory) / INDEX
    if not path.is_file():
        raise ConfigError(
            f"{directory} is not a teacher cache (no {INDEX})",
            hint="write one with distillkit distill --teacher T --cache-teacher DIR (same data flags)",
        )
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ConfigError(f"{path} is not a version-{VERSION} {FORMAT} index", hint="rewrite the cache")
    return index


def load_teacher_skeleton(cfg: Any, src: Any, dtype: str = "float32") -> Any:
    """The teacher's config, class and tokenizer with no weights: the model is built on the meta device.

    ``dtype`` is the one the live teacher would have; a spec student is built in it first, as with a live teacher.
    """
    import torch

    from distillkit.models.load import (
        TASKS,
        LoadedModel,
        auto_class,
        detect_task,
        load_config,
        load_processor,
        resolve_dtype,
    )

    config, src = load_config(src, trust_remote_code=cfg.models.trust_remote_code, allow_pickle=cfg.models.allow_pickle)
    task = cfg.models.task or detect_task(config)
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}", hint=f"choose one of: {', '.join(TASKS)}")
    with torch.device("meta"):
        model = auto_class(task).from_config(config, trust_remote_code=cfg.models.trust_remote_code)
    model.to(resolve_dtype(dtype) or torch.float32)
    processor = load_processor(src.path, task, trust_remote_code=cfg.models.trust_remote_code)
    return LoadedModel(model=model, processor=processor, task=task, path=src.path, source=src)


def spec_student_without_weights(cfg: Any, teacher: Any, device: Any) -> Any:
    """A randomly initialised spec student, built from the teacher's config alone (as ``build_student`` does)."""
    import torch

    from distillkit.models.student import student_config, student_spec

    if cfg.models.student_init != "random":
        raise ConfigError(
            "with --teacher-cache there are no teacher weights to initialise a spec student from",
            hint="pass --student-init random, or give an existing --student model directory",
        )
    s_cfg = student_config(teacher.config, student_spec(cfg.models.student, teacher.config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.optim.seed)
        student = type(teacher.model)(s_cfg)
    # build_student hands the student over in the teacher's dtype; rounding through it keeps the two paths equal
    student.to(next(teacher.model.parameters()).dtype)
    return student.to(device).float()


class CachedTeacherFeed:
    """Offline batches whose teacher logits come from a cache written by :func:`write_teacher_cache`."""

    def __init__(self, cfg: Any, teacher: Any, task: str, device: Any, data: Any):
        from safetensors import safe_open

        from distillkit.models.arch import vocab_size
        from distillkit.registry import LOSSES

        self.device = device
        index = read_index(cfg.llm.teacher_cache)
        hint = "pass the data flags the cache was written with, or write a new cache with --cache-teacher"
        if index["data"] != data_spec(cfg):
            diff = sorted(k for k in index["data"] if index["data"][k] != data_spec(cfg).get(k))
            raise DataError(
                f"the teacher cache {cfg.llm.teacher_cache} was written for other data ({', '.join(diff)} differ)",
                hint=hint,
            )
        if index["n_examples"] != len(data.train) or index["tokens_sha256"] != tokens_sha256(data.train):
            raise DataError(
                f"the training tokens differ from those the teacher cache {cfg.llm.teacher_cache} was written for",
                hint=hint + " (and the same teacher tokenizer)",
            )
        if not math.isclose(index["temperature"], cfg.loss.temperature, rel_tol=0, abs_tol=0):
            raise ConfigError(
                f"the teacher cache keeps the tail mass at temperature {index['temperature']}, "
                f"but this run uses --temperature {cfg.loss.temperature}",
                hint=f"pass --temperature {index['temperature']}, or write a cache at this temperature",
            )
        if index["vocab"] != vocab_size(teacher.config):
            raise ConfigError(
                f"the cache has a {index['vocab']}-token vocabulary but the teacher config has "
                f"{vocab_size(teacher.config)}",
                hint="pass the --teacher the cache was written with",
            )
        for name, _ in cfg.loss_specs(task):
            if LOSSES.get(name).meta.get("kind") != "logits":
                raise ConfigError(
                    f"loss {name} needs teacher hidden states or attention, which a logit cache does not keep",
                    hint="use logit losses (forward_kl, reverse_kl, jsd, tvd, ...) with --teacher-cache",
                )
        self.index, self.vocab = index, index["vocab"]
        root = Path(cfg.llm.teacher_cache)
        self.shards = [
            (sh["start"], sh["n"], safe_open(str(root / sh["file"]), framework="pt")) for sh in index["shards"]
        ]
        self.loads = 0

    def _rows(self, rows: list[int]) -> tuple[Any, Any, Any]:
        import torch

        vals, idx, tail = [], [], []
        for r in rows:
            for start, n, handle in self.shards:
                if start <= r < start + n:
                    vals.append(handle.get_slice("values")[r - start])
                    idx.append(handle.get_slice("indices")[r - start])
                    tail.append(handle.get_slice("tail")[r - start])
                    break
            else:
                raise DataError(f"example {r} is not in the teacher cache", hint="rewrite the cache")
        return torch.stack(vals), torch.stack(idx), torch.stack(tail)

    def next_batch(self, batches: Any, step: int, micro: int) -> dict[str, Any]:
        import torch

        from distillkit.models.forward import to_device

        batch = to_device(batches.next(), self.device, non_blocking=True)
        batch["example_index"] = torch.tensor(batches.last_indices, dtype=torch.long)
        return batch

    def teacher_features(self, batch: dict[str, Any], needs: set[str], blocks: list[int], pooling: str) -> Any:
        from distillkit.distill.losses import Features

        values, indices, tail = self._rows(batch["example_index"].tolist())
        self.loads += values.shape[0]
        logits = dense_logits(values.to(self.device), indices.to(self.device), tail.to(self.device), self.vocab)
        return Features(logits=logits)

    def eval_teacher(self) -> Any:
        return None

    def metrics(self) -> dict[str, Any]:
        return {"teacher_cache_k": self.index["k"], "teacher_cache_rows_read": self.loads}
