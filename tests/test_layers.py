"""The package's layers, enforced on its import graph (see docs/architecture.md).

Every module of ``conveyor/`` belongs to one layer (and, where a layer holds parts
that must not know each other, one group). A module may import modules of lower
layers, and modules of its own layer and group; never a higher layer. Imports under
``if TYPE_CHECKING:`` count too: a type-only arrow upwards is still a knot. No import
cycle may span files of different folders.
"""

from __future__ import annotations

import ast
import fnmatch
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "conveyor"

# (pattern, layer, group): the first pattern that matches a module names its place.
PLACES: list[tuple[str, int, str]] = [
    # 0: the contract drivers and the core agree on; imports nothing but itself
    ("conveyor.errors", 0, "contract"),
    ("conveyor.registry.model", 0, "contract"),
    ("conveyor.registry.ids", 0, "contract"),
    ("conveyor.registry.durations", 0, "contract"),
    ("conveyor.registry.problems", 0, "contract"),
    ("conveyor.registry.conditions", 0, "contract"),
    ("conveyor.registry.convert", 0, "contract"),
    ("conveyor.registry.options", 0, "contract"),
    ("conveyor.drivers.base", 0, "contract"),
    ("conveyor.drivers.kinds", 0, "contract"),
    ("conveyor.drivers.options", 0, "contract"),
    ("conveyor.drivers.options.*", 0, "contract"),
    ("conveyor.queue.headers", 0, "contract"),
    ("conveyor.queue.codecs", 0, "contract"),
    # 1: three parts that never import each other
    ("conveyor.registry", 1, "registry"),
    ("conveyor.registry.*", 1, "registry"),
    ("conveyor.drivers", 1, "drivers"),
    ("conveyor.drivers.*", 1, "drivers"),
    ("conveyor.security.context", 1, "security"),
    ("conveyor.security.policy", 1, "security"),
    # 2: the queue API and what is current (app, delivery, security)
    ("conveyor._loop", 2, "queue"),
    ("conveyor.queue", 2, "queue"),
    ("conveyor.queue.*", 2, "queue"),
    ("conveyor.security", 2, "queue"),
    ("conveyor.security.access", 2, "queue"),
    # 3: the consumer runtime and the functions it runs
    ("conveyor.consumer", 3, "consumer"),
    ("conveyor.consumer.*", 3, "consumer"),
    ("conveyor.functions", 3, "consumer"),
    ("conveyor.lua", 3, "consumer"),
    ("conveyor.lua.*", 3, "consumer"),
    # 4: App, running it, the package's front door
    ("conveyor", 4, "app"),
    ("conveyor.app", 4, "app"),
    ("conveyor.running", 4, "app"),
    ("conveyor.watchdog", 4, "app"),
    ("conveyor.supervision", 4, "app"),
    ("conveyor.observe", 4, "app"),
    ("conveyor.observe.*", 4, "app"),
    ("conveyor.tracing", 4, "app"),
    ("conveyor.logs", 4, "app"),
    # 5: the command line
    ("conveyor.cli", 5, "cli"),
    ("conveyor.cli.*", 5, "cli"),
    ("conveyor.prefork", 5, "cli"),
    ("conveyor.__main__", 5, "cli"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def place(module: str) -> tuple[int, str]:
    for pattern, layer, group in PLACES:
        if fnmatch.fnmatchcase(module, pattern):
            return layer, group
    raise AssertionError(f"{module} has no layer: add it to PLACES in tests/test_layers.py")


def imports_of(module: str) -> Iterator[tuple[str, int]]:
    """The conveyor modules ``module`` imports (type-only ones included), with lines."""
    return imports_in(MODULES[module].read_text())


def imports_in(source: str) -> Iterator[tuple[str, int]]:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # "from conveyor import queue" imports the module conveyor.queue
            base = node.module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "conveyor":
                yield target, node.lineno


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in imports_of(m) if t in MODULES and t != m} for m in MODULES}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        place(module)


