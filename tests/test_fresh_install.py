"""A new user works from the clone root: nothing in the repository may shadow a package a dependency imports there.

transformers imports the PyPI package ``kernels``; distillkit's own kernels live in ``distillkit/kernels/`` and the test
folders are named ``tests/test_*``, so nothing in the repository can be found under a top-level name instead.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_from_root(*args: str) -> subprocess.CompletedProcess:
    """Run Python in the clone root as a user would: the working directory first on ``sys.path``, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_kernels_resolves_to_the_installed_package_from_the_clone_root():
    code = (
        "import transformers, kernels; from transformers import AutoModel; import distillkit; "
        "import distillkit.kernels.kd_loss as kd; print(kernels.__file__); print(kd.__file__)"
    )
    done = run_from_root("-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    kernels_file, kd_file = (Path(line).resolve() for line in done.stdout.splitlines()[:2])
    dist = importlib.metadata.distribution("kernels")
    installed = Path(dist.locate_file("kernels")).resolve()
    assert kernels_file == installed / "__init__.py"
    # the file is one the installed distribution records (its RECORD), whatever folder the venv lives in (the README
    # puts it at .venv inside the clone): nothing of the repository's own answers for `kernels`
    assert any(Path(dist.locate_file(f)).resolve() == kernels_file for f in dist.files or ())
    assert ROOT / ".venv" in kernels_file.parents or ROOT not in kernels_file.parents
    assert ROOT / "kernels" not in kernels_file.parents and ROOT / "distillkit" not in kernels_file.parents
    # distillkit's own kernels come from distillkit/kernels/ (editable install) or site-packages
    assert kd_file.parent.name == "kd_loss" and kd_file.parent.parent.name == "kernels"
    assert kd_file.parent.parent.parent.name == "distillkit"


def test_find_spec_from_the_clone_root_is_the_installed_kernels():
    # transformers decides whether `kernels` is available with importlib.util.find_spec: a folder of the repository
    # (even one without __init__.py, as a namespace package) must never answer for it
    assert not (ROOT / "kernels").exists()
    done = run_from_root("-c", "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin)")
    assert done.returncode == 0, done.stderr[-2000:]
    installed = Path(importlib.metadata.distribution("kernels").locate_file("kernels")).resolve()
    assert Path(done.stdout.strip()).resolve() == installed / "__init__.py"


def test_python_dash_m_from_the_clone_root():
    done = run_from_root("-m", "distillkit.cli.app", "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "search-student" in done.stdout


def test_no_repository_folder_shadows_an_installed_top_level_name():
    # A folder with __init__.py directly under the root would win over an installed package of the same name; so
    # would one directly under tests/, which pytest puts on sys.path.
    installed = set(importlib.metadata.packages_distributions())
    assert "kernels" in installed  # the name this test exists for: transformers depends on it
    top = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"distillkit"}
    under_tests = {p.parent.name for p in (ROOT / "tests").glob("*/__init__.py")}
    assert "kernels" not in top | under_tests
    assert not (top | under_tests) & installed, (top | under_tests) & installed
    assert under_tests and all(name.startswith("test_") for name in under_tests), under_tests
