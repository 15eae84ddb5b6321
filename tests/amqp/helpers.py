"""Small helpers shared by the AMQP broker tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import aiormq
import pytest

from conveyor import errors, queue
from conveyor.app import App
from tests.conftest import require_private_rabbit
from tests.support.harness import AMQP_URL, Harness
from tests.support.rabbit_node import RabbitNode

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


def count(qid: str) -> int | None:
    """``queue.info(qid)["message_count"]``, or None while the connection is being replaced."""
    try:
        return int(queue.info(qid)["message_count"])
    except errors.Error as exc:
        if not exc.retryable:
            raise
        return None


def on(harness: Harness, url: str, **options: object) -> Harness:
    """Point ``harness``'s driver at ``url`` (a private node or a proxy) with extra options."""
    harness.entries[0] = {"name": "drv", "kind": "queue.driver.amqp", "url": url, **options}
    return harness


NODE_START_TIMEOUT = 120.0  # seconds; a node boots in about 5 s on a quiet machine


def start_node(
    factory: pytest.TempPathFactory, name: str = "conveyor-test", config: Sequence[str] = ()
) -> Iterator[RabbitNode]:
    """Body of a module fixture: a private RabbitMQ node, stopped (then killed) afterwards."""
    require_private_rabbit()
    rabbit = RabbitNode(factory.mktemp("rabbit"), name, config=config)
    rabbit.start(timeout=NODE_START_TIMEOUT)
    try:
        yield rabbit
    finally:
        rabbit.stop(timeout=30)
        rabbit.kill()
