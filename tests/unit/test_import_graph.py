"""The import graph of ``federated_learning/`` and ``agents/``: the server never imports the agents,
and no module imports itself back through others.

Every import statement counts, at any depth: inside functions and under ``TYPE_CHECKING`` too,
since a cycle that only the type checker follows still ties two modules into one. An edge goes
to the module an import names (``from pkg import name`` goes to ``pkg.name`` when that is a
module, else to ``pkg``); the parent packages Python runs on the way are not edges.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("federated_learning", "agents")

Graph = dict[str, set[str]]

# Debt (project issue 12): the coordinator builds on its mixins, and they import the coordinator
# and each other back under TYPE_CHECKING, for the type of ``self`` and of their siblings. Each
# pair below is one such back edge (importer, imported). The coordinator's redesign removes them;
# the last test fails once an edge is gone, so this set shrinks with the code until it is empty.
_SERVICES = "federated_learning.services"
ALLOWED_CYCLE_EDGES: frozenset[tuple[str, str]] = frozenset({
})


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_files() -> dict[str, Path]:
    """Every module of the two packages by dotted name."""
    return {module_name(path): path for package in PACKAGES
            for path in sorted((ROOT / package).rglob("*.py"))}


def imported_names(module: str, path: Path) -> Iterator[str]:
    """The absolute dotted names ``module`` imports (``from a import b`` yields ``a.b``), at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            yield source
            yield from (f"{source}.{alias.name}" for alias in node.names if alias.name != "*")


def resolve(name: str, modules: Mapping[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is one of ``modules``; None for other packages."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph() -> Graph:
    modules = module_files()
    graph: Graph = {}
    for module, path in modules.items():
        targets = {resolve(name, modules) for name in imported_names(module, path)}
        graph[module] = {target for target in targets if target is not None and target != module}
    return graph


def within(graph: Graph, package: str) -> Graph:
    """The subgraph of ``package``'s modules and the edges between them."""
    inside = {m for m in graph if m == package or m.startswith(package + ".")}
    return {m: graph[m] & inside for m in inside}


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component: list[str] = []
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
    return found


def describe(graph: Graph, components: list[list[str]]) -> str:
    lines: list[str] = []
    for component in components:
        members = set(component)
        lines.extend(f"  {a} -> {b}" for a in component for b in sorted(graph[a] & members))
        lines.append("")
    return "\n".join(lines)


def test_no_server_module_imports_the_agents() -> None:
    modules = module_files()
    offenders = sorted(
        f"{module} imports {name}"
        for module, path in modules.items() if module.split(".")[0] == "federated_learning"
        for name in imported_names(module, path) if name == "agents" or name.startswith("agents.")
    )
    assert not offenders, "federated_learning/ must not import agents/:\n" + "\n".join(offenders)


def test_agents_modules_import_no_cycle() -> None:
    graph = within(import_graph(), "agents")
    found = cycles(graph)
    assert not found, "import cycles among agents/ modules:\n" + describe(graph, found)


def test_server_modules_import_no_cycle_beyond_the_listed_debt() -> None:
    graph = within(import_graph(), "federated_learning")
    for source, target in ALLOWED_CYCLE_EDGES:
        graph[source].discard(target)
    found = cycles(graph)
    assert not found, "import cycles among federated_learning/ modules:\n" + describe(graph, found)


def test_every_allowed_cycle_edge_still_exists() -> None:
    graph = import_graph()
    gone = sorted(f"{a} -> {b}" for a, b in ALLOWED_CYCLE_EDGES if b not in graph.get(a, set()))
    assert not gone, "remove from ALLOWED_CYCLE_EDGES, these imports are gone:\n" + "\n".join(gone)


# The coordinator's state is its own (decision 0011); every other process reads the published view
# (``protocol/trainings.py``). These modules are the coordinator and what it alone uses.
COORDINATOR_MODULES = ("federated_learning.coordination", "federated_learning.services.coordinator",
                       "federated_learning.services.rounds", "federated_learning.services.notice_batch",
                       "federated_learning.services.initial_models", "federated_learning.records.trainings",
                       "federated_learning.records.secure_exchange")


def test_only_the_coordinator_imports_its_state() -> None:
    graph = import_graph()
    offenders = sorted(f"{module} imports federated_learning.coordination.state"
                       for module, targets in graph.items()
                       if "federated_learning.coordination.state" in targets
                       and not module.startswith(COORDINATOR_MODULES) and module.startswith("federated_learning"))
    assert not offenders, "read the published TrainingView instead:\n" + "\n".join(offenders)
