"""``quantize_model``: load, calibrate (GPTQ or round-to-nearest), optionally distil with fake-quantized weights
(quantized distillation, Polino et al. 2018), convert to real low-bit modules, measure, and write the artifact.

Quantized distillation runs through the ``distill`` engine: a :class:`~distillkit.distill.engine.StudentHooks`
``prepare`` swaps the student's layers for fake-quant ones (started from the post-training quantization, so QAT
refines it), and ``finish`` reads the learned codes back. The teacher is the full-precision model given with
``--teacher``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distillkit import manifest as mf
from distillkit.errors import ConfigError, DataError, DependencyError, ModelError
from distillkit.quantize.config import QuantizeConfig


def _require_bitsandbytes() -> None:
    from distillkit.quantize.bnb import quiet_bitsandbytes

    try:
        with quiet_bitsandbytes():  # its import logs kernel-download failures the user cannot act on
            import bitsandbytes  # noqa: F401
    except ImportError:
        raise DependencyError(
            "this scheme needs bitsandbytes, which is not installed",
            hint="pip install 'distillkit[bnb]' (or pip install bitsandbytes)",
        ) from None


def _source_dtype(path: str) -> Any:
    import torch

    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return torch.float32
    d = cfg.get("dtype") or cfg.get("torch_dtype")
    d = getattr(torch, d, None) if isinstance(d, str) else None
    return d if d in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def _weight_bytes(path: str | Path) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.glob("*.safetensors")) or sum(f.stat().st_size for f in p.glob("*.bin"))


def _refuse_quantized(path: str) -> None:
    try:
        qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError):
        return
    if qc:
        raise ModelError(
            f"{path} is already quantized ({qc.get('quant_method', 'unknown method')})",
            hint="quantize the full-precision model instead",
        )


# ----------------------------------------------------------------------------------------------------------------
# Post-training quantization


def gptq_states(
    model: Any,
    targets: list,
    batches: list[dict],
    r: dict,
    damp: float,
    device: Any,
    *,
    act_order: bool = False,
    clip_search: bool = False,
    latents: dict | None = None,
    reconstruct: Any = None,
    report: list | None = None,
    bits_of: dict | None = None,
) -> dict:
    """GPTQ every Linear target, block by block in model order, at ``r["bits"]`` or its own ``bits_of`` entry
    (mixed precision, see :mod:`distillkit.quantize.sensitivity`).

    ``latents``, when given, receives each Linear's error-compensated float weight (see ``gptq_quantize``'s
    ``return_latent``): where quantized distillation starts from.

    ``reconstruct`` (a :class:`~distillkit.quantize.reconstruct.ReconstructSpec`) trains each block after its GPTQ
    to reproduce the float block (see :mod:`distillkit.quantize.reconstruct`); the float model's own inputs of
    every block are then carried beside the quantized ones. ``report`` receives one record per reconstructed block.

    The inputs of a layer's Linears are collected with every earlier layer already quantized (sequential GPTQ), so
    later layers correct for the error of earlier ones. Embeddings and tied outputs get round-to-nearest (with the
    clip search when asked), unless ``r["embedding_bits"]`` differs from ``r["bits"]``: then the caller quantizes
    the tables at their own bits and they are left out here. Each block runs on its own recorded inputs: the model
    runs once up to the first block, and a block's quantized outputs become the next block's inputs wherever the
    model chains them (checked on the first batch); elsewhere the model runs from the start up to the block.

    Linears that read the same input tensor (q/k/v, gate/up) share one Hessian and are quantized as one stacked
    weight (GPTQ treats rows independently, so this is the same computation done once). The Hessian pass of a
    block stops as soon as every Linear of the block has seen its input.
    """
    import torch

    from distillkit.quantize.gptq import gptq_quantize, rtn_state
    from distillkit.quantize.reconstruct import output_of
    from distillkit.quantize.surgery import weight_of

    bits, group, sym = r["bits"], r["group_size"], r["symmetric"]
    if reconstruct is None:  # reconstruction takes one calibration batch per step: it keeps them as they are
        batches = merge_batches(batches)
    states = {}
    if r.get("embedding_bits", bits) == bits:
        for t in targets:
            if t.kind == "embedding":
                states[t.name] = rtn_state(weight_of(model, t).detach(), bits, group, sym, clip_search)
    linears = [t for t in targets if t.kind in ("linear", "conv1d")]
    # one stage per parent block (the module holding the Linears), in model order
    stages: list[list] = []
    for t in linears:
        parent = _block_of(t.name)
        if stages and _block_of(stages[-1][0].name) == parent:
            stages[-1].append(t)
        else:
            stages.append([t])
    if not stages:
        return states
    blocks = [model.get_submodule(_block_of(s[0].name)) for s in stages]
    masks = [b.get("attention_mask") for b in batches]
    originals = {t.name: weight_of(model, t).detach().clone() for t in linears}
    if reconstruct is not None and latents is None:
        latents = {}
    try:
        with torch.no_grad(), _reconstruct_progress(reconstruct, stages) as progress:
            chains = _chains(model, blocks, min(batches, key=_positions), device)
            inputs = _block_inputs(model, blocks[0], batches, device)
            float_inputs = inputs  # the float model's inputs of block k (the same until a block is quantized)
            for k, stage in enumerate(_progress(stages, "gptq")):
                goals = None
                if progress is not None:  # the float block's outputs, before its weights are quantized
                    goals = [output_of(blocks[k](*a, **kw)) for a, kw in float_inputs]
                for shared, H in _stage_hessians(model, blocks[k], stage, inputs, masks, device):
                    for tbits, members in _by_bits(shared, bits_of or {}, bits):
                        ws = [weight_of(model, t) for t in members]
                        st, latent = gptq_quantize(
                            torch.cat(ws) if len(ws) > 1 else ws[0],
                            H,
                            bits=tbits,
                            group_size=group,
                            symmetric=sym,
                            damp=damp,
                            act_order=act_order,
                            clip_search=clip_search,
                            return_latent=True,
                        )
                        sizes = [w.shape[0] for w in ws]
                        parts = zip(members, _split_rows(st, sizes), latent.split(sizes), strict=True)
                        for t, part, lat in parts:
                            states[t.name] = part
                            if latents is not None:
                                latents[t.name] = lat
                            _set_weight(model, t, part.dequantize(torch.float32))
                    del H
                if goals is not None:
                    rec = _reconstruct_stage(
                        model, blocks[k], stage, states, latents, (inputs, goals, masks), reconstruct, progress
                    )
                    if report is not None:
                        report.append(rec)
                if k + 1 == len(stages):
                    break
                inputs = _next_inputs(model, blocks, k, chains[k], inputs, batches, device)
                if goals is not None:
                    with _float_weights(model, [t for st in stages[: k + 1] for t in st], originals, states):
                        float_inputs = _next_inputs(model, blocks, k, chains[k], float_inputs, batches, device, goals)
    finally:
        for t in linears:  # the caller quantizes from the states; the float model is left as it was
            _set_weight(model, t, originals[t.name])
    return states


def _next_inputs(
    model: Any, blocks: list, k: int, chain: Any, inputs: list, batches: list[dict], device: Any, outputs: Any = None
) -> list:
    """Block ``k + 1``'s inputs from block ``k``'s (``outputs``: its outputs when already computed), as ``chain``
    says (see :func:`_chains`); unchained, the model runs from the start up to the block."""
    if not chain:
        return _block_inputs(model, blocks[k + 1], batches, device)
    if outputs is None:
        outputs = [blocks[k](*args, **kwargs) for args, kwargs in inputs]
    if chain is True:  # the next block takes this one's output and otherwise its arguments
        return [_chain_input(args, kwargs, out) for (args, kwargs), out in zip(inputs, outputs, strict=True)]
    a1, k1 = chain  # ... or the output and nothing else but constants, recorded once
    return [_chain_input(a1, k1, out) for out in outputs]


@contextlib.contextmanager
def _float_weights(model: Any, linears: list, originals: dict, states: dict) -> Iterator[None]:
    """The float weights in ``linears`` for the duration (to run the float model), their quantized ones after."""
    import torch

    for t in linears:
        _set_weight(model, t, originals[t.name])
    try:
        yield
    finally:
        for t in linears:
            _set_weight(model, t, states[t.name].dequantize(torch.float32))


@contextlib.contextmanager
def _reconstruct_progress(spec: Any, stages: list) -> Iterator[Any]:
    """A progress line over every block's reconstruction steps (None when there is no reconstruction)."""
    if spec is None:
        yield None
        return
    from distillkit.progress import Progress

    with Progress("reconstruct", total=spec.steps * len(stages), unit="step") as p:
        yield p


