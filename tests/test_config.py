import json

import pytest

from distillkit.config import DistillConfig, parse_loss_spec, preset_names, read_preset
from distillkit.errors import ConfigError


def test_defaults_and_round_trip():
    cfg = DistillConfig(teacher="t")
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
        DistillConfig(**{"teacher": "t", **changes})


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
    assert cfg.steps == 3  # flag wins
    assert cfg.lr == 0.5  # file beats preset and defaults
    assert cfg.teacher == "file-teacher"
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
