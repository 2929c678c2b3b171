"""`fedmef_core`'s import graph, read from the source: no cycle, and no orchestration library anywhere in it.

Every `import` counts, at module level or inside a function (a lazy import is still a dependency), except those
under `if TYPE_CHECKING:` (never run). Importing `a.b.c` also runs the `__init__` of each package above it that
the importer is not inside itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "fedmef_core"
ROOT = Path(__file__).resolve().parents[2]
ORCHESTRATION = ("prefect", "mlflow", "dvc")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name `tree` imports (for `from x import y`: x, and x.y too, as y may be a module)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join([*here, base] if base else here)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between fedmef_core's modules, every imported top-level name outside it, by module)."""
    modules = _modules()
    edges: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = _imports(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py")
        inside = set(_ancestors(name)) | {name}
        targets = set()
        for target in imported:
            if target in modules:
                targets.update(p for p in [*_ancestors(target), target] if p in modules and p not in inside)
        edges[name] = targets
        external[name] = {t.split(".")[0] for t in imported if t.split(".")[0] != PACKAGE}
    return edges, external


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path `[a, b, ..., a]`, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_sees_lazy_imports_and_skips_type_checking_blocks():
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "if TYPE_CHECKING:\n    from fedmef_core.hidden import Hint\n"
        "def f():\n    import fedmef_core.lazy.deep\n"
    )
    found = _imports(ast.parse(source), "fedmef_core.pkg.mod", is_package=False)
    assert {"fedmef_core.pkg", "fedmef_core.pkg.sibling", "fedmef_core.lazy.deep"} <= found
    assert not any("hidden" in name for name in found)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_fedmef_core_has_no_import_cycle():
    edges, _ = import_graph()
    assert "fedmef_core.config" in edges and edges["fedmef_core.engine"]  # the scan found the package
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle in fedmef_core: " + " -> ".join(cycle or [])


def test_fedmef_core_imports_no_orchestration():
    _, external = import_graph()
    offenders = {m: sorted(names & set(ORCHESTRATION)) for m, names in external.items() if names & set(ORCHESTRATION)}
    assert not offenders, f"fedmef_core must not import {ORCHESTRATION}: {offenders}"
