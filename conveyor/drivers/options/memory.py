"""Options of ``queue.driver.memory``: none on the entry; ``max_length`` on queues."""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.registry.convert import integer
from conveyor.registry.options import DriverSchema, NoOptions, Options, option

__all__ = ["SCHEMA", "MemoryQueueOptions"]


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryQueueOptions(Options):
    """``driver_options.memory`` on a queue."""

    max_length: int | None = option(integer(1), None)  # publishes beyond it are refused


SCHEMA: DriverSchema[NoOptions, MemoryQueueOptions, NoOptions] = DriverSchema(
    "memory", NoOptions, MemoryQueueOptions
)
