"""``distillkit bench``: per-model numbers, ratios consistent with them, quality on data, the plot, errors."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from distillkit.bench import BenchConfig
from distillkit.cli.app import main
from distillkit.errors import ConfigError

FAST = ["--repeats", "2", "--warmup", "1", "--seq", "16", "--decode-tokens", "4"]
MODEL_FIELDS = {
    "name",
    "path",
    "stage",
    "role",
    "runtime",
    "task",
    "model_type",
    "dtype",
    "quant_kernel",
    "params",
    "weights_bytes",
    "file_size_bytes",
    "load_s",
    "latency_ms_p50",
    "latency_ms_p90",
    "latency_ms",
    "throughput",
    "throughput_unit",
    "decode_ms_per_token_p50",
    "decode_ms_per_token_p90",
    "generate_ms_per_token",
    "decode_tokens_per_s",
    "peak_memory_mb",
    "memory_method",
    "quality",
    "notes",
}
REPORT_FIELDS = {
    "ratio_flags",
    "device",
    "device_type",
    "versions",
    "command",
    "created",
    "config",
    "models",
    "baseline",
    "ratios",
    "memory_method",
    "quality_metric",
    "data",
    "notes",
    "plot",
}
RATIO_FIELDS = {"latency_speedup", "throughput_ratio", "decode_speedup", "param_ratio", "size_ratio", "memory_ratio"}


def run_cli(args: list[str]) -> tuple[int, list[str], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue().splitlines(), err.getvalue()


def weights_on_disk(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


@pytest.fixture(scope="module")
def llm_run(models, text_file, tmp_path_factory):
    """Teacher (4 layers) vs student (2 layers) with data, a plot and --out."""
    root = tmp_path_factory.mktemp("bench-llm")
    plot, out = root / "plot.png", root / "report.json"
    args = [
        "bench",
        models["student"][1],
        "--against",
        models["teacher"][1],
        "--data",
        str(text_file),
        "--plot",
        str(plot),
        "--out",
        str(out),
        *FAST,
    ]
    code, lines, err = run_cli(args)
    return code, lines, err, plot, out


def test_bench_report_has_every_field(llm_run, models):
    code, lines, err, _, out = llm_run
    assert code == 0, err
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert json.loads(out.read_text()) == report
    assert set(report) == REPORT_FIELDS
    assert report["device_type"] == "cpu" and report["device"].startswith("cpu")
    assert {"torch", "transformers", "distillkit", "python"} <= set(report["versions"])
    assert isinstance(report["command"], str) and report["command"]
    assert report["baseline"] == "teacher"
    assert [m["name"] for m in report["models"]] == ["teacher", "student"]
    assert [m["role"] for m in report["models"]] == ["teacher", "model"]
    assert "rss" in report["memory_method"]  # CPU: sampled resident set size, documented in the report
    for m in report["models"]:
        assert set(m) == MODEL_FIELDS
        model = models[m["name"]][0]
        assert m["params"] == sum(p.numel() for p in model.parameters())
        assert m["weights_bytes"] == 4 * m["params"]
        assert m["file_size_bytes"] == weights_on_disk(models[m["name"]][1])
        assert m["task"] == "causal-lm" and m["dtype"] == "float32"
        assert len(m["latency_ms"]) == 2 and 0 < m["latency_ms_p50"] <= m["latency_ms_p90"]
        assert m["throughput_unit"] == "tokens/s"
        assert m["throughput"] == pytest.approx(1 * 16 / (m["latency_ms_p50"] / 1000))
        assert 0 < m["decode_ms_per_token_p50"] <= m["decode_ms_per_token_p90"]
        assert m["decode_tokens_per_s"] == pytest.approx(1000 / m["decode_ms_per_token_p50"])
        assert m["generate_ms_per_token"] > 0 and m["load_s"] > 0 and m["peak_memory_mb"] >= 0
    assert "table" not in lines[0]  # the rich table goes to stderr
    assert "teacher" in err and "student" in err and "p50 ms" in err


def test_bench_ratios_match_per_model_numbers(llm_run):
    report = json.loads(llm_run[1][0])
    teacher, student = report["models"]
    ratios = report["ratios"]
    assert set(ratios) == {"student"} and set(ratios["student"]) == RATIO_FIELDS
    r = ratios["student"]
    assert r["param_ratio"] == student["params"] / teacher["params"]
    assert r["size_ratio"] == student["file_size_bytes"] / teacher["file_size_bytes"]
    # a speed ratio that timing noise makes meaningless is withheld (None) with its reason in ratio_flags
    flags = report["ratio_flags"].get("student", {})
    for key, value in (
        ("latency_speedup", teacher["latency_ms_p50"] / student["latency_ms_p50"]),
        ("throughput_ratio", student["throughput"] / teacher["throughput"]),
        ("decode_speedup", teacher["decode_ms_per_token_p50"] / student["decode_ms_per_token_p50"]),
    ):
        assert r[key] == (None if key in flags else value), (key, flags)
    if teacher["peak_memory_mb"] > 0:
        assert r["memory_ratio"] == student["peak_memory_mb"] / teacher["peak_memory_mb"]
    # a 2-layer student of a 4-layer model: fewer parameters, smaller file
    assert 0.4 < r["param_ratio"] < 0.7 and 0.4 < r["size_ratio"] < 0.7


def test_bench_quality_against_teacher(llm_run):
    report = json.loads(llm_run[1][0])
    teacher, student = report["models"]
    assert report["data"]["examples"] >= 2 and report["quality_metric"] == "perplexity"
    assert set(teacher["quality"]) >= {"perplexity"} and "top1_agreement" not in teacher["quality"]
    q = student["quality"]
    assert {"perplexity", "teacher_perplexity", "top1_agreement", "kl_to_teacher"} <= set(q)
    assert q["teacher_perplexity"] == pytest.approx(teacher["quality"]["perplexity"], rel=1e-5)
    assert 1 < q["perplexity"] < 1e6 and 0 <= q["top1_agreement"] <= 1 and q["kl_to_teacher"] >= 0
    assert q["eval_tokens"] == teacher["quality"]["eval_tokens"]  # both saw the same batches


def test_bench_plot_is_a_png(llm_run):
    import matplotlib.image

    plot = llm_run[3]
    assert json.loads(llm_run[1][0])["plot"] == str(plot.absolute())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(plot)
    assert image.shape[:2] == (480, 640)  # 6.4 x 4.8 in at 100 dpi


def test_bench_encoders_embedding_cosine_and_no_against(models, text_file, tmp_path):
    """Feature extractors get embedding cosine against --against; without --against the first model is the baseline."""
    code, lines, err = run_cli(
        ["bench", models["small-encoder"][1], "--against", models["encoder"][1], "--data", str(text_file), *FAST]
    )
    assert code == 0, err
    report = json.loads(lines[0])
    teacher, student = report["models"]
    assert student["task"] == "feature-extraction" and student["decode_ms_per_token_p50"] is None
    assert -1 <= student["quality"]["embedding_cosine"] <= 1
    assert report["ratios"]["small-encoder"]["decode_speedup"] is None
    # the reference has no cosine against itself, yet the plot uses quality: the reference sits at 1 by definition
    assert "embedding_cosine" not in teacher["quality"] and report["quality_metric"] == "embedding_cosine"

    plot = tmp_path / "params.png"
    code, lines, err = run_cli(["bench", models["encoder"][1], models["vit"][1], "--plot", str(plot), *FAST])
    assert code == 0, err
    report = json.loads(lines[0])
    assert report["baseline"] == "encoder" and set(report["ratios"]) == {"vit"}
    assert all(m["quality"] == {} for m in report["models"])
    assert any("quality not measured" in n for n in report["notes"])  # skipped with a note, not an error
    assert report["quality_metric"] is None  # so the plot shows parameters vs latency
    vit = report["models"][1]
    assert vit["task"] == "image-classification" and vit["throughput_unit"] == "images/s"
    assert vit["throughput"] == pytest.approx(1 / (vit["latency_ms_p50"] / 1000))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_errors(models, tmp_path):
    for args, words in (
        (["bench", str(tmp_path / "missing")], ["does not exist"]),
        (["bench", models["student"][1], "--repeats", "0"], ["--repeats"]),
        (["bench", models["student"][1], "--seq", "4096", "--repeats", "1", "--warmup", "0"], ["--seq 4096", "128"]),
        (["bench", models["student"][1], "--plot", str(tmp_path / "plot.gif")], ["--plot"]),
    ):
        code, lines, err = run_cli(args)
        assert code == 1 and lines == [], args
        errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and all(w in errors[0] for w in words), err
        assert "Traceback" not in err


def test_bench_config_validation():
    cfg = BenchConfig(models=("a", "b"), against="t", repeats=2)
    assert BenchConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (
        dict(),
        dict(models=("a",), batch=0),
        dict(models=("a",), warmup=-1),
        dict(models=("a",), decode_tokens=0),
        dict(models=("a",), dtype="int8"),
        dict(models=("a",), task="translation"),
        dict(models=("a",), max_samples=0),
    ):
        with pytest.raises(ConfigError):
            BenchConfig(**bad)


def test_bench_reads_an_onnx_export_from_stdin(models, text_file, tmp_path, monkeypatch):
    """`export - --format onnx | bench - --against TEACHER`: the ONNX artifact runs in onnxruntime and scores
    exactly like the PyTorch model it was exported from."""
    out = tmp_path / "encoder-onnx"
    code, lines, err = run_cli(["export", models["small-encoder"][1], "--format", "onnx", "--out", str(out)])
    assert code == 0, err
    monkeypatch.setattr("sys.stdin", io.StringIO(lines[0] + "\n"))
    code, lines, err = run_cli(
        ["bench", "-", models["small-encoder"][1], "--against", models["encoder"][1], "--data", str(text_file), *FAST]
    )
    assert code == 0, err
    report = json.loads(lines[0])
    teacher, exported, eager = report["models"]
    assert (exported["name"], exported["runtime"], exported["stage"]) == ("encoder-onnx", "onnxruntime", "export")
    assert (eager["runtime"], teacher["runtime"]) == ("pytorch", "pytorch")
    assert exported["file_size_bytes"] == (out / "model.onnx").stat().st_size
    # ONNX counts its initializers: the weights the exported output needs (not BERT's pooler) plus a few constants
    pooler = sum(p.numel() for p in models["small-encoder"][0].pooler.parameters())
    assert exported["params"] == pytest.approx(eager["params"] - pooler, rel=0.01)
    for key in ("embedding_cosine", "similarity_corr"):
        assert exported["quality"][key] == pytest.approx(eager["quality"][key], abs=1e-5)
    assert report["ratios"]["encoder-onnx"]["param_ratio"] == exported["params"] / teacher["params"]


def test_bench_eval_data_reports_heldout_geometry_against_the_teacher(models, text_file):
    """--eval-data adds the held-out measures of distill --eval-data; they match a direct computation."""
    from transformers import AutoModel, AutoTokenizer

    from distillkit.evaluate import embedding_geometry, heldout_embeddings

    small, big = models["small-encoder"][1], models["encoder"][1]
    code, lines, err = run_cli(["bench", small, "--against", big, "--eval-data", str(text_file), *FAST])
    assert code == 0, err
    report = json.loads(lines[0])
    assert report["eval_data"]["records"] == 24 and report["eval_data"]["source"] == str(text_file)
    student = report["models"][1]["quality"]
    texts = text_file.read_text().splitlines()
    seq = int(FAST[FAST.index("--seq") + 1])
    tok = AutoTokenizer.from_pretrained(big)
    t = heldout_embeddings(AutoModel.from_pretrained(big), texts, tok, pooling="mean", max_length=seq)
    s = heldout_embeddings(AutoModel.from_pretrained(small), texts, tok, pooling="mean", max_length=seq)
    want = embedding_geometry(s, t)
    assert student["heldout_spearman"] == pytest.approx(want["spearman"], abs=1e-6)
    assert student["heldout_nn_agreement"] == pytest.approx(want["nn_agreement"])
    assert "heldout_spearman" not in report["models"][0]["quality"]  # the teacher is the reference
