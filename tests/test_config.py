import json

import pytest

from distillkit.config import DistillConfig, parse_loss_spec, preset_names, read_preset
from distillkit.errors import ConfigError


def test_defaults_and_round_trip():
    cfg = DistillConfig.of(teacher="t")
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.loss_specs("causal-lm") == [("forward_kl", 1.0)]
    assert cfg.loss_specs("feature-extraction") == [("embedding_cosine", 1.0), ("hidden_mse", 0.5)]
    assert cfg.warmup_steps() == 5
    assert cfg.replace(warmup=7).warmup_steps() == 7


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
        ({"eval_split": 0.9}, "eval split"),
        ({"steps": 0}, "steps must be"),
        ({"lr": 0.0}, "learning rate"),
        ({"losses": ("nope",)}, "unknown loss 'nope'"),
        ({"losses": ("forward_kl:-1",)}, "positive"),
        ({"mixed_precision": "fp8"}, "mixed precision"),
        ({"teacher_dtype": "int8"}, "teacher dtype"),
        ({"teacher": ""}, "teacher is required"),
    ],
)
def test_out_of_range_values_are_config_errors(changes, match):
    with pytest.raises(ConfigError, match=match):
        DistillConfig.of(**{"teacher": "t", **changes})


def test_loss_spec_parsing():
    assert parse_loss_spec("forward_kl") == ("forward_kl", 1.0)
    assert parse_loss_spec("reverse-kl:0.25") == ("reverse_kl", 0.25)
    with pytest.raises(ConfigError, match="not a number"):
        parse_loss_spec("tvd:x")


def test_precedence_flag_over_file_over_preset(tmp_path):
    name = preset_names()[0]
    preset = read_preset(name)
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"teacher": "file-teacher", "steps": 7, "lr": 0.5}))
    cfg = DistillConfig.resolve(preset=name, config_file=str(f), overrides={"steps": 3, "lr": None}, section="distill")
    assert cfg.optim.steps == 3  # flag wins
    assert cfg.optim.lr == 0.5  # file beats preset and defaults
    assert cfg.models.teacher == "file-teacher"
    flat = {**{k: v for k, v in preset.items() if not isinstance(v, dict)}, **preset.get("distill", {})}
    for k, v in flat.items():
        if k not in ("teacher", "steps", "lr"):
            assert cfg.to_dict()[k] == (list(v) if isinstance(v, tuple) else v)


def test_unknown_key_in_config_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('teacher = "t"\nstepz = 3\n')
    with pytest.raises(ConfigError, match="stepz"):
        DistillConfig.resolve(config_file=str(f))


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        read_preset("no-such-preset")


def test_distill_config_groups_validate_on_their_own():
    from distillkit.config import DataOptions, LossOptions, ModelOptions, OptimOptions, OutputOptions

    for group in (DataOptions(), LossOptions(), OptimOptions(), OutputOptions()):
        assert group.from_dict(group.to_dict()) == group  # every group's defaults are valid
    for build, match in (
        (lambda: LossOptions(temperature=0.0), "temperature must be > 0"),
        (lambda: OptimOptions(steps=0), "steps must be"),
        (lambda: DataOptions(max_length=1), "max length must be"),
        (lambda: OutputOptions(log_to="wandb"), "--log-to"),
        (lambda: ModelOptions(teacher=""), "teacher is required"),
    ):
        with pytest.raises(ConfigError, match=match):
            build()


def test_distill_config_flat_keys_route_to_their_group_and_back():
    from dataclasses import fields

    from distillkit.config import DistillConfig

    cfg = DistillConfig.of(teacher="t", lr=3e-4, max_length=64, mode="sequence", method="dmd", eval_every=5)
    assert (cfg.optim.lr, cfg.data.max_length, cfg.llm.mode, cfg.diffusion.method) == (3e-4, 64, "sequence", "dmd")
    assert cfg.output.eval_every == 5 and cfg.models.teacher == "t"
    flat = cfg.to_dict()
    group_keys = [f.name for g in fields(DistillConfig) for f in fields(getattr(cfg, g.name))]
    assert len(group_keys) == len(set(group_keys)) == len(flat)  # no setting in two groups; to_dict is flat
    assert flat["lr"] == 3e-4 and flat["max_length"] == 64 and "optim" not in flat
    assert DistillConfig.from_dict(flat) == cfg
    assert cfg.replace(steps=9).optim.steps == 9 and cfg.replace(steps=9).optim.lr == 3e-4
    with pytest.raises(ConfigError, match="unknown DistillConfig key"):
        DistillConfig.of(teacher="t", learning_rate=1e-3)


def test_distill_config_checks_settings_of_two_groups_together():
    from distillkit.config import DistillConfig

    with pytest.raises(ConfigError, match="prompt length"):
        DistillConfig.of(teacher="t", max_length=32, prompt_length=32)  # data.max_length vs llm.prompt_length
    with pytest.raises(ConfigError, match="--alpha mixes a hard-label loss"):
        DistillConfig.of(teacher="t", mode="on-policy", alpha=0.5)  # llm.mode vs loss.alpha
    assert DistillConfig.of(teacher="t", max_length=32, prompt_length=31).prompt_tokens() == 31
