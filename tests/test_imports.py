"""Imports in revision/ run one way: no module imports one that imports it back, directly or through a chain; and the
library stands alone: nothing in revision/ imports the demo (demo/, beside it in the repository, not in the wheel),
and neither reaches into the repository root from its own file's location.

The graph is read from the source (ast), so nothing is imported. Every import statement counts: module-level ones
and the ones inside functions (a function-level import that closes a loop is a cycle that only a late call reveals).
An edge goes to the module named (`from revision.align import x` -> revision.align, `from revision import store` ->
revision.store); the implicit import of a package's __init__ by its submodules is not an edge (a package that
re-exports its submodules would otherwise always be a loop).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "revision"
DEMO = PACKAGE.parent / "demo"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the revision modules it imports anywhere in its source."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1] + [node.module or ""]).strip(".") if node.level else node.module
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        targets.add(f"{base}.{alias.name}")
                    elif base in modules:
                        targets.add(base)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop as [a, b, ..., a], or None (depth-first search, colouring the modules on the current path)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_revision_has_no_import_cycle():
    graph = import_graph()
    assert {"revision.embed", "revision.inputs", "revision.lists", "revision.store", "revision.align.run"} <= set(graph)
    assert "revision.lists" in graph["revision.inputs"] and "revision.store" in graph["revision.store_writer"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_store_reader_does_not_import_its_writer():
    graph = import_graph()
    assert "revision.store_writer" not in graph["revision.store"]


def imported_names(path: Path) -> set[str]:
    """Every module name an import statement in `path` names (absolute imports; relative ones stay in their package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names


def test_the_library_never_imports_the_demo():
    assert (DEMO / "pipeline.py").is_file() and (DEMO / "tiny" / "lm.py").is_file()
    offenders = {str(path.relative_to(PACKAGE.parent)): sorted(n for n in imported_names(path) if n.split(".")[0] == "demo")
                 for path in sorted(PACKAGE.rglob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}
    assert not (PACKAGE / "toy").exists() and not (PACKAGE / "tiny").exists()


def test_neither_library_nor_demo_finds_the_repository_from_its_own_location():
    """The pipeline runs a checkout's scripts from an explicit root (the current directory or --repo), never from
    Path(__file__).parents[...], which points elsewhere once the code is installed."""
    upward = re.compile(r"__file__.*\.(parents\b|parent\.parent)")
    hits = [f"{path}:{i}" for root in (PACKAGE, DEMO) for path in sorted(root.rglob("*.py"))
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if upward.search(line)]
    assert not hits


@pytest.mark.parametrize("source, expected", [
    ("from revision import b\n", ["revision.a", "revision.b", "revision.a"]),  # direct, module level
    ("def f():\n    from revision.c import x\n", ["revision.a", "revision.c", "revision.b", "revision.a"]),  # via a chain, in a function
])
def test_a_loop_is_found(tmp_path, monkeypatch, source, expected):
    package = tmp_path / "revision"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text(source)
    (package / "b.py").write_text("import revision.a\n")
    (package / "c.py").write_text("from revision.b import y\n")
    monkeypatch.setitem(globals(), "PACKAGE", package)
    assert find_cycle(import_graph()) == expected
