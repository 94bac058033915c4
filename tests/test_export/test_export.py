"""``distillkit export``: every format round-trips with its parity check, and refused exports leave nothing behind."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from distillkit.cli.app import main
from distillkit.errors import ConfigError
from distillkit.export import ExportConfig

FORMATS = ("hf", "onnx", "torch-export")
PARITY_KEY = {"hf": "hf_max_abs_diff", "onnx": "onnx_max_abs_diff", "torch-export": "torch_export_max_abs_diff"}
UNSEEN = ((4, 21), (1, 3))  # batch/sequence shapes used neither to trace (2, 16) nor to validate (1, 7), (3, 13)


def run_cli(args: list[str]) -> tuple[int, list[str], str]:
    """main(args) with stdout and stderr captured: (exit code, stdout lines, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue().splitlines(), err.getvalue()


def inputs_for(model, batch: int, seq: int, seed: int = 7) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[-1, seq - 3 :] = 0  # right padding on the last row
    feed = {"input_ids": ids, "attention_mask": mask}
    if model.config.model_type == "bert":
        feed["token_type_ids"] = torch.zeros_like(ids)
    return feed


def reference(model, feed: dict):
    import torch

    with torch.no_grad():
        kwargs = {"use_cache": False} if model.config.model_type == "llama" else {}
        return model(**feed, **kwargs).logits


def max_diff_on_tokens(got, ref, mask) -> float:
    """Max |got - ref| over real (non-padding) positions."""
    import torch

    got = torch.as_tensor(got, dtype=torch.float64)
    ref = ref.to(torch.float64)
    keep = mask.bool()
    return float((got[keep] - ref[keep]).abs().max())


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """Every (model, format) exported once through the CLI: key -> (exit code, stdout lines, stderr, out dir)."""
    root = tmp_path_factory.mktemp("exports")
    results = {}
    for name, (_, path) in models.items():
        for fmt in FORMATS:
            out = root / f"{name}-{fmt}"
            results[name, fmt] = (*run_cli(["export", path, "--format", fmt, "--out", str(out)]), out)
    return results


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_export_round_trips_with_parity(exported, models, name, fmt):
    code, lines, err, out = exported[name, fmt]
    assert code == 0, err
    assert len(lines) == 1
    manifest = json.loads(lines[0])
    assert Path(manifest["path"]) == out.absolute() and out.is_dir()
    assert json.loads((out / "distillkit.json").read_text()) == manifest
    assert manifest["stage"] == "export" and manifest["extra"]["format"] == fmt
    assert manifest["config"] == ExportConfig(format=fmt).to_dict()
    assert manifest["inputs"]["model"]["path"] == str(Path(models[name][1]).resolve())
    assert manifest["history"] == []
    assert manifest["metrics"][PARITY_KEY[fmt]] < 1e-4
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary directory left behind"
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file() and (out / "README.md").is_file()
    assert set(manifest["files"]) == {
        p.name for p in out.iterdir() if p.suffix in (".safetensors", ".onnx", ".pt2", ".data")
    }

    model = models[name][0]
    names = manifest["extra"].get("input_names")
    if fmt == "hf":
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

        reloaded = (AutoModelForCausalLM if name == "llama" else AutoModelForMaskedLM).from_pretrained(out).eval()

        def run(feed):
            return reference(reloaded, feed)
    elif fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == names

        def run(feed):
            return session.run(["logits"], {k: feed[k].numpy() for k in names})[0]
    else:
        import torch

        module = torch.export.load(out / "model.pt2").module()

        def run(feed):
            with torch.no_grad():
                return module(*(feed[k] for k in names))

    # An independent check at shapes the export never saw.
    for batch, seq in UNSEEN:
        feed = inputs_for(model, batch, seq)
        assert max_diff_on_tokens(run(feed), reference(model, feed), feed["attention_mask"]) < 1e-4


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_onnx_has_dynamic_batch_and_sequence_axes(exported, name):
    import onnx

    code, lines, err, out = exported[name, "onnx"]
    assert code == 0, err
    manifest = json.loads(lines[0])
    assert manifest["extra"]["exporter"] == "dynamo"  # the TorchScript exporter is only a fallback
    assert isinstance(manifest["extra"]["opset"], int)
    graph = onnx.load(str(out / "model.onnx")).graph
    expected = ["input_ids", "attention_mask"] + (["token_type_ids"] if name == "bert" else [])
    assert [i.name for i in graph.input] == expected
    for inp in graph.input:
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        assert dims == ["batch", "sequence"]
    # the KV cache is off: logits are the only output
    assert [o.name for o in graph.output] == ["logits"]


def test_torch_export_is_dynamic(exported):
    manifest = json.loads(exported["llama", "torch-export"][1][0])
    assert manifest["extra"]["dynamic_shapes"] is True and "note" not in manifest["extra"]


def test_hf_card_and_generation_config(exported):
    out = exported["llama", "hf"][3]
    assert (out / "generation_config.json").is_file()
    card = (out / "README.md").read_text()
    assert "AutoModelForCausalLM" in card and "hf_max_abs_diff" in card and "## Lineage" in card
    onnx_card = (exported["bert", "onnx"][3] / "README.md").read_text()
    assert "onnxruntime" in onnx_card and "token_type_ids" in onnx_card and 'from_pretrained("' in onnx_card


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_card_shows_how_to_run_the_export_without_distillkit(exported, fmt):
    """The model card's Load snippet runs as written (tokenizer + onnxruntime / torch.export only)."""
    import re

    card = (exported["bert", fmt][3] / "README.md").read_text()
    code = re.search(r"## Load\n\n```python\n(.*?)```", card, re.S).group(1)
    assert "distillkit" not in code
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - our own generated snippet
    assert tuple(namespace["logits"].shape) == (1, 4, 128)  # [CLS] hello world [SEP] -> vocabulary logits


def test_onnx_falls_back_to_torchscript_and_says_so(models, tmp_path, monkeypatch):
    def dynamo_fails(*args, **kwargs):
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr("distillkit.export.onnx._export_dynamo", dynamo_fails)
    out = tmp_path / "ts"
    code, lines, err = run_cli(["export", models["bert"][1], "--format", "onnx", "--out", str(out)])
    assert code == 0, err
    manifest = json.loads(lines[0])
    assert manifest["extra"]["exporter"] == "torchscript"
    assert "simulated dynamo failure" in manifest["extra"]["note"]
    assert manifest["metrics"]["onnx_max_abs_diff"] < 1e-4  # validated at (1, 7) and (3, 13): axes are dynamic


def test_history_carries_over_and_stdin(exported, tmp_path, capsys, monkeypatch):
    import shutil

    # an earlier stage's artifact that measured a quality metric
    artifact = str(tmp_path / "distilled")
    shutil.copytree(exported["llama", "hf"][3], artifact)
    first = json.loads((Path(artifact) / "distillkit.json").read_text())
    first.update(path=artifact, metrics={"perplexity": 12.5, "hf_max_abs_diff": 0.5})
    (Path(artifact) / "distillkit.json").write_text(json.dumps(first))
    out = tmp_path / "again"
    assert main(["export", artifact, "--format", "hf", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1
    second = json.loads(lines[0])
    assert Path(second["path"]).is_dir()
    assert [h["stage"] for h in second["history"]] == ["export"]
    assert second["history"][0]["path"] == artifact and "history" not in second["history"][0]
    assert second["inputs"]["model"]["stage"] == "export"
    # quality metrics describe the same model and carry over; parity numbers are the new export's own
    assert second["metrics"] == {"perplexity": 12.5, "hf_max_abs_diff": 0.0}

    # '-' reads the previous stage's manifest line from stdin; --quiet prints only the path
    monkeypatch.setattr("sys.stdin", io.StringIO(lines[0] + "\n"))
    third = tmp_path / "third"
    assert main(["export", "-", "--format", "hf", "--out", str(third), "--quiet"]) == 0
    assert capsys.readouterr().out == f"{third.absolute()}\n"
    history = json.loads((third / "distillkit.json").read_text())["history"]
    assert [h["path"] for h in history] == [artifact, second["path"]]


def test_hf_shards_and_reload(models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model, path = models["llama"]
    out = tmp_path / "sharded"
    code, lines, err = run_cli(["export", path, "--out", str(out), "--max-shard-size", "100KB"])
    assert code == 0, err
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert all(p.stat().st_size <= 100_000 for p in out.glob("*.safetensors"))
    assert json.loads(lines[0])["extra"]["shards"] == shards
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (k, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_existing_output_needs_overwrite(models, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, lines, err = run_cli(["export", models["bert"][1], "--out", str(out)])
    assert code == 1 and lines == [] and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only what distillkit wrote: a plain directory of the user's is refused
    code, lines, err = run_cli(["export", models["bert"][1], "--out", str(out), "--overwrite"])
    assert code == 1 and lines == [] and "only a distillkit artifact" in err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "distillkit.json").write_text(json.dumps({"stage": "export", "path": str(out)}))
    code, lines, err = run_cli(["export", models["bert"][1], "--out", str(out), "--overwrite"])
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def _assert_refused(code: int, lines: list[str], err: str, out: Path) -> str:
    assert code == 1 and lines == []
    assert "Traceback" not in err
    error_lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(error_lines) == 1
    assert not out.exists(), "a refused export left its output directory"
    assert not list(out.parent.glob(f".{out.name}.*")), "a refused export left a temporary directory"
    return error_lines[0]


def test_unknown_format_lists_valid_ones(models, tmp_path):
    out = tmp_path / "x"
    line = _assert_refused(*run_cli(["export", models["llama"][1], "--format", "tflite", "--out", str(out)]), out)
    assert "tflite" in line
    code, _, err = run_cli(["export", models["llama"][1], "--format", "tflite", "--out", str(out)])
    assert "hf, onnx, torch-export" in err


def test_onnx_parity_failure_is_refused(models, tmp_path, monkeypatch):
    import numpy as np
    import onnxruntime as ort

    real_run = ort.InferenceSession.run

    def drifting_run(self, output_names, feed, *args, **kwargs):
        # a runtime that drifts by 1e-3: the check must notice and refuse the artifact
        return [np.asarray(o) + np.float32(1e-3) for o in real_run(self, output_names, feed, *args, **kwargs)]

    monkeypatch.setattr(ort.InferenceSession, "run", drifting_run)
    out = tmp_path / "drift"
    line = _assert_refused(*run_cli(["export", models["bert"][1], "--format", "onnx", "--out", str(out)]), out)
    assert "onnx parity check failed" in line and "0.001 > --atol 0.0001" in line


def test_untraceable_model_is_refused(tmp_path):
    """Longformer's sliding-window attention guards on data-dependent values: torch.export cannot trace it."""
    import torch
    from transformers import LongformerConfig, LongformerForMaskedLM

    torch.manual_seed(0)
    config = LongformerConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        attention_window=4,
        pad_token_id=1,
        max_position_embeddings=66,
    )
    src = tmp_path / "longformer"
    LongformerForMaskedLM(config).save_pretrained(src)
    out = tmp_path / "lf"
    line = _assert_refused(*run_cli(["export", str(src), "--format", "torch-export", "--out", str(out)]), out)
    assert "torch-export cannot hold model type longformer" in line


def test_model_without_text_or_image_inputs_is_refused(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(8, 8),
        conv_stride=(2, 2),
        conv_kernel=(3, 3),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
    )
    src = tmp_path / "wav2vec2"
    Wav2Vec2Model(config).save_pretrained(src)
    out = tmp_path / "w"
    line = _assert_refused(*run_cli(["export", str(src), "--format", "onnx", "--out", str(out)]), out)
    assert "--format onnx" in line and "wav2vec2" in line and "input_values" in line


def test_export_config_validation():
    cfg = ExportConfig(format="onnx", atol=1e-3, opset=18)
    assert ExportConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (
        dict(format="tflite"),
        dict(atol=0.0),
        dict(atol=-1.0),
        dict(atol=float("nan")),
        dict(format="hf", opset=18),
        dict(format="onnx", opset=3),
        dict(max_shard_size="lots"),
        dict(dtype="int3"),
        dict(task="translation"),
    ):
        with pytest.raises(ConfigError):
            ExportConfig(**bad)
    with pytest.raises(AttributeError):
        cfg.atol = 1.0  # frozen
