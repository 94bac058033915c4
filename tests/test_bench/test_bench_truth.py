"""Bench reports only what it measured: speed ratios that timing noise makes absurd are withheld with a reason,
and exported programs count their real parameters and weight bytes."""

from __future__ import annotations

import json

import pytest

from distillkit.bench.report import NOISE_FLOOR_MS, ratios, speed_flags
from distillkit.cli.app import main


def _record(name, runs, params=1000, decode=None):
    import numpy as np

    runs = list(map(float, runs))
    p50 = float(np.percentile(runs, 50))
    return {
        "name": name,
        "latency_ms": runs,
        "latency_ms_p50": p50,
        "latency_ms_p90": float(np.percentile(runs, 90)),
        "throughput": 16 / (p50 / 1000),
        "decode_ms_per_token_p50": decode,
        "decode_ms_per_token_p90": decode * 1.05 if decode else None,
        "params": params,
        "file_size_bytes": params * 4,
        "peak_memory_mb": 1.0,
    }


def test_a_stable_plausible_speedup_is_reported():
    base = _record("teacher", [10.0, 10.2, 9.9, 10.1, 10.0], params=4000, decode=2.0)
    student = _record("student", [5.0, 5.1, 4.9, 5.0, 5.05], params=2000, decode=1.0)
    assert speed_flags(student, base) == {}
    r = ratios(student, base)
    assert r["latency_speedup"] == pytest.approx(2.0) and r["throughput_ratio"] == pytest.approx(2.0)
    assert r["decode_speedup"] == pytest.approx(2.0)


def test_an_absurd_speedup_for_the_same_work_is_withheld():
    # the reported case: 1328x for a model with as many parameters as its baseline
    base = _record("teacher", [13.28, 13.3, 13.2, 13.25, 13.3])
    model = _record("q", [0.01, 0.0101, 0.0099, 0.01, 0.01])
    flags = speed_flags(model, base)
    assert "noise floor" in flags["latency_speedup"] and "1.33e+03x" in flags["latency_speedup"]
    model = _record("q", [0.14, 0.141, 0.139, 0.14, 0.14])  # above the floor, stable, but 95x for equal work
    flags = speed_flags(model, base)
    assert "more than 4x the parameter ratio allows" in flags["latency_speedup"]
    r = ratios(model, base)
    assert r["latency_speedup"] is None and r["throughput_ratio"] is None
    assert r["param_ratio"] == 1.0  # the ratios noise cannot touch stay
    # a 100x smaller model may be 95x faster
    assert speed_flags(_record("tiny", [0.14] * 5, params=10), base) == {}


def test_noisy_runs_and_the_noise_floor_withhold_the_ratio():
    base = _record("teacher", [67.4, 68.3, 67.6, 68.5, 67.9])
    noisy = _record("q", [45.6, 2.2, 3.0, 4.7, 52.2])  # a real run on a busy 2-core machine
    assert "spread" in speed_flags(noisy, base)["latency_speedup"]
    assert ratios(noisy, base)["latency_speedup"] is None
    floor = _record("teacher", [NOISE_FLOOR_MS / 2] * 5)
    assert "noise floor" in speed_flags(_record("s", [NOISE_FLOOR_MS / 4] * 5), floor)["latency_speedup"]


def test_flagged_ratios_are_warned_on_stderr_and_named_in_the_report(models, tmp_path, capsys, monkeypatch):
    import distillkit.bench.report as report_mod

    # every real timing on a tiny model is below this floor, so the flag path runs end to end
    monkeypatch.setattr(report_mod, "NOISE_FLOOR_MS", 1e9)
    _, teacher = models["teacher"]
    _, student = models["student"]
    code = main(["bench", student, "--against", teacher, "--seq", "16", "--batch", "1", "--decode-tokens", "2",
                 "--repeats", "2", "--warmup", "0"])  # fmt: skip
    cap = capsys.readouterr()
    assert code == 0, cap.err
    report = json.loads(cap.out.splitlines()[-1])
    r, flags = report["ratios"]["student"], report["ratio_flags"]["student"]
    assert r["latency_speedup"] is None and r["decode_speedup"] is None and r["throughput_ratio"] is None
    assert set(flags) == {"latency_speedup", "throughput_ratio", "decode_speedup"}
    assert "warning: student: latency_speedup" in cap.err and "noise floor" in cap.err
    assert r["param_ratio"] is not None


def test_a_torch_export_of_a_packed_model_reports_real_params_and_weight_bytes(tmp_path, capsys):
    from tests import tiny

    model, path = tiny.tiny_llama(tmp_path / "llama", num_hidden_layers=2)
    q, pt2 = tmp_path / "q", tmp_path / "pt2"
    assert main(["quantize", path, "--scheme", "int4", "--group-size", "32", "--out", str(q), "--quiet",
                 "--max-samples", "100", "--max-length", "32", "--calib-batches", "1", "--eval-batches", "1"]) == 0  # fmt: skip
    assert main(["export", str(q), "--format", "torch-export", "--out", str(pt2), "--quiet"]) == 0
    capsys.readouterr()
    code = main(["bench", str(pt2), str(q), "--against", path, "--seq", "16", "--batch", "1", "--decode-tokens", "2",
                 "--repeats", "2", "--warmup", "0"])  # fmt: skip
    cap = capsys.readouterr()
    assert code == 0, cap.err
    report = json.loads(cap.out.splitlines()[-1])
    by = {m["name"]: m for m in report["models"]}
    n = sum(p.numel() for p in model.parameters())
    assert by["llama"]["params"] == by["q"]["params"] == by["pt2"]["params"] == n  # was 320: the norms only
    # the .pt2 counts its tensors, not its serialized graph: a 4-bit program is far smaller than the float weights
    assert report["ratios"]["pt2"]["size_ratio"] < 0.5, report["ratios"]["pt2"]
    assert report["ratios"]["pt2"]["param_ratio"] == 1.0
