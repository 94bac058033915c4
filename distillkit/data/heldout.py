"""Held-out text for quality measures: ``--eval-data`` of ``distill`` and ``bench``.

A held-out set is a list of texts, one record each, never trained on: the user's own file (any format ``--data``
reads; its text column is detected) or an embedded corpus (``builtin:quotes``, ``builtin:docstrings``,
``builtin:english``). ``None``/``"none"`` means no held-out evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

from distillkit.errors import DataError

# Pairwise measures over N records cost N^2 memory; more records than this are cut (in file order) and the
# manifest says how many were used.
MAX_RECORDS = 2000
MIN_RECORDS = 8


@dataclass(frozen=True)
class HeldOut:
    texts: list[str]
    source: str
    description: str
    n_read: int

    def info(self) -> dict:
        return {
            "source": self.source,
            "description": self.description,
            "records": len(self.texts),
            "records_read": self.n_read,
        }


def is_none(spec: str | None) -> bool:
    return spec is None or spec.strip().lower() in ("", "none")


def read_heldout(spec: str, text_column: str | None = None) -> HeldOut:
    """Read the held-out texts ``spec`` names (a path or ``builtin:NAME``); at most :data:`MAX_RECORDS`."""
    from distillkit.data.corpus import BUILTIN, builtin_name, load_builtin

    name = builtin_name(spec)
    if name is not None:
        texts = load_builtin(name)
        source, description = spec, BUILTIN[name][2]
    else:
        from distillkit.data.prepare import detect_text_column
        from distillkit.data.sources import DataSpec, read_raw

        raw = read_raw(DataSpec(data=spec, eval_split=0.0, text_column=text_column))
        if raw.kind in ("imagefolder", "hub"):
            raise DataError(
                f"--eval-data {spec} is not a local text file",
                hint="pass a .txt/.jsonl/.csv/.parquet file of held-out text, or builtin:quotes",
            )
        column = detect_text_column(raw.train, text_column)
        texts = [str(t) for t in raw.train[column] if isinstance(t, str) and t.strip()]
        source, description = raw.source, f"{raw.fmt or raw.kind} file, column {column!r}"
    n_read = len(texts)
    if n_read < MIN_RECORDS:
        raise DataError(
            f"--eval-data {spec} holds {n_read} non-empty records; held-out measures need at least {MIN_RECORDS}",
            hint="give a held-out file with more lines (a few hundred or more make stable numbers)",
        )
    return HeldOut(texts[:MAX_RECORDS], source, description, n_read)
