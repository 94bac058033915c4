"""Progress on stderr (plain lines when stderr is not a terminal), quiet libraries, one meaning per option, Ctrl-C."""

from __future__ import annotations

import collections
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distillkit import progress
from distillkit.errors import ConfigError
from distillkit.progress import Progress, format_duration, format_line, track

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(label: str, total: int | None, steps: list[tuple[float, int]], **kw) -> list[str]:
    """The plain lines a Progress prints for updates ``(seconds since start, done)``."""
    clock, out = FakeClock(), io.StringIO()
    with Progress(label, total, tty=False, clock=clock, stream=out, **kw) as p:
        for t, done in steps:
            clock.now = 100.0 + t
            p.update(done)
    return out.getvalue().splitlines()


# --------------------------------------------------------------------------------------------------------------
# The line format


def test_line_format_matches_the_documented_example():
    assert format_line("distill", "step", 120, 2000, 3.1) == "distill: step 120/2000 (6%) 3.1 it/s eta 10m06s"
    # slow loops read as seconds per item; no eta once done; extra info at the end
    assert format_line("gptq", "layer", 3, 24, 1 / 42.0, "x") == "gptq: layer 3/24 (12%) 42.0 s/it eta 14m42s x"
    assert format_line("gptq", "layer", 24, 24, 0.5) == "gptq: layer 24/24 (100%) 2.0 s/it"
    assert format_line("search", "candidate", 7, None, None) == "search: candidate 7"


@pytest.mark.parametrize(
    "seconds, text", [(0, "0s"), (59.4, "59s"), (60, "1m00s"), (605, "10m05s"), (3599, "59m59s"), (7380, "2h03m")]
)
def test_durations(seconds, text):
    assert format_duration(seconds) == text


# --------------------------------------------------------------------------------------------------------------
# Rate limiting (fake clock)


def test_first_and_last_item_and_at_most_one_line_per_interval(monkeypatch):
    monkeypatch.setenv("DISTILLKIT_PROGRESS_INTERVAL", "10")
    # one update per second for 25 items: lines at item 1 (first), 11 and 21 (10 s apart) and 25 (last)
    lines = _lines("distill", 25, [(float(i), i) for i in range(1, 26)])
    assert lines == [
        "distill: step 1/25 (4%) 1.0 it/s eta 24s",
        "distill: step 11/25 (44%) 1.0 it/s eta 14s",
        "distill: step 21/25 (84%) 1.0 it/s eta 4s",
        "distill: step 25/25 (100%) 1.0 it/s",
    ]


def test_interval_zero_prints_every_item_and_default_is_ten_seconds(monkeypatch):
    monkeypatch.setenv("DISTILLKIT_PROGRESS_INTERVAL", "0")
    assert len(_lines("x", 5, [(0.5 * i, i) for i in range(1, 6)])) == 5
    monkeypatch.delenv("DISTILLKIT_PROGRESS_INTERVAL")
    assert progress.interval_s() == 10.0
    # 9.9 s after the first line nothing more; at 10 s the next
    lines = _lines("x", 100, [(1, 1), (10.9, 2), (11.0, 3)])
    assert [ln.split()[2] for ln in lines] == ["1/100", "3/100"]


def test_a_loop_that_stops_short_still_shows_where_it_ended(monkeypatch):
    monkeypatch.setenv("DISTILLKIT_PROGRESS_INTERVAL", "10")
    lines = _lines("search", 50, [(1, 1), (2, 2), (3, 3)])
    assert [ln.split()[2] for ln in lines] == ["1/50", "3/50"]


def test_resumed_run_rates_count_only_this_runs_items(monkeypatch):
    monkeypatch.setenv("DISTILLKIT_PROGRESS_INTERVAL", "0")
    lines = _lines("distill", 2000, [(2.0, 1004)], start=1000)
    assert lines == ["distill: step 1004/2000 (50%) 2.0 it/s eta 8m18s"]


def test_disabled_progress_prints_nothing(monkeypatch):
    monkeypatch.setenv("DISTILLKIT_PROGRESS_INTERVAL", "0")
    assert _lines("distill", 3, [(1, 1), (2, 2), (3, 3)], enabled=False) == []


def test_an_error_does_not_print_a_closing_line(monkeypatch):
    monkeypatch.setenv("DISTILLKIT_PROGRESS_INTERVAL", "10")
    clock, out = FakeClock(), io.StringIO()
    with pytest.raises(KeyboardInterrupt), Progress("distill", 9, tty=False, clock=clock, stream=out) as p:
        p.update(1)
        clock.now += 1
        p.update(2)
        raise KeyboardInterrupt
    assert out.getvalue().splitlines() == ["distill: step 1/9 (11%)"]  # no rate yet: no time had passed


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_interval_is_a_user_error(monkeypatch, value):
    monkeypatch.setenv("DISTILLKIT_PROGRESS_INTERVAL", value)
    with pytest.raises(ConfigError, match="DISTILLKIT_PROGRESS_INTERVAL") as e:
        progress.interval_s()
    assert "unset" in e.value.hint


def test_track_goes_to_stderr_not_stdout(monkeypatch, capsys):
    monkeypatch.setenv("DISTILLKIT_PROGRESS_INTERVAL", "0")
    assert list(track(["a", "b", "c"], "prune taylor", unit="batch")) == ["a", "b", "c"]
    cap = capsys.readouterr()
    assert cap.out == ""
    assert [ln.split(" (")[0] for ln in cap.err.splitlines()] == [f"prune taylor: batch {i}/3" for i in (1, 2, 3)]


