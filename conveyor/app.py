"""``App``: one loaded configuration and, while started, its running runtime.

An app owns its drivers, its queue :class:`~conveyor.queue.runtime.Runtime` (what
``conveyor.queue`` publishes through), its consumers and, when started from plain
code, the thread running its event loop. It builds every consumer with what the
consumer needs — bound queue, dead-letter queue, handler, worker context — so
nothing below it ever calls back up.

Start order: resolve every driver class and handler (all problems at once), open
the drivers, declare the queues, attach them to the runtime (the app is now
running and current), then — with ``consumers=True`` — start consumers in
``depends_on`` order and call ``on_start`` functions.

Stop order (the reverse): stop consumers (all at once, each gracefully within the
grace period), close the drivers, detach the runtime, and finally stop the loop
thread if the app owns one. After ``stop`` returns no task of the app is pending.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from functools import partial
from types import TracebackType
from typing import Any, TypeVar

from conveyor import errors
from conveyor._loop import LoopThread, forbid_running_loop, run_blocking
from conveyor.consumer.runtime import Consumer, is_async_handler
from conveyor.drivers.base import Driver
from conveyor.drivers.kinds import driver_class
from conveyor.functions import Functions
from conveyor.queue import context as qctx
from conveyor.queue.bound import BoundQueue
from conveyor.queue.codecs import get_codec
from conveyor.queue.runtime import Runtime
from conveyor.registry.ids import canonical_id
from conveyor.registry.model import ConsumerSpec, Registry
from conveyor.registry.problems import Problem, problems_error
from conveyor.running import RunReport, Supervisor
from conveyor.security.context import context_from_block
from conveyor.security.policy import PolicyEngine

__all__ = ["DEFAULT_GRACE", "App", "RunReport"]

log = logging.getLogger("conveyor.app")

T = TypeVar("T")

DEFAULT_GRACE = 30.0


class App:
    """A loaded app. ``with app`` / ``async with app`` start it without consumers."""

    def __init__(self, registry: Registry, *, log_bodies: bool = False) -> None:
        self.registry = registry
        self.log_bodies = log_bodies
        self.consumers: dict[str, Consumer] = {}
        self.stopped_stats: dict[str, dict[str, int]] = {}  # stats of consumers since stopped
        self.runtime = Runtime(PolicyEngine(registry.policies, registry.strict_security))
        self.functions = Functions(registry)
        self._drivers: dict[str, Driver] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: LoopThread | None = None
        self._tokens: list[contextvars.Token[Any]] = []
        self._supervisor = Supervisor(self)
        self._on_start_done = False

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<conveyor.App {len(self.registry.queues)} queues, {state}>"

    @property
    def running(self) -> bool:
        """True from the moment the queues are declared until the app stops."""
        return self.runtime.running

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise errors.invalid("app is not started")
        return self._loop

    # -- sync lifecycle --------------------------------------------------------------

    def start(self, consumers: bool = False) -> App:
        """Start drivers and queues (and consumers); blocking form of :meth:`astart`."""
        forbid_running_loop("app.astart")
        if self.running:
            raise errors.invalid("app is already started")
        self._loop_thread = LoopThread(name="conveyor-loop")
        self._loop_thread.start()
        try:
            run_blocking(self._loop_thread.loop, self.astart(consumers=consumers))
        except BaseException:
            self._loop_thread.stop()
            self._loop_thread = None
            raise
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully (``timeout`` s for in-flight handlers); blocking form of :meth:`astop`."""
        forbid_running_loop("app.astop")
        if self._loop is None:
            return
        try:
            run_blocking(self._loop, self.astop(timeout))
        finally:
            if self._loop_thread is not None:
                self._loop_thread.stop()
                self._loop_thread = None

    def __enter__(self) -> App:
        self.start(consumers=False)
        self._tokens.append(qctx.entered.set(self.runtime))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._tokens:
            qctx.entered.reset(self._tokens.pop())
        self.stop()

    async def __aenter__(self) -> App:
        await self.astart(consumers=False)
        self._tokens.append(qctx.entered.set(self.runtime))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._tokens:
            qctx.entered.reset(self._tokens.pop())
        await self.astop()

    # -- async lifecycle -------------------------------------------------------------

    async def astart(self, consumers: bool = False) -> App:
        if self.running:
            raise errors.invalid("app is already started")
        self._loop = asyncio.get_running_loop()
        self._supervisor.arm(self._loop)
        try:
            self.preflight(consumers)
            await self._open_drivers()
            queues = await self._declare_queues()
        except BaseException:
            await self._close_drivers()
            self._loop = None
            raise
        self.runtime.attach(self._loop, queues)
        if consumers:
            try:
                await self.astart_consumers()
            except BaseException:
                await self.astop(0)
                raise
        return self

    async def astop(self, timeout: float | None = None) -> None:
        if self._loop is None:
            return
        await self.astop_consumers(timeout)
        await self._close_drivers()
        self.runtime.detach()
        self._on_start_done = False
        self._loop = None

    def preflight(self, consumers: bool = True) -> None:
        """Resolve every driver class and (with ``consumers``) every handler without starting.

        Raises one INVALID error, "cannot start the app", listing every problem
        (``details["problems"]`` holds dicts with ``file``, ``entry``, ``field``,
        ``message`` and ``line``). ``start`` runs this first, so nothing is opened for
        an app that cannot run; ``conveyor check`` runs it to catch import errors
        before deployment.
        """
        problems: list[Problem] = []
        for spec in self.registry.drivers.values():
            try:
                driver_class(spec.kind)
            except errors.Error as exc:
                problems.append(Problem(spec.origin.file, spec.id, "kind", exc.message))
        if consumers:
            # auto_start consumers and their dependencies, then on_start functions
            problems += self.functions.problems(self._consumer_order(None))
        if problems:
            raise problems_error("cannot start the app", problems)

    async def _open_drivers(self) -> None:
        for spec in self.registry.drivers.values():
            driver = driver_class(spec.kind)(spec)
            await driver.open()
            self._drivers[spec.id] = driver

    async def _declare_queues(self) -> dict[str, BoundQueue]:
        queues: dict[str, BoundQueue] = {}
        for spec in self.registry.queues.values():
            driver = self._drivers[spec.driver]
            await driver.declare(spec)
            queues[spec.id] = BoundQueue(spec, get_codec(spec.codec), driver)
        return queues

    async def _close_drivers(self) -> None:
        drivers, self._drivers = list(self._drivers.values()), {}
        for driver in reversed(drivers):
            try:
                await driver.close()
            except Exception:
                log.exception("closing driver %s failed", driver.spec.id)

    # -- consumers -------------------------------------------------------------------

    def start_consumers(self, ids: Iterable[str] | None = None) -> None:
        """Blocking form of :meth:`astart_consumers`."""
        self._blocking(self.astart_consumers(ids), "app.astart_consumers")

    def stop_consumers(self, timeout: float | None = None) -> None:
        """Blocking form of :meth:`astop_consumers`."""
        self._blocking(self.astop_consumers(timeout), "app.astop_consumers")

    async def astop_consumers(self, timeout: float | None = None) -> None:
        """Stop every running consumer gracefully; drivers and queues stay up."""
        grace = DEFAULT_GRACE if timeout is None else max(timeout, 0.0)
        consumers = list(self.consumers.values())
        if consumers:
            force = self._supervisor.force_event
            await asyncio.gather(*(c.stop(grace, force) for c in consumers))
        self.stopped_stats.update({c.spec.id: c.stats.as_dict() for c in consumers})
        self.consumers.clear()

    async def astart_consumers(self, ids: Iterable[str] | None = None) -> None:
        """Start the given consumers (default: every ``auto_start`` one) in dependency order."""
        if not self.running:
            raise errors.invalid("app is not started")
        for spec in self._consumer_order(ids):
            await self._start_consumer(spec)
        if ids is None and not self._on_start_done:
            self._on_start_done = True
            await self._run_on_start()

    async def _start_consumer(self, spec: ConsumerSpec) -> None:
        if spec.id in self.consumers:
            return
        queue = self.runtime.queue(spec.queue)
        dead_letter = queue.spec.dead_letter
        security = context_from_block(spec.security) if spec.security else None
        consumer = Consumer(
            spec,
            queue,
            self.functions.handler(spec),
            dead_letter=self.runtime.queue(dead_letter.queue) if dead_letter else None,
            context=partial(self.runtime.context, security),
            log_bodies=self.log_bodies,
        )
        await consumer.start()
        self.consumers[spec.id] = consumer

    def _consumer_order(self, ids: Iterable[str] | None) -> list[ConsumerSpec]:
        registry = self.registry.consumers
        if ids is None:
            roots = [s.id for s in registry.values() if s.auto_start]
        else:
            roots = list(ids)
            for cid in roots:
                if cid not in registry:
                    raise errors.not_found(f"consumer {cid} is not declared", consumer=cid)
        ordered: list[ConsumerSpec] = []
        seen: set[str] = set()

        def visit(cid: str) -> None:
            if cid in seen:
                return
            seen.add(cid)
            spec = registry[cid]
            for dep in spec.depends_on:
                if dep in registry:
                    visit(dep)
            ordered.append(spec)

        for cid in roots:
            visit(cid)
        return ordered

    async def _run_on_start(self) -> None:
        for spec in self.registry.functions.values():
            if spec.on_start:
                log.info("calling on_start function %s", spec.id)
                await self.acall(spec.id)

    # -- running until a signal ----------------------------------------------------------

    def run(
        self,
        *,
        grace: float | None = None,
        until: Callable[[], bool] | None = None,
        timeout: float | None = None,
    ) -> RunReport:
        """Start with consumers and block until SIGINT/SIGTERM, ``until()`` or ``timeout``.

        Then stop: consumers first (in-flight handlers get ``grace`` seconds), a
        snapshot of every queue's counts, then the drivers. The first signal stops
        gracefully; a second one, or any signal once stopping has begun, stops at once.
        Returns what happened (:class:`RunReport`).
        """
        return self._supervisor.run(grace=grace, until=until, timeout=timeout)

    async def arun(self, *, grace: float | None = None) -> RunReport:
        """Async form of :meth:`run`: runs until signalled or :meth:`request_stop`."""
        return await self._supervisor.arun(grace=grace)

    def request_stop(self, immediate: bool = False) -> None:
        """Ask a running :meth:`run` to stop (thread-safe); ``immediate`` skips the grace period."""
        self._supervisor.request_stop(immediate)

    # -- idleness (used by `conveyor run --until-idle` and tests) -------------------------

    async def ais_idle(self) -> bool:
        """True when no handler runs and every consumed queue holds no message at all."""
        for consumer in self.consumers.values():
            if consumer.in_flight:
                return False
            info = await consumer.queue.driver.info(consumer.queue.spec)
            if info.get("message_count", 0):
                return False
        return True

    def is_idle(self) -> bool:
        return self._blocking(self.ais_idle(), "app.ais_idle")

    async def await_idle(self, *, settle: float = 0.2, timeout: float | None = None) -> bool:
        """Wait until idle for ``settle`` s in a row; False on ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        idle_since: float | None = None
        while True:
            now = time.monotonic()
            if await self.ais_idle():
                idle_since = idle_since or now
                if now - idle_since >= settle:
                    return True
            else:
                idle_since = None
            if deadline is not None and now >= deadline:
                return False
            await asyncio.sleep(0.05)

    def wait_idle(self, *, settle: float = 0.2, timeout: float | None = None) -> bool:
        return self._blocking(self.await_idle(settle=settle, timeout=timeout), "app.await_idle")

    # -- functions and queues ----------------------------------------------------------

    def call(self, func_id: str, *args: Any) -> Any:
        """Invoke a function entry in the app's context and return its result."""
        forbid_running_loop("app.acall")
        fn = self.functions.function(canonical_id(func_id, what="function ID"))
        if is_async_handler(fn):
            return self._blocking(self._call_async(fn, args), "app.acall")
        ctx = contextvars.copy_context()
        ctx.run(qctx.entered.set, self.runtime)
        return ctx.run(fn, *args)

    async def acall(self, func_id: str, *args: Any) -> Any:
        fn = self.functions.function(canonical_id(func_id, what="function ID"))
        if is_async_handler(fn):
            return await self._call_async(fn, args)
        ctx = contextvars.copy_context()
        ctx.run(qctx.entered.set, self.runtime)
        return await asyncio.to_thread(ctx.run, fn, *args)

    async def _call_async(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        token = qctx.entered.set(self.runtime)
        try:
            return await fn(*args)
        finally:
            qctx.entered.reset(token)

    def info(self, queue_id: str) -> dict[str, Any]:
        """Blocking form of :meth:`ainfo` (usable whether or not this app is current)."""
        return self._blocking(self.ainfo(queue_id), "app.ainfo")

    async def ainfo(self, queue_id: str) -> dict[str, Any]:
        """Queue counts from this app's driver, whether or not this app is current."""
        return await self.runtime.ainfo(queue_id)

    def _blocking(self, coro: Coroutine[Any, Any, T], async_name: str) -> T:
        return self.runtime.blocking(coro, async_name)

    # -- stats -------------------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, int]]:
        """Per-consumer counters: running consumers and those stopped since the app started."""
        merged = dict(self.stopped_stats)
        merged.update({cid: c.stats.as_dict() for cid, c in self.consumers.items()})
        return merged
