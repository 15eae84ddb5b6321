"""How the test suites use each driver: one row per driver.

A row gives the driver entry's fields in tests (used as YAML by the app-level
``Harness`` and as the option record by the driver-level ``DriverKit``), the server
it needs (its tests skip without it locally and fail in CI), and how to delete what
outlives a test (queues on a shared broker). A new driver's tests opt in to both
conformance suites with one row here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["AMQP_URL", "PROFILES", "Profile"]

AMQP_URL = os.environ.get("CONVEYOR_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _delete_amqp_queues(names: Iterable[str], delays: Iterable[float]) -> None:
    """Delete the broker queues ``names`` and their delay queues for ``delays`` (seconds)."""
    from conveyor.drivers.amqp._topology import delay_name
    from tests.support.rabbit_node import delete_queues

    names = list(names)
    waits = {max(round(d * 1000), 1) for d in delays if d > 0}
    delete_queues(AMQP_URL, names + [delay_name(name, ms) for name in names for ms in waits])


@dataclass(frozen=True)
class Profile:
    fields: Callable[[Path], dict[str, Any]]  # the driver entry's fields, given the test's tmp_path
    service: tuple[str, int] | None = None  # (name, port) of the server it needs on 127.0.0.1
    cleanup: Callable[[Iterable[str], Iterable[float]], None] | None = None  # (queue names, delays used)


PROFILES: dict[str, Profile] = {
    "memory": Profile(lambda tmp: {}),
    "sqlite": Profile(lambda tmp: {"path": str(tmp / "queues.db")}),
    "amqp": Profile(lambda tmp: {"url": AMQP_URL}, ("RabbitMQ", 5672), _delete_amqp_queues),
}
