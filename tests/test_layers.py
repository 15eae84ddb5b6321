"""The contract layer stays free of implementations (STYLE: practices 1 to 3)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "conveyor"

# The contract: what drivers and the core agree on. It may import only itself.
CONTRACT = [
    "errors.py",
    "registry/model.py",
    "registry/ids.py",
    "drivers/base.py",
    "queue/headers.py",
    "queue/codecs.py",
]
CONTRACT_MODULES = {"conveyor", "conveyor.errors", "conveyor.registry.model", "conveyor.drivers.base"}
CONTRACT_MODULES |= {"conveyor.registry.ids", "conveyor.queue.headers", "conveyor.queue.codecs"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_contract_modules_import_no_implementation() -> None:
    for relative in CONTRACT:
        own = {m for m in imported_modules(PACKAGE / relative) if m.startswith("conveyor")}
        assert own <= CONTRACT_MODULES, (relative, own - CONTRACT_MODULES)


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
        "lupa": "lua",
        "sqlite3": "drivers/sqlite",
    }
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        for module in imported_modules(path):
            root = module.split(".")[0]
            if root in clients:
                assert relative.startswith(clients[root]), (relative, module)
