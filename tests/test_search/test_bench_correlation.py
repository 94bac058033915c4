"""``distillkit bench --search-correlation``: the rank-correlation benchmark through the bench command."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from distillkit.cli.app import main
from distillkit.search.correlation import kendall_tau, spearman_rho
from tests.tiny import _WORDS, tiny_bert


@pytest.fixture(scope="module")
def teacher_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("corr")
    teacher = Path(tiny_bert(root / "teacher")[1])
    r = random.Random(0)
    data = root / "text.txt"
    data.write_text("\n".join(" ".join(r.choice(_WORDS[11:80]) for _ in range(16)) for _ in range(80)))
    return teacher, data


def test_bench_search_correlation_reports_tau_and_rho(teacher_and_data, tmp_path, capsys):
    teacher, data = teacher_and_data
    report_file = tmp_path / "corr.json"
    code = main(
        [
            "bench",
            "--search-correlation",
            str(teacher),
            "--candidates",
            "4",
            "--steps",
            "2",
            "--data",
            str(data),
            "--seq",
            "16",
            "--out",
            str(report_file),
        ]
    )
    cap = capsys.readouterr()
    assert code == 0, cap.err
    lines = [ln for ln in cap.out.splitlines() if ln.strip()]
    assert len(lines) == 1  # one JSON line on stdout, the table on stderr
    report = json.loads(lines[0])
    assert json.loads(report_file.read_text()) == report
    assert report["task"] == "feature-extraction" and report["quality"] == "student_similarity_corr"
    assert len(report["candidates"]) == 4
    assert report["config"]["steps"] == 2 and report["config"]["max_length"] == 16
    assert "Kendall tau" in cap.err and "diswot" in cap.err
    quality = [c["quality"] for c in report["candidates"]]
    assert all(-1.0 <= q <= 1.0 for q in quality)
    assert {"diswot", "params", "flops", "naswot", "gradnorm", "synflow", "diswot_random_init"} <= set(
        report["correlation"]
    )
    for name, corr in report["correlation"].items():
        values = [c["scores"][name] for c in report["candidates"]]
        for key, fn in (("kendall_tau", kendall_tau), ("spearman_rho", spearman_rho)):
            if math.isnan(corr[key]):
                continue  # a constant score ranks nothing
            assert -1.0 <= corr[key] <= 1.0
            assert corr[key] == pytest.approx(fn(values, quality), abs=1e-12)
    # params ranks like the parameter counts themselves
    counts = [c["params"] for c in report["candidates"]]
    assert report["correlation"]["params"]["kendall_tau"] == pytest.approx(kendall_tau(counts, quality), abs=1e-12)


def test_kendall_and_spearman_reference_values():
    # perfectly concordant, perfectly discordant, and a hand-counted case with one tie
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman_rho([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # pairs: (1,2)+ (1,3)+ (1,4)+ (2,3)- (2,4)+ (3,4)+ -> 5 concordant, 1 discordant
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # ranks [1,2,3,4] vs [1,3,2,4]: rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman_rho([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # a tie in x: tau-b = (C - D) / sqrt((n0 - tx)(n0 - ty)) = (4 - 1) / sqrt(5 * 6)
    assert kendall_tau([1, 1, 2, 3], [1, 2, 4, 3]) == pytest.approx(3 / math.sqrt(30))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--candidates", "1"], "--candidates 1"),
        (["--steps", "0"], "--steps 0"),
    ],
)
def test_bench_search_correlation_bad_input(teacher_and_data, args, message, capsys):
    teacher, _ = teacher_and_data
    assert main(["bench", "--search-correlation", str(teacher), *args]) == 1
    assert message in capsys.readouterr().err


def test_candidates_without_search_correlation_is_refused(capsys):
    assert main(["bench", "some-model", "--candidates", "3"]) == 1
    assert "--search-correlation" in capsys.readouterr().err
