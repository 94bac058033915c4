"""The layering of the package stays as designed: imports only point down, no cycles, no private names across modules.

Layers, top to bottom (an import may only point to its own layer or a lower one)::

    cli/                               flags -> config, one call into an engine, manifest out
    stage engines                      distill/ search/ prune/ quantize/ export/ bench/
    shared parts                       models/ data/ manifest config registry attention progress evaluate presets
    kernels/, errors.py                import nothing above them (kernels/ is distillkit/kernels/)

The walk reads the source with ``ast`` (nothing is imported), so imports inside functions count as much as those at
the top of a file.

ALLOWLIST holds the violations that remain in code being reworked elsewhere, each with its reason. The list only
shrinks: an entry whose violation is gone fails the test until it is deleted.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]

# Layer of each top-level unit of the package (a subpackage or a module directly under distillkit/); higher = above.
CLI, STAGE, SHARED, BASE = 4, 3, 2, 1
LAYER_NAMES = {CLI: "cli", STAGE: "stage engine", SHARED: "shared part", BASE: "kernels/errors"}
LAYERS: dict[str, int] = {
    # The package's own face: public verbs that call the engines lazily. Its module level defines only metadata.
    "distillkit": CLI,
    "cli": CLI,
    "distill": STAGE,
    "search": STAGE,
    "prune": STAGE,
    "quantize": STAGE,
    "export": STAGE,
    "bench": STAGE,
    "models": SHARED,
    "data": SHARED,
    "manifest": SHARED,
    "config": SHARED,
    "registry": SHARED,
    "attention": SHARED,
    "progress": SHARED,
    "evaluate": SHARED,
    "presets": SHARED,
    "kernels": BASE,
    "errors": BASE,
}

# Package metadata every layer may read from the root package: its module level imports nothing (checked below).
ROOT_METADATA = {"__version__"}

# (kind, importer, imported[:name]) -> why it is still there. Kinds: "upward", "private", "cycle" (cycle entries name
# the sorted modules of one cycle joined by " "). Only violations in code that is being reworked elsewhere belong here.
ALLOWLIST: dict[tuple[str, str, str], str] = {}  # empty: the package has no violation left


def _module_files() -> dict[str, Path]:
    """Module name -> source file, for distillkit/ and the folders pyproject maps into it."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir: dict[str, str] = pyproject["tool"]["setuptools"]["package-dir"]
    files: dict[str, Path] = {}
    for package, folder in package_dir.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            files[".".join([package, *parts])] = path
    return files


def _unit(module: str) -> str:
    """The top-level unit that decides a module's layer: ``distillkit.models.student`` -> ``models``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(files: dict[str, Path]) -> list[tuple[str, str, str | None, int]]:
    """(importer, imported module, imported name or None, line) for every import of one of our modules.

    A private attribute read through an imported module (``from distillkit.models import student``, then
    ``student._helper``) counts as an import of that name.
    """
    found = []
    for importer, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        modules: dict[str, str] = {}  # local name -> our module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = alias.name
                    while target and target not in files:
                        target = target.rpartition(".")[0]
                    if target:
                        found.append((importer, target, None, node.lineno))
                        if alias.asname:
                            modules[alias.asname] = target
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(importer, is_package, node.level, node.module)
                for alias in node.names:
                    if f"{source}.{alias.name}" in files:  # `from package import submodule`
                        found.append((importer, f"{source}.{alias.name}", None, node.lineno))
                        modules[alias.asname or alias.name] = f"{source}.{alias.name}"
                    elif source in files:
                        found.append((importer, source, alias.name, node.lineno))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in modules
                and node.attr.startswith("_")
            ):
                found.append((importer, modules[node.value.id], node.attr, node.lineno))
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _layer_name(module: str) -> str:
    return LAYER_NAMES.get(LAYERS.get(_unit(module), 0), "unlayered")


def violations(files: dict[str, Path] | None = None, root: Path = ROOT) -> dict[tuple[str, str, str], str]:
    """Every violation of the layering, keyed like ALLOWLIST, with where it is."""
    files = _module_files() if files is None else files
    found: dict[tuple[str, str, str], str] = {}
    edges: dict[str, set[str]] = defaultdict(set)
    for importer, target, name, line in _imports(files):
        where = f"{files[importer].relative_to(root)}:{line}"
        if target == "distillkit" and name in ROOT_METADATA:
            continue
        if target != importer:
            edges[importer].add(target)
        if LAYERS.get(_unit(target), 0) > LAYERS.get(_unit(importer), 0):
            found[("upward", importer, target)] = (
                f"{where}: {_layer_name(importer)} {importer} imports {_layer_name(target)} {target}"
            )
        if name and name.startswith("_") and not name.startswith("__") and target != importer:
            found[("private", importer, f"{target}:{name}")] = f"{where}: {importer} imports private {target}.{name}"
    for component in _cycles(edges):
        found[("cycle", component[0], " ".join(component))] = f"import cycle: {' <-> '.join(component)}"
    return found


def _report(title: str, lines: list[str]) -> str:
    return title + "\n" + "\n".join(f"  {ln}" for ln in sorted(lines))


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _module_files()}
    missing = sorted(units - set(LAYERS))
    assert not missing, (
        f"no layer for {missing}: add each to LAYERS in {Path(__file__).name} (see the layer order at its top)"
    )


def test_the_root_package_imports_nothing_at_import_time():
    """Every layer may read ``distillkit.__version__`` only because the root module's body imports none of ours."""
    tree = ast.parse((ROOT / "distillkit" / "__init__.py").read_text())
    ours = [
        n.lineno
        for n in tree.body
        if isinstance(n, ast.Import | ast.ImportFrom)
        and (
            n.level
            or any(a.name.startswith("distillkit") for a in getattr(n, "names", []))
            or (getattr(n, "module", None) or "").startswith("distillkit")
        )
    ]
    assert not ours, f"distillkit/__init__.py imports distillkit modules at import time (lines {ours})"


