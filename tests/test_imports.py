"""The package's layers, read from its own import statements (nothing is imported or run).

Every ``import`` and ``from ... import`` of every module counts, wherever it
stands: at module level, inside functions, under ``if TYPE_CHECKING:``.
``import ultrastyle.a.b`` and ``from ultrastyle.a.b import name`` are an
edge to module ``ultrastyle.a.b``; ``from ultrastyle.a import b`` is an edge
to ``ultrastyle.a.b`` where that is a module, else to the package
``ultrastyle.a``. Relative imports are resolved against the importing module.
(The package face, ``ultrastyle/__init__.py``, loads its public names lazily
through ``importlib``: no import statement, so no edge.)
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import ultrastyle

PACKAGE = Path(ultrastyle.__file__).resolve().parent
# What the pure core may import besides itself: the standard library, numpy and torch (the
# architecture description it works on, `core.arch`, is part of it).
CORE_THIRD_PARTY = {"numpy", "torch"}
CORE_SIBLINGS: set[str] = set()
PIPELINE = {"ultrastyle.runtime.tiled", "ultrastyle.runtime.batch", "ultrastyle.runtime.pairs", "ultrastyle.runtime.decode"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported module or package, line) of every import statement in ``path`` (any package, unresolved)."""
    is_package = path.name == "__init__.py"
    out = []
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    # `if TYPE_CHECKING:` imports never run: the package's own typed names (ultrastyle/__init__.py) are no edge.
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}  # fmt: skip
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package, up level - 1 packages
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names if f"{base}.{a.name}" in modules()]
    return out


@cache
def graph() -> dict[str, dict[str, int]]:
    """Module -> {module of this package it imports: first line}."""
    mods = modules()
    out: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        edges: dict[str, int] = {}
        for target, line in _imports(name, path):
            if target in mods and target != name:
                edges.setdefault(target, line)
        out[name] = edges
    return out


