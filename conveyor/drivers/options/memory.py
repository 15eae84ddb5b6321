"""Options of ``queue.driver.memory``: ``max_message_size`` on the entry; ``max_length`` on queues."""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.drivers.options import message_size_option
from conveyor.registry.convert import integer
from conveyor.registry.options import DriverSchema, NoOptions, Options, option

__all__ = ["SCHEMA", "MemoryOptions", "MemoryQueueOptions"]


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryOptions(Options):
    """The ``queue.driver.memory`` entry."""

    # 16 MiB: every stored message lives in the process's memory until it is acked.
    max_message_size: int = message_size_option()


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryQueueOptions(Options):
    """``driver_options.memory`` on a queue."""

    max_length: int | None = option(integer(1), None)  # publishes beyond it are refused


SCHEMA: DriverSchema[MemoryOptions, MemoryQueueOptions, NoOptions] = DriverSchema(
    "memory", MemoryOptions, MemoryQueueOptions
)
