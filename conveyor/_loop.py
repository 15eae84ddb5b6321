"""The bridge between blocking callers and the async core.

An app started from plain (non-async) code owns an event loop running in a daemon
thread; blocking calls hand coroutines to it and wait. Calling a blocking form from
inside a running event loop would deadlock or stall that loop, so it raises INVALID
naming the async form instead.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from conveyor import errors

__all__ = ["LoopThread", "forbid_running_loop", "run_blocking"]

T = TypeVar("T")

log = logging.getLogger("conveyor.app")

DRAIN_TIMEOUT = 1.0  # seconds tasks left at loop shutdown get to end once cancelled


async def _bounded(coro: Coroutine[Any, Any, None]) -> None:
    try:
        await asyncio.wait_for(coro, DRAIN_TIMEOUT)
    except TimeoutError:
        log.error("loop shutdown step did not finish within %.1fs; abandoned", DRAIN_TIMEOUT)


def forbid_running_loop(async_name: str) -> None:
    """Raise INVALID if the calling thread is running an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise errors.invalid(
        f"blocking call inside a running event loop: use `await {async_name}(...)` instead",
        use=async_name,
    )


def run_blocking(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on ``loop`` (owned by another thread) and wait for its result."""
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    return future.result()


class LoopThread:
    """An event loop running in a daemon thread, owned by one app."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            self._drain()
            self.loop.close()

    def _drain(self) -> None:
        # Anything still pending belongs to a component that failed to stop it;
        # cancel it so the loop can close without "Task was destroyed" noise.
        # Bounded: a task that swallows its cancellation must not keep the loop (and
        # the process) alive for ever.
        pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.wait(pending, timeout=DRAIN_TIMEOUT))
            for task in pending:
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: the owner is gone
            stuck = [t.get_name() for t in pending if not t.done()]
            if stuck:
                log.error("abandoning %d task(s) that ignore cancellation: %s", len(stuck), stuck)
        self.loop.run_until_complete(_bounded(self.loop.shutdown_asyncgens()))
        self.loop.run_until_complete(_bounded(self.loop.shutdown_default_executor()))

    def stop(self) -> None:
        """Stop the loop and wait for its thread; the loop is closed afterwards."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            if threading.current_thread() is not self._thread:
                self._thread.join()

    @property
    def thread(self) -> threading.Thread:
        return self._thread