def _reconstruct_stage(
    model: Any, block: Any, stage: list, states: dict, latents: dict, data: tuple, spec: Any, progress: Any
) -> dict:
    """Reconstruct one block after its GPTQ, in place (``states``, ``latents`` and the block's weights); ``data``
    is (quantized inputs, float goals, masks). Returns the block's record for the manifest."""
    import torch

    from distillkit.quantize.reconstruct import reconstruct_block

    name = _block_of(stage[0].name)
    base = progress.done
    if any(t.name == name for t in stage):  # a bare Linear (an output head): GPTQ's objective is already its own
        progress.update(base + spec.steps, info=f"{name}: skipped")
        return {"block": name, "skipped": "a single Linear"}

    def on_step(step: int, loss: float) -> None:
        progress.update(base + step, info=f"{name} mse {loss:.4g}")

    t0 = time.perf_counter()
    new_states, new_latents, rec = reconstruct_block(
        block, stage, states, latents, *data, spec, prefix=name + ".", on_step=on_step
    )
    rec["seconds"] = time.perf_counter() - t0
    states.update(new_states)
    latents.update(new_latents)
    for t in stage:
        _set_weight(model, t, states[t.name].dequantize(torch.float32))
    return {"block": name, **rec}


def _stage_hessians(
    model: Any, block: Any, stage: list, inputs: list, masks: list, device: Any, share: bool = True
) -> list[tuple[list, Any]]:
    """``[(targets, H)]``: the input Hessian of the Linears of ``stage``, from running ``block`` on ``inputs``.

    With ``share``, Linears whose input is the very tensor another Linear of the block read first (on the first
    batch) are grouped with it and get its Hessian instead of accumulating the same one again. Every later batch
    must show the same sharing; if one does not, the pass is run again without sharing. When every Linear was
    called once on the first batch, later batches stop the block as soon as each has seen its input.
    """
    from distillkit.quantize.gptq import HessianAccumulator

    names = [t.name for t in stage]
    leader: dict[str, str] = {}  # target -> the target whose Hessian it uses (itself for an accumulator's owner)
    accs: dict[str, Any] = {}
    st: dict[str, Any] = {"batch": 0, "mask": None, "seen": {}, "calls": {}, "broken": False, "stop": False}

    def hook(name: str) -> Any:
        def pre(module: Any, args: tuple) -> None:
            x = args[0]
            seen, calls = st["seen"], st["calls"]
            calls[name] = calls.get(name, 0) + 1
            if name not in leader:  # sharing is decided on the first batch; a Linear first seen later owns its own
                owner = next((n for n, y in seen.items() if y is x), None) if share and st["batch"] == 0 else None
                leader[name] = owner or name
                if owner is None:
                    accs[name] = HessianAccumulator(x.shape[-1], device)
            own = leader[name]
            if own == name:
                accs[name].add(x, st["mask"])
                seen.setdefault(name, x)
            elif seen.get(own) is not x or calls[name] > 1:
                st["broken"] = True
            if st["stop"] and len(calls) == len(names):
                raise _StopForward

        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for b, ((args, kwargs), mask) in enumerate(zip(inputs, masks, strict=True)):
            st.update(batch=b, mask=mask, seen={}, calls={})
            try:
                block(*args, **kwargs)
            except _StopForward:
                pass
            calls = st["calls"]
            if any((n in calls) != (o in calls) for n, o in leader.items()):
                st["broken"] = True  # a Linear ran without the one it shares with, or the other way round
            if b == 0:
                st["stop"] = len(calls) == len(names) and all(c == 1 for c in calls.values())
            if st["broken"]:
                break
    finally:
        for h in handles:
            h.remove()
    if st["broken"]:
        return _stage_hessians(model, block, stage, inputs, masks, device, share=False)
    for t in stage:  # never called: an all-zero Hessian (every input dead), as for a Linear with no inputs
        if t.name not in leader:
            leader[t.name] = t.name
            accs[t.name] = HessianAccumulator(t.in_features, device)
    by_name = {t.name: t for t in stage}
    return [([by_name[n] for n in names if leader[n] == owner], accs[owner].H) for owner in accs]


