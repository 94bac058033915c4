"""``run_bench``: measure models side by side in one process, after warm-up, over repeats.

Per model: parameters, weight bytes on disk, load time, prefill latency p50/p90 at ``[batch, seq]``
(random token ids within the vocabulary, or random ``pixel_values``), per-token decode latency for
causal LMs (greedy ``generate`` with the KV cache), throughput, peak memory, and quality on
``--data`` through :func:`distillkit.evaluate.evaluate_quality`. Model directories run in PyTorch;
``distillkit export`` artifacts in onnxruntime (``--format onnx``) or as ``torch.export`` programs
(``--format torch-export``), which have no KV cache and so no decode numbers.

Peak memory is the growth above the pre-load baseline over loading plus one prefill (and one
``generate`` for causal LMs): on CUDA from ``torch.cuda.max_memory_allocated`` (tensors only); on
CPU from the process's resident set size sampled every 2 ms (everything the process touched,
including allocator slack; memory freed by an earlier model and reused can make it an
underestimate, which is why each model's memory is measured after the previous one is freed and
the heap trimmed). The timed runs happen after that window, without the sampler running.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from distillkit import manifest as mf
from distillkit.bench.config import BenchConfig
from distillkit.bench.measure import (
    PeakMemory,
    check_writable,
    device_name,
    percentile,
    software_versions,
    sync_device,
    timed,
    trim_heap,
    weight_file_bytes,
)
from distillkit.errors import ConfigError, DistillkitError
from distillkit.progress import Progress

QUALITY_BATCH = 8  # quality is evaluated in batches of 8 whatever --batch is (in-batch metrics need > 2 rows)
# ----------------------------------------------------------------------------------------------
# Measurement helpers


def _model_name(src: mf.Source) -> str:
    return Path(src.path).name if src.is_local else src.path


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def _bench_dtype(cfg: BenchConfig, src: mf.Source, device: Any) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    if device.type != "cuda":
        return "float32"
    from distillkit.models.load import load_config

    config = load_config(src, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)[0]
    dt = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32").replace("torch.", "")
    return dt if dt in ("float32", "bfloat16", "float16") else "float32"


class _Stamps:
    """A stopping criterion that never stops and records when each new token was produced."""

    def __init__(self, device: Any):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        sync_device(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _decode(model: Any, inputs: tuple[Any, ...], io: Any, n_tokens: int, device: Any) -> tuple[float, float]:
    """One greedy ``generate`` of exactly ``n_tokens`` with the KV cache: (total ms, decode-only ms per token).

    Decode-only excludes the prefill and first token: (time of the last token - time of the first) / (n - 1)."""
    import torch
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    class Stamps(_Stamps, StoppingCriteria):
        pass

    def first_set(key: str) -> Any:
        for holder in (getattr(model, "generation_config", None), model.config):
            value = getattr(holder, key, None)
            if value is not None:
                return value
        return None

    eos, pad = first_set("eos_token_id"), first_set("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)
    gen = GenerationConfig(
        max_new_tokens=n_tokens,
        min_new_tokens=n_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    kwargs = dict(zip(io.input_names, inputs, strict=True))
    kwargs.pop("token_type_ids", None)
    stamps = Stamps(device)
    with torch.no_grad():
        sync_device(device)
        t0 = time.perf_counter()
        out = model.generate(**kwargs, generation_config=gen, stopping_criteria=StoppingCriteriaList([stamps]))
        sync_device(device)
        total = (time.perf_counter() - t0) * 1000.0
    made = out.shape[1] - inputs[0].shape[1]
    if made != n_tokens:
        raise DistillkitError(f"generate produced {made} tokens instead of {n_tokens}")
    per_token = (
        ((stamps.times[-1] - stamps.times[0]) * 1000.0 / (n_tokens - 1))
        if n_tokens > 1 and len(stamps.times) >= 2
        else float("nan")
    )
    return total, per_token


# ----------------------------------------------------------------------------------------------
# Quality data


def quality_batches(cfg: BenchConfig, processor: Any, task: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every example of ``--data``, collated in batches of :data:`QUALITY_BATCH` once, so that every model sees
    identical batches (masked-LM masks included).

    Bench evaluates on the whole file: the data module always holds some examples out, so the split is made
    half/half (the split that most easily leaves each half at least one packed block) and both halves are used."""
    import torch
    from torch.utils.data import ConcatDataset, DataLoader

    from distillkit.data import DataSpec, prepare_data

    spec = DataSpec(
        data=cfg.data,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        max_length=cfg.seq,
        max_samples=cfg.max_samples,
        seed=cfg.seed,
        eval_split=0.5,
    )
    prepared = prepare_data(spec, processor, task)
    parts = [d for d in (prepared.train, prepared.eval) if d is not None and len(d) > 0]
    dataset = ConcatDataset(parts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        batches = list(DataLoader(dataset, batch_size=QUALITY_BATCH, shuffle=False, collate_fn=prepared.collate_fn))
    info = {k: v for k, v in prepared.info.items() if isinstance(v, str | int | float | bool) or v is None}
    info.update(examples=len(dataset), batches=len(batches), batch_size=QUALITY_BATCH)
    return batches, info


def _max_token_id(batches: list[dict[str, Any]]) -> int:
    return max((int(b["input_ids"].max()) for b in batches if "input_ids" in b), default=-1)


# ----------------------------------------------------------------------------------------------
# One model


def _import_model_code(cfg: BenchConfig, src: mf.Source) -> None:
    """Import the model's Python modules before the load is timed: load time is reading weights, not imports."""
    from distillkit.bench.runtimes import export_format
    from distillkit.models.load import auto_class, detect_task, load_config

    fmt = export_format(src)
    if fmt == "onnx":
        with contextlib.suppress(ImportError):
            import onnxruntime  # noqa: F401
        return
    if fmt is not None:
        return
    config = load_config(src, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)[0]
    with contextlib.suppress(Exception):
        auto_class(cfg.task or detect_task(config))._model_mapping[type(config)]


def load_for_bench(cfg: BenchConfig, src: mf.Source, device: Any) -> Any:
    """A :class:`distillkit.bench.runtimes.BenchModel`: PyTorch, or the runtime of an ONNX / torch.export artifact."""
    from distillkit.bench import runtimes

    fmt = runtimes.export_format(src)
    if fmt == "onnx":
        return runtimes.load_onnx(src, cfg.task, device)
    if fmt == "torch-export":
        return runtimes.load_pt2(src, cfg.task, device)
    bench_model = runtimes.load_pytorch(
        src,
        cfg.task,
        device,
        _bench_dtype(cfg, src, device),
        allow_pickle=cfg.allow_pickle,
        trust_remote_code=cfg.trust_remote_code,
        quant_kernel=cfg.quant_kernel,
    )
    from distillkit.attention import enable_sparse_attention, sparse_settings

    sparse = sparse_settings(getattr(bench_model.model, "config", None))
    if sparse is not None:  # a student distilled with --sparse-attention is measured with the attention it trained with
        enable_sparse_attention(bench_model.model, *sparse)
    return bench_model


def check_positions(cfg: BenchConfig, bm: Any, name: str) -> None:
    """The timed prefill (``--seq``) and, for a model that generates, the prompt plus ``--decode-tokens`` must fit
    its positions: a learned position table (GPT-2) fails out of range, a RoPE model measures untrained lengths."""
    io = bm.io
    if io.kind != "text" or io.max_positions is None:
        return
    if cfg.seq > io.max_positions:
        raise ConfigError(
            f"--seq {cfg.seq} is longer than {name}'s {io.max_positions} positions",
            hint=f"pass --seq {io.max_positions} or less",
        )
    if bm.can_generate and cfg.seq + cfg.decode_tokens > io.max_positions:
        raise ConfigError(
            f"--seq {cfg.seq} plus --decode-tokens {cfg.decode_tokens} is longer than {name}'s "
            f"{io.max_positions} positions",
            hint=f"pass --seq {max(1, io.max_positions - cfg.decode_tokens)} or less, or fewer --decode-tokens",
        )


def warm_up_process(cfg: BenchConfig, src: mf.Source, device: Any) -> None:
    """Load the first model once and run it, untimed and unmeasured, so that one-time costs (lazy imports,
    thread pools, allocator arenas, kernel selection) do not land on whichever model is measured first."""
    import torch

    _import_model_code(cfg, src)
    bm = load_for_bench(cfg, src, device)
    check_positions(cfg, bm, _model_name(src))
    seq = cfg.seq
    inputs = bm.io.sample(cfg.batch, seq, seed=cfg.seed, device=device)
    with torch.no_grad():
        bm.forward(*inputs)
    if bm.can_generate:
        _decode(bm.model, inputs, bm.io, 2, device)
    del bm
    trim_heap()


def measure(cfg: BenchConfig, src: mf.Source, name: str, device: Any) -> tuple[dict[str, Any], Any]:
    """Load ``src`` and measure it; returns (record, BenchModel)."""
    import torch

    _import_model_code(cfg, src)
    trim_heap()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    notes: list[str] = []
    with PeakMemory(device) as memory:
        t0 = time.perf_counter()
        bm = load_for_bench(cfg, src, device)
        sync_device(device)
        load_s = time.perf_counter() - t0
        io = bm.io
        check_positions(cfg, bm, name)
        inputs = io.sample(cfg.batch, cfg.seq, seed=cfg.seed, device=device)

        def prefill() -> None:
            with torch.no_grad():
                bm.forward(*inputs)

        prefill()
        if bm.can_generate:
            _decode(bm.model, inputs, io, cfg.decode_tokens, device)
    # timed runs show on stderr: a large model's benchmark is minutes of otherwise silent work
    with Progress(f"bench {name} prefill", cfg.warmup + cfg.repeats, unit="run") as bar:
        latencies = timed(prefill, device, cfg.warmup, cfg.repeats, tick=bar.advance)
    p50 = percentile(latencies, 50)
    units = cfg.batch * (cfg.seq if io.kind == "text" else 1)
    record: dict[str, Any] = {
        "name": name,
        "path": src.path,
        "stage": src.manifest.stage if src.manifest is not None else None,
        "role": "model",
        "runtime": bm.runtime,
        "task": bm.task,
        "model_type": io.model_type,
        "dtype": bm.dtype,
        "quant_kernel": getattr(bm.model, "quant_kernel", None),
        "params": bm.params,
        "weights_bytes": bm.weights_bytes,
        "file_size_bytes": weight_file_bytes(src.path),
        "load_s": load_s,
        "latency_ms_p50": p50,
        "latency_ms_p90": percentile(latencies, 90),
        "latency_ms": latencies,
        "throughput": units / (p50 / 1000.0),
        "throughput_unit": "tokens/s" if io.kind == "text" else "images/s",
        "decode_ms_per_token_p50": None,
        "decode_ms_per_token_p90": None,
        "generate_ms_per_token": None,
        "decode_tokens_per_s": None,
        "peak_memory_mb": memory.peak / 2**20,
        "memory_method": memory.method,
        "quality": {},
        "notes": notes,
    }
    if record["file_size_bytes"] is None:
        notes.append("file size unknown: not a local directory")
    if bm.can_generate:
        totals, per_token = [], []
        with Progress(f"bench {name} decode", min(cfg.warmup, 1) + cfg.repeats, unit="run") as bar:
            for _ in range(min(cfg.warmup, 1)):
                _decode(bm.model, inputs, io, cfg.decode_tokens, device)
                bar.advance()
            for _ in range(cfg.repeats):
                total, step = _decode(bm.model, inputs, io, cfg.decode_tokens, device)
                totals.append(total / cfg.decode_tokens)
                per_token.append(step)
                bar.advance()
        record["generate_ms_per_token"] = percentile(totals, 50)
        if cfg.decode_tokens > 1:
            record["decode_ms_per_token_p50"] = percentile(per_token, 50)
            record["decode_ms_per_token_p90"] = percentile(per_token, 90)
            record["decode_tokens_per_s"] = cfg.batch / (record["decode_ms_per_token_p50"] / 1000.0)
        else:
            notes.append("decode-only latency needs --decode-tokens >= 2; generate_ms_per_token includes the prefill")
    elif bm.task == "causal-lm":
        why = "the export has no KV cache" if bm.runtime != "pytorch" else "the model has no generate()"
        notes.append(f"decode latency not measured: {why}")
    return record, bm


def _quality(
    bm: Any,
    record: dict[str, Any],
    batches: list[dict[str, Any]] | None,
    data_task: str | None,
    teacher: Any,
    device: Any,
) -> None:
    from distillkit.evaluate import evaluate_quality

    if batches is None:
        return
    if bm.task != data_task:
        record["notes"].append(f"quality skipped: task {bm.task} differs from the data's task {data_task}")
        return
    if bm.io.kind == "text" and _max_token_id(batches) >= bm.io.vocab_size:
        record["notes"].append(
            "quality skipped: the data's token ids exceed this model's vocabulary (another tokenizer?)"
        )
        return
    teacher_model = None
    if teacher is not None and teacher is not bm:
        if teacher.task == bm.task:
            teacher_model = teacher.model
        else:
            record["notes"].append(f"teacher comparison skipped: teacher task {teacher.task} differs")
    try:
        quality = evaluate_quality(
            bm.model,
            batches,
            bm.task,
            teacher=teacher_model,
            pooling=bm.pooling,
            teacher_pooling=teacher.pooling if teacher_model is not None else None,
            device=device,
        )
    except RuntimeError as e:
        if bm.runtime == "pytorch":
            raise
        # a static-shape torch.export program, or an ONNX graph, that cannot take the data's batch shapes
        record["notes"].append(
            f"quality skipped: the {bm.runtime} model cannot run the data batches ({str(e).splitlines()[0][:200]})"
        )
        return
    record["quality"] = {k: float(v) for k, v in quality.items()}


def _heldout(cfg: BenchConfig, bm: Any, record: dict[str, Any], heldout: Any, is_teacher: bool, notes: list) -> Any:
    """``--eval-data``: the held-out measures of ``bm`` into ``record["quality"]`` (``heldout_*``). The set and the
    teacher's side are built from the first model that can take them (the ``--against`` teacher when given)."""
    from distillkit.data.heldout import read_heldout
    from distillkit.distill.heldout import HELDOUT_TASKS, HeldOutEval

    if bm.runtime != "pytorch" or bm.task not in HELDOUT_TASKS or bm.processor is None:
        record["notes"].append(f"held-out measures skipped: they need a PyTorch {' or '.join(HELDOUT_TASKS)} model")
        return heldout
    if heldout is None:
        comparable = is_teacher
        heldout = HeldOutEval(
            read_heldout(cfg.eval_data),
            bm.task,
            bm.model,
            bm.processor,
            pooling=bm.pooling,
            max_length=cfg.seq,
            teacher_comparable=comparable,
        )
        if not comparable and bm.task == "feature-extraction":
            notes.append("--eval-data without --against: embedding geometry needs a teacher to compare with")
    if heldout.task != bm.task:
        record["notes"].append(f"held-out measures skipped: task {bm.task} differs from {heldout.task}")
        return heldout
    if not is_teacher:
        record["quality"].update(heldout.measure(bm.model))
    elif bm.task == "causal-lm":
        record["quality"]["heldout_perplexity"] = heldout.measure(bm.model)["heldout_perplexity"]
    return heldout


# ----------------------------------------------------------------------------------------------
# The run


def run_bench(cfg: BenchConfig, sources: list[Any] | None = None) -> dict[str, Any]:
    """Benchmark ``sources`` (default ``cfg.models``) and ``cfg.against`` side by side; returns the report.

    The baseline of the ratios is ``--against`` when given, else the first model; it is measured
    first, in the same process and with the same settings as the others."""
    import torch

    from distillkit.bench.report import build_report, print_table, write_plot, write_report
    from distillkit.models.load import resolve_device

    device = resolve_device(cfg.device)
    for path in (cfg.plot, cfg.out):
        if path:
            check_writable(path)
    raw = list(sources if sources is not None else cfg.models)
    resolved = [s if isinstance(s, mf.Source) else mf.read_source(s) for s in raw]
    teacher_src = mf.read_source(cfg.against) if cfg.against else None
    entries: list[tuple[mf.Source, bool]] = []
    if teacher_src is not None:
        entries.append((teacher_src, True))
    for s in resolved:
        if teacher_src is None or s.path != teacher_src.path:
            entries.append((s, False))
    names = _unique([_model_name(s) for s, _ in entries])
    from distillkit.bench import diffusion

    if diffusion.check_kinds(entries, names):  # diffusers denoisers: images/s and samples against the baseline
        return diffusion.run_diffusion_bench(cfg, entries, names, device)
    if cfg.diffusion_steps is not None:
        raise ConfigError("--diffusion-steps applies to diffusers models only", hint="drop --diffusion-steps")
    if cfg.prompts is not None:
        raise ConfigError("--prompts applies to text-conditioned diffusers pipelines only", hint="drop --prompts")
    if cfg.video_shape is not None:
        raise ConfigError("--video-shape applies to video diffusers models only", hint="drop --video-shape")
    if cfg.image_size is not None:
        raise ConfigError("--image-size applies to Flux diffusers models only", hint="drop --image-size")
    notes: list[str] = []
    if cfg.data is None and cfg.eval_data is None:
        notes.append(
            "quality not measured: pass --data FILE for perplexity/accuracy"
            + (" and agreement with --against" if cfg.against else "")
        )
    elif cfg.against is None:
        notes.append("no --against: top-1 agreement, KL and embedding cosine need a teacher")

    torch.manual_seed(cfg.seed)
    warm_up_process(cfg, entries[0][0], device)
    records: list[dict[str, Any]] = []
    teacher_loaded = None
    batches: list[dict[str, Any]] | None = None
    data_task: str | None = None
    data_info: dict[str, Any] | None = None
    heldout: Any = None
    for (src, is_teacher), name in zip(entries, names, strict=True):
        sys.stderr.write(f"bench: {name}\n")
        record, loaded = measure(cfg, src, name, device)
        record["role"] = "teacher" if is_teacher else "model"
        if cfg.data is not None and batches is None:
            if loaded.processor is None:
                notes.append(
                    f"quality of {name} not measured: it has no tokenizer or image processor to read --data with"
                )
            else:
                data_task = loaded.task
                batches, data_info = quality_batches(cfg, loaded.processor, loaded.task)
        _quality(loaded, record, batches, data_task, teacher_loaded, device)
        if cfg.eval_data is not None:
            heldout = _heldout(cfg, loaded, record, heldout, is_teacher, notes)
        records.append(record)
        if is_teacher and batches is not None:
            teacher_loaded = loaded  # kept for the agreement of the others
        else:
            del loaded
        trim_heap()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del teacher_loaded
    baseline = records[0]["name"]
    report = build_report(
        cfg,
        records,
        baseline=baseline,
        device=device_name(device),
        device_type=device.type,
        versions=software_versions(),
        notes=notes,
        data_info=data_info,
    )
    if heldout is not None:
        report["eval_data"] = heldout.info() | {"measured_on": "each model as benchmarked"}
    print_table(report)
    if cfg.plot:
        report["plot"] = write_plot(report, cfg.plot)
    if cfg.out:
        write_report(report, cfg.out)
    return report
