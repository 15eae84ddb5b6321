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
grace period), close the drivers, detach the runtime, close the metrics endpoint (if
``serve_metrics`` asked for one; it binds first thing on start), and finally stop the
loop thread if the app owns one. After ``stop`` returns no task of the app is pending.

Size: over 500 lines because the app's lifecycle is one piece of state (loop, drivers,
queues, consumers, background restarts, watchdog) that start, stop and the late start
of optional parts all change (the metrics endpoint and the tracer are wired into that
same order); the run loop, startup retries, the watchdog, the metrics and health
endpoint and tracing already live in ``running``, ``supervision``, ``watchdog``,
``observe`` and ``tracing``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from conveyor import errors
from conveyor._loop import LoopThread, forbid_running_loop, run_blocking
from conveyor.consumer.retry import RetryRule
from conveyor.consumer.runtime import Consumer, DeliveryTracer, is_async_handler
from conveyor.drivers.base import Driver
from conveyor.drivers.kinds import driver_class
from conveyor.functions import Functions
from conveyor.logs import consumer_fields
from conveyor.observe.health import Parts
from conveyor.observe.http import Listen
from conveyor.observe.observer import Observer
from conveyor.queue import context as qctx
from conveyor.queue.bound import BoundQueue
from conveyor.queue.codecs import get_codec
from conveyor.queue.runtime import Runtime
from conveyor.registry.ids import canonical_id
from conveyor.registry.loader import load_registry
from conveyor.registry.model import ConsumerSpec, DriverSpec, Registry
from conveyor.registry.problems import Problem, problems_error
from conveyor.running import RunReport, Supervisor
from conveyor.security.context import SecurityContext, context_from_block
from conveyor.security.policy import PolicyEngine, queue_aliases
from conveyor.supervision import Restarts, start_with_retries
from conveyor.watchdog import LoopWatchdog

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

__all__ = ["DEFAULT_GRACE", "App", "RunReport"]

log = logging.getLogger("conveyor.app")

T = TypeVar("T")

DEFAULT_GRACE = 30.0