MERGE_POSITIONS = 8192  # padded positions (rows x length) of one merged calibration batch
PAD_SLACK = 1.3  # ... and at most this many positions per real token


def merge_batches(batches: list[dict], max_positions: int = MERGE_POSITIONS) -> list[dict]:
    """The rows of right-padded batches regrouped by length into as few batches as hold ``max_positions`` padded
    positions each (each trimmed to its longest row).

    GPTQ only sums over the real tokens (its Hessians leave padding out), but its passes compute on every padded
    position and pay per call: the same tokens in fewer passes, with rows of like length together, cost less
    (all-MiniLM-L6-v2 on its default calibration text: 16 batches, 3,800 positions for 2,077 tokens, become 5
    batches and 2,596 positions). A right-padded row's real tokens keep their positions and attend to the same
    tokens however much padding follows them, so their activations do not change. Batches that are not all
    right-padded text batches (left padding, a tensor other than ``[rows, length]`` or ``[rows]``, differing
    non-tensor values) are returned as they are."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    keys = set(batches[0]) if batches else set()
    rows: list[tuple[int, dict]] = []  # (real length, {key: the row's tensor, or a shared value})
    for b in batches:
        m = b.get("attention_mask")
        if not isinstance(m, torch.Tensor) or m.dim() != 2 or set(b) != keys:
            return batches
        n, t = m.shape
        lengths = m.sum(1)
        if not torch.equal(m.bool(), torch.arange(t, device=m.device) < lengths.unsqueeze(1)):
            return batches  # not right-padded
        for k, v in b.items():
            if isinstance(v, torch.Tensor):
                if v.dim() not in (1, 2) or v.shape[0] != n or (v.dim() == 2 and v.shape[1] != t):
                    return batches
            elif not _same(v, batches[0][k]):
                return batches
        for i in range(n):
            keep = max(int(lengths[i]), 1)
            row = {
                k: (v[i, :keep] if v.dim() == 2 else v[i]) if isinstance(v, torch.Tensor) else v for k, v in b.items()
            }
            rows.append((keep, row))
    rows.sort(key=lambda r: r[0])  # stable: rows of one length keep their order

    def join(group: list[tuple[int, dict]]) -> dict:
        out = {}
        for k, v in group[0][1].items():
            if not isinstance(v, torch.Tensor):
                out[k] = v
            elif v.dim() == 1:  # per position: padded on the right to the group's longest row (labels: ignored)
                fill = -100 if k == "labels" else 0
                out[k] = pad_sequence([r[k] for _, r in group], batch_first=True, padding_value=fill)
            else:
                out[k] = torch.stack([r[k] for _, r in group])
        return out

    merged, group, real = [], [], 0
    for length, row in rows:
        padded = (len(group) + 1) * length  # the group's positions with this row, the longest so far
        if group and (padded > max_positions or padded > PAD_SLACK * (real + length)):
            merged.append(join(group))
            group, real = [], 0
        group.append((length, row))
        real += length
    if group:
        merged.append(join(group))
    return merged


def _positions(batch: dict) -> int:
    m = batch.get("attention_mask")
    return m.numel() if m is not None else 0


def _by_bits(members: list, bits_of: dict, default: int) -> list[tuple[int, list]]:
    """Linears that share a Hessian, split by their bits: ``[(bits, targets)]`` in first-seen order."""
    out: dict[int, list] = {}
    for t in members:
        out.setdefault(bits_of.get(t.name, default), []).append(t)
    return list(out.items())


def _split_rows(st: Any, sizes: list[int]) -> list:
    """The :class:`QuantState` of a stacked weight cut back into its Linears' row blocks (own storage each)."""
    if len(sizes) == 1:
        return [st]
    out, r0 = [], 0
    for n in sizes:
        sl = slice(r0, r0 + n)
        out.append(
            dataclasses.replace(
                st,
                codes=st.codes[sl].clone(),
                scales=st.scales[sl].clone(),
                zeros=None if st.zeros is None else st.zeros[sl].clone(),
            )
        )
        r0 += n
    return out


def _calib_inputs(model: Any, batch: dict, device: Any) -> dict:
    from distillkit.models.forward import forward_params, model_inputs

    inputs = model_inputs(model, batch, device)
    if "use_cache" in forward_params(type(model)):
        inputs["use_cache"] = False  # a key/value cache shared by calls would grow when a block runs again
    return inputs


