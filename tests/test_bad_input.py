"""Every bad input gets a clean error: one ``error:`` line (and at most one ``hint:``), exit code 1, no traceback,
nothing written, and the inputs byte-identical afterwards.

The bad inputs (broken weight files, diffusers directories given to transformers-only stages, orphan manifests,
pickles of non-tensors, unreadable data, garbage on stdin, impossible lengths, no-op or out-of-range flags, an
unwritable or full disk) are built once per module from the tiny models; each case runs the real CLI in-process
through :func:`distillkit.cli.app.main`. Almost every case fails before any data is read or any step is trained.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from distillkit.cli.app import main
from tests import tiny

FAST = ["--max-length", "32", "--eval-batches", "1"]
# The flags each command needs to get past its own argument checks, so that the case's bad input is what stops it.
PRUNE = ["--mlp", "0.5", *FAST, "--calib-batches", "1"]
QUANTIZE = ["--method", "rtn", "--group-size", "32", *FAST, "--calib-batches", "1"]
SEARCH = ["--params", "0.9", "--candidates", "2", "--max-length", "16"]
DISTILL = ["--student", "layers=1", "--steps", "1", *FAST]
BENCH = ["--repeats", "1", "--warmup", "0", "--seq", "16", "--decode-tokens", "2"]
COMMANDS = ("distill", "search-student", "prune", "quantize", "export", "bench")


class Unpicklable:
    """A class torch's ``weights_only`` unpickler refuses: what a pickle of arbitrary objects holds."""


