"""The fused linear + distillation loss against its float32 reference: values and gradients.

Two backends run the same autograd function: torch math per chunk, and the Triton kernel (under
``TRITON_INTERPRET=1`` on CPU, set by tests/conftest.py; slow, so its shapes are tiny and its
cases few). GPU cases at larger shapes are marked ``gpu`` and skipped without CUDA.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from distillkit.kernels.kd_loss import (
    DIVERGENCES,
    fused_kd_loss,
    fused_kd_loss_topk,
    naive_kd_loss,
    naive_kd_loss_topk,
)
from distillkit.kernels.kd_loss import fused as fused_module
from distillkit.kernels.kd_loss.fused import default_chunk_size, interpreting, resolve_backend

CUDA = torch.cuda.is_available()
TRITON_OK = fused_module.triton_available() and (CUDA or interpreting())
needs_triton = pytest.mark.skipif(
    not TRITON_OK, reason="Triton needs CUDA, or TRITON_INTERPRET=1 set before import on CPU"
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")

# (loss atol, loss rtol, gradient relative Frobenius error) per dtype: bf16 rounds the logits and
# the head-gradient accumulation, the reference computes in float32 from the same bf16 inputs.
TOL = {torch.float32: (2e-5, 1e-5, 2e-5), torch.bfloat16: (3e-2, 2e-2, 3e-2)}
PARAMS = {"beta": 0.3, "skew": 0.2}


def make_inputs(n=20, vocab=300, hs=32, ht=48, dtype=torch.float32, seed=0, bias=True, device="cpu"):
    """Student/teacher hidden states and heads with logits of std ~2, labels with every 4th token ignored."""
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(n, hs, generator=g)
    sw = torch.randn(vocab, hs, generator=g) * (2.0 / hs**0.5)
    sb = torch.randn(vocab, generator=g) * 0.1 if bias else None
    th = torch.randn(n, ht, generator=g)
    tw = torch.randn(vocab, ht, generator=g) * (2.0 / ht**0.5)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::4] = -100

    def leaf(x):
        return None if x is None else x.to(device=device, dtype=dtype).requires_grad_()

    return {
        "student_hidden": leaf(sh),
        "student_head": leaf(sw),
        "student_bias": leaf(sb),
        "teacher_hidden": th.to(device=device, dtype=dtype),
        "teacher_head": tw.to(device=device, dtype=dtype),
        "labels": labels.to(device),
    }


def grads_of(loss, x):
    wrt = [t for t in (x["student_hidden"], x["student_head"], x["student_bias"]) if t is not None]
    return torch.autograd.grad(loss, wrt)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def check(x, dtype, backend, chunk_size, **kw):
    """Fused and naive loss/parts/gradients agree within the dtype's tolerance; returns the fused loss."""
    args = (x["student_hidden"], x["student_head"], x["teacher_hidden"], x["teacher_head"], x["labels"])
    extra = {"student_bias": x["student_bias"], **kw}
    ref, ref_kd, ref_ce = naive_kd_loss(*args, return_parts=True, **extra)
    out, kd, ce = fused_kd_loss(*args, chunk_size=chunk_size, backend=backend, return_parts=True, **extra)
    atol, rtol, gtol = TOL[dtype]
    assert out.dtype == torch.float32 and out.shape == ()
    torch.testing.assert_close(out.detach(), ref.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(kd, ref_kd, atol=atol, rtol=rtol)
    torch.testing.assert_close(ce, ref_ce, atol=atol, rtol=rtol)
    for got, want, inp in zip(grads_of(out, x), grads_of(ref, x), ("hidden", "head", "bias"), strict=True):
        assert got.dtype == dtype
        assert rel_err(got, want) < gtol, f"grad {inp}: relative error {rel_err(got, want):.2e}"
    return out


# --- torch backend: every divergence x temperature x dtype ------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_torch_backend_matches_naive(divergence, temperature, dtype):
    x = make_inputs(n=22, vocab=300, dtype=dtype, seed=10 * DIVERGENCES.index(divergence) + int(temperature))
    # chunk 8 does not divide 22 tokens; alpha mixes in the hard labels, every 4th ignored
    check(x, dtype, "torch", 8, divergence=divergence, temperature=temperature, alpha=0.25, **PARAMS)


# --- Triton kernel (interpreter on CPU) -------------------------------------------------------------------

TRITON_CASES = [
    ("forward_kl", 1.0, torch.float32, 0.0),
    ("reverse_kl", 2.0, torch.float32, 0.5),
    ("jsd", 4.0, torch.float32, 0.0),
    ("tvd", 2.0, torch.float32, 0.25),
    ("skew_kl", 1.0, torch.float32, 0.0),
    ("skew_reverse_kl", 4.0, torch.float32, 0.0),
    ("forward_kl", 2.0, torch.bfloat16, 0.25),
    ("jsd", 1.0, torch.bfloat16, 0.0),
]


@needs_triton
@pytest.mark.parametrize(
    "divergence,temperature,dtype,alpha", TRITON_CASES, ids=[f"{c[0]}-T{c[1]:g}-{c[2]}-a{c[3]}" for c in TRITON_CASES]
)
def test_triton_backend_matches_naive(divergence, temperature, dtype, alpha):
    # vocabulary 200 is not a multiple of the kernel's 128-wide vocabulary block, chunk 6 not of 14 tokens
    x = make_inputs(n=14, vocab=200, hs=16, ht=24, dtype=dtype, seed=7)
    check(x, dtype, "triton", 6, divergence=divergence, temperature=temperature, alpha=alpha, **PARAMS)


@needs_triton
def test_triton_and_torch_backends_agree_without_labels_or_bias():
    x = make_inputs(n=10, vocab=150, hs=16, ht=16, bias=False, seed=3)
    args = (x["student_hidden"], x["student_head"], x["teacher_hidden"], x["teacher_head"])
    a = fused_kd_loss(*args, divergence="jsd", beta=0.5, temperature=2.0, backend="triton", chunk_size=4)
    b = fused_kd_loss(*args, divergence="jsd", beta=0.5, temperature=2.0, backend="torch", chunk_size=4)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for ga, gb in zip(grads_of(a, x), grads_of(b, x), strict=True):
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5)


