"""Parking for coroutines that wait for a delivery (or for room to take one).

A wake-up is a hint: the woken coroutine checks again and parks again if it was
beaten to it. ``wait`` is cancellation-safe: a waiter cancelled after it was woken
passes the wake-up on, so none is lost when a consumer stops.
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["Waiters"]


class Waiters:
    __slots__ = ("_futures",)

    def __init__(self) -> None:
        self._futures: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return len(self._futures)

    async def wait(self) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futures.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.wake()  # we were woken, then cancelled: hand the wake-up on
            raise

    def wake(self, count: int = 1) -> None:
        """Wake up to ``count`` waiters (oldest first)."""
        futures = self._futures
        while count > 0 and futures:
            future = futures.popleft()
            if not future.done():
                future.set_result(None)
                count -= 1

    def wake_all(self) -> None:
        self.wake(len(self._futures))
