"""The import graph of sync/: no module imports itself back, and nothing deployed needs sync/dev/.

Module-level imports only, read from the source (nothing is imported): a cycle there
makes a module's names depend on which end of the circle was imported first. Imports
under ``if TYPE_CHECKING:`` count (type checkers and readers follow them); imports inside
a function do not (they run when the function does, which is how the CLI loads sync/dev/).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

SYNC = Path(__file__).resolve().parents[1] / "sync"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _module_level(statements: Iterable[ast.stmt]) -> Iterable[ast.Import | ast.ImportFrom]:
    """Import statements run when the module is imported: not those inside functions or classes."""
    for statement in statements:
        if isinstance(statement, ast.Import | ast.ImportFrom):
            yield statement
        elif isinstance(statement, ast.If | ast.Try | ast.With):
            yield from _module_level(statement.body)
            yield from _module_level(getattr(statement, "orelse", ()))
            yield from _module_level(getattr(statement, "finalbody", ()))
            for handler in getattr(statement, "handlers", ()):
                yield from _module_level(handler.body)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of ``root``'s package it imports at module level."""
    files = {_module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for statement in _module_level(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body):
            if isinstance(statement, ast.Import):
                targets.update(alias.name for alias in statement.names)
                continue
            base = statement.module or ""
            if statement.level:
                anchor = package.split(".")[: len(package.split(".")) - (statement.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from package import name` imports the submodule package.name when there is one.
            for alias in statement.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in files else base)
        graph[name] = {target for target in targets if target in files and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _describe(graph: dict[str, set[str]], component: list[str]) -> str:
    members = set(component)
    return "; ".join(f"{module} -> {', '.join(sorted(graph[module] & members))}" for module in component)


def test_sync_has_no_import_cycle() -> None:
    graph = import_graph(SYNC)
    # The parser sees the graph at all: a few edges known to exist.
    assert "sync.batch.endpoint" in graph["sync.batch.client"]
    assert "sync.batch.endpoint" in graph["sync.batch.ratelimit"]
    assert "sync.config" in graph["sync.mapping"]
    found = cycles(graph)
    assert not found, "import cycles in sync/: " + " | ".join(_describe(graph, component) for component in found)


def test_nothing_deployed_imports_sync_dev_at_module_level() -> None:
    """infra/package.py leaves sync/dev/ out of the zip: a module-level import of it would fail there."""
    graph = import_graph(SYNC)
    assert "sync.dev.simulator" in graph
    offenders = {
        module: sorted(target for target in targets if target.startswith("sync.dev"))
        for module, targets in graph.items()
        if not module.startswith("sync.dev")
    }
    assert not {module: targets for module, targets in offenders.items() if targets}


def test_the_check_finds_cycles_and_ignores_lazy_imports(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    # a <-> b through a TYPE_CHECKING block: a cycle.
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import thing\n")
    # c <-> d through a relative import and a lazy one: no cycle (d imports c only when called).
    (package / "sub" / "c.py").write_text("from . import d\n")
    (package / "sub" / "d.py").write_text("def f():\n    from pkg.sub import c\n    return c\n")
    graph = import_graph(package)
    assert graph["pkg.sub.c"] == {"pkg.sub.d"}
    assert graph["pkg.sub.d"] == set()
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports at module level, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def _every_import(path: Path) -> set[str]:
    """The modules a file names in any import statement, lazy ones (inside functions) included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


# The pure core: mapping, encoding, planning. It may stand on the differ's contract
# (sync.differ), never on a differ, the state, or the warehouse (docs/how-a-run-works.md, "The rooms").
CORE = (
    "sync.plan",
    "sync.planner",
    "sync.mapping",
    "sync.convert",
    "sync.decode",
    "sync.encode",
    "sync.attributes",
    "sync.fingerprint",
)
EDGES = ("sync.diff", "sync.state", "sync.warehouse", "sync.runtime", "sync.engine")


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == package or module.startswith(package + ".") for package in packages)


def test_the_core_imports_no_differ_and_no_state() -> None:
    graph = import_graph(SYNC)
    assert "sync.differ" in graph["sync.plan"]  # the contract: allowed, and seen by the parser
    offenders = {
        module: sorted(target for target in _reachable(graph, module) if _within(target, EDGES))
        for module in CORE
        if module in graph
    }
    assert not {module: targets for module, targets in offenders.items() if targets}


def test_the_engine_never_imports_the_warehouse_and_the_differ_contract_stands_alone() -> None:
    graph = import_graph(SYNC)
    reached = _reachable(graph, "sync.engine") | _every_import(SYNC / "engine.py")
    assert not sorted(module for module in reached if _within(module, ("sync.warehouse",)))
    # The contract is the floor both sides stand on: it imports nothing of the project but the model.
    assert graph["sync.differ"] <= {"sync.model"}
    # The warehouse edge is built by the runtime alone, which the warehouse never imports back.
    assert not any("sync.runtime" in _every_import(path) for path in (SYNC / "warehouse").glob("*.py")), (
        "sync/warehouse/ imports sync.runtime"
    )
