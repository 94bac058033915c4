"""Block-wise reconstruction after GPTQ and the latent weights it (and QAT) starts from."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from distillkit.quantize import functional as qf
from distillkit.quantize.gptq import gptq_quantize
from tests.test_quantize.test_gptq import _padded_batches, _problem


@pytest.mark.parametrize("act_order,sym,clip", [(True, False, True), (False, True, False), (True, True, False)])
def test_gptq_latent_rounds_to_its_codes(act_order, sym, clip):
    w, H, _ = _problem(3)
    w, H = w.float(), H.float()
    st, latent = gptq_quantize(
        w, H, bits=2, group_size=32, symmetric=sym, damp=0.01, act_order=act_order, clip_search=clip,
        return_latent=True,
    )  # fmt: skip
    again = gptq_quantize(w, H, bits=2, group_size=32, symmetric=sym, damp=0.01, act_order=act_order, clip_search=clip)
    assert torch.equal(again.codes, st.codes)  # asking for the latent changes nothing
    z = None if sym else st.zeros.float()
    codes = qf.quantize_codes(latent, st.scales.float(), z, 2, 32)
    assert torch.equal(codes.to(torch.uint8), st.codes)
    # it is not the dequantized weight: GPTQ's compensation moved it off the grid
    assert (latent - st.dequantize(torch.float32)).abs().max() > 1e-3


def _tiny_bert(tmp_path):
    from distillkit.models.load import load_model
    from distillkit.quantize.surgery import find_targets
    from tests import tiny

    _, path = tiny.tiny_bert(tmp_path / "m")
    model = load_model(path, task="feature-extraction", dtype="float32", device="cpu").model.eval()
    return model, find_targets(model, (), embeddings=False)


def _gptq(model, targets, batches, latents=None, **kw):
    from distillkit.quantize import engine

    r = {"bits": 2, "group_size": 32, "symmetric": False}
    return engine.gptq_states(model, targets, batches, r, 0.1, "cpu", act_order=True, latents=latents, **kw)


def test_qat_from_gptq_latents_starts_exactly_at_gptq_and_its_step_sizes_can_learn(tmp_path):
    from distillkit.quantize.surgery import to_fake_quant_

    model, targets = _tiny_bert(tmp_path)
    batches = _padded_batches(16, length=10, pad=(0, 6))
    latents: dict = {}
    states = _gptq(model, targets, batches, latents)
    assert latents.keys() == {t.name for t in targets}
    kw = dict(bits=2, group_size=32, symmetric=False, quantizer="lsq", init=states)
    on_grid = to_fake_quant_(copy.deepcopy(model), targets, **kw)
    behind = to_fake_quant_(copy.deepcopy(model), targets, **kw, latents=latents)
    for t in targets:  # the same codes and grid either way: the forward pass starts at GPTQ's model
        a, b = on_grid.get_submodule(t.name), behind.get_submodule(t.name)
        assert torch.equal(a.to_state().codes, states[t.name].codes)
        assert torch.equal(b.to_state().codes, states[t.name].codes)
        assert torch.equal(b.to_state().scales, states[t.name].scales)
    grads = {}
    for key, m in (("on_grid", on_grid), ("behind", behind)):
        out = m(**batches[0])
        (out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()).backward()
        grads[key] = sum(m.get_submodule(t.name).quantizer.scale.grad.abs().sum().item() for t in targets)
    # on the grid round(w / s) - w / s is zero, so the step sizes get (almost) no gradient; from the latents they do
    assert grads["behind"] > 1e4 * grads["on_grid"], grads


def _first_layer(tmp_path, seed, steps, lr):
    """GPTQ a tiny BERT, then reconstruct its first layer on its own float inputs; returns what that took and gave."""
    from distillkit.quantize import engine
    from distillkit.quantize.reconstruct import ReconstructSpec, output_of, reconstruct_block

    model, targets = _tiny_bert(tmp_path)
    batches = _padded_batches(seed, length=10, pad=(0, 6))
    latents: dict = {}
    states = _gptq(model, targets, batches, latents)
    block = model.encoder.layer[0]
    with torch.no_grad():
        inputs = engine._block_inputs(model, block, batches, "cpu")
        goals = [output_of(block(*a, **kw)) for a, kw in inputs]
    masks = [b["attention_mask"] for b in batches]
    layer0 = [t for t in targets if t.name.startswith("encoder.layer.0.")]
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    spec = ReconstructSpec(steps=steps, lr=lr)
    got = reconstruct_block(block, layer0, states, latents, inputs, goals, masks, spec, prefix="encoder.layer.0.")
    assert all(torch.equal(p, before[n]) for n, p in block.named_parameters())  # the block itself is untouched
    return (states, latents, layer0, block, (inputs, goals, masks)), got


def test_reconstruction_lowers_the_block_error_and_its_states_compute_what_it_trained(tmp_path):
    from distillkit.quantize.reconstruct import masked_mse, output_of
    from distillkit.quantize.surgery import weight_of

    (states, _, layer0, block, data), (new_states, new_latents, rec) = _first_layer(tmp_path, 17, 40, 3e-4)
    assert rec["mse_after"] < rec["mse_before"] and "kept" not in rec
    assert any(not torch.equal(new_states[t.name].codes, states[t.name].codes) for t in layer0)
    # the error it reports is the error of its states, dequantized into the float block
    trial = copy.deepcopy(block)
    for t in layer0:
        st = new_states[t.name]
        local = dataclasses.replace(t, name=t.name.removeprefix("encoder.layer.0."))
        weight_of(trial, local).data.copy_(st.dequantize(torch.float32))
        codes = qf.quantize_codes(new_latents[t.name], st.scales.float(), st.zeros.float(), 2, 32)
        assert torch.equal(codes.to(torch.uint8), st.codes)  # the latents still round to the codes
    with torch.no_grad():
        err = sum(masked_mse(output_of(trial(*a, **kw)), g, m).item() for (a, kw), g, m in zip(*data, strict=True))
    assert err / len(data[0]) == pytest.approx(rec["mse_after"], rel=1e-4)


def test_reconstruction_that_does_not_help_keeps_gptq(tmp_path):
    (states, latents, layer0, _, _), (new_states, new_latents, rec) = _first_layer(tmp_path, 18, 5, 50.0)
    assert rec["kept"] == 1.0 and rec["mse_after"] == rec["mse_before"]
    for t in layer0:
        assert new_states[t.name] is states[t.name] and new_latents[t.name] is latents[t.name]


def test_reconstruction_reads_the_float_inputs_the_same_whether_blocks_chain_or_not(tmp_path, monkeypatch):
    from distillkit.quantize import engine
    from distillkit.quantize.reconstruct import ReconstructSpec

    model, targets = _tiny_bert(tmp_path)
    batches = _padded_batches(19, length=10, pad=(0, 6))
    spec = ReconstructSpec(steps=20, lr=3e-4)
    float_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    fast_report: list = []
    fast = _gptq(model, targets, batches, reconstruct=spec, report=fast_report)
    assert all(torch.equal(p, float_weights[n]) for n, p in model.named_parameters())  # left as it was
    monkeypatch.setattr(engine, "_chains", lambda model, blocks, batch, device: [False] * (len(blocks) - 1))
    slow_report: list = []
    slow = _gptq(model, targets, batches, reconstruct=spec, report=slow_report)
    assert [b["block"] for b in fast_report] == [f"encoder.layer.{i}" for i in range(4)] + ["pooler"]
    assert [b["mse_after"] for b in fast_report] == [b["mse_after"] for b in slow_report]
    for name in fast:
        assert torch.equal(fast[name].codes, slow[name].codes), name
    assert any(b["mse_after"] < b["mse_before"] for b in fast_report)
    plain = _gptq(model, targets, batches)
    assert any(not torch.equal(plain[n].codes, fast[n].codes) for n in fast)  # reconstruction changed something


def test_quantize_reconstructs_records_and_continues_into_qat(tmp_path, capsys):
    from distillkit.cli.app import main
    from tests import tiny
    from tests.test_quantize.test_quantize import FAST

    _, path = tiny.tiny_bert(tmp_path / "m")
    out = tmp_path / "q"
    args = ["quantize", path, "--scheme", "int2", "--reconstruct-steps", "4", "--teacher", path, "--qat-steps", "2",
            "--out", str(out), *FAST]  # fmt: skip
    code = main(args)
    cap = capsys.readouterr()
    assert code == 0, cap.err
    m = json.loads(cap.out)
    rec = m["extra"]["reconstruct"]
    assert rec["steps_per_block"] == 4 and rec["lr"] == 3e-4 and len(rec["blocks"]) == 5
    assert all(b["mse_after"] <= b["mse_before"] for b in rec["blocks"])
    assert any(b["mse_after"] < b["mse_before"] for b in rec["blocks"])  # it trained, not only kept GPTQ
    assert m["config"]["resolved"]["reconstruct_steps"] == 4
    assert "reconstruct" in cap.err  # progress lines
    assert m["extra"]["qat"]["steps"] == 2


def test_reconstruction_defaults_and_refusals():
    from distillkit.errors import ConfigError
    from distillkit.quantize import QuantizeConfig

    assert QuantizeConfig(scheme="int2").resolved()["reconstruct_steps"] == 400
    assert QuantizeConfig(scheme="int3").resolved()["reconstruct_steps"] == 400
    assert QuantizeConfig(scheme="int3").calib_batches == 64
    assert QuantizeConfig(scheme="int4").calib_batches == 16
    assert QuantizeConfig(scheme="int4").resolved()["reconstruct_steps"] == 0
    assert QuantizeConfig(scheme="int2", method="rtn").resolved()["reconstruct_steps"] == 0
    assert QuantizeConfig(scheme="int4", reconstruct_steps=50).resolved()["reconstruct_steps"] == 50
    for kw, msg in (
        (dict(scheme="int4", reconstruct_steps=-1), "must be >= 0"),
        (dict(scheme="int4", method="rtn", reconstruct_steps=5), "continues from GPTQ"),
        (dict(scheme="nf4", reconstruct_steps=5), "packed codes"),
        (dict(scheme="int4", reconstruct_lr=0), "--reconstruct-lr must be positive"),
    ):
        with pytest.raises(ConfigError, match=msg):
            QuantizeConfig(**kw)