def strongly_connected(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or not (Tarjan), those of two or more."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        for n in sorted(g[m]):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            group = []
            while True:
                n = stack.pop()
                group.append(n)
                if n == m:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for m in sorted(g):
        if m not in index:
            visit(m)
    return out


def import_cycles(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest cycle per group of `strongly_connected` modules (the first module repeated at the end)."""
    cycles = []
    for group in strongly_connected(g):
        start, members = group[0], set(group)
        back: dict[str, str] = {}
        frontier = [start]
        while start not in back:  # breadth first, inside the group, until the start is reached again
            nxt = []
            for m in frontier:
                for n in sorted(g[m]):
                    if n in members and n not in back:
                        back[n] = m
                        nxt.append(n)
            frontier = nxt
        cycle = [start]
        while len(cycle) == 1 or cycle[-1] != start:
            cycle.append(back[cycle[-1]])
        cycles.append(cycle[::-1])
    return cycles


def _describe(cycle: list[str]) -> str:
    g, mods = graph(), modules()
    return "\n".join(
        f"  {a} -> {b}  ({mods[a].relative_to(PACKAGE.parent)}:{g[a][b]})" for a, b in zip(cycle, cycle[1:])
    )


def test_the_walker_sees_every_kind_of_import(tmp_path):
    g = graph()
    assert "ultrastyle.core.transforms" in g["ultrastyle.runtime.cascade"]  # module level
    assert "ultrastyle.runtime.backends.torch_backend" in g["ultrastyle.runtime.backends.select"]  # inside a function
    assert "ultrastyle.models.zoo" in g["ultrastyle.models.pretrained"]  # from a package import a module
    two = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "b": 1}, "d": {"a": 1, "e": 1}, "e": {"d": 1}}
    assert import_cycles(two) == [["a", "b", "c", "a"], ["d", "e", "d"]]
    assert import_cycles({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 1}}) == []


def test_no_import_cycles():
    cycles = import_cycles(graph())
    assert not cycles, "import cycles (importer -> imported, where the import stands):\n" + "\n\n".join(map(_describe, cycles))


def _outside_imports(prefix: str) -> dict[str, list[str]]:
    """Per module under ``prefix``: every import of it that is not the package part itself."""
    mods = modules()
    out: dict[str, list[str]] = {}
    for name, path in mods.items():
        if name != prefix and not name.startswith(prefix + "."):
            continue
        for target, line in _imports(name, path):
            top = target.split(".")[0]
            if target == prefix or target.startswith(prefix + "."):
                continue
            if top == "ultrastyle":
                if target in CORE_SIBLINGS:
                    continue
            elif top in sys.stdlib_module_names or top in CORE_THIRD_PARTY or top == "__future__":
                continue
            out.setdefault(name, []).append(f"{target} (line {line})")
    return out


def test_the_core_imports_only_itself_the_standard_library_numpy_and_torch():
    assert "ultrastyle.core.plan" in modules() and "ultrastyle.core.transforms" in modules()
    bad = _outside_imports("ultrastyle.core")
    assert not bad, "the core imports beyond stdlib, numpy and torch:\n" + "\n".join(
        f"  {m}: {', '.join(ts)}" for m, ts in sorted(bad.items())
    )


def _importers_of(targets: set[str], prefix: str) -> dict[str, list[str]]:
    return {
        m: sorted(t for t in edges if t in targets)
        for m, edges in graph().items()
        if (m == prefix or m.startswith(prefix + ".")) and any(t in targets for t in edges)
    }


def test_trt_does_not_import_the_tiled_pipeline():
    found = _importers_of({"ultrastyle.runtime.tiled"}, "ultrastyle.trt")
    assert not found, f"trt/ imports the tiled pipeline: {found}"


def test_backends_do_not_import_the_pipeline():
    found = _importers_of(PIPELINE, "ultrastyle.runtime.backends")
    assert not found, f"backends import the pipeline: {found}"


def test_trt_export_and_calibration_import_no_pipeline_and_trt_and_export_no_backend():
    pipeline = PIPELINE | {"ultrastyle.runtime.cascade"}
    for prefix in ("ultrastyle.trt", "ultrastyle.export", "ultrastyle.calibration"):
        found = _importers_of(pipeline, prefix)
        assert not found, f"{prefix} imports the pipeline: {found}"
    backends = {m for m in modules() if m.startswith("ultrastyle.runtime.backends")}
    for prefix in ("ultrastyle.trt", "ultrastyle.export"):  # (calibration runs bundles with a backend)
        found = _importers_of(backends, prefix)
        assert not found, f"{prefix} imports a backend: {found}"


ORCHESTRATION = ("ultrastyle.api", "ultrastyle.deploy", "ultrastyle.cli", "ultrastyle.runtime", "ultrastyle.distributed",
                 "ultrastyle.optimization", "ultrastyle.distill", "ultrastyle.calibration", "ultrastyle.trt")  # fmt: skip


def test_image_io_and_the_networks_import_no_orchestration():
    """`io` (files, canvases on disk) and `models.networks` (the layers) sit under everything that runs a model."""
    g = graph()
    pure = [m for m in g if m.startswith("ultrastyle.io") or m == "ultrastyle.models.networks"]
    assert "ultrastyle.io.images" in pure and "ultrastyle.models.networks" in pure
    bad = [f"{m} -> {t} ({modules()[m].relative_to(PACKAGE.parent)}:{line})" for m in pure for t, line in g[m].items()
           if t.startswith(ORCHESTRATION)]  # fmt: skip
    assert not bad, "\n".join(bad)


def test_type_checkers_see_every_public_name_at_its_lazy_home():
    """``import ultrastyle`` loads names on first use (``__getattr__``), which a type checker cannot follow: every name
    was ``Any`` to mypy and IDEs. The TYPE_CHECKING imports give each its real type; they must name what ``_API`` loads."""
    tree = ast.parse(Path(ultrastyle.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING")
    # `X as X`: an explicit re-export, which pyright and mypy --strict need to call the name public
    assert all(a.asname for imp in block.body for a in imp.names)
    seen = {a.asname: imp.module if a.asname == a.name else f"{imp.module}:{a.name}" for imp in block.body for a in imp.names}
    assert seen == {name: spec for name, spec in ultrastyle._API.items()}
    assert ultrastyle.__all__ == ["__version__", *ultrastyle._API]  # a literal list, which type checkers read