# --- semantics ------------------------------------------------------------------------------------------


def test_endpoints_equal_the_plain_kls():
    x = make_inputs(n=12, vocab=100, seed=11)
    args = (x["student_hidden"], x["student_head"], x["teacher_hidden"], x["teacher_head"], x["labels"])
    fkl = fused_kd_loss(*args, divergence="forward_kl", temperature=2.0, backend="torch")
    rkl = fused_kd_loss(*args, divergence="reverse_kl", temperature=2.0, backend="torch")
    for divergence, kw, want in (
        ("jsd", {"beta": 0.0}, fkl),
        ("jsd", {"beta": 1.0}, rkl),
        ("skew_kl", {"skew": 0.0}, fkl),
        ("skew_reverse_kl", {"skew": 0.0}, rkl),
    ):
        got = fused_kd_loss(*args, divergence=divergence, temperature=2.0, backend="torch", **kw)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert fkl.item() > 0.05 and rkl.item() > 0.05 and abs(fkl.item() - rkl.item()) > 1e-3


def test_ignored_tokens_do_not_count_and_mask_overrides_labels():
    x = make_inputs(n=16, vocab=120, seed=5)
    args = (x["student_hidden"], x["student_head"], x["teacher_hidden"], x["teacher_head"])
    labels = x["labels"]
    kept = labels != -100
    # the ignored tokens' hidden states do not matter: scrambling them changes nothing
    loss = fused_kd_loss(*args, labels, backend="torch", chunk_size=5)
    (g_hidden,) = torch.autograd.grad(loss, x["student_hidden"])
    assert torch.all(g_hidden[~kept] == 0) and g_hidden[kept].abs().sum() > 0
    only_kept = fused_kd_loss(
        x["student_hidden"][kept], x["student_head"], x["teacher_hidden"][kept], x["teacher_head"], backend="torch"
    )
    torch.testing.assert_close(loss, only_kept, atol=1e-6, rtol=1e-6)
    # an explicit mask picks the divergence's tokens, labels keep only the hard-label role
    mask = torch.zeros(16, dtype=torch.bool)
    mask[:3] = True
    first3 = fused_kd_loss(*args, labels, mask=mask, backend="torch")
    want = fused_kd_loss(
        x["student_hidden"][:3], x["student_head"], x["teacher_hidden"][:3], x["teacher_head"], backend="torch"
    )
    torch.testing.assert_close(first3, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_fully_ignored_batch_gives_zero_not_nan(backend):
    x = make_inputs(n=6, vocab=100, hs=8, ht=8, seed=2)
    labels = torch.full((6,), -100)
    loss = fused_kd_loss(
        x["student_hidden"],
        x["student_head"],
        x["teacher_hidden"],
        x["teacher_head"],
        labels,
        student_bias=x["student_bias"],
        alpha=0.5,
        backend=backend,
    )
    assert loss.item() == 0.0
    for g in grads_of(loss, x):
        assert torch.all(g == 0)


def test_backward_scales_by_the_incoming_gradient_and_eval_needs_no_grad():
    x = make_inputs(n=9, vocab=64, seed=4, bias=False)
    args = (x["student_hidden"], x["student_head"], x["teacher_hidden"], x["teacher_head"], x["labels"])
    base = grads_of(fused_kd_loss(*args, temperature=2.0, backend="torch"), x)
    scaled = grads_of(3.0 * fused_kd_loss(*args, temperature=2.0, backend="torch") + 1.0, x)
    for a, b in zip(scaled, base, strict=True):
        torch.testing.assert_close(a, 3.0 * b, atol=1e-7, rtol=1e-6)
    with torch.no_grad():
        value = fused_kd_loss(*args, temperature=2.0, backend="torch")
    ref = naive_kd_loss(*args, temperature=2.0)
    torch.testing.assert_close(value, ref.detach(), atol=1e-6, rtol=1e-6)


def test_chunks_never_hold_all_tokens(monkeypatch):
    seen = []
    real = fused_module._chunk_rows

    def spy(logits, teacher, *a, **k):
        seen.append((tuple(logits.shape), tuple(teacher.shape)))
        return real(logits, teacher, *a, **k)

    monkeypatch.setattr(fused_module, "_chunk_rows", spy)
    x = make_inputs(n=23, vocab=90, seed=1)
    loss = fused_kd_loss(
        x["student_hidden"], x["student_head"], x["teacher_hidden"], x["teacher_head"], backend="torch", chunk_size=7
    )
    loss.backward()
    assert seen == [((7, 90), (7, 90))] * 3 + [((2, 90), (2, 90))]


def test_default_chunk_size():
    # two bf16 [C, 128256] buffers in 384 MiB -> 784 rows, rounded down to a multiple of 64
    assert default_chunk_size(8192, 128256, 2) == 768
    assert default_chunk_size(8192, 128256, 4) == 384
    assert default_chunk_size(20, 300, 4) == 20


def test_bad_inputs_raise_with_the_reason():
    x = make_inputs(n=5, vocab=50, seed=0)
    args = (x["student_hidden"], x["student_head"], x["teacher_hidden"], x["teacher_head"])
    with pytest.raises(ValueError, match="needs labels"):
        fused_kd_loss(*args, alpha=0.5)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 50\)"):
        fused_kd_loss(*args, torch.tensor([0, 1, 2, 3, 50]), alpha=0.5)
    with pytest.raises(ValueError, match="unknown divergence"):
        fused_kd_loss(*args, divergence="taid")
    with pytest.raises(ValueError, match="must match"):
        fused_kd_loss(x["student_hidden"], x["student_head"], x["teacher_hidden"][:4], x["teacher_head"])
    with pytest.raises(ValueError, match="temperature"):
        fused_kd_loss(*args, temperature=0.0)
    with pytest.raises(ValueError, match="skew"):
        fused_kd_loss(*args, divergence="skew_kl", skew=1.0)


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", cpu) == "torch"
    with pytest.raises(RuntimeError, match="backend='torch'"):
        resolve_backend("triton", cpu)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", cpu)