def test_no_import_goes_up_or_sideways() -> None:
    bad = []
    for module in MODULES:
        layer, group = place(module)
        for target, line in imports_of(module):
            if target not in MODULES:
                continue
            to_layer, to_group = place(target)
            if to_layer > layer or (to_layer == layer and to_group != group):
                bad.append(f"{module}:{line} imports {target} ({group} {layer} -> {to_group} {to_layer})")
    assert not bad, "\n".join(bad)


def test_the_runtime_never_reaches_up() -> None:
    """The three knots this layering untied, named so that their return is obvious."""
    for module in MODULES:
        targets = {t for t, _ in imports_of(module)}
        if module.startswith(("conveyor.consumer", "conveyor.queue")):
            assert "conveyor.app" not in targets, module
        if module.startswith("conveyor.queue"):
            assert not any(t.startswith("conveyor.consumer") for t in targets), module
        if module.startswith("conveyor.security"):
            assert not any(t.startswith(("conveyor.app", "conveyor.consumer")) for t in targets), module


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def folder(module: str) -> str:
    path = MODULES[module]
    return str(path.parent.relative_to(PACKAGE))


def test_no_import_cycle_crosses_folders() -> None:
    crossing = [c for c in _cycles(graph()) if len({folder(m) for m in c}) > 1]
    assert not crossing, crossing


def test_cycle_finder_finds_cycles() -> None:
    """The check above would catch a cycle (it is not vacuous)."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]


def test_import_reader_sees_type_only_and_submodule_imports() -> None:
    """The checks above see what they must: imports under TYPE_CHECKING, and a
    submodule imported as a name (``from conveyor import queue``)."""
    source = textwrap.dedent(
        """
        from typing import TYPE_CHECKING
        from conveyor import queue, errors
        if TYPE_CHECKING:
            from conveyor.app import App
        """
    )
    assert sorted(t for t, _ in imports_in(source)) == ["conveyor.app", "conveyor.errors", "conveyor.queue"]


def test_no_relative_imports() -> None:
    """The reader above follows absolute imports only; the package uses nothing else."""
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree)), module


def test_loading_an_app_imports_no_driver_and_no_client_library(tmp_path: Path) -> None:
    (tmp_path / "app.yaml").write_text(
        textwrap.dedent(
            """
            namespace: app
            entries:
              - {name: rabbit, kind: queue.driver.amqp}
              - {name: store, kind: queue.driver.sqlite, path: q.db}
              - {name: q, kind: queue.queue, driver: rabbit}
            """
        )
    )
    script = textwrap.dedent(
        """
        import sys, conveyor
        from conveyor import queue, security, errors
        conveyor.load("app.yaml")
        heavy = ["aio_pika", "aiormq", "lupa", "sqlite3", "conveyor.drivers.amqp",
                 "conveyor.drivers.sqlite", "conveyor.drivers.memory", "conveyor.lua"]
        print(",".join(m for m in heavy if m in sys.modules))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""


def test_each_client_library_is_imported_by_its_driver_module_only() -> None:
    clients = {
        "aio_pika": "drivers/amqp",
        "aiormq": "drivers/amqp",
        "pamqp": "drivers/amqp",
        "yarl": "drivers/amqp",
        "lupa": "lua",
        "sqlite3": "drivers/sqlite",
    }
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                if root in clients:
                    assert relative.startswith(clients[root]), (relative, name)


def test_every_kind_in_the_table_is_complete() -> None:
    """One row per driver: its options module declares SCHEMA, its class has that kind."""
    from conveyor.drivers.kinds import KINDS, driver_class, schema

    names = set()
    for row in KINDS:
        found = schema(row.kind)
        names.add(found.name)
        assert row.kind == f"queue.driver.{found.name}", row
        assert driver_class(row.kind).kind == row.kind
    assert len(names) == len(KINDS)