class App:
    """A loaded app. ``with app`` / ``async with app`` start it without consumers."""

    def __init__(
        self,
        registry: Registry,
        *,
        log_bodies: bool = False,
        tracing: bool | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.registry = registry
        self.log_bodies = log_bodies
        # OpenTelemetry (docs/operations.md#tracing): None = on when a real tracer provider
        # is set when the app starts (or tracer_provider is given); True/False force it.
        self.tracing = tracing
        self.tracer_provider = tracer_provider
        self._delivery_tracer: DeliveryTracer | None = None
        self.consumers: dict[str, Consumer] = {}
        self.stopped_stats: dict[str, dict[str, int]] = {}  # stats of consumers since stopped
        engine = PolicyEngine(
            registry.policies, registry.strict_security, aliases=queue_aliases(registry.queues)
        )
        self.runtime = Runtime(engine)
        self.functions = Functions(registry)
        self._drivers: dict[str, Driver] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: LoopThread | None = None
        self._tokens: list[contextvars.Token[Any]] = []
        self._supervisor = Supervisor(self)
        self._on_start_done = False
        self._watchdog: LoopWatchdog | None = None
        self._restarts = Restarts()
        self._missing: dict[str, str] = {}  # optional drivers not started yet: id -> why
        self._consumers_started = False  # astart_consumers() ran for the auto_start set
        # metrics and health (docs/operations.md#metrics); serves only after serve_metrics()
        self._observer = Observer(registry, self.runtime, self.consumers, self._health_parts)

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
            await self._observer.open(self._loop)  # first: /healthz answers during the start
            self.preflight(consumers)
            await self._open_drivers()
            queues = await self._declare_queues()
        except BaseException:
            await self._close_drivers()
            await self._observer.close()
            self._loop = None
            raise
        self._start_tracing()
        self.runtime.attach(self._loop, queues, unavailable=self._unavailable_queues())
        self._watchdog = LoopWatchdog(self._loop, threading.get_ident())
        self._watchdog.start()
        self._retry_missing_drivers()
        if consumers:
            try:
                await self.astart_consumers()
            except BaseException:
                await self.astop(0)
                raise
        self._observer.opened()
        return self

    async def astop(self, timeout: float | None = None) -> None:
        if self._loop is None:
            return
        self._observer.stopping()  # /readyz fails from now on
        await self._restarts.cancel()
        await self.astop_consumers(timeout)
        await self._close_drivers()
        self._missing.clear()
        self._consumers_started = False
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        self.runtime.detach()
        self._on_start_done = False
        await self._observer.close()  # the metrics endpoint, last before the loop
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
            starting = self._consumer_order(None)
            problems += self.functions.problems(starting)
            problems += _retry_problems(starting)
            problems += self._hard_timeout_problems(starting)
        if problems:
            raise problems_error("cannot start the app", problems)

    def _hard_timeout_problems(self, consumers: list[ConsumerSpec]) -> list[Problem]:
        found: list[Problem] = []
        for spec in consumers:
            if spec.hard_timeout is None:
                continue
            try:
                handler = self.functions.handler(spec)
            except errors.Error:
                continue  # reported by the handler check
            if is_async_handler(handler):
                found.append(
                    Problem(
                        spec.origin.file,
                        spec.id,
                        "hard_timeout",
                        "hard_timeout applies to sync and Lua handlers (they run in worker "
                        "processes); an async handler is bounded by timeout",
                    )
                )
            elif _load_path(self.registry) is None:
                found.append(
                    Problem(
                        spec.origin.file,
                        spec.id,
                        "hard_timeout",
                        "hard_timeout needs an app loaded from files (handler processes load them again)",
                    )
                )
        return found

    def _start_tracing(self) -> None:
        """Decide, for this start, whether publishes and deliveries are traced."""
        built = None
        if self.tracing is not False and (
            self.tracing or self.tracer_provider is not None or _tracing_possible()
        ):
            from conveyor.tracing import tracers  # noqa: PLC0415 - imports OpenTelemetry

            built = tracers(self.tracer_provider, force=self.tracing is True)
        self.runtime.tracer, self._delivery_tracer = built if built is not None else (None, None)

    async def _open_drivers(self) -> None:
        """Open every driver, retrying retryable failures (see :mod:`conveyor.supervision`)."""
        for spec in self.registry.drivers.values():
            try:
                self._drivers[spec.id] = await self._open_driver(spec)
            except errors.Error as exc:
                if spec.startup != "optional":
                    raise
                log.error(
                    "driver %s did not start; it is optional, so the app starts without it "
                    "(its queues and consumers wait for it; retrying in the background): %s",
                    spec.id,
                    exc,
                )
                self._missing[spec.id] = exc.message

    async def _open_driver(self, spec: DriverSpec) -> Driver:
        opened: list[Driver] = []

        async def open_once() -> None:
            driver = driver_class(spec.kind)(spec)
            try:
                await driver.open()
            except BaseException:
                with contextlib.suppress(Exception):
                    await driver.close()
                raise
            opened.append(driver)

        await start_with_retries(f"driver {spec.id}", open_once, spec.startup_timeout)
        return opened[0]

    async def _declare_queues(self, driver_id: str | None = None) -> dict[str, BoundQueue]:
        """Declare the queues of open drivers (of ``driver_id`` only, if given)."""
        queues: dict[str, BoundQueue] = {}
        for spec in self.registry.queues.values():
            driver = self._drivers.get(spec.driver)
            if driver is None or (driver_id is not None and spec.driver != driver_id):
                continue
            await driver.declare(spec)
            queues[spec.id] = BoundQueue(spec, get_codec(spec.codec), driver)
        return queues

    def _unavailable_queues(self) -> dict[str, str]:
        """Queues on optional drivers that have not started, with why."""
        return {
            spec.id: f"its driver {spec.driver} has not started: {self._missing[spec.driver]}"
            for spec in self.registry.queues.values()
            if spec.driver in self._missing
        }

    def _retry_missing_drivers(self) -> None:
        for driver_id in self._missing:
            spec = self.registry.drivers[driver_id]
            self._restarts.add(f"driver {driver_id}", f"driver {driver_id}", partial(self._late_driver, spec))

    async def _late_driver(self, spec: DriverSpec) -> None:
        """An optional driver came up: declare its queues, start the consumers waiting for it."""
        driver = await self._open_driver(spec)
        self._drivers[spec.id] = driver
        try:
            queues = await self._declare_queues(spec.id)
        except BaseException:
            del self._drivers[spec.id]
            with contextlib.suppress(Exception):
                await driver.close()
            raise
        self._missing.pop(spec.id, None)
        self.runtime.add(queues)
        if self._consumers_started:
            for cspec in self._consumer_order(None):
                if self.registry.queues[cspec.queue].driver == spec.id:
                    await self._start_or_defer(cspec)

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
        self._observer.retire(self.consumers)  # keeps their metrics, then clears the dict

    async def astart_consumers(self, ids: Iterable[str] | None = None) -> None:
        """Start the given consumers (default: every ``auto_start`` one) in dependency order."""
        if not self.running:
            raise errors.invalid("app is not started")
        for spec in self._consumer_order(ids):
            await self._start_or_defer(spec)
        if ids is None:
            self._consumers_started = True
        if ids is None and not self._on_start_done:
            self._on_start_done = True
            await self._run_on_start()

    def _process_factory(self, spec: ConsumerSpec) -> Callable[[], Callable[[Any], Any]] | None:
        """What a handler process runs to build ``spec``'s handler (with ``hard_timeout``)."""
        if spec.hard_timeout is None:
            return None
        path = _load_path(self.registry)
        if path is None:
            raise errors.invalid(
                f"consumer {spec.id}: hard_timeout needs an app loaded from files "
                "(handler processes load them again)"
            )
        return partial(handler_in_process, path, spec.id)

    async def _start_or_defer(self, spec: ConsumerSpec) -> None:
        """Start ``spec`` (retrying retryable failures until its startup_timeout); an
        optional consumer that still fails, or one whose optional driver is not up yet,
        is left to the background restarts."""
        driver_id = self.registry.queues[spec.queue].driver
        if driver_id in self._missing:
            log.warning("consumer %s waits for its driver %s, which has not started", spec.id, driver_id)
            return  # started by _late_driver
        try:
            await start_with_retries(
                f"consumer {spec.id}", partial(self._start_consumer, spec), spec.startup_timeout
            )
        except errors.Error as exc:
            if spec.startup != "optional":
                raise
            log.error(
                "consumer %s did not start; it is optional, so the app runs without it "
                "(retrying in the background): %s",
                spec.id,
                exc,
            )
            what = f"consumer {spec.id}"
            self._restarts.add(what, what, partial(self._start_consumer, spec))

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
            context=partial(self._worker_context, spec, security),
            log_bodies=self.log_bodies,
            process_factory=self._process_factory(spec),
            tracer=self._delivery_tracer,
            timed=self._observer.configured,
        )
        await consumer.start()
        self.consumers[spec.id] = consumer

    def _worker_context(self, spec: ConsumerSpec, security: SecurityContext | None) -> contextvars.Context:
        """A worker's context: the runtime's, plus the consumer's log fields (conveyor.logs)."""
        ctx = self.runtime.context(security)
        ctx.run(consumer_fields.set, {"consumer": spec.id, "queue": spec.queue})
        return ctx

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

    # -- metrics and health (conveyor.observe; docs/operations.md#metrics) -----------------

    def serve_metrics(self, port: int = 0, host: str = "127.0.0.1", *, path: str | None = None) -> None:
        """Serve ``/metrics``, ``/healthz`` and ``/readyz`` over HTTP while the app runs.

        Call before starting the app. The server binds ``host``:``port`` (port 0: a free
        port; see :attr:`metrics_address`) first thing when the app starts (INVALID if it
        cannot, e.g. the port is in use) and closes last when it stops. ``path`` serves
        on a Unix socket instead (what ``conveyor run --processes`` workers do).
        """
        if self.running:
            raise errors.invalid("serve_metrics() must be called before the app starts")
        self._observer.configure(Listen(host, port, path))

    @property
    def metrics_address(self) -> tuple[str, int] | str | None:
        """Where the metrics endpoint listens — ``(host, port)`` as bound, or the Unix
        socket's path — while the app runs; None otherwise."""
        return self._observer.address

    def _health_parts(self) -> Parts:
        """What ``/readyz`` judges; called on the app's loop."""
        wanted = [spec.id for spec in self._consumer_order(None)] if self._consumers_started else []
        return Parts(
            self.registry,
            dict(self._drivers),
            dict(self._missing),
            dict(self.consumers),
            wanted,
            self._restarts.pending(),
        )


