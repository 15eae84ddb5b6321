"""The toy driver: the memory driver's queues behind the toy's own options."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from conveyor.drivers.base import Driver, Subscription
from conveyor.drivers.memory import MemoryDriver
from conveyor.drivers.options.memory import MemoryQueueOptions
from conveyor.registry.model import DriverSpec, QueueSpec
from conveyor.registry.options import Options
from tests.support.toy.options import SCHEMA

__all__ = ["ToyDriver"]

# Every instance, so that a test can see what the app's driver was given.
INSTANCES: list[ToyDriver] = []


class ToyDriver(MemoryDriver):
    kind = "queue.driver.toy"

    def __init__(self, spec: DriverSpec) -> None:
        Driver.__init__(self, spec)
        self.options = SCHEMA.driver_options(spec.options)
        self._queues = {}
        self.tags: list[str | None] = []
        INSTANCES.append(self)

    async def declare(self, queue: QueueSpec) -> None:
        limit = SCHEMA.queue_options(queue.driver_options).max_length
        memory = {"memory": MemoryQueueOptions(max_length=limit)}
        await super().declare(dataclasses.replace(queue, driver_options=memory))

    async def subscribe(
        self, queue: QueueSpec, *, prefetch: int, auto_ack: bool, options: Mapping[str, Options]
    ) -> Subscription:
        settings = SCHEMA.consumer_options(options)
        self.tags.append(settings.tag if settings is not None else None)
        return await super().subscribe(queue, prefetch=prefetch, auto_ack=auto_ack, options=options)

    async def info(self, queue: QueueSpec) -> dict[str, Any]:
        return {**await super().info(queue), "label": self.options.label}
