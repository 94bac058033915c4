"""Pruning: every kind on tiny Llama, GPT-2, BERT and ResNet models reloads with matching config and weights; ratio 0 is
the identity; importances rank constructed cases as expected; target-params, recovery, errors and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

from distillkit.cli.app import main
from distillkit.errors import ConfigError
from distillkit.prune import PruneConfig
from distillkit.prune.engine import prune_module
from distillkit.prune.importance import ImportanceContext, block_importance
from distillkit.registry import IMPORTANCES
from tests import tiny
from tests.tiny import sample_inputs

AUTO = {
    "llama": AutoModelForCausalLM,
    "gpt2": AutoModelForCausalLM,
    "bert": AutoModel,
    "resnet": AutoModelForImageClassification,
    "resnet_bottleneck": AutoModelForImageClassification,
}
TASK = {"llama": "causal-lm", "gpt2": "causal-lm", "bert": "feature-extraction"}
# Each kind with a different importance, so that every criterion prunes every family somewhere.
KINDS = {
    "mlp": (dict(mlp=0.5), "taylor"),
    "heads": (dict(heads=0.5), "activation"),
    "hidden": (dict(hidden=0.25, round_to=8), "magnitude_l1"),
    "layers": (dict(layers=0.5), "magnitude"),
}


def _ctx(model, task, n=2):
    batches = [sample_inputs(model, batch=4, length=12, seed=i) for i in range(n)]
    return ImportanceContext(model=model, task=task, batches=batches, device=torch.device("cpu"))


def _main_output(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _reload_check(pruned, path, auto, inputs):
    """Save, reload with from_pretrained (no missing, unexpected or resized weights), compare outputs exactly."""
    pruned.save_pretrained(path)
    reloaded, info = auto.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    reloaded.eval()
    got, ref = _main_output(reloaded, inputs), _main_output(pruned, inputs)
    assert torch.isfinite(got).all()
    assert torch.equal(got, ref)
    return reloaded


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_reloads_with_matching_config(name, kind, request, tmp_path):
    model, _ = request.getfixturevalue(name)
    amounts, importance = KINDS[kind]
    cfg = PruneConfig(importance=importance, layer_importance="loss" if name == "bert" else "angular", **amounts)
    pruned, extra = prune_module(cfg, _ctx(model, TASK[name]))
    before, after = extra["sizes"]["before"], extra["sizes"]["after"]
    expected = {
        "mlp": ("intermediate", before["intermediate"] // 2),
        "heads": ("heads", before["heads"] // 2),
        "hidden": ("hidden", 48),
        "layers": ("layers", before["layers"] // 2),
    }[kind]
    assert after[expected[0]] == expected[1]
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    reloaded = _reload_check(pruned, tmp_path / "m", AUTO[name], sample_inputs(model, seed=7))
    if name == "llama":
        assert reloaded.config.head_dim == 16  # heads keep their size; the config says so explicitly
        if kind == "heads":
            assert reloaded.config.num_key_value_heads == 1  # auto: one whole kv group of 2 query heads removed


@pytest.mark.parametrize("name", ["resnet", "resnet_bottleneck"])
@pytest.mark.parametrize("importance", ["magnitude", "activation", "taylor"])
def test_resnet_channels_reload(name, importance, request, tmp_path):
    model, _ = request.getfixturevalue(name)
    cfg = PruneConfig(channels=0.5, importance=importance)
    pruned, extra = prune_module(cfg, _ctx(model, "image-classification"))
    assert pruned.config.hidden_sizes == [w // 2 for w in model.config.hidden_sizes]
    assert pruned.config.embedding_size == model.config.embedding_size // 2
    _reload_check(pruned, tmp_path / "m", AUTO[name], sample_inputs(model, seed=3))


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "resnet", "resnet_bottleneck"])
def test_ratio_zero_is_the_original(name, request):
    model, _ = request.getfixturevalue(name)
    task = TASK.get(name, "image-classification")
    cfg = PruneConfig(mlp=0.0, heads=0.0, hidden=0.0, layers=0.0, channels=0.0)
    pruned, _ = prune_module(cfg, _ctx(model, task))
    inputs = sample_inputs(model, seed=5)
    assert torch.equal(_main_output(pruned, inputs), _main_output(model, inputs))
    assert pruned.state_dict().keys() == model.state_dict().keys()


def _zeroed_llama():
    model, _ = tiny.tiny_llama(num_hidden_layers=3)
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[5] = 0
        mlp.up_proj.weight[5] = 0
        mlp.down_proj.weight[:, 5] = 0
        attn = model.model.layers[1].self_attn
        attn.q_proj.weight[2 * 16 : 3 * 16] = 0  # query head 2
        attn.o_proj.weight[:, 2 * 16 : 3 * 16] = 0
        block = model.model.layers[2]  # the identity: both residual branches write zeros
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    return model


@pytest.mark.parametrize("importance", ["magnitude", "magnitude_l1", "activation", "taylor"])
def test_zeroed_mlp_channel_ranks_last(importance):
    model = _zeroed_llama()
    scores = IMPORTANCES.get(importance).obj(_ctx(model, "causal-lm"))
    assert scores.mlp[0][5] == 0
    assert scores.mlp[0].argmin() == 5 and (scores.mlp[0] > 0).sum() == scores.mlp[0].numel() - 1


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_zeroed_head_ranks_last_and_is_pruned(importance):
    model = _zeroed_llama()
    ctx = _ctx(model, "causal-lm")
    scores = IMPORTANCES.get(importance).obj(ctx)
    assert scores.heads[1].argmin() == 2 and scores.heads[1][2] == 0
    # per-group mode keeps both kv groups and drops the weaker query head of each; head 2 is in group 1
    pruned, extra = prune_module(PruneConfig(heads=0.5, head_mode="per-group", importance=importance), ctx)
    assert extra["sizes"]["after"]["kv_heads"] == 2 and pruned.config.num_attention_heads == 2
    kept = pruned.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(kept[16:], model.model.layers[1].self_attn.q_proj.weight[3 * 16 :])


@pytest.mark.parametrize("metric", ["angular", "loss"])
def test_identity_block_scores_zero_and_goes_first(metric):
    model = _zeroed_llama()
    ctx = _ctx(model, "causal-lm")
    score = block_importance(ctx, metric)
    assert score[2] == pytest.approx(0, abs=1e-6) and (score[:2] > 1e-3).all()
    pruned, extra = prune_module(PruneConfig(layers=2, layer_importance=metric), ctx)
    assert extra["kept_layers"] == [0, 1]
    inputs = sample_inputs(model, seed=1)
    torch.testing.assert_close(_main_output(pruned, inputs), _main_output(model, inputs), atol=1e-5, rtol=1e-5)


def test_zeroed_resnet_channel_ranks_last(resnet):
    import copy

    model = copy.deepcopy(resnet[0])
    conv = model.resnet.encoder.stages[1].layers[1].layer[0]
    with torch.no_grad():
        conv.convolution.weight[3] = 0
        conv.normalization.weight[3] = 0
        conv.normalization.bias[3] = 0
        model.resnet.encoder.stages[1].layers[1].layer[1].convolution.weight[:, 3] = 0
    for importance in ("magnitude", "activation", "taylor"):
        scores = IMPORTANCES.get(importance).obj(_ctx(model, "image-classification"))
        assert scores["inner1.1.0"].argmin() == 3, importance


@pytest.mark.parametrize("round_to", [1, 8])
def test_target_params_lands_within_one_rounding_step(llama, round_to):
    model, _ = llama
    n = sum(p.numel() for p in model.parameters())
    target = int(0.8 * n)
    pruned, extra = prune_module(PruneConfig(target_params=0.8, round_to=round_to), _ctx(model, "causal-lm"))
    got = sum(p.numel() for p in pruned.parameters())
    cfg = model.config
    step = cfg.num_hidden_layers * 3 * cfg.hidden_size * round_to  # one rounding step of every MLP
    assert abs(got - target) <= step
    assert extra["target_params"] == target and 0 < extra["solved_ratio"] < 1


def _run(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_prune_with_recovery_records_three_qualities(llama, tmp_path, capsys):
    _, path = llama
    out = tmp_path / "pruned"
    args = ["prune", path, "--mlp", "0.5", "--heads", "0.5", "--recover-steps", "2", "--max-samples", "200",
            "--max-length", "32", "--batch-size", "4", "--calib-batches", "2", "--eval-batches", "2",
            "--importance", "activation", "--out", str(out)]  # fmt: skip
    code, stdout, err = _run(args, capsys)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    manifest = json.loads(lines[0])
    assert manifest["stage"] == "prune" and manifest["path"] == str(out)
    m = manifest["metrics"]
    for stage in ("quality_before", "quality_after_prune", "quality_after_recovery"):
        assert m[stage]["perplexity"] > 1 and "kl_to_teacher" in m[stage]
    assert m["quality_before"]["kl_to_teacher"] == pytest.approx(0, abs=1e-6)
    assert m["quality_after_prune"]["kl_to_teacher"] > 0
    assert m["params_after"] < m["params_before"] and 0 < m["flop_ratio"] < 1
    assert manifest["extra"]["recovery"]["steps"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.intermediate_size == 64 and reloaded.config.num_attention_heads == 2
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no work directories left behind


def _unsupported_model(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                    max_position_embeddings=32, word_embed_proj_dim=16)  # fmt: skip
    OPTForCausalLM(cfg).save_pretrained(tmp_path / "opt")
    return str(tmp_path / "opt")


@pytest.mark.parametrize(
    "case,flags,message",
    [
        ("llama", ["--mlp", "1.5"], "--mlp must be a ratio in [0, 1)"),
        ("llama", ["--heads", "-0.1"], "--heads must be a ratio in [0, 1)"),
        ("llama", ["--mlp", "0.999"], "would remove every MLP channel"),
        ("llama", ["--heads", "0.9"], "would remove every attention head"),
        # an explicit count is refused; a ratio (--heads 0.25) is rounded instead (tests/test_bad_input.py)
        ("llama", ["--heads", "3"], "cannot be divided evenly over the 2 key/value groups"),
        ("llama", ["--heads", "3", "--head-mode", "groups"], "not a whole number of key/value groups"),
        ("llama", ["--hidden", "50"], "transformers refuses the pruned llama config"),
        ("llama", ["--channels", "0.5"], "--channels is for ResNet-style CNNs"),
        ("resnet", ["--channels", "0.99"], "would remove every channel"),
        ("resnet", ["--mlp", "0.3"], "a ResNet is pruned with --channels"),
        ("opt", ["--mlp", "0.3"], "pruning opt models is not supported"),
        ("llama", ["--mlp", "0.3", "--importance", "nope"], "unknown importance 'nope'"),
    ],
)
def test_errors_exit_1_with_one_line_and_no_output(case, flags, message, request, tmp_path, capsys):
    path = _unsupported_model(tmp_path) if case == "opt" else request.getfixturevalue(case)[1]
    out = tmp_path / "out"
    code, stdout, err = _run(["prune", path, *flags, "--out", str(out)], capsys)
    assert code == 1
    assert stdout == ""
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and message in lines[0], err
    assert len(lines) == 2 and lines[1].startswith("hint: ")
    if case == "opt":
        assert "llama" in lines[1] and "resnet" in lines[1]
    assert not out.exists()


def test_config_validation():
    with pytest.raises(ConfigError):
        PruneConfig(round_to=3)
    with pytest.raises(ConfigError):
        PruneConfig(channels=2)  # channels are a ratio only
    with pytest.raises(ConfigError):
        PruneConfig(target_params=0)
    assert PruneConfig(mlp=0.3, layers=2).requested() == ["mlp", "layers"]


def test_prune_help_stays_torch_free():
    code = (
        "import sys\n"
        "from distillkit.cli.app import main\n"
        "assert main(['prune', '--help']) == 0\n"
        "assert 'torch' not in sys.modules, 'prune --help pulled in torch'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("magnitude", "activation", "taylor", "--recover-steps", "--target-params"):
        assert name in r.stdout