def _block_inputs(model: Any, block: Any, batches: list[dict], device: Any) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) ``block`` is called with, per batch, running the model only up to it."""
    got: list[tuple[tuple, dict]] = []

    def grab(module: Any, args: tuple, kwargs: dict) -> None:
        got.append((args, dict(kwargs)))
        raise _StopForward

    h = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for b in batches:
            try:
                model(**_calib_inputs(model, b, device))
            except _StopForward:
                pass
    finally:
        h.remove()
    if len(got) != len(batches):
        raise ModelError("a calibration batch never reached a quantized layer", hint="use --method rtn")
    return got


def _hidden_of(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs.get("hidden_states")


def _chain_input(args: tuple, kwargs: dict, out: Any) -> tuple[tuple, dict]:
    h = out if hasattr(out, "shape") else out[0]
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a is b or (type(a) is type(b) and isinstance(a, int | float | bool | str | type(None)) and a == b)


def _chains(model: Any, blocks: list, batch: dict, device: Any) -> list[Any]:
    """Per block, how the next block's inputs follow from this block's output: ``True`` when the next block is
    called with this block's output and otherwise the same arguments; ``(args, kwargs)`` when it is called with the
    output and nothing but constants (``None``, bools, strings: e.g. a pooler), recorded here; ``False`` when
    neither holds (the model is run up to the next block instead).

    Checked on one batch with the float model: every block's call is recorded in one forward pass.
    """
    import torch

    calls: dict[int, tuple[tuple, dict]] = {}

    def record(i: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            calls.setdefault(i, (args, dict(kwargs)))

        return hook

    hooks = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        model(**_calib_inputs(model, batch, device))
    finally:
        for h in hooks:
            h.remove()
    out: list[Any] = []
    for k in range(len(blocks) - 1):
        if k not in calls or k + 1 not in calls:
            out.append(False)
            continue
        (a0, k0), (a1, k1) = calls[k], calls[k + 1]
        h1 = _hidden_of(a1, k1)
        if not isinstance(h1, torch.Tensor):
            out.append(False)
            continue
        same = len(a0) == len(a1) and set(k0) == set(k1)
        same = same and all(_same(x, y) for x, y in zip(a0[1:], a1[1:], strict=True))
        same = same and all(_same(k0[n], k1[n]) for n in k0 if n != "hidden_states")
        rest = [*(a1[1:] if a1 else ()), *(v for n, v in k1.items() if n != "hidden_states")]
        constant = all(v is None or isinstance(v, bool | str) for v in rest)
        how: Any = True if same else (a1, k1) if constant else False
        if how is not False:
            args, kwargs = _chain_input(a0, k0, blocks[k](*a0, **k0))
            h = _hidden_of(args, kwargs)
            if not (isinstance(h, torch.Tensor) and h.shape == h1.shape and bool(torch.allclose(h, h1, atol=1e-5))):
                how = False
        out.append(how)
    return out


class _StopForward(Exception):
    pass


def _block_of(name: str) -> str:
    # "model.layers.3.mlp.up_proj" -> "model.layers.3": the numbered container is the block
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def _set_weight(model: Any, t: Any, w: Any) -> None:
    """Point the layer's weight at ``w`` (in the weight's dtype and device, transposed for a Conv1D) instead of
    writing into the weight's storage: a checkpoint loaded from safetensors is mapped from its file, and the first
    write into each page costs a page fault and a copy (0.16 s of MiniLM's 2.5 s of GPTQ). The caller hands over
    ``w``: the model may keep it as its weight."""
    m = model.get_submodule(t.name)
    w = w.t() if t.kind == "conv1d" else w
    m.weight.data = w.to(device=m.weight.device, dtype=m.weight.dtype).contiguous()


def _progress(items: list, what: str):
    from distillkit.progress import track

    return track(items, what, unit="layer", transient=True)


# ----------------------------------------------------------------------------------------------------------------
# Quantized distillation


def _qat(cfg: QuantizeConfig, src: mf.Source, loaded: Any, r: dict, init: tuple, final: Path) -> tuple[Any, dict, dict]:
    """Distil the teacher into the fake-quantized model for ``qat_steps``; returns (model, states, summary).

    ``init`` is (states, latents): the post-training codes and grid every quantized layer starts from, and the
    float weights behind them where GPTQ left some (see ``to_fake_quant_``)."""
    import torch

    from distillkit.config import DistillConfig
    from distillkit.distill.engine import StudentHooks, run_distill
    from distillkit.quantize.surgery import fake_to_plain_, find_targets, to_fake_quant_

    holder: dict[str, Any] = {}

    def prepare(student: Any) -> Any:
        # The quantized model should reproduce the teacher's function, which is the same network: dropout would only
        # make it chase a noisier target than the one it is evaluated against.
        for m in student.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        targets = find_targets(student, cfg.skip, embeddings=cfg.embeddings and r["format"] == "packed")
        holder["targets"] = targets
        return to_fake_quant_(
            student,
            targets,
            bits=r["bits"],
            group_size=r["group_size"],
            symmetric=r["symmetric"],
            quantizer=cfg.quantizer,
            act_bits=cfg.act_bits,
            init=init[0],
            latents=init[1],
            embedding_grid=embedding_grid(r),
        )

    def finish(student: Any) -> None:
        holder["states"] = fake_to_plain_(student, holder["targets"])
        holder["model"] = student

    dcfg = DistillConfig.of(
        teacher=cfg.teacher,
        student=src.path,
        task=loaded.task,
        data=cfg.data,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        eval_split=cfg.eval_split,
        max_length=cfg.max_length,
        max_samples=cfg.max_samples,
        losses=cfg.losses,
        temperature=cfg.temperature,
        steps=cfg.qat_steps,
        batch_size=cfg.batch_size,
        lr=cfg.qat_lr,
        seed=cfg.seed,
        device=cfg.device,
        mixed_precision="no",
        eval_batches=cfg.eval_batches,
        eval_data="none",  # this stage measures its own artifact
        allow_pickle=cfg.allow_pickle,
        trust_remote_code=cfg.trust_remote_code,
    )
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.qat-", dir=final.parent))
    try:
        hooks = StudentHooks(prepare=prepare, finish=finish, label="qat")
        result = run_distill(dcfg, out=str(work / "qat"), hooks=hooks) or {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        "steps": cfg.qat_steps,
        "lr": cfg.qat_lr,
        "quantizer": cfg.quantizer,
        "act_bits": cfg.act_bits,
        "losses": result.get("config", {}).get("resolved_losses"),
        "final_train_loss": result.get("metrics", {}).get("final_train_loss"),
        "train_s": result.get("timings", {}).get("train_s"),
        # the fake-quantized model's held-out quality as distill measured it; conversion must reproduce it
        "fake_quant_quality": {
            k.removeprefix("student_"): v
            for k, v in result.get("metrics", {}).items()
            if k.startswith("student_") and k != "student_params"
        },
    }
    model = holder["model"].eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, holder["states"], summary


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class _Run:
    """What the steps of :func:`quantize_model` share: the inputs, the loaded models and data, and the figures."""

    cfg: QuantizeConfig
    src: mf.Source
    final: Path
    r: dict  # the resolved scheme (bits, group size, method, format, ...)
    device: Any
    overwrite: bool = False
    loaded: Any = None
    model: Any = None  # the float model, quantized in place
    teacher: Any = None
    targets: list = dataclasses.field(default_factory=list)
    save_dtype: Any = None
    calib: list = dataclasses.field(default_factory=list)
    evals: list = dataclasses.field(default_factory=list)
    latents: dict = dataclasses.field(default_factory=dict)  # GPTQ's float weights behind its codes, for QAT
    reference: Any = None  # what quality is measured against: the teacher, else a float copy of the model
    metrics: dict = dataclasses.field(default_factory=dict)
    timings: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)


@mf.releases_locks
def quantize_model(cfg: QuantizeConfig, source: str | mf.Source, out: str, overwrite: bool = False) -> dict[str, Any]:
    """Quantize ``source`` as ``cfg`` says into the artifact directory ``out``; returns its manifest dict.

    Metrics: ``quality_before`` (the float model) and ``quality_after`` (the quantized one) from
    :func:`distillkit.evaluate.evaluate_quality` on held-out data against the teacher (or the float model); the
    "after" figures are measured on the artifact reloaded from disk, and a scheme whose reload does not reproduce
    the quantized model (``reload_output_cosine`` < 0.95) is refused with nothing written; with
    ``quality_ptq`` (the starting point) when quantized distillation ran; weight SQNR per layer (mean/min, dB);
    file sizes and their ratio.
    """
    t_start = time.perf_counter()
    run = _start(cfg, source, out, overwrite)
    _load(run)
    run.timings["load_s"] = time.perf_counter() - t_start
    _calibration_data(run)
    qmodel, layout = _quantize(run)
    check, expected = _expected_outputs(run, qmodel)
    manifest = _write_artifact(run, qmodel, layout, check, expected, t_start)
    _report(manifest)
    return manifest.to_dict()


def _start(cfg: QuantizeConfig, source: str | mf.Source, out: str, overwrite: bool) -> _Run:
    """Check the request before anything heavy: the output, the scheme's dependencies and device, the source."""
    from distillkit.models.load import resolve_device

    src = source if isinstance(source, mf.Source) else mf.read_source(source)
    final = mf.check_output(out, overwrite, protect=[src.path, cfg.teacher, cfg.data])
    r = cfg.resolved()
    if r["format"] == "bnb":
        _require_bitsandbytes()
    device = resolve_device(cfg.device)
    if r["format"] == "dynamic" and device.type != "cpu":
        raise ConfigError("dynamic-int8 runs on the CPU", hint="pass --device cpu, or use --scheme int8 on a GPU")
    if src.kind != "hub":
        _refuse_quantized(src.path)
    return _Run(cfg=cfg, src=src, final=final, r=r, device=device, overwrite=overwrite)


def _load(run: _Run) -> None:
    """The float model (and teacher) in float32, and the layers to quantize."""
    import torch

    from distillkit.models.load import load_model
    from distillkit.quantize.surgery import check_group_size, find_targets

    cfg, src = run.cfg, run.src
    common = dict(
        dtype="float32", device=str(run.device), allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code
    )
    run.loaded = load_model(src, task=cfg.task, **common)
    run.model = run.loaded.model.eval()
    if run.loaded.task == "image-classification" and cfg.qat_steps and cfg.data is None:
        raise DataError("quantized distillation of an image model needs images", hint="pass --data IMAGE_FOLDER")
    run.save_dtype = _source_dtype(src.path) if src.kind != "hub" else torch.float32
    if run.r["format"] != "bnb":
        run.targets = find_targets(run.model, cfg.skip, embeddings=cfg.embeddings and run.r["format"] == "packed")
        if not run.targets:
            raise ConfigError("nothing to quantize: every layer is skipped", hint="loosen --skip")
        check_group_size(run.targets, run.r["group_size"])
    if cfg.teacher:
        run.teacher = load_model(cfg.teacher, task=run.loaded.task, **common)
        run.teacher.model.eval().requires_grad_(False)


def _calibration_data(run: _Run) -> None:
    """Calibration and held-out batches, the reference model, and the float model's quality before quantization."""
    import torch

    from distillkit.data.calibration import calibration_batches, held_out_quality

    run.calib, run.evals, data_info = calibration_batches(run.cfg, run.loaded)
    # the float model is quantized in place, so without a teacher the reference is a copy of it
    run.reference = run.teacher.model if run.teacher is not None else copy.deepcopy(run.model)
    run.extra.update(calibration=data_info, pooling=run.loaded.pooling)
    with torch.random.fork_rng(devices=[]):
        run.metrics["quality_before"] = held_out_quality(run.model, run.evals, run.loaded, run.reference, run.device)


def _quantize(run: _Run) -> tuple[Any, dict | None]:
    """The quantized model and its packed layout (None for bitsandbytes): post-training states (GPTQ or RTN),
    embedding tables at their own bits, optional quantized distillation, then real low-bit modules."""
    import torch

    from distillkit.data.calibration import held_out_quality
    from distillkit.models.packed.kernels import select_kernel_
    from distillkit.quantize import functional as qf
    from distillkit.quantize.surgery import to_quantized_, weight_of

    cfg, r, model, metrics, timings = run.cfg, run.r, run.model, run.metrics, run.timings
    t0 = time.perf_counter()
    if r["format"] == "bnb":
        from distillkit.quantize.bnb import quantize_bnb

        qmodel = quantize_bnb(
            run.src.path, run.loaded.task, cfg.scheme, run.device, trust_remote_code=cfg.trust_remote_code
        )
        timings["quantize_s"] = time.perf_counter() - t0
        return qmodel, None
    originals = {t.name: weight_of(model, t).detach().clone() for t in run.targets if t.kind != "tied"}
    states = _post_training_states(run)
    timings["calibrate_s"] = time.perf_counter() - t0
    qmodel = model
    if cfg.qat_steps:
        ptq = copy.deepcopy(model)
        to_quantized_(ptq, run.targets, states)
        select_kernel_(ptq, "cached", run.device)
        with torch.random.fork_rng(devices=[]):
            metrics["quality_ptq"] = held_out_quality(ptq, run.evals, run.loaded, run.reference, run.device)
        del ptq
        t_qat = time.perf_counter()
        qmodel, states, run.extra["qat"] = _qat(cfg, run.src, run.loaded, r, (states, run.latents), run.final)
        qmodel.to(run.device)
        timings["qat_s"] = time.perf_counter() - t_qat
    sq = [qf.sqnr_db(originals[n], st.dequantize()) for n, st in states.items()]
    metrics["weight_sqnr_db_mean"] = sum(sq) / len(sq)
    metrics["weight_sqnr_db_min"] = min(sq)
    layout = to_quantized_(qmodel, run.targets, states, act_bits=cfg.act_bits)
    metrics["quantized_params"] = sum(t.in_features * t.out_features for t in run.targets if t.kind != "tied")
    timings["quantize_s"] = time.perf_counter() - t0
    return qmodel, layout


def _post_training_states(run: _Run) -> dict:
    """Every target's quantized state: GPTQ (or RTN) at the scheme's bits (or a promoted layer's), embedding
    tables at theirs."""
    from distillkit.quantize.gptq import rtn_state
    from distillkit.quantize.surgery import quantize_states_rtn, weight_of

    cfg, r, model = run.cfg, run.r, run.model
    bits_of = _mixed_precision(run)
    if r["method"] == "gptq":
        if not run.calib:
            raise DataError("GPTQ needs calibration data, and there is none", hint="give --data or use --method rtn")
        spec, report = None, []
        if r["reconstruct_steps"]:
            from distillkit.quantize.reconstruct import ReconstructSpec

            spec = ReconstructSpec(steps=r["reconstruct_steps"], lr=cfg.reconstruct_lr, seed=cfg.seed)
        states = gptq_states(
            model,
            run.targets,
            run.calib,
            r,
            cfg.damp,
            run.device,
            act_order=cfg.act_order,
            clip_search=cfg.clip_search,
            latents=run.latents,
            reconstruct=spec,
            report=report,
            bits_of=bits_of,
        )
        if spec is not None:
            run.extra["reconstruct"] = {
                "steps_per_block": spec.steps,
                "lr": spec.lr,
                "calibration_batches": len(run.calib),
                "seconds": sum(b.get("seconds", 0.0) for b in report),
                "blocks": report,
            }
    else:
        states = quantize_states_rtn(model, run.targets, r["bits"], r["group_size"], r["symmetric"], bits_of)
    grid = embedding_grid(r)
    if grid is not None:  # mixed precision: embedding tables at their own bits
        for t in run.targets:
            if t.kind == "embedding":
                w = weight_of(model, t).detach()
                states[t.name] = rtn_state(w, *grid, cfg.clip_search and grid[0] != 8)
    return states


def _mixed_precision(run: _Run) -> dict[str, int]:
    """``{Linear: bits}`` of the layers promoted to ``--sensitive-bits`` by their measured sensitivity (empty
    without ``--sensitive-fraction``); the measurement goes into the manifest."""
    import torch

    from distillkit.progress import Progress
    from distillkit.quantize.gptq import rtn_state
    from distillkit.quantize.sensitivity import SENSITIVITY_BATCHES, choose_promoted, linear_sensitivity

    cfg, r = run.cfg, run.r
    if not r["sensitive_fraction"]:
        return {}
    if not run.calib:
        raise DataError(
            "choosing layers by sensitivity needs calibration data, and there is none",
            hint="give --data, or drop --sensitive-fraction",
        )
    linears = [t for t in run.targets if t.kind in ("linear", "conv1d")]
    batches = merge_batches(run.calib[:SENSITIVITY_BATCHES])

    def quantize(t: Any, w: Any) -> Any:
        return rtn_state(w, r["bits"], r["group_size"], r["symmetric"], cfg.clip_search).dequantize(torch.float32)

    t0 = time.perf_counter()
    with Progress("sensitivity", total=len(linears), unit="layer", transient=True) as p:
        sens = linear_sensitivity(
            run.model, linears, batches, quantize, lambda m, b: _outputs(m, b, run.device), on_layer=p.update
        )
    sizes = {t.name: t.in_features * t.out_features for t in linears}
    promoted = choose_promoted(sizes, sens, r["sensitive_fraction"])
    run.timings["sensitivity_s"] = time.perf_counter() - t0
    run.extra["mixed_precision"] = {
        "measure": "relative output error with the layer alone quantized round-to-nearest",
        "calibration_batches": min(len(run.calib), SENSITIVITY_BATCHES),
        "fraction": r["sensitive_fraction"],
        "bits": r["sensitive_bits"],
        "promoted": promoted,
        "promoted_fraction": sum(sizes[n] for n in promoted) / max(sum(sizes.values()), 1),
        "sensitivity": sens,
    }
    return dict.fromkeys(promoted, r["sensitive_bits"])


def embedding_grid(r: dict) -> tuple[int, int, bool] | None:
    """(bits, group size, symmetric) of the embedding tables when they differ from the scheme's bits, else None:
    8-bit tables are per row and symmetric, narrower ones take the scheme's group and symmetry."""
    eb = r["embedding_bits"]
    if eb == r["bits"]:
        return None
    return (8, 0, True) if eb == 8 else (eb, r["group_size"], r["symmetric"])


def _expected_outputs(run: _Run, qmodel: Any) -> tuple[list[dict], list[Any]]:
    """The check batches and the converted model's outputs on them, as it runs in memory: the reload of the written
    files must reproduce them. Packed layers multiply with the exact weight kept once dequantized ("cached": the
    same outputs as dequantizing every call)."""
    from distillkit.models.packed.kernels import select_kernel_
    from distillkit.models.packed.modules import to_dynamic_int8_

    if run.r["format"] == "packed":
        select_kernel_(qmodel, "cached", run.device)
    eval_model = qmodel
    if run.r["format"] == "dynamic":
        eval_model = to_dynamic_int8_(copy.deepcopy(qmodel).cpu())
    # Recorded before the save: saving can change the in-memory model (bitsandbytes unpacks its CPU layout in
    # place), and a model compared with itself after that would agree with a broken reload.
    check = [
        _check_rows(b) for b in (run.evals or run.calib or _sample_batches(run.model, run.loaded))[:_CHECK_BATCHES]
    ]
    with _no_cpu_repack(eval_model):
        expected = [_outputs(eval_model, b, run.device).half().cpu() for b in check]
    return check, expected


def _write_artifact(
    run: _Run, qmodel: Any, layout: dict | None, check: list[dict], expected: list[Any], t_start: float
) -> mf.Manifest:
    """Save, reload the files the way a user would, refuse an unfaithful reload, measure quality on the reload, and
    finalize the artifact with its manifest. Nothing is left at ``--out`` if any of it fails."""
    import torch

    from distillkit.data.calibration import held_out_quality
    from distillkit.models.packed.format import FORMAT_VERSION, QUANT_METHOD, save_quantized
    from distillkit.models.save import copy_sentence_transformers_files

    cfg, r, metrics = run.cfg, run.r, run.metrics
    qc = None
    if layout is not None:
        qc = {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "scheme": cfg.scheme,
            "act_bits": cfg.act_bits,
            "runtime": "dynamic-int8" if r["format"] == "dynamic" else "dequant",
            "modules": layout,
        }
    run.final.parent.mkdir(parents=True, exist_ok=True)
    with mf.atomic_artifact(run.final, run.overwrite) as tmp:
        if qc is not None:
            save_quantized(qmodel, tmp, qc, run.save_dtype)
        else:
            qmodel.save_pretrained(tmp, safe_serialization=True)
        if run.loaded.processor is not None:
            run.loaded.processor.save_pretrained(tmp)
        copy_sentence_transformers_files(run.src.path, tmp)
        # Every figure in the manifest describes the files as written: reload them the way a user would, refuse
        # if the reload does not reproduce the converted model, and measure quality on the reload.
        t_check = time.perf_counter()
        reloaded = reload_artifact(tmp, run.loaded.task, r["format"], cfg.scheme, run.device)
        fidelity = output_cosine(expected, reloaded, check, run.device)
        if not fidelity >= 1.0 - RELOAD_TOLERANCE:
            raise _unfaithful(
                cfg.scheme, run.device, f"its outputs have cosine {fidelity:.3f} to the converted model's"
            )
        metrics["reload_output_cosine"] = fidelity
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metrics["quality_after"] = held_out_quality(reloaded, run.evals, run.loaded, run.reference, run.device)
        del reloaded
        run.timings["reload_check_s"] = time.perf_counter() - t_check
        if "qat" in run.extra:
            run.extra["qat"]["gain"] = qat_gain(metrics.get("quality_ptq", {}), metrics["quality_after"])
        for stage in ("before", "ptq", "after"):
            for k, v in metrics.get(f"quality_{stage}", {}).items():
                metrics[f"{stage}_{k}"] = v
        metrics["source_bytes"] = _weight_bytes(run.src.path) if run.src.kind != "hub" else None
        metrics["artifact_bytes"] = _weight_bytes(tmp)
        if metrics["source_bytes"]:
            metrics["size_ratio"] = metrics["artifact_bytes"] / metrics["source_bytes"]
        manifest = mf.Manifest(
            stage="quantize",
            path=str(run.final),
            task=run.loaded.task,
            model_type=getattr(run.loaded.config, "model_type", None),
            inputs={
                "model": mf.describe_input(run.src.path, run.src.manifest),
                **({"teacher": mf.describe_input(run.teacher.path, None)} if run.teacher is not None else {}),
            },
            config={**cfg.to_dict(), "resolved": r},
            metrics=metrics,
            timings={**run.timings, "total_s": time.perf_counter() - t_start},
            history=mf.history_of(run.src),
            extra=run.extra,
        )
        mf.finalize_artifact(tmp, manifest, run.final)
    return manifest


# The figure that says whether quantized distillation helped, by task: (metric, +1 higher is better / -1 lower)
_QAT_MEASURES = (("embedding_cosine", 1), ("kl_to_teacher", -1), ("top1_agreement", 1), ("accuracy", 1))


def qat_gain(ptq: dict, after: dict) -> dict | None:
    """How quantized distillation moved the held-out figure it is judged by, from its post-training start to the
    saved artifact: ``{"metric", "ptq", "after", "improved"}``; None when the two share no such figure. A run that
    ended below its start says so on stderr, with what to try."""
    from distillkit.errors import warn

    for name, sign in _QAT_MEASURES:
        if name in ptq and name in after:
            improved = sign * (after[name] - ptq[name]) > 0
            if not improved:
                warn(
                    f"quantized distillation ended no better than its post-training start ({name} "
                    f"{after[name]:.4f} vs {ptq[name]:.4f}); try a lower --qat-lr, more --qat-steps, or --qat-steps 0"
                )
            return {"metric": name, "ptq": ptq[name], "after": after[name], "improved": improved}
    return None


# ----------------------------------------------------------------------------------------------------------------
# Reload check

# The reload of a faithful artifact computes what the converted model computed (cosine 1 up to the storage dtype of
# the unquantized tensors); a lossy save/reload path shows up as a cosine far below that.
RELOAD_TOLERANCE = 0.05
_CHECK_BATCHES = 4


def reload_artifact(directory: Path, task: str, fmt: str, scheme: str, device: Any) -> Any:
    """Load the artifact in ``directory`` with the loader a user would use: ``distillkit.load`` for the packed and
    dynamic layouts, ``AutoModel*.from_pretrained(dir, device_map=...)`` for bitsandbytes."""
    if fmt != "bnb":
        from distillkit.models.packed.format import load_quantized

        try:
            return load_quantized(directory, task, device=device if fmt == "packed" else "cpu", kernel="cached")
        except (ValueError, RuntimeError, OSError, KeyError) as e:
            raise _unfaithful(scheme, device, f"reloading it failed ({str(e).splitlines()[0][:200]})") from None
    from distillkit.models.load import auto_class
    from distillkit.quantize.bnb import quiet_bitsandbytes

    try:
        with quiet_bitsandbytes(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return auto_class(task).from_pretrained(directory, device_map={"": str(device)}).eval()
    except Exception as e:  # noqa: BLE001 - any failure to reload means the artifact is not usable as written
        raise _unfaithful(scheme, device, f"reloading it failed ({str(e).splitlines()[0][:200]})") from None


def _outputs(model: Any, batch: dict, device: Any) -> Any:
    """The model's output tensor for ``batch``: logits, or an encoder's hidden states."""
    import torch

    from distillkit.models.forward import model_inputs

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = model(**model_inputs(model, batch, device))
    t = o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state
    return t.float()


def _check_rows(batch: dict) -> dict:
    # a few rows are enough to see a broken reload, and keep the recorded logits of a large vocabulary small
    return {k: v[:4] if hasattr(v, "shape") and v.ndim else v for k, v in batch.items()}


@contextlib.contextmanager
def _no_cpu_repack(model: Any) -> Iterator[None]:
    """bitsandbytes (0.50, CPU with AVX512-BF16) repacks 4-bit weights in place on the first forward, and a model
    saved after that reloads wrong; run the reference forward on its portable path instead."""
    mods = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for m in mods:
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m in mods:
            m.support_avx512bf16_for_cpu = True


def output_cosine(expected: list[Any], model: Any, batches: list[dict], device: Any) -> float:
    """Mean cosine between ``expected`` outputs and ``model``'s on ``batches`` (logits, or hidden states of an
    encoder), per real position (attention mask) or example."""
    import torch.nn.functional as F

    total, n = 0.0, 0
    for want, batch in zip(expected, batches, strict=True):
        x, y = want.float(), _outputs(model, batch, device).cpu()
        if x.shape != y.shape:
            return 0.0
        cos = F.cosine_similarity(x.flatten(2) if x.ndim > 3 else x, y.flatten(2) if y.ndim > 3 else y, dim=-1)
        mask = batch.get("attention_mask")
        if cos.ndim == 2 and mask is not None and tuple(mask.shape) == tuple(cos.shape):
            cos = cos[mask.bool().cpu()]
        total += float(cos.sum())
        n += cos.numel()
    return total / max(n, 1)


def _sample_batches(model: Any, loaded: Any) -> list[dict]:
    """Random inputs for the reload check when there are no held-out batches (``--eval-batches 0``)."""
    from distillkit.export.signature import describe_io

    io = describe_io(model, loaded.task, loaded.processor, purpose="the quantize reload check")
    inputs = io.sample(2, min(16, io.max_positions or 16), seed=1, pad=True)
    return [dict(zip(io.input_names, inputs, strict=True))]


def _unfaithful(scheme: str, device: Any, why: str) -> ModelError:
    where = "this CPU" if getattr(device, "type", str(device)) == "cpu" else f"this device ({device})"
    alt = (
        "run it on a CUDA GPU, or use --scheme int4 / int8"
        if scheme in ("nf4", "fp4", "llm-int8")
        else ("use another --scheme (int8 or int4), or report the model type")
    )
    return ModelError(
        f"--scheme {scheme} cannot be saved faithfully on {where}: the artifact reloaded from disk does not "
        f"reproduce the quantized model ({why}); nothing was written",
        hint=alt,
    )


def _report(manifest: mf.Manifest) -> None:
    from rich.table import Table

    from distillkit.progress import stderr_console

    m = manifest.metrics
    t = Table(title=f"quantize {manifest.config['scheme']} -> {manifest.path}", title_justify="left")
    t.add_column("")
    t.add_column("before", justify="right")
    if "quality_ptq" in m:
        t.add_column("post-training", justify="right")
    t.add_column("after", justify="right")
    keys = sorted(set(m.get("quality_before", {})) | set(m.get("quality_after", {})))
    for k in keys:
        if k.startswith("teacher_"):
            continue
        row = [k, _fmt(m.get("quality_before", {}).get(k))]
        if "quality_ptq" in m:
            row.append(_fmt(m["quality_ptq"].get(k)))
        row.append(_fmt(m.get("quality_after", {}).get(k)))
        t.add_row(*row)
    if m.get("source_bytes"):
        row = ["weights MB", f"{m['source_bytes'] / 1e6:.2f}"]
        if "quality_ptq" in m:
            row.append("")
        row.append(f"{m['artifact_bytes'] / 1e6:.2f} ({m['size_ratio']:.2f}x)")
        t.add_row(*row)
    stderr_console().print(t)
    mp = manifest.extra.get("mixed_precision")
    if mp:
        stderr_console().print(
            f"mixed precision: {len(mp['promoted'])} most sensitive Linears "
            f"({100 * mp['promoted_fraction']:.1f}% of their weights) at {mp['bits']} bits"
        )


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
