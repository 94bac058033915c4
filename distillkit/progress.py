"""Progress of long loops, on stderr, readable on a terminal and in a log.

Every long loop (distillation and QAT steps, GPTQ layers, calibration batches, benchmark runs, search
candidates, teacher sampling) reports through :class:`Progress` or :func:`track`:

- on a terminal (rich's notion of one, so ``FORCE_COLOR``/``TTY_COMPATIBLE`` apply) it is a rich bar;
- otherwise (a log file, CI, ``2>file``, a pipe) a rich bar prints nothing until it ends, so a 30-minute GPTQ
  run would be silent. There it prints plain lines instead, e.g.
  ``distill: step 120/2000 (6%) 3.1 it/s eta 10m06s loss 2.3141``: the first item, the last, and in between
  at most one line every ``DISTILLKIT_PROGRESS_INTERVAL`` seconds (default 10; 0 prints every item).

Nothing goes to stdout, which carries only the manifest line. Bars opened while another is live on the
terminal join it as an extra row, since rich allows one live display at a time.

:func:`silence_library_noise` quiets third-party messages a user cannot act on; the CLI calls it first.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar

from distillkit.errors import ConfigError

T = TypeVar("T")

INTERVAL_ENV = "DISTILLKIT_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0

# The one live rich Progress on the terminal (None when no bar is showing) and how many bars share it.
_live: Any = None
_live_users = 0


def interval_s() -> float:
    """Seconds between plain progress lines: ``DISTILLKIT_PROGRESS_INTERVAL`` or 10."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also rejects nan
        raise ConfigError(
            f"{INTERVAL_ENV}={raw!r} is not a number of seconds >= 0",
            hint=f"set {INTERVAL_ENV} to e.g. 10 (0 prints a line for every step), or unset it",
        )
    return value


def format_duration(seconds: float) -> str:
    """``5s``, ``10m05s``, ``2h03m``: short and fixed-order, for ETAs in log lines."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_line(label: str, unit: str, done: int, total: int | None, rate: float | None, info: str = "") -> str:
    """One plain progress line: ``distill: step 120/2000 (6%) 3.1 it/s eta 10m06s loss 2.31``.

    ``rate`` is items per second (None before it can be measured); slow loops read better as seconds per item.
    """
    parts = [f"{label}: {unit} {done}/{total} ({100 * done / total:.0f}%)" if total else f"{label}: {unit} {done}"]
    if rate is not None and rate > 0:
        parts.append(f"{rate:.1f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/it")
        if total and done < total:
            parts.append(f"eta {format_duration((total - done) / rate)}")
    if info:
        parts.append(info)
    return " ".join(parts)


class _Lines:
    """Plain lines on stderr: the first update, the last item, and at most one line per ``interval`` between."""

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str,
        start: int,
        interval: float,
        clock: Callable[[], float],
        stream: TextIO | None,
    ):
        self.label, self.total, self.unit, self.start = label, total, unit, start
        self.interval, self.clock, self.stream = interval, clock, stream
        self.t0 = clock()
        self.last_print: float | None = None
        self.done, self.info, self.printed_done = start, "", None

    def update(self, done: int, info: str) -> None:
        self.done, self.info = done, info
        now = self.clock()
        last = self.total is not None and done >= self.total
        if self.last_print is None or last or now - self.last_print >= self.interval:
            self._print(now)

    def close(self) -> None:
        # a loop that stopped short of its total (early stop, a break) still shows where it ended
        if self.last_print is not None and self.printed_done != self.done:
            self._print(self.clock())

    def _print(self, now: float) -> None:
        elapsed = now - self.t0
        n = self.done - self.start
        rate = n / elapsed if n > 0 and elapsed > 0 else None
        stream = self.stream or sys.stderr  # looked up now, so redirection (and pytest's capture) is honoured
        stream.write(format_line(self.label, self.unit, self.done, self.total, rate, self.info) + "\n")
        stream.flush()
        self.last_print, self.printed_done = now, self.done


class Progress:
    """Progress of one loop of ``total`` items; a rich bar on a terminal, plain lines otherwise.

    ``with Progress("gptq", total=24, unit="layer") as p: ... p.update(i + 1, info="sqnr 31.2 dB")``.
    ``start`` is where a resumed loop begins (rates count only the items done in this run). ``enabled=False``
    shows nothing (e.g. on processes other than the main one). ``tty``, ``clock`` and ``stream`` are for tests.
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        unit: str = "step",
        start: int = 0,
        enabled: bool = True,
        transient: bool = False,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        stream: TextIO | None = None,
    ):
        self.label, self.total, self.unit, self.start = label, total, unit, start
        self.enabled, self.transient = enabled, transient
        self.tty, self.clock, self.stream = tty, clock, stream
        self.done = start
        self._lines: _Lines | None = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if not self.enabled:
            return self
        tty = self.tty if self.tty is not None else _stderr_is_terminal()
        if tty:
            self._open_bar()
        else:
            self._lines = _Lines(self.label, self.total, self.unit, self.start, interval_s(), self.clock, self.stream)
        return self

    def update(self, done: int, info: str = "") -> None:
        """``done`` items of ``total`` are finished; ``info`` is a short extra such as ``loss 2.31``."""
        self.done = done
        if self._lines is not None:
            self._lines.update(done, info)
        elif self._task is not None:
            _live.update(self._task, completed=done, info=info)

    def advance(self, n: int = 1, info: str = "") -> None:
        self.update(self.done + n, info)

    def __exit__(self, *exc: Any) -> None:
        if self._lines is not None:
            if exc[0] is None:
                self._lines.close()
            self._lines = None
        elif self._task is not None:
            self._close_bar()

    # the terminal: one shared rich Progress, one task per open bar

    def _open_bar(self) -> None:
        global _live, _live_users
        if _live is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            _live = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=self.transient,
            )
            _live.start()
        _live_users += 1
        self._task = _live.add_task(self.label, total=self.total, completed=self.start, info="")

    def _close_bar(self) -> None:
        global _live, _live_users
        if self.transient:
            _live.remove_task(self._task)
        self._task = None
        _live_users -= 1
        if _live_users == 0:
            _live.stop()
            _live = None