def test_imports_point_down_without_cycles_or_private_names():
    found = violations()
    new = {k: v for k, v in found.items() if k not in ALLOWLIST}
    gone = [k for k in ALLOWLIST if k not in found]
    message = []
    if new:
        message.append(_report(f"{len(new)} layering violation(s):", list(new.values())))
    if gone:
        message.append(
            _report(
                "allowlisted violation(s) no longer exist; delete them from ALLOWLIST:", [" | ".join(k) for k in gone]
            )
        )
    assert not message, "\n".join(message)


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    """On a small made-up package: a lazy upward import, relative-import and lazy cycles, and private names taken
    both by ``from m import _x`` and by ``m._x`` are found; reading ``distillkit.__version__`` and importing
    downwards are not violations."""
    sources = {
        "distillkit/__init__.py": '__version__ = "0"\n',
        "distillkit/models/__init__.py": "",
        "distillkit/models/a.py": "def f():\n    from distillkit.prune.engine import run\n",
        "distillkit/models/b.py": "from . import c\n",
        "distillkit/models/c.py": "from .b import thing\n",
        "distillkit/prune/__init__.py": "",
        "distillkit/prune/engine.py": (
            "from distillkit import __version__\n"
            "from distillkit.errors import E\n"
            "from distillkit.models import a\n"
            "from distillkit.models.a import _helper\n"
            "x = a._hidden\n"
        ),
        "distillkit/errors.py": "",
        "distillkit/kernels/k/naive.py": "from distillkit.errors import E\n",
    }
    files = {}
    for rel, text in sources.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        files[".".join(p for p in Path(rel).with_suffix("").parts if p != "__init__")] = path
    assert set(violations(files, tmp_path)) == {
        ("upward", "distillkit.models.a", "distillkit.prune.engine"),
        ("private", "distillkit.prune.engine", "distillkit.models.a:_helper"),
        ("private", "distillkit.prune.engine", "distillkit.models.a:_hidden"),
        ("cycle", "distillkit.models.a", "distillkit.models.a distillkit.prune.engine"),
        ("cycle", "distillkit.models.b", "distillkit.models.b distillkit.models.c"),
    }


def test_kernels_are_walked_as_distillkit_kernels():
    files = _module_files()
    assert files["distillkit.kernels.kd_loss.naive"] == ROOT / "distillkit" / "kernels" / "kd_loss" / "naive.py"
    assert files["distillkit.models.student"] == ROOT / "distillkit" / "models" / "student.py"
    assert _resolve("distillkit.kernels.kd_loss", True, 1, "naive") == "distillkit.kernels.kd_loss.naive"
    assert _resolve("distillkit.prune.engine", False, 2, "models.student") == "distillkit.models.student"


if __name__ == "__main__":
    for key, text in sorted(violations().items()):
        print(f"{'ALLOWED ' if key in ALLOWLIST else ''}{text}")
