"""The ``distillkit`` command: registers the implemented subcommands and maps errors to exit codes.

Exit codes: 0 success, 1 a known error (one ``error: ...`` line and a hint on stderr), 2 usage
error, 130 interrupted. ``DISTILLKIT_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Annotated

import typer

from distillkit import __version__
from distillkit.errors import DistillkitError


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"distillkit {__version__}\n")
        raise typer.Exit()


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="distillkit",
        help="Compress Hugging Face models: distill a student from a teacher and measure it.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )

    @app.callback()
    def root(
        version: Annotated[
            bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
        ] = False,
    ) -> None:
        """distillkit: one CLI for distillation, and the artifacts that chain its stages."""

    from distillkit.cli import bench, distill, export, prune, quantize, search_student

    for module in (distill, search_student, prune, quantize, export, bench):
        module.register(app)
    return app


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(Exit, ClickException, Abort) classes: Typer >= 0.25 vendors its own click, older Typer uses click."""
    exits: list[type] = [typer.Exit]
    usage: list[type] = []
    aborts: list[type] = [typer.Abort]
    mods = []
    try:
        from typer._click import exceptions as vendored

        mods.append(vendored)
    except ImportError:
        pass
    try:
        import click.exceptions as upstream

        mods.append(upstream)
    except ImportError:
        pass
    for m in mods:
        exits.extend(c for c in (getattr(m, "Exit", None),) if c is not None)
        usage.append(m.ClickException)
        aborts.extend(c for c in (getattr(m, "Abort", None),) if c is not None)
    return tuple(exits), tuple(usage), tuple(aborts)


def _fail(message: str, hint: str | None, code: int = 1) -> int:
    sys.stderr.write(f"error: {message}\n")
    if hint:
        sys.stderr.write(f"hint: {hint}\n")
    return code


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _known_failure(e: BaseException) -> tuple[str, str] | None:
    """(message, hint) for an exception that is the machine's or a file's fault, not distillkit's: a full disk,
    a read-only or forbidden path, a weights file that cannot be parsed. None for anything else."""
    chain = _chain(e)
    for x in chain:
        # torch.save and safetensors wrap the OS error in their own exception and keep only its text
        text = str(x)
        full = (isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
            s in text for s in ("No space left on device", "StorageFull", "Disk quota exceeded")
        )
        if full:
            where = f" while writing {x.filename}" if isinstance(x, OSError) and x.filename else ""
            return (
                f"no space left on the device{where}",
                "free disk space or pass --out on a disk with room; the unfinished output was removed",
            )
    for x in chain:
        if isinstance(x, OSError) and x.errno == errno.EROFS:
            return f"read-only file system: {x.filename}", "pass --out in a writable directory"
        if isinstance(x, OSError) and x.errno in (errno.EACCES, errno.EPERM) and x.filename:
            return f"permission denied: {x.filename}", "check that path's permissions, or pass --out elsewhere"
    if type(e).__name__ == "SafetensorError":
        first = (str(e).strip().splitlines() or ["unreadable"])[0]
        return (
            f"a weights file is not valid safetensors: {first}",
            "the file is truncated or corrupt (an interrupted download or copy?): fetch or copy it again",
        )
    return None


def _quiet_libraries() -> None:
    """stderr belongs to distillkit's own progress and tables: silence the libraries' bars and advice."""
    for var, value in (
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(var, value)
    from distillkit.progress import silence_library_noise

    silence_library_noise()


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    debug = os.environ.get("DISTILLKIT_DEBUG", "") not in ("", "0")
    exit_types, usage_types, abort_types = _click_exceptions()
    app = build_app()
    try:
        rv = app(args=argv, prog_name="distillkit", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
        if code == 130:  # outside standalone mode Typer turns Ctrl-C into a returned 130, not a raised Exit
            sys.stderr.write("interrupted\n")
    except DistillkitError as e:
        if debug:
            traceback.print_exc()
        code = _fail(e.message, e.hint, e.exit_code)
    except exit_types as e:
        code = e.exit_code
        if code == 130:  # Typer turns Ctrl-C into a silent Exit(130)
            sys.stderr.write("interrupted\n")
    except usage_types as e:
        e.show()
        code = e.exit_code
    except (KeyboardInterrupt, *abort_types):
        sys.stderr.write("interrupted\n")
        code = 130
    except MemoryError:
        code = _fail("out of memory", "lower --batch-size or --max-length, or use --grad-accum")
    except Exception as e:  # noqa: BLE001 - the one place that turns unknown errors into exit codes
        known = _known_failure(e)
        if known is not None:
            if debug:
                traceback.print_exc()
            code = _fail(*known)
        elif type(e).__name__ == "OutOfMemoryError":
            code = _fail(
                f"out of GPU memory: {str(e).splitlines()[0]}",
                "lower --batch-size or --max-length, or use --grad-accum",
            )
        else:
            traceback.print_exc()
            code = _fail(
                f"internal error: {type(e).__name__}: {e}",
                "this is a distillkit bug; please report it with the traceback above",
            )
    # a stage that failed before its atomic write still holds the lock on its --out: it ends with the command
    from distillkit.manifest import release_outputs

    release_outputs()
    sys.stdout.flush()
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
