"""Mixed precision by measured sensitivity: the measurement, the choice, and per-layer bits through GPTQ,
reconstruction, quantized distillation and the saved artifact."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from distillkit.quantize import functional as qf
from distillkit.quantize.sensitivity import choose_promoted, linear_sensitivity
from tests.test_quantize.test_gptq import _padded_batches
from tests.test_quantize.test_reconstruct import _tiny_bert


def _rtn2(t, w):
    return qf.quantize_rtn(w, 2, 32, False).dequantize(torch.float32)


def _hidden(model, batch):
    return model(**batch).last_hidden_state


def test_sensitivity_is_each_layers_own_output_error_and_leaves_the_model_as_it_was(tmp_path):
    from distillkit.quantize.surgery import weight_of

    model, targets = _tiny_bert(tmp_path)
    batches = _padded_batches(21, length=10, pad=(0, 6))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    with torch.no_grad():
        sens = linear_sensitivity(model, targets, batches, _rtn2, _hidden, on_layer=seen.append)
    assert seen == list(range(1, len(targets) + 1))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert sens.keys() == {t.name for t in targets}
    assert sens["pooler.dense"] == 0.0  # the pooler does not feed the hidden states measured
    # one layer by hand: quantize it alone and compare the masked outputs
    t = next(t for t in targets if t.name == "encoder.layer.1.intermediate.dense")
    trial = copy.deepcopy(model)
    with torch.no_grad():
        weight_of(trial, t).copy_(_rtn2(t, weight_of(model, t).detach()))
        err = tot = 0.0
        for b in batches:  # sums over the real positions only, pooled over the batches
            y, yq = _hidden(model, b), _hidden(trial, b)
            keep = b["attention_mask"].bool()
            err += float((yq - y)[keep].square().sum())
            tot += float(y[keep].square().sum())
    assert sens[t.name] == pytest.approx(err / tot, rel=1e-5)
    assert max(sens.values()) > 3 * min(v for v in sens.values() if v > 0)  # layers differ: something to choose


def test_choose_promoted_takes_the_most_error_per_weight_that_fits_the_budget():
    sizes = {"a": 100, "b": 400, "c": 100, "d": 400, "e": 0}
    sens = {"a": 1.0, "b": 8.0, "c": 3.0, "d": 2.0, "e": 0.0}
    # per weight: c 0.03, b 0.02, a 0.01, d 0.005; budget 0.5 * 1000 = 500
    assert choose_promoted(sizes, sens, 0.5) == ["b", "c"]
    assert choose_promoted(sizes, sens, 0.25) == ["a", "c"]  # b no longer fits; a still does
    assert choose_promoted(sizes, sens, 0.05) == []
    assert choose_promoted(sizes, {**sens, "c": 0.0}, 0.1) == ["a"]  # a layer that costs nothing is not promoted


def test_gptq_gives_a_promoted_layer_its_bits_and_leaves_its_neighbours_codes(tmp_path):
    from distillkit.quantize import engine

    model, targets = _tiny_bert(tmp_path)
    batches = _padded_batches(22, length=10, pad=(0, 6))
    r = {"bits": 2, "group_size": 32, "symmetric": False}
    value = "encoder.layer.0.attention.self.value"
    uniform = engine.gptq_states(model, targets, batches, r, 0.1, "cpu", act_order=True)
    mixed = engine.gptq_states(model, targets, batches, r, 0.1, "cpu", act_order=True, bits_of={value: 4})
    assert mixed[value].bits == 4 and int(mixed[value].codes.max()) > 3
    assert all(st.bits == 2 for n, st in mixed.items() if n != value)
    # query and key share the value's Hessian; GPTQ's rows are independent, so their codes do not change
    for n in ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key"):
        same = (mixed[n].codes == uniform[n].codes).float().mean().item()
        assert same > 0.999, (n, same)
    w = model.get_submodule(value).weight.detach()
    err = {k: (s[value].dequantize(torch.float32) - w).square().sum().item() for k, s in (("u", uniform), ("m", mixed))}
    assert err["m"] < err["u"] / 4


def test_fake_quant_modules_keep_each_states_grid(tmp_path):
    from distillkit.quantize.surgery import fake_to_plain_, to_fake_quant_

    model, targets = _tiny_bert(tmp_path)
    from distillkit.quantize.surgery import quantize_states_rtn

    wide = {targets[0].name: 4, targets[3].name: 8}
    states = quantize_states_rtn(model, targets, 2, 32, False, wide)
    assert [states[t.name].bits for t in targets[:4]] == [4, 2, 2, 8]
    fq = to_fake_quant_(
        copy.deepcopy(model), targets, bits=2, group_size=32, symmetric=False, quantizer="lsq", init=states
    )
    back = fake_to_plain_(fq, targets)
    for t in targets:
        assert back[t.name].bits == states[t.name].bits
        assert torch.equal(back[t.name].codes, states[t.name].codes), t.name


def test_quantize_with_sensitive_fraction_writes_per_layer_bits_through_reconstruction_and_qat(tmp_path, capsys):
    from distillkit.cli.app import main
    from tests import tiny
    from tests.test_quantize.test_quantize import FAST

    _, path = tiny.tiny_bert(tmp_path / "m")
    out = tmp_path / "q"
    args = ["quantize", path, "--scheme", "int2", "--sensitive-fraction", "0.3", "--sensitive-bits", "4",
            "--reconstruct-steps", "3", "--teacher", path, "--qat-steps", "2", "--out", str(out), *FAST]  # fmt: skip
    code = main(args)
    cap = capsys.readouterr()
    assert code == 0, cap.err
    m = json.loads(cap.out)
    mp = m["extra"]["mixed_precision"]
    assert mp["bits"] == 4 and mp["fraction"] == 0.3 and 0 < mp["promoted_fraction"] <= 0.3
    layout = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    sizes = {n: e["in_features"] * e["out_features"] for n, e in layout.items() if e["kind"] in ("linear", "conv1d")}
    assert mp["sensitivity"].keys() == sizes.keys()
    # the choice is the knapsack over the recorded measurement (config.json lists modules by name, not in model
    # order), and the fraction it reports is what it chose
    assert mp["promoted"] and sorted(mp["promoted"]) == sorted(choose_promoted(sizes, mp["sensitivity"], 0.3))
    assert mp["promoted_fraction"] == pytest.approx(sum(sizes[n] for n in mp["promoted"]) / sum(sizes.values()))
    for name, e in layout.items():
        if e["kind"] in ("linear", "conv1d"):
            assert e["bits"] == (4 if name in mp["promoted"] else 2), name
    assert "mixed precision" in cap.err
    assert m["metrics"]["reload_output_cosine"] > 0.99


def test_mixed_precision_defaults_and_refusals():
    from distillkit.errors import ConfigError
    from distillkit.quantize import QuantizeConfig

    assert QuantizeConfig(scheme="int2").resolved()["sensitive_bits"] == 3
    assert QuantizeConfig(scheme="int3").resolved()["sensitive_bits"] == 4
    assert QuantizeConfig(scheme="int4").resolved()["sensitive_bits"] == 8
    assert QuantizeConfig(scheme="int4").resolved()["sensitive_fraction"] == 0.0
    for kw, msg in (
        (dict(scheme="int4", sensitive_fraction=1.0), r"must be in \[0, 1\)"),
        (dict(scheme="int4", sensitive_fraction=-0.1), r"must be in \[0, 1\)"),
        (dict(scheme="int4", sensitive_fraction=0.1, sensitive_bits=3), "not wider"),
        (dict(scheme="int8", sensitive_fraction=0.1), "int8 has no wider bits"),
        (dict(scheme="int4", sensitive_bits=5), "5-bit weights are not supported"),
        (dict(scheme="int4", sensitive_bits=8), "--sensitive-fraction promotes, and none are"),
        (dict(scheme="nf4", sensitive_fraction=0.1), "packed format"),
        (dict(scheme="dynamic-int8", sensitive_fraction=0.1, sensitive_bits=8), "packed format"),
    ):
        with pytest.raises(ConfigError, match=msg):
            QuantizeConfig(**kw)
