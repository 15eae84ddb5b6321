"""Small helpers shared by the AMQP broker tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import aiormq

from conveyor import queue
from conveyor.app import App
from tests.support.harness import AMQP_URL, Harness

T = TypeVar("T")


def broker(fn: Callable[[Any], Awaitable[T]], url: str = AMQP_URL) -> T:
    """Run ``fn(channel)`` on a raw aiormq channel of its own connection (outside any app)."""

    async def main() -> T:
        conn = await aiormq.connect(url)
        try:
            return await fn(await conn.channel())
        finally:
            await conn.close()

    return asyncio.run(main())


def on_loop(app: App, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    return asyncio.run_coroutine_threadsafe(coro, app.loop).result(timeout)


class Sink:
    """Thread-safe record of what handlers saw."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[Any] = []
        self.attempts: list[int] = []
        self.headers: list[dict[str, Any]] = []

    def record(self, payload: Any) -> None:
        msg = queue.message()
        with self.lock:
            self.items.append(payload)
            self.attempts.append(msg.attempts)
            self.headers.append(msg.headers)

    def __len__(self) -> int:
        with self.lock:
            return len(self.items)


def on(harness: Harness, url: str, **options: object) -> Harness:
    """Point ``harness``'s driver at ``url`` (a private node or a proxy) with extra options."""
    harness.entries[0] = {"name": "drv", "kind": "queue.driver.amqp", "url": url, **options}
    return harness
