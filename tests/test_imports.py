"""The package's import graph has no cycle.

Every module of rtbcli is parsed with `ast`, and every import it makes, at the top or inside a
function, becomes an edge to the rtbcli module it names (and to the packages above that module,
whose `__init__` runs first). A cycle is a design fault even when a lazy import keeps Python from
tripping over it, so lazy imports count. Only imports under `if TYPE_CHECKING:` are left out:
they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rtbcli"


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, except under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _with_parents(name: str, known: dict[str, Path]) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(known)


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The rtbcli modules (and their packages) that module `name` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            # `from X import y`: y is a submodule of X or a name defined in X
            targets = [f"{base_name}.{alias.name}" if f"{base_name}.{alias.name}" in known else base_name for alias in node.names]
        for target in targets:
            out |= _with_parents(target, known)
    out.discard(name)
    return out - _with_parents(name, known)  # a module's own packages are already imported before it runs


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_graph_is_read():
    graph = import_graph()
    assert "rtbcli.config" in graph and "rtbcli.cli" in graph
    assert "rtbcli.config" in graph["rtbcli.tasks"]
    assert "rtbcli.datasets.digits" in graph["rtbcli.rewards.digits"]
    assert "rtbcli.rewards" in graph["rtbcli.rewards.digits"] or "rtbcli.rewards" in graph["rtbcli.tasks"]


def test_finds_a_cycle_through_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]


def test_a_function_level_import_is_an_edge(tmp_path):
    pkg = tmp_path / "rtbcli"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    known = {module_name(p, tmp_path): p for p in sorted(pkg.rglob("*.py"))}
    assert imported_modules("rtbcli.a", pkg / "a.py", known) == {"rtbcli.b"}
    assert imported_modules("rtbcli.b", pkg / "b.py", known) == set()


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (modules that import each other, directly or through others): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )
