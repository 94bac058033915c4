"""The ``cpu-bf16`` product of packed layers against the exact ``dequant`` one, and its selection rules."""

from __future__ import annotations

import json

import pytest
import torch

import distillkit
from distillkit.cli.app import main
from distillkit.errors import ConfigError
from distillkit.models.packed import kernels
from distillkit.models.packed.modules import QuantLinear
from distillkit.quantize import functional as qf
from tests import tiny

needs_fast = pytest.mark.skipif(not kernels.cpu_bf16_available(), reason="this CPU has no AVX512-BF16 int4 kernel")


def _layer(o, i, bits, group, symmetric, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, i, generator=g)
    m = QuantLinear(i, o, bits=bits, group_size=group, symmetric=symmetric, bias=bias)
    m.load_state(qf.quantize_rtn(w, bits, group, symmetric))
    if bias:
        m.bias.data = torch.randn(o, generator=g)
    return m


def _rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


@needs_fast
@pytest.mark.parametrize("rows", [1, kernels.DECODE_ROWS, kernels.DECODE_ROWS + 1, 64])
@pytest.mark.parametrize(("bits", "group", "symmetric"), [(4, 32, False), (4, 128, True), (8, 0, True), (2, 32, False)])
def test_cpu_bf16_matches_exact_product(rows, bits, group, symmetric):
    m = _layer(96, 256, bits, group, symmetric)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(1))
    ref = m(x)  # dequant: the stored values in float32
    m.set_kernel("cpu-bf16")
    y = m(x)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert _rel_err(y, ref) < 1e-2  # bf16 rounding of activations and weights only
    # the int4 kernel (decode rows) and the cached bf16 weight (prefill rows) each carry the layer
    uses_int4 = bits == 4 and rows <= kernels.DECODE_ROWS
    assert (m._kernel.cached_bytes == 0) == uses_int4
    m.set_kernel("dequant")
    assert torch.equal(m(x), ref)


@needs_fast
def test_int4_kernel_layout_is_the_stored_codes():
    # weights and inputs exact in bf16 with exact fp32 partial sums: the kernel's product is the float product,
    # rounded once to the bf16 output
    o, i, g = 32, 128, 32
    codes = torch.randint(0, 16, (o, i), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    scales = torch.full((o, i // g), 0.25)
    zeros = torch.randint(0, 16, (o, i // g), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    x = torch.randint(-4, 5, (3, i), generator=torch.Generator().manual_seed(4)).float()
    w = (codes.float().reshape(o, -1, g) - zeros.float().unsqueeze(-1)) * 0.25
    packed, sz = kernels.pack_int4(codes, scales, zeros, g)
    out = kernels.int4_mm(x.to(torch.bfloat16), packed, g, sz)
    assert torch.equal(out, (x @ w.reshape(o, i).t()).to(torch.bfloat16))


def test_resolve_kernel_rules(monkeypatch):
    assert kernels.resolve_kernel("dequant", "cpu") == "dequant"
    assert kernels.resolve_kernel("auto", "meta") == "dequant"  # not a CPU
    with pytest.raises(ConfigError, match="unknown quant kernel"):
        kernels.resolve_kernel("fast", "cpu")
    monkeypatch.setattr(kernels, "cpu_bf16_available", lambda: False)
    assert kernels.resolve_kernel("auto", "cpu") == "dequant"
    with pytest.raises(ConfigError, match="AVX512-BF16"):
        kernels.resolve_kernel("cpu-bf16", "cpu")
    monkeypatch.setattr(kernels, "cpu_bf16_available", lambda: True)
    assert kernels.resolve_kernel("auto", "cpu") == "cpu-bf16"


def test_no_packed_linear_no_kernel():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert kernels.select_kernel_(model, "dequant") is None
    model.append(_layer(4, 32, 4, 32, False))
    assert kernels.select_kernel_(model, "dequant") == "dequant"


def test_act_bits_keep_the_exact_product():
    m = _layer(16, 64, 4, 32, False)
    m.act_bits = 8
    m.set_kernel("cpu-bf16")
    assert m._kernel is None


@pytest.fixture(scope="module")
def int4_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("int4-llama")
    _, path = tiny.tiny_llama(
        d / "fp32", hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2
    )
    out = d / "q"
    args = ["quantize", path, "--scheme", "int4", "--method", "rtn", "--out", str(out), "--max-samples", "64"]
    args += ["--max-length", "16", "--batch-size", "4", "--calib-batches", "1", "--eval-batches", "1"]
    assert main(args) == 0
    return out


@needs_fast
def test_load_picks_the_kernel_and_engines_keep_exact(int4_llama):
    fast = distillkit.load(str(int4_llama)).model
    exact = distillkit.load(str(int4_llama), quant_kernel="dequant").model
    assert fast.quant_kernel == "cpu-bf16" and exact.quant_kernel == "dequant"
    from distillkit.models.load import load_model

    assert load_model(str(int4_llama)).model.quant_kernel == "dequant"  # engines: the file's exact values
    ids = torch.randint(3, 120, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fast(ids).logits, exact(ids).logits
        assert _rel_err(a, b) < 2e-2
        # batch-1 prompt and decode (12 rows, then 1) run through the int4 kernel: no bf16 copy of a 4-bit weight
        fresh = distillkit.load(str(int4_llama)).model
        fresh.generate(ids, max_new_tokens=4, do_sample=False)
    q_proj = fresh.model.layers[0].self_attn.q_proj
    assert q_proj.bits == 4 and q_proj._kernel._int4 is not None and q_proj._kernel.cached_bytes == 0


@pytest.mark.parametrize("act_bits", [None, 8])
def test_cached_is_the_exact_product_bit_for_bit(act_bits):
    m = _layer(48, 64, 4, 32, False)
    m.act_bits = act_bits
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    ref = m(x)
    m.set_kernel("cached")
    assert m._kernel.cached_bytes == 0  # made on first use
    assert torch.equal(m(x), ref) and torch.equal(m(x), ref)
    assert m._kernel.cached_bytes == 48 * 64 * 4
    y64 = m(x.double())  # a new dtype gets its own copy
    assert m._kernel.cached_bytes == 48 * 64 * 8
    m.set_kernel("dequant")
    assert m._kernel is None and torch.equal(y64, m(x.double()))


def test_cached_artifact_equals_dequant(int4_llama):
    exact = distillkit.load(str(int4_llama), quant_kernel="dequant").model
    cached = distillkit.load(str(int4_llama), quant_kernel="cached").model
    assert cached.quant_kernel == "cached"
    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, exact(ids).logits)
    manifest = json.loads((int4_llama / "distillkit.json").read_text())
    assert manifest["metrics"]["reload_output_cosine"] >= 0.999


def test_bench_rejects_unknown_quant_kernel(int4_llama, capsys):
    code = main(["bench", str(int4_llama), "--quant-kernel", "fast"])
    err = capsys.readouterr().err
    assert code == 1 and "unknown quant kernel" in err and "Traceback" not in err


@needs_fast
def test_bench_reports_the_kernel(int4_llama, capsys):
    code = main(["bench", str(int4_llama), "--repeats", "1", "--warmup", "0", "--seq", "8", "--decode-tokens", "2"])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out.strip().splitlines()[-1])
    assert report["models"][0]["quant_kernel"] == "cpu-bf16"
