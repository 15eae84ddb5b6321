"""Running an app until told to stop: signals, stop requests, and the report.

``App.run`` / ``App.arun`` (and ``conveyor run``) go through one
:class:`Supervisor`. It starts the app with its consumers, waits for SIGINT/SIGTERM,
:meth:`Supervisor.request_stop`, ``until()`` or a timeout, then stops in this order:
consumers (in-flight handlers get the grace period), a snapshot of every declared
queue's counts, the drivers. The first signal stops gracefully; a second one — or
any signal once stopping has begun — stops at once: handlers still running are
cancelled and their messages go back to their queues. Whatever handlers do (swallow
the cancellation, block in C, hold a non-daemon thread), a forced stop by signal
ends the process within ``FORCED_EXIT_AFTER`` seconds: if the run has not returned
by then, the process exits with status 128 + the signal's number, without further
clean-up; messages it still held come back through the driver's own recovery
(lease expiry, a closed connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol

from conveyor import errors
from conveyor._loop import forbid_running_loop
from conveyor.queue.runtime import Runtime
from conveyor.registry.model import Registry

__all__ = ["RunReport", "Runnable", "Supervisor"]

log = logging.getLogger("conveyor.app")

POLL_INTERVAL = 0.1  # seconds between checks of until() and the timeout
FORCED_EXIT_AFTER = 3.0  # seconds a stop forced by a signal may take before the process exits
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True, slots=True)
class RunReport:
    """How a run ended and what it did.

    ``reason`` is ``"signal"``, ``"request"`` (:meth:`App.request_stop`), ``"until"``
    (``until()`` returned true) or ``"timeout"``; ``forced`` is true when the stop
    was made immediate (a second signal, or a signal once stopping had begun);
    ``signal`` is the number of the last signal received.
    ``consumers`` holds each consumer's counters, ``queues`` each declared queue's
    counts once the consumers had stopped (``{}`` for one that could not be read).
    """

    reason: str
    forced: bool
    elapsed: float
    consumers: dict[str, dict[str, int]]
    queues: dict[str, dict[str, Any]]
    signal: int | None = None  # the last signal received, if a signal ended the run


class Runnable(Protocol):
    """What the supervisor needs from the app it runs."""

    registry: Registry
    runtime: Runtime

    def start(self, consumers: bool = False) -> Any: ...

    def stop(self, timeout: float | None = None) -> None: ...

    def stop_consumers(self, timeout: float | None = None) -> None: ...

    async def astart(self, consumers: bool = False) -> Any: ...

    async def astop(self, timeout: float | None = None) -> None: ...

    async def astop_consumers(self, timeout: float | None = None) -> None: ...

    def stats(self) -> dict[str, dict[str, int]]: ...


class Supervisor:
    """Runs one app; owned by it (``App.run`` / ``arun`` / ``request_stop`` delegate here)."""

    def __init__(self, app: Runnable) -> None:
        self._app = app
        self._requested = threading.Event()
        self._signals = 0
        self._last_signal: int | None = None
        self._stopping = False
        self._forced = False
        self._exit_timer: threading.Timer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self.force_event: asyncio.Event | None = None

    def arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called by the app as it starts on ``loop``: fresh stop and force events."""
        self._loop = loop
        self._stop_event = asyncio.Event()
        self.force_event = asyncio.Event()

    def _reset(self) -> None:
        self._requested.clear()
        self._signals = 0
        self._last_signal = None
        self._stopping = False
        self._forced = False

    # -- asking to stop ------------------------------------------------------------------

    def request_stop(self, immediate: bool = False) -> None:
        """Ask a running ``run``/``arun`` to stop (thread-safe); ``immediate`` skips the grace."""
        self._forced = self._forced or immediate
        self._requested.set()
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to stop
            loop.call_soon_threadsafe(self._set_events, immediate)

    def _set_events(self, immediate: bool) -> None:
        if self._stop_event is not None:
            self._stop_event.set()
        if immediate and self.force_event is not None:
            self.force_event.set()

    def _on_signal(self, signum: int, frame: FrameType | None = None) -> None:
        self._signals += 1
        self._last_signal = signum
        name = signal.Signals(signum).name
        immediate = self._signals > 1 or self._stopping
        if immediate:
            log.warning("received %s: stopping at once", name)
            self._arm_exit(signum)
        else:
            log.info("received %s: stopping gracefully (send it again to stop at once)", name)
        self.request_stop(immediate)

    def _arm_exit(self, signum: int) -> None:
        """The last resort of a forced stop: end the process if the run has not returned."""
        if self._exit_timer is not None:
            return
        timer = threading.Timer(FORCED_EXIT_AFTER, _exit_now, (signum,))
        timer.daemon = True
        timer.name = "conveyor-forced-exit"
        self._exit_timer = timer
        timer.start()

    def _disarm_exit(self) -> None:
        timer, self._exit_timer = self._exit_timer, None
        if timer is not None:
            timer.cancel()

    # -- the blocking form ---------------------------------------------------------------

    def run(
        self, *, grace: float | None, until: Callable[[], bool] | None, timeout: float | None
    ) -> RunReport:
        forbid_running_loop("app.arun")
        self._reset()
        started = time.monotonic()
        restore = self._install_handlers()
        try:
            self._app.start(consumers=True)
            try:
                reason = self._wait(started, until, timeout)
                self._begin_stop(reason)
                self._app.stop_consumers(grace)
                queues = self._app.runtime.blocking(self.snapshot(), "app.arun")
            finally:
                self._app.stop(grace)
        finally:
            restore()
            self._disarm_exit()
        return self._report(reason, started, queues)

    def _wait(self, started: float, until: Callable[[], bool] | None, timeout: float | None) -> str:
        while not self._requested.wait(POLL_INTERVAL):
            if until is not None and until():
                return "until"
            if timeout is not None and time.monotonic() - started >= timeout:
                return "timeout"
        return "signal" if self._signals else "request"

    def _install_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _SIGNALS}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    # -- the async form --------------------------------------------------------------------

    async def arun(self, *, grace: float | None) -> RunReport:
        self._reset()
        started = time.monotonic()
        await self._app.astart(consumers=True)
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
        try:
            assert self._stop_event is not None  # armed by astart
            await self._stop_event.wait()
            reason = "signal" if self._signals else "request"
            self._begin_stop(reason)
            await self._app.astop_consumers(grace)
            queues = await self.snapshot()
        finally:
            try:
                for sig in installed:
                    loop.remove_signal_handler(sig)
                await asyncio.shield(self._app.astop(grace))
            finally:
                self._disarm_exit()
        return self._report(reason, started, queues)

    # -- stopping ----------------------------------------------------------------------------

    def _begin_stop(self, reason: str) -> None:
        self._stopping = True
        log.info("stopping (%s)", reason)

    async def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every declared queue's counts; ``{}`` (and a warning) for one that fails."""
        found: dict[str, dict[str, Any]] = {}
        for qid in self._app.registry.queues:
            try:
                found[qid] = await self._app.runtime.ainfo(qid)
            except errors.Error as exc:
                log.warning("cannot read queue %s: %s", qid, exc)
                found[qid] = {}
        return found

    def _report(self, reason: str, started: float, queues: dict[str, dict[str, Any]]) -> RunReport:
        elapsed = time.monotonic() - started
        return RunReport(reason, self._forced, elapsed, self._app.stats(), queues, self._last_signal)


def _exit_now(signum: int) -> None:
    log.critical(
        "forced stop did not finish within %.1fs (a handler ignores cancellation?); exiting now",
        FORCED_EXIT_AFTER,
    )
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(128 + signum)