def track(
    items: Iterable[T],
    label: str,
    *,
    total: int | None = None,
    unit: str = "item",
    enabled: bool = True,
    transient: bool = False,
) -> Iterator[T]:
    """Iterate ``items`` with a :class:`Progress` (``total`` defaults to ``len(items)`` where it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(label, total, unit=unit, enabled=enabled, transient=transient) as p:
        for i, item in enumerate(items, 1):
            yield item
            p.update(i)


def stderr_console() -> Any:
    """A rich console on stderr, for tables and messages to people: stdout carries only the manifest line."""
    from rich.console import Console

    return Console(stderr=True)


def _stderr_is_terminal() -> bool:
    return stderr_console().is_terminal


# --------------------------------------------------------------------------------------------------------------
# Third-party noise


class _DropMessages(logging.Filter):
    """Drops log records whose unformatted message starts with one of ``prefixes``; keeps everything else."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# (logger name, message prefixes). Each entry is a message about the library's own optional speed-ups that
# changes nothing the user asked for and that they cannot act on from distillkit; real warnings from the
# same loggers still come through.
_NOISY_LOG_MESSAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # bitsandbytes on a CPU with avx512-bf16 tries to fetch a faster 4-bit GEMM from the hub at import time
    # and falls back to its own kernel when it cannot (offline, untrusted publisher) ...
    ("bitsandbytes.backends.cpu.ops", ("Failed to load CPU gemm_4bit_forward",)),
    # ... and offline, the `kernels` package says so first, for that one repository
    (
        "kernels._internals.hf_hub",
        ("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",),
    ),
)


def silence_library_noise() -> None:
    """Install targeted filters for third-party messages a distillkit user cannot act on (idempotent).

    Only named loggers and exact message prefixes are filtered, before the libraries are imported, so that
    every other warning still reaches stderr.
    """
    for name, prefixes in _NOISY_LOG_MESSAGES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.prefixes == prefixes for f in logger.filters):
            logger.addFilter(_DropMessages(*prefixes))