def test_bars_on_a_terminal_share_one_live_display():
    # rich allows one live display at a time: a bar opened inside another (GPTQ inside quantize, say) joins it
    with Progress("outer", 3, tty=True) as outer:
        live = progress._live
        with Progress("inner", 5, tty=True, transient=True) as inner:
            assert progress._live is live and len(live.tasks) == 2
            inner.update(5)
        assert len(live.tasks) == 1  # the transient inner bar is gone, the outer one stays
        outer.update(3)
        assert live.tasks[0].completed == 3
    assert progress._live is None


# --------------------------------------------------------------------------------------------------------------
# Real runs with stderr in a file


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    env.pop("DISTILLKIT_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def llama_and_text(tmp_path_factory):
    from tests.test_distill.test_engine import markov_lines
    from tests.tiny import tiny_llama

    root = tmp_path_factory.mktemp("progress")
    text = root / "text.txt"
    text.write_text("\n".join(markov_lines(40, seed=0)))
    return Path(tiny_llama(root / "llama")[1]), text


def test_distill_with_stderr_in_a_file_prints_step_lines_and_only_the_manifest_on_stdout(llama_and_text, tmp_path):
    llama, text = llama_and_text
    out, err_file = tmp_path / "student", tmp_path / "stderr.log"
    args = ["distill", "--teacher", str(llama), "--student", "layers=1", "--data", str(text)]
    args += ["--steps", "6", "--max-length", "32", "--batch-size", "4", "--out", str(out)]
    with open(err_file, "w") as err:
        r = subprocess.run(
            [sys.executable, "-m", "distillkit.cli.app", *args],
            env=_env(DISTILLKIT_PROGRESS_INTERVAL="0"),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            timeout=300,
        )
    stderr = err_file.read_text()
    assert r.returncode == 0, stderr[-3000:]
    stdout_lines = r.stdout.splitlines()
    assert len(stdout_lines) == 1 and json.loads(stdout_lines[0])["path"] == str(out)  # the manifest, nothing else
    steps = [ln for ln in stderr.splitlines() if ln.startswith("distill: step ")]
    assert [ln.split()[2] for ln in steps] == [f"{i}/6" for i in range(1, 7)]
    assert all(" it/s" in ln and " tok/s" in ln and "loss " in ln for ln in steps)
    assert all(" eta " in ln for ln in steps[:-1]) and steps[-1].startswith("distill: step 6/6 (100%)")
    assert "\x1b[" not in stderr  # no terminal escape codes in a log file


def test_quantize_does_not_pass_on_bitsandbytes_import_noise(llama_and_text, tmp_path):
    import importlib.util

    # bitsandbytes looks for the hub kernel (and says it failed) only on CPUs with avx512-bf16, like this one
    cpuinfo = Path("/proc/cpuinfo")
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    if not cpuinfo.is_file() or "avx512_bf16" not in cpuinfo.read_text():
        pytest.skip("this CPU lacks avx512-bf16: bitsandbytes prints no import-time kernel message here")
    noise = ("gemm_4bit_forward", "quantization-bitsandbytes")
    llama, text = llama_and_text
    out = tmp_path / "nf4"
    r = subprocess.run(
        [sys.executable, "-m", "distillkit.cli.app", "quantize", str(llama), "--scheme", "nf4"]
        + ["--data", str(text), "--max-length", "32", "--eval-batches", "2", "--out", str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["path"] == str(out)
    assert not any(n in r.stderr for n in noise), r.stderr
    assert "Traceback" not in r.stderr and "quantize nf4" in r.stderr  # distillkit's own summary still shows


def test_the_noise_filter_keeps_other_messages_of_the_same_logger(caplog):
    import logging

    progress.silence_library_noise()
    progress.silence_library_noise()  # idempotent: one filter, not two
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert sum(isinstance(f, progress._DropMessages) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "offline")
        logger.warning("a real bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes warning"]


# --------------------------------------------------------------------------------------------------------------
# Options: one meaning per spelling within a command


def _commands():
    import typer

    from distillkit.cli.app import build_app

    group = typer.main.get_command(build_app())
    return group.commands


def test_no_option_name_is_declared_twice_within_a_command():
    commands = _commands()
    assert {"distill", "search-student", "prune", "quantize", "export", "bench"} <= set(commands)
    for name, command in commands.items():
        names = collections.Counter(o for p in command.params for o in (*p.opts, *p.secondary_opts))
        assert [o for o, n in names.items() if n > 1] == [], f"{name} declares an option name twice"


def test_short_q_means_quiet_in_every_command_that_has_it():
    for name, command in _commands().items():
        for p in command.params:
            if "-q" in p.opts:
                assert p.name == "quiet" and "--quiet" in p.opts, f"{name}: -q is {p.opts}"
    quantize = _commands()["quantize"]
    scheme = next(p for p in quantize.params if p.name == "scheme")
    assert scheme.opts == ["--scheme"]


# --------------------------------------------------------------------------------------------------------------
# Ctrl-C: "interrupted" and exit 130 on every path (a real SIGINT mid-run with stderr a pipe:
# tests/test_distill/test_engine.py::test_ctrl_c_exits_130_and_keeps_the_checkpoint)


@pytest.mark.parametrize("how", ["keyboard-interrupt", "exit-130"])
def test_both_interrupt_paths_print_interrupted_and_exit_130(how, monkeypatch, capsys):
    import typer

    import distillkit.cli.app as app_module

    build = app_module.build_app

    def with_stop() -> typer.Typer:
        app = build()

        @app.command("stop")
        def stop() -> None:
            if how == "exit-130":
                raise typer.Exit(130)
            raise KeyboardInterrupt

        return app

    monkeypatch.setattr(app_module, "build_app", with_stop)
    assert app_module.main(["stop"]) == 130
    cap = capsys.readouterr()
    assert cap.err.splitlines() == ["interrupted"] and cap.out == ""
