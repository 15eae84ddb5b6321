"""Build throwaway apps for tests: unique namespace and queue names, one driver."""

from __future__ import annotations

import os
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import conveyor
from conveyor.drivers.kinds import driver_class
from conveyor.drivers.base import Capabilities
from tests.support.handlers import install

AMQP_URL = os.environ.get("CONVEYOR_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def driver_entry(kind: str, tmp_path: Path) -> dict[str, Any]:
    if kind == "memory":
        return {"kind": "queue.driver.memory"}
    if kind == "sqlite":
        return {"kind": "queue.driver.sqlite", "path": str(tmp_path / "queues.db")}
    if kind == "amqp":
        return {"kind": "queue.driver.amqp", "url": AMQP_URL}
    raise ValueError(kind)


def _delete_amqp_queues(entries: list[dict[str, Any]]) -> None:
    from tests.support.rabbit_node import delete_queues, test_queue_names

    delete_queues(AMQP_URL, test_queue_names(entries))


def capabilities(kind: str) -> Capabilities:
    return driver_class(f"queue.driver.{kind}").capabilities


@dataclass
class Harness:
    """Collects entries, writes them as one YAML file and loads the app."""

    tmp_path: Path
    driver: str = "memory"
    namespace: str = field(default_factory=lambda: "t" + uuid.uuid4().hex[:10])
    entries: list[dict[str, Any]] = field(default_factory=list)
    top: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.entries.append({"name": "drv", **driver_entry(self.driver, self.tmp_path)})
        if self.driver == "amqp":
            # Broker queues outlive the test: delete this harness's queues once it is dropped
            # (after the test's fixtures are torn down; at exit at the latest).
            weakref.finalize(self, _delete_amqp_queues, self.entries)

    def qid(self, name: str) -> str:
        return f"{self.namespace}:{name}"

    def queue(self, name: str, **fields: Any) -> str:
        entry = {"name": name, "kind": "queue.queue", "driver": "drv", **fields}
        entry.setdefault("queue_name", f"{self.namespace}.{name}")
        entry.setdefault("retry", {"delay": 0})
        self.entries.append(entry)
        return self.qid(name)

    def consumer(self, name: str, queue: str, handler: Callable[..., Any], **fields: Any) -> str:
        entry = {"name": name, "kind": "queue.consumer", "queue": queue, "handler": install(handler)}
        entry.update(fields)
        self.entries.append(entry)
        return self.qid(name)

    def add(self, **entry: Any) -> None:
        self.entries.append(entry)

    def write(self) -> Path:
        doc = {"version": "1.0", "namespace": self.namespace, **self.top, "entries": self.entries}
        path = self.tmp_path / f"{self.namespace}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def load(self, **kwargs: Any) -> conveyor.App:
        return conveyor.load(self.write(), **kwargs)