def _hash_tree(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _copy(src: str | Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """Every bad input of the table, by name (the ``{name}`` placeholders in the cases)."""
    root = tmp_path_factory.mktemp("bad-input")
    w: dict[str, Path] = {}
    _, llama = tiny.tiny_llama(root / "llama")
    w["llama"] = Path(llama)
    w["gpt2"] = Path(tiny.tiny_gpt2(root / "gpt2")[1])
    w["unet"] = Path(tiny.tiny_unet(root / "unet")[1])

    # a diffusers pipeline directory (model_index.json, unet/, scheduler/), as DDPMPipeline.save_pretrained writes
    pipe = root / "pipe"
    shutil.copytree(w["unet"], pipe / "unet", ignore=shutil.ignore_patterns("scheduler"))
    shutil.copytree(w["unet"] / "scheduler", pipe / "scheduler")
    index = {
        "_class_name": "DDPMPipeline",
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (pipe / "model_index.json").write_text(json.dumps(index))
    w["pipe"] = pipe

    # broken safetensors: every way a copy or download goes wrong
    def broken(name: str, edit, base: Path = w["llama"], weights: str = "model.safetensors") -> None:
        d = _copy(base, root / name)
        f = d / weights
        data = f.read_bytes()
        f.write_bytes(edit(data))
        w[name] = d

    broken("trunc", lambda b: b[: len(b) // 2])
    broken("trunc_header", lambda b: b[:100])
    broken("huge_header", lambda b: b"\xff" * 8 + b[8:])
    broken("bad_json", lambda b: b[:8] + b"\x00" * 16 + b[24:])
    broken("trailing", lambda b: b + b"\x00" * 1000)
    broken("empty_weights", lambda b: b"")
    broken("unet_trunc", lambda b: b[: len(b) // 2], base=w["unet"], weights="diffusion_pytorch_model.safetensors")
    shard = _copy(w["llama"], root / "missing_shard")
    (shard / "model.safetensors").rename(shard / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (shard / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    w["missing_shard"] = shard

    # pickle weights (--allow-pickle) that hold something other than a state dict of tensors
    for name, obj in (
        ("pkl_objects", {"config": {"lr": 1e-4}, "step": 10, "note": "not weights"}),
        ("pkl_class", {"model": Unpicklable()}),
        ("pkl_list", [torch.zeros(2)]),
    ):
        d = _copy(w["llama"], root / name)
        (d / "model.safetensors").unlink()
        torch.save(obj, d / "pytorch_model.bin")
        w[name] = d

    # manifests whose directory holds no model: one records another artifact's path, one a vanished one
    for name, recorded in (("orphan", w["llama"]), ("orphan_gone", root / "gone")):
        d = root / name
        d.mkdir()
        (d / "distillkit.json").write_text(json.dumps({"stage": "distill", "path": str(recorded)}))
        w[name] = d / "distillkit.json"
        w[name + "_dir"] = d

    data = root / "data"
    data.mkdir()
    text = "\n".join(
        f"the {word} of the day is a good {word} to see and read" for word in ("man", "word", "line", "page") * 40
    )
    files = {
        "text.txt": text.encode(),
        "empty.txt": b"",
        "empty.jsonl": b"",
        "empty.csv": b"",
        "blank.txt": b"  \n\n \t\n",
        "latin1.txt": "caf\xe9 na\xefve r\xe9sum\xe9\n".encode("latin-1") * 50,
        "latin1.jsonl": b'{"text": "caf\xe9 au lait"}\n' * 50,
        "latin1.csv": b"text\ncaf\xe9 au lait\n" * 50,
        "binary.txt": bytes(range(256)) * 20,
        "cut.txt": "na\u00efve\n".encode()[:3],  # ends inside a two-byte character
        "not_gzip.txt.gz": b"plain text, not gzip\n",
    }
    for name, content in files.items():
        (data / name).write_bytes(content)
    (data / "empty.txt.gz").write_bytes(gzip.compress(b""))
    (data / "latin1.txt.gz").write_bytes(gzip.compress(files["latin1.txt"]))
    for name in [*files, "empty.txt.gz", "latin1.txt.gz"]:
        w[name.replace(".", "_")] = data / name
    return {k: str(v) for k, v in w.items()}


# (id, argv with {placeholders}, a piece of the expected error line, what stdin holds: None, text or bytes);
# {out} is a fresh path per case.
CASES: list[tuple[str, list[str], str, str | bytes | None]] = []


def case(id: str, argv: list[str], expect: str, stdin: str | bytes | None = None) -> None:
    CASES.append((id, argv, expect, stdin))


def model_args(command: str, model: str, extra: tuple[str, ...] = ()) -> list[str]:
    """``command`` run on ``model`` (the teacher for distill) with the flags that make it otherwise valid."""
    if command == "distill":
        return ["distill", "--teacher", model, *DISTILL, *extra, "--out", "{out}"]
    if command == "bench":
        return ["bench", model, *BENCH, *extra, "--out", "{out}"]
    flags = {"search-student": SEARCH, "prune": PRUNE, "quantize": QUANTIZE, "export": []}[command]
    return [command, model, *flags, *extra, "--out", "{out}"]


CORRUPT = "not a valid safetensors file"
for cmd in COMMANDS:
    case(f"{cmd}-truncated-weights", model_args(cmd, "{trunc}"), "is truncated")
    case(f"{cmd}-truncated-in-header", model_args(cmd, "{trunc_header}"), CORRUPT)
    case(f"{cmd}-garbage-header-length", model_args(cmd, "{huge_header}"), "header claims")
    case(f"{cmd}-garbage-header-json", model_args(cmd, "{bad_json}"), "header is not readable JSON")
    case(f"{cmd}-trailing-bytes", model_args(cmd, "{trailing}"), "trailing bytes")
    case(f"{cmd}-empty-weights-file", model_args(cmd, "{empty_weights}"), "fewer than the 8 of a header")
    case(f"{cmd}-missing-shard", model_args(cmd, "{missing_shard}"), "shard(s) that are not in")
    case(f"{cmd}-orphan-manifest", model_args(cmd, "{orphan}"), "holds no model")
    case(f"{cmd}-orphan-manifest-dir", model_args(cmd, "{orphan_gone_dir}"), "holds no model")
    case(f"{cmd}-pickle-of-objects", model_args(cmd, "{pkl_objects}", ("--allow-pickle",)), "non-tensor entries")
for cmd in ("distill", "bench"):
    case(f"{cmd}-truncated-diffusers-weights", model_args(cmd, "{unet_trunc}"), "is truncated")
for cmd in ("prune", "export"):
    case(f"{cmd}-pickle-of-a-class", model_args(cmd, "{pkl_class}", ("--allow-pickle",)), "Unsupported global")
    case(f"{cmd}-pickle-of-a-list", model_args(cmd, "{pkl_list}", ("--allow-pickle",)), "holds a list")
case(
    "distill-truncated-student",
    ["distill", "--teacher", "{llama}", "--student", "{trunc}", "--out", "{out}"],
    "is truncated",
)
case("bench-truncated-baseline", ["bench", "{llama}", "--against", "{trunc}", *BENCH], "is truncated")

# diffusers directories to the stages that take transformers models only
for cmd in ("search-student", "prune", "quantize", "export"):
    case(f"{cmd}-diffusers-pipeline", model_args(cmd, "{pipe}"), "is a diffusers pipeline (model_index.json)")
    case(f"{cmd}-diffusers-unet-dir", model_args(cmd, "{unet}"), "is a diffusers UNet2DModel model")

# garbage on stdin for '-': (id, stdin text, expected)
STDIN = [
    ("word", "garbage\n", "neither a distillkit manifest nor the path"),
    ("hub-id-like", "org/model\n", "neither a distillkit manifest nor the path"),
    ("broken-json", "{not json\n", "not JSON"),
    ("json-not-manifest", '{"a": 1}\n', "needs 'stage' and 'path'"),
    ("json-list", "[1, 2]\n", "needs 'stage' and 'path'"),
    (
        "manifest-of-vanished-artifact",
        '{"stage": "distill", "path": "/nonexistent/artifact"}\n',
        "which does not exist",
    ),
    ("only-blank-lines", "\n \n\n", "stdin was empty"),
]
STDIN_BYTES = b"\xff\xfe\x00binary"
for cmd in COMMANDS:
    argv = (
        ["distill", "-", "--teacher", "{llama}", "--steps", "1", *FAST, "--out", "{out}"] if cmd == "distill" else None
    )
    for sid, text, expect in STDIN:
        case(f"{cmd}-stdin-{sid}", argv or model_args(cmd, "-"), expect, text)
    case(f"{cmd}-stdin-bytes", argv or model_args(cmd, "-"), "bytes that are not text", STDIN_BYTES)

# an --out nobody can write, even as root
for cmd in ("distill", "search-student", "prune", "quantize", "export"):
    case(f"{cmd}-out-under-proc", [*model_args(cmd, "{llama}")[:-1], "/proc/distillkit-out"], "cannot write to /proc")
    case(f"{cmd}-out-under-sys", [*model_args(cmd, "{llama}")[:-1], "/sys/distillkit-out"], "cannot write to /sys")
case("bench-report-under-proc", [*model_args("bench", "{llama}")[:-1], "/proc/report.json"], "/proc")

# sequences longer than the model's positions (128): GPT-2's table would index out of range, Llama would run on
# positions it never saw
for cmd, model in (("distill", "{gpt2}"), ("distill", "{llama}"), ("prune", "{gpt2}"), ("quantize", "{llama}")):
    case(
        f"{cmd}-max-length-past-positions-{model[1:-1]}",
        model_args(cmd, model, ("--max-length", "1024")),
        "longer than the 128 positions",
    )
case(
    "search-student-max-length-past-positions",
    model_args("search-student", "{gpt2}", ("--max-length", "1024")),
    "longer than the 128 positions",
)
case("bench-seq-past-positions", model_args("bench", "{gpt2}", ("--seq", "1024")), "--seq 1024 is longer")
case(
    "bench-decode-past-positions",
    model_args("bench", "{gpt2}", ("--seq", "120", "--decode-tokens", "16")),
    "plus --decode-tokens 16",
)

# data that cannot be read as text
DATA = [
    ("empty-txt", "{empty_txt}", "is empty"),
    ("empty-jsonl", "{empty_jsonl}", "is empty"),
    ("empty-csv", "{empty_csv}", "is empty"),
    ("empty-gz", "{empty_txt_gz}", "is empty"),
    ("blank-lines-only", "{blank_txt}", "holds no rows"),
    ("latin1-txt", "{latin1_txt}", "is not UTF-8 text"),
    ("latin1-jsonl", "{latin1_jsonl}", "is not UTF-8 text"),
    ("latin1-csv", "{latin1_csv}", "is not UTF-8 text"),
    ("latin1-gz", "{latin1_txt_gz}", "is not UTF-8 text"),
    ("binary-txt", "{binary_txt}", "is not UTF-8 text"),
    ("ends-mid-character", "{cut_txt}", "ends inside a multi-byte character"),
    ("not-really-gzip", "{not_gzip_txt_gz}", "cannot read"),
]
for did, path, expect in DATA:
    case(f"distill-data-{did}", model_args("distill", "{llama}", ("--data", path)), expect)
for cmd in ("search-student", "prune", "quantize", "bench"):
    for did, path, expect in (DATA[0], DATA[5], DATA[6]):
        case(f"{cmd}-data-{did}", model_args(cmd, "{llama}", ("--data", path)), expect)

# flags that would do nothing, or nothing sensible
case("prune-no-amount", ["prune", "{llama}", "--out", "{out}"], "nothing to prune")
case("prune-mlp-zero", ["prune", "{llama}", "--mlp", "0", "--out", "{out}"], "nothing to prune")
case(
    "prune-all-zero",
    ["prune", "{llama}", "--mlp", "0", "--heads", "0", "--layers", "0", "--out", "{out}"],
    "nothing to prune",
)
case("distill-temperature-1e-8", model_args("distill", "{llama}", ("--temperature", "1e-8")), "is below 0.05")
case("quantize-temperature-1e-8", model_args("quantize", "{llama}", ("--temperature", "1e-8")), "is below 0.05")
case(
    "quantize-skip-matching-nothing",
    model_args("quantize", "{llama}", ("--skip", "lm_haed")),
    "--skip 'lm_haed' matches no module",
)
case(
    "quantize-skip-glob-matching-nothing",
    model_args("quantize", "{llama}", ("--skip", "*.attention.*")),
    "matches no module",
)
case(
    "distill-student-larger-than-teacher",
    ["distill", "--teacher", "{llama}", "--student", "{gpt2}", "--steps", "1", *FAST, "--out", "{out}"],
    "more than the teacher",
)
case(
    "distill-spec-student-larger",
    model_args("distill", "{llama}", ("--student", "layers=8")),
    "larger than the teacher",
)
HUGE = str(2**70)
case("distill-steps-past-int64", model_args("distill", "{llama}", ("--steps", HUGE)), f"--steps {HUGE} is out of range")
case("distill-batch-size-past-int64", model_args("distill", "{llama}", ("--batch-size", HUGE)), "--batch-size")
case("distill-max-length-past-int64", model_args("distill", "{llama}", ("--max-length", HUGE)), "--max-length")
case("distill-negative-huge-steps", model_args("distill", "{llama}", ("--steps", "-" + HUGE)), "--steps")
for cmd in ("distill", "search-student", "prune", "quantize", "export", "bench"):
    case(
        f"{cmd}-seed-past-uint32",
        model_args(cmd, "{llama}", ("--seed", str(2**40))),
        "--seed 1099511627776 is out of range",
    )
case("prune-calib-batches-past-int64", model_args("prune", "{llama}", ("--calib-batches", HUGE)), "out of range")
case(
    "quantize-qat-steps-past-int64",
    model_args("quantize", "{llama}", ("--qat-steps", HUGE, "--teacher", "{llama}")),
    "out of range",
)
case("search-candidates-past-int64", model_args("search-student", "{llama}", ("--candidates", HUGE)), "out of range")
case("export-opset-past-int64", model_args("export", "{llama}", ("--format", "onnx", "--opset", HUGE)), "out of range")
case("bench-repeats-past-int64", model_args("bench", "{llama}", ("--repeats", HUGE)), "out of range")


def _paths_in(argv: list[str]) -> list[Path]:
    return [Path(a) for a in argv if a.startswith("/") and Path(a).exists() and not a.startswith(("/proc", "/sys"))]


def _check_clean_failure(code: int, err: str, expect: str) -> None:
    assert code == 1, err
    assert "Traceback" not in err and "distillkit bug" not in err, err
    lines = err.splitlines()
    errors = [i for i, ln in enumerate(lines) if ln.startswith("error:")]
    hints = [i for i, ln in enumerate(lines) if ln.startswith("hint:")]
    assert len(errors) == 1, err
    assert len(hints) <= 1 and all(h == errors[0] + 1 for h in hints), err
    assert expect in lines[errors[0]], err


def _run_case(argv: list[str], world: dict[str, str], tmp_path: Path, capsys, monkeypatch, stdin=None):
    outs = tmp_path / "outs"
    outs.mkdir()
    out = outs / "result"
    argv = [a.format(out=out, **world) for a in argv]
    monkeypatch.chdir(tmp_path)  # a stray relative write would land here and be seen
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", stdin)
    inputs = _paths_in(argv)
    before = {p: _hash_tree(p) for p in inputs}
    code = main(argv)
    err = capsys.readouterr().err
    assert not out.exists()
    assert sorted(os.listdir(outs)) == [], "a temporary or partial sibling was left behind"
    assert sorted(os.listdir(tmp_path)) == ["outs"]
    for p in inputs:
        assert _hash_tree(p) == before[p], f"{p} changed"
    return code, err


@pytest.mark.parametrize(("argv", "expect", "stdin"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_error(argv, expect, stdin, world, tmp_path, capsys, monkeypatch):
    if isinstance(stdin, bytes):  # a terminal or pipe in a UTF-8 locale decodes strictly
        stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8", errors="strict")
    elif stdin is not None:
        stdin = io.StringIO(stdin)
    code, err = _run_case(argv, world, tmp_path, capsys, monkeypatch, stdin)
    _check_clean_failure(code, err, expect)


def test_the_table_covers_every_command_with_many_cases():
    assert len(CASES) >= 80
    per_command = {cmd: sum(1 for _, argv, _, _ in CASES if argv[0] == cmd) for cmd in COMMANDS}
    assert min(per_command.values()) >= 10, per_command


# --- a full disk: the stage runs to its final write, which fails with ENOSPC ------------------------------------

FULL_DISK = [
    ("prune", ["prune", "{llama}", *PRUNE, "--data", "{text_txt}", "--out", "{out}"]),
    ("quantize", ["quantize", "{llama}", *QUANTIZE, "--data", "{text_txt}", "--out", "{out}"]),
    ("export", ["export", "{llama}", "--out", "{out}"]),
    ("distill", ["distill", "--teacher", "{llama}", *DISTILL, "--data", "{text_txt}", "--out", "{out}"]),
    ("search-student", ["search-student", "{llama}", *SEARCH, "--data", "{text_txt}", "--out", "{out}"]),
]


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.safetensors")


@pytest.mark.parametrize(("argv",), [(a,) for _, a in FULL_DISK], ids=[c for c, _ in FULL_DISK])
def test_a_full_disk_is_a_clean_error_and_leaves_nothing(argv, world, tmp_path, capsys, monkeypatch):
    import distillkit.manifest as mf

    monkeypatch.setattr(mf, "write_manifest", _disk_full)  # every stage's last write, inside its atomic artifact
    code, err = _run_case(argv, world, tmp_path, capsys, monkeypatch)
    _check_clean_failure(code, err, "no space left on the device while writing model.safetensors")


def test_a_full_disk_inside_a_library_error_is_recognised(world, tmp_path, capsys, monkeypatch):
    """safetensors reports ENOSPC in its own exception type, with only the OS error's text."""
    from safetensors import SafetensorError

    import distillkit.manifest as mf

    def fail(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(mf, "write_manifest", fail)
    code, err = _run_case(["export", "{llama}", "--out", "{out}"], world, tmp_path, capsys, monkeypatch)
    _check_clean_failure(code, err, "no space left on the device")


def test_a_full_disk_writing_the_bench_report(world, tmp_path, capsys, monkeypatch):
    import distillkit.bench.report as report

    monkeypatch.setattr(report, "write_report", _disk_full)
    code, err = _run_case(model_args("bench", "{llama}"), world, tmp_path, capsys, monkeypatch)
    _check_clean_failure(code, err, "no space left on the device")


# --- what goes on, loudly -------------------------------------------------------------------------------------


def test_auto_map_without_trust_remote_code_says_what_was_ignored(world, tmp_path, capsys):
    d = _copy(world["llama"], tmp_path / "custom")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    code = main(["export", str(d), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1, err
    assert "auto_map: AutoConfig, AutoModelForCausalLM" in warnings[0]
    assert "not used without --trust-remote-code" in warnings[0] and "built-in llama" in warnings[0]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"


def test_gqa_head_ratio_rounds_to_whole_groups_and_says_so(world, tmp_path, capsys):
    """4 query heads over 2 key/value groups: --heads 0.25 asks for 3, which no grouping holds; 2 are kept."""
    out = tmp_path / "out"
    code = main(["prune", world["llama"], "--heads", "0.25", *FAST, "--calib-batches", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "keeping 2 heads" in warnings[0] and "would keep 3 of the 4" in warnings[0], err
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2, 1)
    manifest = json.loads((out / "distillkit.json").read_text())
    assert manifest["extra"]["notes"] == [warnings[0].removeprefix("warning: ")]


def test_gqa_head_rounding_prefers_the_nearest_valid_count():
    from distillkit.prune.engine import _round_heads

    # 32 heads over 8 groups of 4: a count is valid if a multiple of 4 (whole groups) or of 8 (per group)
    assert _round_heads(32, 8, 0.2, 26, "auto") == 24  # 25.6 -> 24 (28 is further)
    assert _round_heads(32, 8, 0.1, 29, "auto") == 28
    assert _round_heads(32, 8, 0.3, 22, "per-group") == 24  # multiples of 8 only
    assert _round_heads(32, 8, 0.5, 16, "auto") == 16  # already valid: unchanged
    assert _round_heads(4, 2, 0.25, 3, "auto") == 2  # a tie (2 or 4) removes heads rather than none
    assert _round_heads(4, 2, 0.25, 3, "groups") == 2
