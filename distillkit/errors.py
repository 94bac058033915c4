"""Errors a user can act on.

Everything a user can get wrong is raised as a :class:`DistillkitError` subclass deep in the code
and turned into a one-line ``error: ...`` message plus hint and exit code 1 in exactly one place,
:func:`distillkit.cli.app.main`. The message says what is wrong; the hint says what to do.
"""

from __future__ import annotations

import sys


def warn(message: str) -> None:
    """One loud ``warning: ...`` line on stderr: something asked for was changed or ignored, and the run goes on."""
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()


class DistillkitError(Exception):
    """Base class of every error that is the user's to fix (exit code 1)."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(DistillkitError):
    """A value or combination of options that cannot work (out of range, malformed spec)."""


class ModelError(DistillkitError):
    """A model that cannot be loaded or used as asked (missing, not a model, pickle, vocab mismatch)."""


class DataError(DistillkitError):
    """Data that cannot be read or used (missing file, empty, no text column)."""


class OutputError(DistillkitError):
    """An output location that cannot be written (exists without --overwrite, not writable)."""


class TrainingError(DistillkitError):
    """Training that cannot go on (a non-finite loss)."""


class OfflineError(DistillkitError):
    """A hub id was given while the hub cannot be reached."""


class DependencyError(DistillkitError):
    """An optional dependency is needed for what was asked."""
