"""Starting what may not be ready yet, and starting again what failed.

Every driver and consumer has a ``lifecycle.startup`` of ``required`` (the default)
or ``optional`` and a ``lifecycle.startup_timeout`` (default 30 s):

- A start that fails with a *retryable* error (a broker not reachable yet) is tried
  again with exponential backoff (:class:`Backoff`) until ``startup_timeout``. A
  worker started before its broker therefore comes up by itself once the broker does.
  A non-retryable error (bad credentials, a bad path) is not retried.
- When the start still fails, a ``required`` part fails the app's start; an
  ``optional`` one is logged at ERROR and the app starts without it, while
  :class:`Restarts` keeps trying in the background (backoff capped at
  ``MAX_DELAY``) and completes the start once it succeeds: a driver's queues are
  declared and its consumers started; a consumer starts.

:class:`Restarts` owns its background tasks; the app cancels them first when it
stops, before consumers and drivers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from conveyor import errors

__all__ = ["FIRST_DELAY", "MAX_DELAY", "Backoff", "Restarts", "start_with_retries"]

log = logging.getLogger("conveyor.app")

FIRST_DELAY = 0.2  # seconds before the second try
MAX_DELAY = 30.0  # seconds: the longest wait between two tries


@dataclass(slots=True)
class Backoff:
    """Delays ``first, 2*first, 4*first ...`` capped at ``cap``, with ±20 % jitter."""

    first: float = FIRST_DELAY
    cap: float = MAX_DELAY
    _next: float = field(default=0.0, init=False)

    def next(self) -> float:
        base = self._next or self.first
        self._next = min(base * 2, self.cap)
        return base * random.uniform(0.8, 1.2)  # jitter: tries of many workers spread out

    def reset(self) -> None:
        self._next = 0.0


async def start_with_retries(what: str, start: Callable[[], Awaitable[None]], timeout: float) -> None:
    """Run ``start`` until it succeeds; retry retryable errors until ``timeout`` seconds.

    Raises the last error (its message says for how long it was tried) when the time is
    up, and a non-retryable error at once.
    """
    deadline = time.monotonic() + timeout
    backoff = Backoff()
    tries = 0
    while True:
        tries += 1
        try:
            await start()
        except errors.Error as exc:
            left = deadline - time.monotonic()
            if not exc.retryable:
                raise
            if left <= 0:
                raise _gave_up(what, exc, tries, timeout) from None
            delay = min(backoff.next(), left)
            log.warning("%s did not start (%s); trying again in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
            continue
        if tries > 1:
            log.info("%s started after %d tries", what, tries)
        return


def _gave_up(what: str, exc: errors.Error, tries: int, timeout: float) -> errors.Error:
    return errors.Error(
        exc.kind,
        f"{what} did not start within its {timeout:g}s startup_timeout ({tries} tries): {exc.message}",
        retryable=exc.retry_hint,
        details={**exc.details, "tries": tries},
    )


class Restarts:
    """Background tries of optional parts that did not start; owned by one app."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._tasks

    def pending(self) -> list[str]:
        return sorted(self._tasks)

    def add(self, name: str, what: str, start: Callable[[], Awaitable[None]]) -> None:
        """Keep calling ``start`` (with backoff) until it succeeds; once per ``name``."""
        if name in self._tasks:
            return
        task = asyncio.get_running_loop().create_task(self._keep_trying(what, start), name=f"restart {name}")
        self._tasks[name] = task
        task.add_done_callback(lambda _: self._tasks.pop(name, None))

    async def _keep_trying(self, what: str, start: Callable[[], Awaitable[None]]) -> None:
        backoff = Backoff()
        while True:
            delay = backoff.next()
            await asyncio.sleep(delay)
            try:
                await start()
            except errors.Error as exc:
                log.error("%s still does not start: %s", what, exc)
                continue
            except Exception:
                log.exception("%s still does not start", what)
                continue
            log.info("%s started", what)
            return

    async def cancel(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._tasks.clear()
