"""Build drivers and queue specs for a driver kind, without YAML or an App.

The driver-level conformance suite (``tests/conformance/test_driver_contract.py``)
drives :class:`conveyor.drivers.base.Driver` objects directly. A :class:`DriverKit`
gives it, for one short kind ("memory", "sqlite", "amqp"):

- ``spec``: one :class:`DriverSpec`, the same for every driver instance the kit
  builds, so two instances share the backend exactly when the driver allows it
  (the SQLite file, the broker); ``driver()`` builds a new, unopened instance;
  ``opened()`` is an async context manager that opens one and always closes it;
- ``queue(name, max_length=...)``: a :class:`QueueSpec` with a name unique to this
  kit (so unique per test) and, if asked, the driver's own length limit;
- ``cleanup()``: delete what outlives the test (AMQP queues, their delay queues).

A new driver opts in with its row in ``tests/support/profiles.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from conveyor.drivers.base import Capabilities, Driver
from conveyor.drivers.kinds import driver_class, schema
from conveyor.registry.model import DriverSpec, QueueSpec
from conveyor.registry.options import DriverSchema, Options
from tests.support.profiles import PROFILES

__all__ = ["DriverKit", "run"]

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 45.0) -> T:
    """Run ``coro`` on a fresh event loop, cancelled after ``timeout`` s.

    The bound sits below pytest's own ``--timeout``, so a hang surfaces as a
    ``TimeoutError`` raised through the test's ``finally`` blocks (drivers get closed)
    instead of a killed process.
    """
    return asyncio.run(asyncio.wait_for(coro, timeout))


class DriverKit:
    """Drivers and queues of one kind for one test (see the module docstring)."""

    def __init__(self, name: str, tmp_path: Path) -> None:
        self.name = name
        self.kind = f"queue.driver.{name}"
        self.tmp_path = tmp_path
        self.prefix = "t" + uuid.uuid4().hex[:12]
        self.cls: type[Driver] = driver_class(self.kind)
        self.schema: DriverSchema[Any, Any, Any] = schema(self.kind)
        self.spec = DriverSpec(id=f"{self.prefix}:drv", kind=self.kind, options=self.options())
        self.queue_names: list[str] = []
        self.delays: set[float] = set()  # retry delays used (the AMQP driver's delay queues)

    @property
    def capabilities(self) -> Capabilities:
        return self.cls.capabilities

    def options(self) -> Options:
        """The driver entry's option record (the same backend for every instance)."""
        record: Options = self.schema.driver(**PROFILES[self.name].fields(self.tmp_path))
        return record

    # -- drivers -------------------------------------------------------------------------

    def driver(self) -> Driver:
        """A new, unopened instance on the kit's spec."""
        return self.cls(self.spec)

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[Driver]:
        """A new instance, opened; closed on the way out whatever happens."""
        drv = self.driver()
        await drv.open()
        try:
            yield drv
        finally:
            await drv.close()

    # -- queues --------------------------------------------------------------------------

    def queue(self, name: str, *, max_length: int | None = None) -> QueueSpec:
        """A queue spec named ``<prefix>.<name>`` (unique per kit), optionally length-limited."""
        queue_name = f"{self.prefix}.{name}"
        self.queue_names.append(queue_name)
        bags: dict[str, Options] = {}
        if max_length is not None:
            if not self.has_max_length_option():
                raise ValueError(f"the {self.name} driver's queue options have no max_length")
            bags[self.schema.name] = self.schema.queue(max_length=max_length)
        return QueueSpec(
            id=f"{self.prefix}:{name}", driver=self.spec.id, queue_name=queue_name, driver_options=bags
        )

    def has_max_length_option(self) -> bool:
        return "max_length" in {f.name for f in dataclasses.fields(self.schema.queue)}

    def used_delay(self, seconds: float) -> float:
        """Record a retry delay passed to ``nack`` (for cleanup); returns it."""
        self.delays.add(seconds)
        return seconds

    # -- cleanup -------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Delete what outlives the test: the broker's queues and delay queues."""
        cleanup = PROFILES[self.name].cleanup
        if cleanup is not None and self.queue_names:
            cleanup(self.queue_names, self.delays)
