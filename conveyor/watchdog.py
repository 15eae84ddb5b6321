"""Noticing a blocked event loop, and saying who blocks it.

Async handlers share the app's event loop with every other consumer, the drivers'
connections and their heartbeats. One that blocks it (``time.sleep``, CPU work, a
blocking client) stalls all of them: a broker that misses heartbeats drops the
connection and redelivers. :class:`LoopWatchdog` is a daemon thread that pings the
loop every ``interval`` seconds; when a ping waits longer than ``threshold`` it logs
a WARNING naming the task that runs (a consumer worker is named
``<consumer id>#<n>``) and where its code is, and another once the loop is free again,
with how long it was blocked. It only observes: nothing is interrupted.

Owned by the app: started by ``App.astart`` after the drivers are open, stopped by
``App.astop`` after they are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from pathlib import Path
from types import FrameType

__all__ = ["BLOCKED_AFTER", "LoopWatchdog"]

log = logging.getLogger("conveyor.app")

BLOCKED_AFTER = 1.0  # seconds the loop may be held before a WARNING names who holds it
_PACKAGE = str(Path(__file__).parent)
_STDLIB_ASYNCIO = str(Path(asyncio.__file__).parent)


class LoopWatchdog:
    """Watches ``loop``, run by the thread whose ident is ``thread_id``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        thread_id: int,
        *,
        threshold: float = BLOCKED_AFTER,
        interval: float | None = None,
    ) -> None:
        self.loop = loop
        self.thread_id = thread_id
        self.threshold = threshold
        self.interval = interval if interval is not None else min(threshold / 4, 0.25)
        self.blocked_count = 0  # stalls reported so far
        self.longest = 0.0  # the longest stall seen, in seconds
        self._stop = threading.Event()
        self._answered = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="conveyor-loop-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end; not joined (it may be called from the loop it pings,
        and the thread is a daemon that ends within ``interval``)."""
        self._stop.set()
        self._answered.set()
        self._thread = None

    def _main(self) -> None:
        while not self._stop.is_set():
            self._answered.clear()
            sent = time.monotonic()
            try:
                self.loop.call_soon_threadsafe(self._answered.set)
            except RuntimeError:  # the loop is closed
                return
            if self._answered.wait(self.threshold) or self._stop.is_set():
                self._stop.wait(self.interval)
                continue
            where = self._where()
            log.warning(
                "event loop blocked for %.1fs so far by %s: an async handler must not block "
                "(await, or make it a sync handler, which runs in a thread)",
                time.monotonic() - sent,
                where,
                extra={"blocked_by": where},
            )
            while not self._answered.wait(self.interval):
                if self._stop.is_set():
                    return
            blocked = time.monotonic() - sent
            self.blocked_count += 1
            self.longest = max(self.longest, blocked)
            log.warning("event loop was blocked for %.1fs by %s", blocked, where, extra={"blocked_by": where})

    def _where(self) -> str:
        """The running task's name and the innermost frame of code outside conveyor and asyncio."""
        task_name = None
        with contextlib.suppress(Exception):  # a racy read from another thread, for the log only
            task = asyncio.tasks._current_tasks.get(self.loop)  # type: ignore[attr-defined]
            task_name = task.get_name() if task is not None else None
        frame = sys._current_frames().get(self.thread_id)
        place = _user_frame(frame)
        parts = [f"task {task_name}" if task_name else "a callback", place or "unknown code"]
        return " at ".join(parts)


def _user_frame(frame: FrameType | None) -> str | None:
    """``file:line in function`` of the innermost frame that is not conveyor's or asyncio's."""
    fallback = None
    while frame is not None:
        filename = frame.f_code.co_filename
        text = f"{filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        if fallback is None:
            fallback = text
        if not filename.startswith((_PACKAGE, _STDLIB_ASYNCIO)) and "/selectors.py" not in filename:
            return text
        frame = frame.f_back
    return fallback
