"""Drivers that fail on purpose, for tests of how the core treats driver errors.

They are real drivers (the memory driver) with one operation made to fail the way a
broker-backed driver can fail; they stand in for no server.
"""

from __future__ import annotations

from typing import Any

from conveyor import errors
from conveyor.drivers.memory import MemoryDriver
from conveyor.registry.model import QueueSpec


class InfoFailingDriver(MemoryDriver):
    """``info`` fails as a driver whose broker is unreachable: UNAVAILABLE, retryable."""

    async def info(self, queue: QueueSpec) -> dict[str, Any]:
        raise errors.Error(
            errors.UNAVAILABLE, "the broker is unreachable", retryable=True, details={"queue": queue.id}
        )
