"""Build throwaway apps for tests: unique namespace and queue names, one driver."""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import conveyor
from conveyor.drivers.base import Capabilities
from conveyor.drivers.kinds import driver_class
from conveyor.registry.durations import parse_duration
from conveyor.registry.model import RetrySpec
from tests.support.handlers import install
from tests.support.profiles import AMQP_URL, PROFILES

__all__ = ["AMQP_URL", "Harness", "capabilities", "driver_entry"]


def driver_entry(kind: str, tmp_path: Path) -> dict[str, Any]:
    """The YAML entry of driver ``kind`` ("memory", "sqlite", ...) in tests."""
    return {"kind": f"queue.driver.{kind}", **PROFILES[kind].fields(tmp_path)}


def _cleanup(kind: str, entries: list[dict[str, Any]]) -> None:
    """Delete what the queues of ``entries`` left behind (with every delay their retries use)."""
    cleanup = PROFILES[kind].cleanup
    if cleanup is None:
        return
    names, delays = [], set()
    for entry in entries:
        if entry.get("kind") != "queue.queue" or "queue_name" not in entry:
            continue
        names.append(entry["queue_name"])
        raw = entry.get("retry") or {}
        retry = RetrySpec(
            delay=parse_duration(raw.get("delay", 1.0)),
            backoff=float(raw.get("backoff", 2.0)),
            max_delay=parse_duration(raw.get("max_delay", 300.0)),
        )
        delays |= {retry.delay_for(attempt) for attempt in range(1, 40)} | {retry.max_delay}
    cleanup(names, delays)


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
        if PROFILES[self.driver].cleanup is not None:
            # Broker queues outlive the test: delete this harness's queues once it is dropped
            # (after the test's fixtures are torn down; at exit at the latest).
            weakref.finalize(self, _cleanup, self.driver, self.entries)

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
