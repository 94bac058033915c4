"""How ``bench`` measures: timing with device sync, peak memory, weight bytes on disk, and the machine a run was on.

Shared by the model benchmark (``engine``) and the diffusion benchmark (``diffusion``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from distillkit import __version__
from distillkit import manifest as mf

SAMPLE_EVERY_S = 0.002
MEMORY_METHODS = {
    "cuda": "cuda_max_allocated: torch.cuda.max_memory_allocated above the pre-load baseline (tensors only)",
    "cpu": "rss_sampled: peak resident set size above the pre-load baseline, sampled every 2 ms",
}


def sync_device(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def trim_heap() -> None:
    """Give freed heap back to the OS so the next model's RSS baseline is honest (glibc only)."""
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory growth in bytes inside a ``with`` block (see the module docstring for the method)."""

    def __init__(self, device: Any):
        self.device = device
        self.peak = 0
        self.method = MEMORY_METHODS["cuda" if device.type == "cuda" else "cpu"]
        self._base = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            base = _rss_bytes()
            if base is None:  # no /proc (macOS): fall back to the high-water mark, a lower bound
                import resource

                self.method = "ru_maxrss: growth of the process's peak RSS (a lower bound)"
                scale = 1 if sys.platform == "darwin" else 1024
                self._read = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
                base = self._read()
            else:
                self._read = _rss_bytes
            self._base = self._high = base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._high = max(self._high, self._read() or 0)
            self._stop.wait(SAMPLE_EVERY_S)

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._high = max(self._high, self._read() or 0)
            self.peak = max(0, self._high - self._base)


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def timed(fn: Any, device: Any, warmup: int, repeats: int, tick: Any = None) -> list[float]:
    """Wall-clock milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones.

    ``tick()`` (progress) runs after every call, outside the timed span.
    """
    tick = tick or (lambda: None)
    for _ in range(warmup):
        fn()
        tick()
    sync_device(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        times.append((time.perf_counter() - t0) * 1000.0)
        tick()
    return times


def weight_file_bytes(path: str) -> int | None:
    """Bytes of the weight files of a local model directory (recursively), None for a hub id."""
    p = Path(path)
    if not p.is_dir():
        return None
    return sum(
        _pt2_payload_bytes(f) if f.suffix == ".pt2" else f.stat().st_size
        for f in p.rglob("*")
        if f.is_file()
        and f.suffix in mf.WEIGHT_SUFFIXES
        and not any(part.startswith(".") for part in f.relative_to(p).parts)
    )


def _pt2_payload_bytes(path: Path) -> int:
    """The tensor bytes inside a ``.pt2`` archive (its ``data/`` entries).

    The archive also holds the serialized graph (a JSON description of every op, often larger than a small model's
    weights), which is code, not weights: counting it made a torch.export artifact of a 4-bit model look bigger than
    the float model it came from."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            payload = sum(
                i.file_size
                for i in z.infolist()
                if "/data/" in f"/{i.filename}" and not i.is_dir() and not i.filename.endswith(".json")
            )
    except (OSError, zipfile.BadZipFile):
        return path.stat().st_size
    return payload or path.stat().st_size


def software_versions() -> dict[str, str]:
    import torch

    versions = {"distillkit": __version__, **mf.environment()}
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
    return versions


def device_name(device: Any) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def check_writable(path: str) -> None:
    """Fail before the measurements, not after them, when a --plot / --out file cannot be written."""
    from distillkit.errors import OutputError

    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise OutputError(f"{p} is a directory", hint="pass a file name")
    probe = p.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {probe}", hint="choose a writable location")
