"""Build the embedded default corpus ``corpus.txt.gz`` from the standard library's docstrings.

Run as ``python -m distillkit.data.build_corpus`` (``--check`` rebuilds in memory and compares with the file,
``--out PATH`` writes elsewhere). The result depends only on the Python build it runs on: modules are visited in
sorted order, members in ``dir()`` order, and the gzip header carries no timestamp or file name, so two runs on the
same interpreter give byte-identical files.

Docstrings are chosen because they are English prose that ships with every Python, carries no licence question
beyond the PSF licence of Python itself, and needs no download.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib
import inspect
import io
import pkgutil
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

CORPUS_PATH = Path(__file__).with_name("corpus.txt.gz")
MIN_PARAGRAPH_CHARS = 40
MIN_PARAGRAPH_WORDS = 6

# Top-level names never imported: GUI toolkits, test suites, the IDE, modules that print, open a browser or otherwise
# act when imported, packaging tools (ensurepip, venv) and modules that are data or C samples rather than prose.
_SKIP_TOP = frozenset(
    {
        "antigravity",
        "this",
        "idlelib",
        "tkinter",
        "turtle",
        "turtledemo",
        "lib2to3",
        "test",
        "tests",
        "ensurepip",
        "venv",
        "pydoc_data",
        "xxlimited",
        "xxlimited_35",
        "xxsubtype",
    }
)
# Sub-package parts that mean "tests" or generated boilerplate (the codec modules differ only in a file name).
_SKIP_PARTS = frozenset({"test", "tests", "idle_test", "__main__"})
_SKIP_PACKAGES_CHILDREN = frozenset({"encodings"})

_CODE_START = re.compile(
    r"^(>>>|\.\.\.|\$ |%|#|@|\||[-=~^*+]{3,}|:\w|\.\. )"
    r"|^(def|class|import|from|return|raise|yield|assert|with|try|except|lambda|print)\b(?!\s+(a|an|the)\b)"
)
_CODE_ANYWHERE = re.compile(
    r"==|!=|->|=>|<=|>=|\{|\}|;\s*$|\w\(\s*\)|\[\s*\]|^\w+(\.\w+)*\s*[-+*/]?=\s|\w\.\w+\(|\\n|::"
)
_SPACES = re.compile(r"\s+")
# Sphinx roles such as :func:`open` read better as plain `open`.
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`]*)`")


def _module_names() -> Iterator[str]:
    """Importable public stdlib module names, sorted, sub-modules included."""
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in _SKIP_TOP:
            continue
        module = _import_quietly(top)
        if module is None:
            continue
        yield top
        path = getattr(module, "__path__", None)
        if path is None or top in _SKIP_PACKAGES_CHILDREN:
            continue
        children = []
        # walk_packages would import packages itself (noisily); iterate level by level through our own importer.
        stack = [(top, list(path))]
        while stack:
            prefix, paths = stack.pop()
            for info in pkgutil.iter_modules(paths):
                if info.name.startswith("_") or info.name in _SKIP_PARTS:
                    continue
                full = f"{prefix}.{info.name}"
                children.append(full)
                if info.ispkg:
                    child = _import_quietly(full)
                    if child is not None and getattr(child, "__path__", None):
                        stack.append((full, list(child.__path__)))
        yield from sorted(children)


def _import_quietly(name: str):
    """Import ``name`` with stdout/stderr swallowed and warnings silenced; None when it cannot be imported."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except (Exception, SystemExit):  # a module that cannot be imported here is simply not harvested
            return None


def _docstrings(module) -> Iterator[str]:
    """The module docstring, then those of its public classes, functions, methods and properties defined in it."""
    name = module.__name__
    if isinstance(module.__doc__, str):
        yield module.__doc__
    for attr in dir(module):
        if attr.startswith("_"):
            continue
        try:
            obj = getattr(module, attr)
        except Exception:  # lazy attributes may fail to resolve; they have nothing to give
            continue
        if getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj):
            if isinstance(obj.__doc__, str):
                yield obj.__doc__
            for meth_name, meth in sorted(vars(obj).items()):
                if meth_name.startswith("_"):
                    continue
                func = meth.__func__ if isinstance(meth, (classmethod, staticmethod)) else meth
                if (inspect.isroutine(func) or isinstance(func, property)) and isinstance(func.__doc__, str):
                    yield func.__doc__
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            if isinstance(obj.__doc__, str):
                yield obj.__doc__


def _is_code_line(line: str) -> bool:
    s = line.strip()
    if not s:
        return False
    if _CODE_START.search(s) or _CODE_ANYWHERE.search(s):
        return True
    letters = sum(c.isalpha() or c.isspace() for c in s)
    return letters / len(s) < 0.8


def paragraphs(doc: str) -> list[str]:
    """Clean prose paragraphs of one docstring: dedented, code and doctest dropped, whitespace collapsed."""
    text = inspect.cleandoc(doc)
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        # Everything after the first prompt in a block is doctest input or its expected output.
        for i, line in enumerate(lines):
            if line.lstrip().startswith((">>>", "...")):
                lines = lines[:i]
                break
        # Indented lines are literal blocks, signatures or argument tables rather than running text. Only the prose
        # lines before the first such line are kept, and only when they end a sentence, so no sentence is cut short.
        for i, line in enumerate(lines):
            if line.startswith((" ", "\t")) or _is_code_line(line):
                lines = lines[:i]
                break
        para = _SPACES.sub(" ", _ROLE.sub(r"`\1`", " ".join(lines))).strip()
        if len(para) < MIN_PARAGRAPH_CHARS or len(para.split()) < MIN_PARAGRAPH_WORDS:
            continue
        if not para[0].isalpha() or not para.endswith((".", "!", "?")):
            continue
        out.append(para)
    return out


def build_corpus() -> list[str]:
    """All paragraphs, deduplicated, in first-seen order (modules sorted by name)."""
    seen: set[str] = set()
    corpus: list[str] = []
    # Reading the docstrings of deprecated aliases (typing.io, ...) warns; that is noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _module_names():
            module = sys.modules.get(name) or _import_quietly(name)
            if module is None:
                continue
            for doc in _docstrings(module):
                for para in paragraphs(doc):
                    if para not in seen:
                        seen.add(para)
                        corpus.append(para)
    return corpus


def encode(corpus: list[str]) -> bytes:
    """Gzip of one paragraph per line; ``mtime=0`` and no file name keep the bytes reproducible."""
    raw = ("\n".join(corpus) + "\n").encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    return buf.getvalue()


def describe(corpus: list[str]) -> str:
    words = sum(len(p.split()) for p in corpus)
    version = ".".join(map(str, sys.version_info[:3]))
    return (
        f"{len(corpus):,} English paragraphs ({words:,} words) of docstrings harvested from the Python {version} "
        "standard library, with doctests and code removed."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CORPUS_PATH, help="where to write the gzip file")
    parser.add_argument("--check", action="store_true", help="compare with the existing file instead of writing")
    args = parser.parse_args(argv)
    corpus = build_corpus()
    data = encode(corpus)
    raw_size = sum(len(p.encode()) + 1 for p in corpus)
    print(f"{len(corpus)} paragraphs, {raw_size:,} bytes raw, {len(data):,} bytes gzipped", file=sys.stderr)
    print(describe(corpus), file=sys.stderr)
    if args.check:
        same = args.out.is_file() and args.out.read_bytes() == data
        print("identical" if same else f"{args.out} differs from a fresh build", file=sys.stderr)
        return 0 if same else 1
    args.out.write_bytes(data)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
