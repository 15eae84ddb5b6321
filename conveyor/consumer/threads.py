"""A fixed pool of daemon threads for sync handlers.

Why not ``ThreadPoolExecutor``: its threads are joined at interpreter exit, so one
handler that hangs past the stop grace period would keep the process alive for ever.
Here a stuck thread is abandoned (it is a daemon) and its late result is dropped.
The pool is bounded: ``size`` threads, created up front.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["HandlerExit", "HandlerThreads"]

_Job = tuple["asyncio.Future[Any]", contextvars.Context, Callable[[Any], Any], Any]


def _resolve(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():  # cancelled while the thread ran: nobody wants the result
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class HandlerExit(Exception):
    """A sync handler raised a ``BaseException`` that is not an ``Exception``.

    ``GeneratorExit``, ``SystemExit`` or ``KeyboardInterrupt`` raised by handler code
    is a failed attempt like any other error; it must not stop the worker that ran it.
    """

    def __init__(self, raised: BaseException) -> None:
        text = str(raised)
        name = type(raised).__name__
        super().__init__(f"handler raised {name}: {text}" if text else f"handler raised {name}")
        self.__cause__ = raised


class HandlerThreads:
    def __init__(self, size: int, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # Finished jobs wait here; one loop wake-up drains all that finished meanwhile.
        self._done: deque[tuple[asyncio.Future[Any], bool, Any]] = deque()
        self._drain_pending = False
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._main, name=f"{name}-{i}", daemon=True) for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, ctx: contextvars.Context, fn: Callable[[Any], Any], arg: Any) -> asyncio.Future[Any]:
        """Run ``ctx.run(fn, arg)`` in a pool thread; the future resolves on the loop."""
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._jobs.put((fut, ctx, fn, arg))
        return fut

    def shutdown(self) -> None:
        """Let idle threads exit; busy ones finish (or are abandoned) on their own."""
        for _ in self._threads:
            self._jobs.put(None)

    def _main(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, ctx, fn, arg = job
            try:
                self._done.append((fut, True, ctx.run(fn, arg)))
            except Exception as exc:  # delivered to the awaiting worker, never lost
                self._done.append((fut, False, exc))
            except BaseException as exc:  # GeneratorExit, SystemExit, KeyboardInterrupt
                # Raised into a coroutine these would end the worker task itself:
                # hand the worker an ordinary exception that names them instead.
                self._done.append((fut, False, HandlerExit(exc)))
            if not self._schedule_drain():
                return

    def _schedule_drain(self) -> bool:
        with self._lock:
            if self._drain_pending:
                return True
            self._drain_pending = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the app stopped without us
            return False
        return True

    def _drain(self) -> None:
        with self._lock:
            self._drain_pending = False
        done = self._done
        while done:
            _resolve(*done.popleft())
