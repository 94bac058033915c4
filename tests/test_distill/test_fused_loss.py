"""``distill --fused-loss``: the causal-LM loss from hidden states equals the unfused loss, and is refused clearly."""

from __future__ import annotations

import json

import pytest
import torch

from distillkit.cli.app import main
from distillkit.config import DistillConfig
from distillkit.distill.engine import DistillModule, build_losses
from distillkit.distill.features import student_features
from distillkit.distill.fused import attach_fused_loss, resolve_fused_loss
from distillkit.errors import ConfigError
from tests.test_distill.test_engine import distill_cmd, markov_lines
from tests.tiny import tiny_llama


@pytest.fixture(scope="module")
def pair():
    teacher, _ = tiny_llama()
    student, _ = tiny_llama(
        seed=1, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
    )
    return teacher, student


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding must count in neither path
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


@pytest.mark.parametrize(
    "loss,alpha", [("forward_kl", 0.0), ("jsd:0.5", 0.3), ("reverse_kl", 0.0), ("skew_kl", 0.5), ("tvd", 0.2)]
)
def test_fused_module_equals_unfused_loss_parts_and_gradients(pair, loss, alpha):
    teacher, student = pair
    cfg = DistillConfig.of(teacher="t", losses=(loss,), alpha=alpha, temperature=2.0, jsd_beta=0.3)
    losses = build_losses(cfg, "causal-lm", student.config, teacher.config)
    batch = _batch()
    results = []
    for fused in (False, True):
        module = DistillModule(student, losses, "causal-lm", "mean", alpha)
        if fused:
            assert attach_fused_loss(module, cfg, "causal-lm", teacher) == "on"
            assert module.needs == {"fused_hidden"}
        with torch.no_grad():
            t_feats, _ = student_features(teacher, batch, "causal-lm", module.needs, [], "mean")
        # the fused teacher stops at its last hidden state [B, T, 64]: no [B, T, V] logits
        got_shape = t_feats.last_hidden.shape if fused else t_feats.logits.shape
        assert tuple(got_shape) == ((3, 9, 64) if fused else (3, 9, 128))
        student.zero_grad()
        total, parts = module(batch, t_feats, 0.0)
        total.backward()
        results.append((total.detach(), parts, {n: p.grad.clone() for n, p in student.named_parameters()}))
    (ref, ref_parts, ref_grads), (got, got_parts, got_grads) = results
    assert ref.item() > 0.01
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert sorted(got_parts) == sorted(ref_parts) == sorted([loss.split(":")[0]] + (["hard"] if alpha else []))
    for k in ref_parts:
        torch.testing.assert_close(got_parts[k], ref_parts[k], atol=1e-6, rtol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_resolution_auto_on_off(pair):
    teacher, student = pair

    def resolve(choice, *specs, task="causal-lm"):
        cfg = DistillConfig.of(teacher="t", losses=specs, fused_loss=choice)
        return resolve_fused_loss(cfg, task, build_losses(cfg, task, student.config, teacher.config), student, teacher)

    assert resolve("auto", "forward_kl").name == "forward_kl"
    assert resolve("off", "forward_kl") is None
    assert resolve("auto", "taid") is None
    assert resolve("auto", "forward_kl", "hidden_mse") is None
    with pytest.raises(ConfigError, match="loss taid is not one of the fused divergences") as e:
        resolve("on", "taid")
    assert "--fused-loss auto" in e.value.hint
    with pytest.raises(ConfigError, match=r"2 losses \(forward_kl, hidden_mse\)"):
        resolve("on", "forward_kl", "hidden_mse")
    with pytest.raises(ConfigError, match="fused loss must be auto, on or off"):
        DistillConfig.of(teacher="t", fused_loss="yes")
    # a hooked head (e.g. fake-quantized) or post-processed logits are not lm_head(hidden): refused
    handle = student.lm_head.register_forward_hook(lambda module, args, out: out * 2)
    try:
        assert resolve("auto", "forward_kl") is None
        with pytest.raises(ConfigError, match="the student: LlamaForCausalLM's output head is Linear, not a plain"):
            resolve("on", "forward_kl")
    finally:
        handle.remove()
    teacher.config.logit_scale = 0.5
    try:
        with pytest.raises(ConfigError, match=r"the teacher's logits are post-processed \(logit_scale=0.5\)"):
            resolve("on", "forward_kl")
    finally:
        del teacher.config.logit_scale
    assert resolve("on", "forward_kl") is not None


def _run(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, [ln for ln in cap.out.splitlines() if ln.strip()], cap.err


def test_short_run_with_fused_on_equals_unfused(tmp_path, capsys):
    teacher = tiny_llama(tmp_path / "teacher")[1]
    data = tmp_path / "text.txt"
    data.write_text("\n".join(markov_lines(40, seed=0)))
    common = ["--steps", "4", "--lr", "1e-3", "--max-length", "32", "--batch-size", "4", "--alpha", "0.2"]
    common += ["--loss", "jsd", "--eval-batches", "1", "--eval-split", "0.1"]
    logs = {}
    for choice in ("on", "off"):
        out = tmp_path / choice
        code, lines, err = _run(
            distill_cmd(teacher, data, "layers=1", *common, "--fused-loss", choice, "--out", str(out)), capsys
        )
        assert code == 0, err
        manifest = json.loads(lines[0])
        assert manifest["config"]["fused_loss"] == choice
        assert manifest["config"]["resolved_fused_loss"] == choice
        logs[choice] = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train = {c: [r for r in log if "loss" in r] for c, log in logs.items()}
    assert [r["step"] for r in train["on"]] == [1, 2, 3, 4]
    # step 1 is the loss before any update (step 0's weights), step 4 after three updates
    for i in (0, 3):
        for key in ("loss", "loss/jsd", "loss/hard"):
            assert train["on"][i][key] == pytest.approx(train["off"][i][key], rel=1e-5, abs=1e-6), (i, key)
    assert train["on"][0]["loss"] != train["on"][3]["loss"]


def test_fused_on_with_a_feature_loss_is_one_line_exit_1(tmp_path, capsys):
    teacher = tiny_llama(tmp_path / "teacher")[1]
    data = tmp_path / "text.txt"
    data.write_text("\n".join(markov_lines(20, seed=0)))
    out = tmp_path / "o"
    code, lines, err = _run(
        distill_cmd(teacher, data, "layers=1", "--loss", "hidden_mse", "--fused-loss", "on", "--max-length", "32")
        + ["--out", str(out)],
        capsys,
    )
    assert code == 1 and lines == []
    assert "error: --fused-loss on cannot be used: loss hidden_mse is not one of the fused divergences" in err
    assert not out.exists()