def test_import_pulls_in_neither_torch_nor_triton():
    code = (
        "import sys, distillkit.kernels, distillkit.kernels.kd_loss; "
        "assert callable(distillkit.kernels.__getattr__); "
        "bad = [m for m in ('torch', 'triton') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names_resolve():
    import distillkit.kernels as kernels

    assert kernels.fused_kd_loss is fused_kd_loss
    assert kernels.fused_kd_loss_topk is fused_kd_loss_topk


# --- top-k teacher --------------------------------------------------------------------------------------


def topk_of(x, k):
    with torch.no_grad():
        t = x["teacher_hidden"].float() @ x["teacher_head"].float().T
    values, indices = t.topk(k, dim=-1)
    return values.to(x["teacher_hidden"].dtype), indices


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_topk_with_k_equal_vocab_is_the_full_teacher_loss(backend):
    x = make_inputs(n=12, vocab=150, hs=16, ht=16, seed=9)
    values, indices = topk_of(x, 150)
    # log-probs instead of logits: the same softened teacher distribution
    values = torch.log_softmax(values, dim=-1)
    kw = {"divergence": "reverse_kl", "temperature": 2.0, "alpha": 0.2, "student_bias": x["student_bias"]}
    got = fused_kd_loss_topk(
        x["student_hidden"], x["student_head"], values, indices, x["labels"], backend=backend, chunk_size=5, **kw
    )
    want = naive_kd_loss(
        x["student_hidden"], x["student_head"], x["teacher_hidden"], x["teacher_head"], x["labels"], **kw
    )
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    for a, b in zip(grads_of(got, x), grads_of(want, x), strict=True):
        assert rel_err(a, b) < 2e-5


TOPK_CASES = [
    ("forward_kl", 1.0, "torch"),
    ("jsd", 2.0, "torch"),
    ("tvd", 4.0, "torch"),
    ("skew_kl", 2.0, "torch"),
    ("skew_reverse_kl", 1.0, "torch"),
    ("forward_kl", 2.0, "triton"),
    ("jsd", 1.0, "triton"),
    ("skew_reverse_kl", 4.0, "triton"),
]


@pytest.mark.parametrize(
    "divergence,temperature,backend",
    [pytest.param(*c, marks=needs_triton) if c[2] == "triton" else c for c in TOPK_CASES],
    ids=[f"{c[0]}-T{c[1]:g}-{c[2]}" for c in TOPK_CASES],
)
def test_topk_matches_naive_topk(divergence, temperature, backend):
    x = make_inputs(n=12, vocab=200, hs=16, ht=16, seed=13, bias=False)
    values, indices = topk_of(x, 10)
    # a shuffled order inside the top-k must not matter
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    values, indices = values[:, perm], indices[:, perm]
    kw = {"divergence": divergence, "temperature": temperature, "alpha": 0.1, **PARAMS}
    got = fused_kd_loss_topk(
        x["student_hidden"], x["student_head"], values, indices, x["labels"], backend=backend, chunk_size=5, **kw
    )
    want = naive_kd_loss_topk(x["student_hidden"], x["student_head"], values, indices, x["labels"], **kw)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    for a, b in zip(grads_of(got, x), grads_of(want, x), strict=True):
        assert rel_err(a, b) < 2e-5
    # and a top-k loss differs from the full-teacher one, so the test would notice a dropped tail
    full = naive_kd_loss(
        x["student_hidden"], x["student_head"], x["teacher_hidden"], x["teacher_head"], x["labels"], **kw
    )
    assert abs(full.item() - want.item()) > 1e-3


def test_topk_refuses_reverse_kl_and_bad_indices():
    x = make_inputs(n=4, vocab=40, seed=0)
    values, indices = topk_of(x, 5)
    with pytest.raises(ValueError, match="infinite against a teacher top-k"):
        fused_kd_loss_topk(x["student_hidden"], x["student_head"], values, indices, divergence="reverse_kl")
    with pytest.raises(ValueError, match="infinite"):
        fused_kd_loss_topk(x["student_hidden"], x["student_head"], values, indices, divergence="jsd", beta=1.0)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 40\)"):
        fused_kd_loss_topk(x["student_hidden"], x["student_head"], values, indices + 40)
    with pytest.raises(ValueError, match="must both be"):
        fused_kd_loss_topk(x["student_hidden"], x["student_head"], values, indices[:, :3])


