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


class FlakyStartDriver(MemoryDriver):
    """``open`` and ``subscribe`` fail as against a broker that is not up yet.

    Tests set ``open_failures`` / ``subscribe_failures`` (how many calls fail, -1: all)
    and ``failure`` (the error raised); ``opens`` and ``subscribes`` count the calls.
    """

    open_failures = 0
    subscribe_failures = 0
    failure = errors.Error(errors.UNAVAILABLE, "connection refused", retryable=True)
    opens = 0
    subscribes = 0

    @classmethod
    def reset(cls) -> None:
        cls.open_failures = cls.subscribe_failures = cls.opens = cls.subscribes = 0
        cls.failure = errors.Error(errors.UNAVAILABLE, "connection refused", retryable=True)

    async def open(self) -> None:
        cls = type(self)
        cls.opens += 1
        if cls.open_failures:
            cls.open_failures -= 1 if cls.open_failures > 0 else 0
            raise cls.failure
        await super().open()

    async def subscribe(self, *args: Any, **kwargs: Any) -> Any:
        cls = type(self)
        cls.subscribes += 1
        if cls.subscribe_failures:
            cls.subscribe_failures -= 1 if cls.subscribe_failures > 0 else 0
            raise cls.failure
        return await super().subscribe(*args, **kwargs)