def handler_in_process(path: str, consumer_id: str) -> Callable[[Any], Any]:
    """Run in a handler process (``hard_timeout``): load the app's files, resolve the handler."""
    registry = load_registry(path)
    spec = registry.consumers.get(consumer_id)
    if spec is None:
        raise errors.invalid(f"consumer {consumer_id} is not declared in {path}")
    return Functions(registry).handler(spec)


def _tracing_possible() -> bool:
    """False when no tracer provider can have been configured: OpenTelemetry's trace API
    was never imported and no provider is named by the environment (import it only then)."""
    return "opentelemetry.trace" in sys.modules or bool(os.environ.get("OTEL_PYTHON_TRACER_PROVIDER"))


def _load_path(registry: Registry) -> str | None:
    """What to load again in a handler process: the one file, or the files' directory."""
    files = registry.files
    if not files:
        return None
    if len(files) == 1:
        return str(files[0])
    return os.path.commonpath([str(f.parent) for f in files])


def _retry_problems(consumers: list[ConsumerSpec]) -> list[Problem]:
    """Exception classes named by ``retry.never_on`` / ``always_on`` that cannot be imported."""
    found: list[Problem] = []
    for spec in consumers:
        try:
            RetryRule.of(spec)
        except errors.Error as exc:
            found.append(Problem(spec.origin.file, spec.id, "retry", exc.message))
    return found
