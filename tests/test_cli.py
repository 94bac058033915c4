import subprocess
import sys

from distillkit import __version__
from distillkit.cli.app import main


def _run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_and_help_stay_torch_free():
    r = _run_py(
        "import sys, distillkit\n"
        "assert 'torch' not in sys.modules, 'import distillkit pulled in torch'\n"
        "from distillkit.cli.app import main\n"
        "code = main(['--help'])\n"
        "assert code == 0\n"
        "assert 'torch' not in sys.modules, '--help pulled in torch'\n"
        "assert 'transformers' not in sys.modules\n"
        "code = main(['distill', '--help'])\n"
        "assert code == 0\n"
        "assert 'torch' not in sys.modules, 'distill --help pulled in torch'\n"
    )
    assert r.returncode == 0, r.stderr
    assert "distill" in r.stdout


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"distillkit {__version__}"


def test_distill_help_lists_registered_losses(capsys):
    from distillkit.registry import LOSSES

    assert main(["distill", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for name in LOSSES.names():
        assert name in out


def test_usage_error_is_exit_2(capsys):
    assert main(["distill", "--teacher", "x", "--steps", "notanint"]) == 2


def test_known_error_is_one_line_exit_1(capsys, tmp_path):
    code = main(["distill", "--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ")
    assert "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    assert not (tmp_path / "o").exists()