# --- GPU ------------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gpu_triton_matches_naive_at_larger_shapes(divergence, dtype):
    # 32,007 is not a multiple of the 4096-wide vocabulary block; 1000 tokens not of the 384-row chunk
    x = make_inputs(n=1000, vocab=32007, hs=256, ht=384, dtype=dtype, seed=21, device="cuda")
    check(x, dtype, "triton", 384, divergence=divergence, temperature=2.0, alpha=0.25, **PARAMS)


@gpu
@needs_cuda
def test_gpu_topk_matches_naive_topk():
    x = make_inputs(n=512, vocab=32007, hs=256, ht=256, seed=22, device="cuda", bias=False)
    values, indices = topk_of(x, 64)
    kw = {"divergence": "forward_kl", "temperature": 2.0}
    got = fused_kd_loss_topk(x["student_hidden"], x["student_head"], values, indices, backend="triton", **kw)
    want = naive_kd_loss_topk(x["student_hidden"], x["student_head"], values, indices, **kw)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for a, b in zip(grads_of(got, x), grads_of(want, x), strict=True):
        assert rel_err(a, b) < 1e-4


# --- benchmark ------------------------------------------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="checks the error raised without CUDA")
def test_bench_needs_cuda():
    from distillkit.errors import ConfigError
    from distillkit.kernels.kd_loss import bench_kd_loss

    with pytest.raises(ConfigError, match="needs a CUDA GPU") as e:
        bench_kd_loss(tokens=8, student_hidden=8, teacher_hidden=8, vocab=16)
    assert "tests/kernels" in e.value.hint


@gpu
@needs_cuda
def test_gpu_bench_rows_at_small_sizes():
    from distillkit.kernels.kd_loss import bench_kd_loss

    rows = bench_kd_loss(tokens=1024, student_hidden=256, teacher_hidden=512, vocab=32000, warmup=1, iters=2)
    assert [r["impl"] for r in rows] == ["naive", "distillkit", "liger"]
    naive, ours, liger = rows
    assert naive["status"] == ours["status"] == "ok" and liger["status"] in ("ok", "not installed")
    assert ours["loss"] == pytest.approx(naive["loss"], rel=2e-2)
    assert 0 < ours["peak_extra_gib"] < naive["peak_extra_gib"]
    assert ours["speedup_vs_naive"] == pytest.approx(naive["ms"] / ours["ms"], rel=1e-2)
