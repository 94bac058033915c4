"""``distillkit bench --kernel``: dispatch and errors (the measurements themselves need a CUDA GPU)."""

from __future__ import annotations

import pytest
import torch

from distillkit.bench.kernels import KERNELS
from distillkit.cli.app import main


def _run(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_every_registered_kernel_benchmark_exists():
    import importlib

    for module, func, _ in KERNELS.values():
        assert callable(getattr(importlib.import_module(module), func))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_bench_without_cuda_says_so(name, capsys):
    code, out, err = _run(["bench", "--kernel", name], capsys)
    assert code == 1 and out == ""
    assert "needs a CUDA GPU" in err.splitlines()[0]


def test_unknown_kernel_and_models_with_kernel_are_refused(capsys):
    code, _, err = _run(["bench", "--kernel", "nope"], capsys)
    assert code == 1 and "unknown kernel 'nope'" in err and "kd-loss" in err
    code, _, err = _run(["bench", "some-model", "--kernel", "kd-loss"], capsys)
    assert code == 1 and "not models" in err
