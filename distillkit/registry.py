"""Name -> implementation registries.

A method (a loss, an importance, a scheme, a proxy score) is one class or function plus one
decorator. CLI choices and ``--help`` text come from here, so the modules that register must
stay importable without torch: they import torch inside functions.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from distillkit.errors import ConfigError


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    help: str
    meta: dict[str, Any] = field(default_factory=dict)


class Registry:
    """A named collection of implementations.

    ``modules`` are imported on first lookup so that the decorators in them have run; keeping
    them torch-free at import time keeps ``--help`` fast.
    """

    def __init__(self, kind: str, modules: tuple[str, ...] = ()):
        self.kind = kind
        self._modules = modules
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    def register(self, name: str, *, help: str = "", **meta: Any) -> Callable[[Any], Any]:
        def decorator(obj: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = help or ((obj.__doc__ or "").strip().splitlines() or [""])[0]
            self._entries[name] = Entry(name, obj, doc, dict(meta))
            return obj

        return decorator

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._modules:
                importlib.import_module(module)

    def get(self, name: str) -> Entry:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}",
                hint=f"choose one of: {', '.join(self.names())}",
            ) from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        self._load()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def help_text(self) -> str:
        """One line per entry, for ``--help``."""
        return "; ".join(f"{e.name}: {e.help}" if e.help else e.name for e in self)


LOSSES = Registry("loss", modules=("distillkit.distill.losses",))
IMPORTANCES = Registry("importance", modules=("distillkit.prune.importance",))
SCORES = Registry("score", modules=("distillkit.search.scores",))
SCHEMES = Registry("quantization scheme", modules=("distillkit.quantize.schemes",))
