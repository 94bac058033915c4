"""``distillkit quantize`` end to end on tiny models: artifacts, reload exactness, sizes, QAT, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distillkit.cli.app import main
from distillkit.models.packed.format import load_quantized
from distillkit.models.packed.modules import QuantEmbedding, QuantLinear, TiedQuantLinear
from distillkit.quantize import QuantizeConfig
from tests import tiny

FAST = [
    "--max-samples",
    "200",
    "--max-length",
    "32",
    "--batch-size",
    "4",
    "--calib-batches",
    "2",
    "--eval-batches",
    "2",
]


def _run(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _tokens(seed=0):
    return torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    """A tiny Llama wide enough for group 128, saved in bfloat16 like real checkpoints."""
    d = tmp_path_factory.mktemp("llama-bf16")
    model, path = tiny.tiny_llama(
        d, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2
    )
    model.to(torch.bfloat16).save_pretrained(path)
    return path


def test_int4_g128_artifact_is_small_and_reloads_exactly(llama_bf16, tmp_path, capsys):
    out = tmp_path / "q"
    code, stdout, err = _run(["quantize", llama_bf16, "--scheme", "int4", "--out", str(out), *FAST], capsys)
    assert code == 0, err
    m = json.loads(stdout)
    assert m["stage"] == "quantize" and m["config"]["resolved"] == {
        "format": "packed", "bits": 4, "group_size": 128, "symmetric": False, "method": "gptq",
        "embedding_bits": 8, "reconstruct_steps": 0, "sensitive_fraction": 0.0, "sensitive_bits": 8,
    }  # fmt: skip
    # every Linear is packed at 4 bits + fp16 scale and uint8 zero per 128 weights, the embedding at 8 bits
    assert m["metrics"]["size_ratio"] <= 0.35
    assert (out / "quantized.safetensors").stat().st_size == m["metrics"]["artifact_bytes"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "distillkit"
    layout = cfg["quantization_config"]["modules"]
    assert layout["model.layers.0.mlp.down_proj"]["bits"] == 4 and layout["model.embed_tokens"]["kind"] == "embedding"
    assert layout["model.embed_tokens"]["bits"] == 8 and layout["model.embed_tokens"]["group_size"] == 128

    import distillkit

    loaded = distillkit.load(str(out), quant_kernel="dequant")  # the exact product the manifest was measured with
    model = loaded.model
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert model.model.layers[0].self_attn.q_proj.qweight.dtype == torch.uint8
    # the quality the manifest reports was measured on the same numbers the reloaded model computes
    again = load_quantized(out, "causal-lm")
    x = _tokens()
    assert torch.equal(model(x).logits, again(x).logits)
    assert 0 < m["metrics"]["after_kl_to_teacher"] < 0.5
    assert m["metrics"]["weight_sqnr_db_min"] > 15


def test_plain_transformers_refuses_the_packed_format(llama_bf16, tmp_path, capsys):
    out = tmp_path / "q"
    assert (
        _run(["quantize", llama_bf16, "--scheme", "int8", "--method", "rtn", "--out", str(out), *FAST], capsys)[0] == 0
    )
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(out)  # loud, instead of silently random weights


def test_gpt2_conv1d_and_tied_head_share_one_packed_table(gpt2, tmp_path, capsys):
    model, path = gpt2
    out = tmp_path / "q"
    code, stdout, err = _run(["quantize", path, "--scheme", "int8", "--out", str(out), *FAST], capsys)
    assert code == 0, err
    q = load_quantized(out, "causal-lm")
    assert isinstance(q.lm_head, TiedQuantLinear) and isinstance(q.transformer.wte, QuantEmbedding)
    assert torch.equal(q.lm_head.weight, q.transformer.wte.weight)
    assert isinstance(q.transformer.h[0].attn.c_attn, QuantLinear)
    with torch.no_grad():
        ref = model.eval()(_tokens()).logits
        got = q(_tokens()).logits
    # int8 per-channel: close to the float model
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_gptq_beats_round_to_nearest_on_the_model(llama, tmp_path, capsys):
    _, path = llama
    kl = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / method
        args = ["quantize", path, "--scheme", "int4", "--group-size", "32", "--method", method, "--out", str(out)]
        code, stdout, err = _run([*args, *FAST, "--calib-batches", "4"], capsys)
        assert code == 0, err
        kl[method] = json.loads(stdout)["metrics"]["after_kl_to_teacher"]
    assert kl["gptq"] < kl["rtn"], kl


@pytest.mark.parametrize("quantizer", ["lsq", "dq"])
def test_quantized_distillation_trains_converts_and_records(llama, tmp_path, capsys, quantizer):
    _, path = llama
    out = tmp_path / "qat"
    args = ["quantize", path, "--scheme", "int4", "--group-size", "32", "--teacher", path, "--qat-steps", "3",
            "--qat-lr", "1e-3", "--quantizer", quantizer, "--act-bits", "8", "--out", str(out), *FAST]  # fmt: skip
    code, stdout, err = _run(args, capsys)
    assert code == 0, err
    m = json.loads(stdout)
    assert m["extra"]["qat"]["steps"] == 3 and m["extra"]["qat"]["quantizer"] == quantizer
    assert {"quality_before", "quality_ptq", "quality_after"} <= set(m["metrics"])
    assert m["metrics"]["quality_after"] != m["metrics"]["quality_ptq"]  # training changed the model
    gain = m["extra"]["qat"]["gain"]
    ptq_kl, after_kl = m["metrics"]["quality_ptq"]["kl_to_teacher"], m["metrics"]["quality_after"]["kl_to_teacher"]
    assert gain == {"metric": "kl_to_teacher", "ptq": ptq_kl, "after": after_kl, "improved": after_kl < ptq_kl}
    assert ("ended no better than its post-training start" in err) == (not gain["improved"])
    # the converted low-bit model computes what the trained fake-quant model computed (same held-out batches)
    fq = m["extra"]["qat"]["fake_quant_quality"]
    for key in ("kl_to_teacher", "perplexity", "top1_agreement"):
        assert fq[key] == pytest.approx(m["metrics"]["quality_after"][key], rel=1e-5, abs=1e-7), key
    q = load_quantized(out, "causal-lm")
    layer = q.model.layers[0].mlp.up_proj
    assert layer.act_bits == 8 and layer.has_codebook == (quantizer == "dq")
    # mixed precision survives training: the table was trained and stored at 8 bits, the Linears at 4
    assert layer.bits == 4 and q.model.embed_tokens.bits == 8
    assert m["config"]["resolved"]["embedding_bits"] == 8
    assert not list(out.parent.glob(".qat.qat-*"))  # the inner distill run left nothing behind


def test_dynamic_int8_runs_torch_dynamic_linear(llama, tmp_path, capsys):
    model, path = llama
    out = tmp_path / "dyn"
    code, stdout, err = _run(
        ["quantize", path, "--scheme", "dynamic-int8", "--device", "cpu", "--out", str(out), *FAST], capsys
    )
    assert code == 0, err
    q = load_quantized(out, "causal-lm")
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    assert isinstance(q.model.layers[0].mlp.up_proj, DynamicLinear)
    with torch.no_grad():
        ref = model.eval()(_tokens()).logits
        got = q(_tokens()).logits
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("scheme", ["nf4", "llm-int8"])
def test_bitsandbytes_artifact_reloads_with_from_pretrained(llama, tmp_path, capsys, scheme):
    pytest.importorskip("bitsandbytes")
    model, path = llama
    out = tmp_path / scheme
    code, stdout, err = _run(
        ["quantize", path, "--scheme", scheme, "--device", "cpu", "--out", str(out), *FAST], capsys
    )
    assert code == 0, err
    m = json.loads(stdout)
    assert m["metrics"]["size_ratio"] < (0.5 if scheme == "llm-int8" else 0.35)
    import warnings

    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
        import bitsandbytes as bnb

        cls = bnb.nn.Linear4bit if scheme == "nf4" else bnb.nn.Linear8bitLt
        assert isinstance(q.model.layers[0].mlp.up_proj, cls)
        with torch.no_grad():
            got = q(_tokens()).logits.float()
            ref = model.eval()(_tokens()).logits
    # quantized (not the float weights), yet close to the float model
    err = (got - ref).abs().max().item()
    assert 0 < err < 0.3 * ref.abs().max().item(), err


def _no_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--scheme", "int5"], "5-bit weights are not supported"),
        (["--scheme", "int4", "--group-size", "48"], "group size 48 is not supported"),
        (["--scheme", "int4", "--group-size", "128"], "group size 128 does not divide the 64 input features"),
        (["--scheme", "int4", "--qat-steps", "5"], "needs a full-precision teacher"),
        (["--scheme", "int4", "--act-bits", "8"], "--act-bits is trained with quantized distillation"),
        (["--scheme", "int4", "--act-bits", "3", "--qat-steps", "2"], "3-bit activations are not supported"),
        (["--scheme", "nf4", "--group-size", "32"], "--group-size does not apply"),
        (["--scheme", "nf4"], "needs bitsandbytes"),
        (["--scheme", "nope"], "unknown quantization scheme 'nope'"),
        (["--scheme", "dynamic-int8", "--qat-steps", "2", "--teacher", "x"], "cannot target the dynamic-int8 scheme"),
    ],
)
def test_errors_exit_1_with_one_line_and_no_output(llama, tmp_path, capsys, monkeypatch, flags, message):
    _, path = llama
    if message == "needs bitsandbytes":
        _no_bitsandbytes(monkeypatch)
    out = tmp_path / "out"
    code, stdout, err = _run(["quantize", path, *flags, "--out", str(out)], capsys)
    assert code == 1, err
    assert stdout == ""
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and message in lines[0], err
    assert len(lines) == 2 and lines[1].startswith("hint: ")
    if "group size 48" in message:
        assert "32, 64, 128" in lines[1]
    if "5-bit weights" in message:
        assert "2, 3, 4, 8" in lines[1]
    assert not out.exists()


def test_an_already_quantized_model_is_refused(llama, tmp_path, capsys):
    _, path = llama
    first = tmp_path / "q"
    assert _run(["quantize", path, "--scheme", "int8", "--method", "rtn", "--out", str(first), *FAST], capsys)[0] == 0
    code, _, err = _run(["quantize", str(first), "--scheme", "int4", "--out", str(tmp_path / "again")], capsys)
    assert code == 1 and "already quantized" in err


def test_pipeline_stdin_and_config_defaults(llama, tmp_path):
    """``distillkit quantize -`` reads the previous stage's manifest line from stdin."""
    _, path = llama
    src = tmp_path / "copy"
    shutil.copytree(path, src)
    manifest = json.dumps({"path": str(src), "stage": "distill"})
    out = tmp_path / "q"
    r = subprocess.run(
        [sys.executable, "-m", "distillkit.cli.app", "quantize", "-", "--scheme", "int8", "--method", "rtn",
         "--out", str(out), "--quiet", *FAST],
        input=manifest + "\n", capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    assert Path(out, "distillkit.json").is_file()
    assert QuantizeConfig().resolved()["method"] == "gptq"


def test_export_keeps_the_packed_layout_and_onnx_refuses_it(llama, tmp_path, capsys):
    _, path = llama
    q = tmp_path / "q"
    assert (
        _run(
            ["quantize", path, "--scheme", "int4", "--group-size", "32", "--method", "rtn", "--out", str(q), *FAST],
            capsys,
        )[0]
        == 0
    )
    hf = tmp_path / "hf"
    code, stdout, err = _run(["export", str(q), "--format", "hf", "--out", str(hf)], capsys)
    assert code == 0, err
    assert json.loads(stdout)["metrics"]["hf_max_abs_diff"] == 0.0
    assert (hf / "quantized.safetensors").is_file() and not (hf / "model.safetensors").exists()
    x = _tokens()
    assert torch.equal(load_quantized(hf, "causal-lm")(x).logits, load_quantized(q, "causal-lm")(x).logits)
    code, _, err = _run(["export", str(q), "--format", "onnx", "--out", str(tmp_path / "onnx")], capsys)
    assert code == 1 and "packed low-bit weights" in err and not (tmp_path / "onnx").exists()


def test_qat_gain_says_when_training_did_not_help(capsys):
    from distillkit.quantize.engine import qat_gain

    up = qat_gain({"embedding_cosine": 0.86, "eval_examples": 8}, {"embedding_cosine": 0.87, "eval_examples": 8})
    assert up == {"metric": "embedding_cosine", "ptq": 0.86, "after": 0.87, "improved": True}
    assert capsys.readouterr().err == ""
    down = qat_gain({"kl_to_teacher": 0.10, "top1_agreement": 0.9}, {"kl_to_teacher": 0.12, "top1_agreement": 0.95})
    assert down["metric"] == "kl_to_teacher" and down["improved"] is False  # lower KL is better: 0.12 is worse
    err = capsys.readouterr().err
    assert err.startswith("warning: quantized distillation ended no better") and "--qat-lr" in err
    assert qat_gain({}, {"embedding_cosine": 0.9}) is None
