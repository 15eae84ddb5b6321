"""``App``: one loaded configuration and, while started, its running runtime.

Start order: resolve every handler and driver class (all problems at once), open the
drivers, declare the queues, mark the app started, then — with ``consumers=True`` —
start consumers in ``depends_on`` order and call ``on_start`` functions.

Stop order (the reverse): stop consumers (all at once, each gracefully within the
grace period), close the drivers, shut the handler thread pools, mark the app
stopped, and finally stop the loop thread if the app owns one. After ``stop`` returns
no task of the app is pending.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from functools import partial
from types import FrameType, TracebackType
from typing import Any, TypeVar

from conveyor import errors
from conveyor._loop import LoopThread, forbid_running_loop, run_blocking
from conveyor.consumer.runtime import Consumer, Handler, is_async_handler
from conveyor.drivers import create_driver, driver_class
from conveyor.drivers.base import Driver, Outgoing
from conveyor.functions import import_callable, resolve_function
from conveyor.queue import context as qctx
from conveyor.queue.bound import BoundQueue
from conveyor.queue.codecs import check_data, get_codec
from conveyor.queue.headers import check_headers
from conveyor.registry.ids import canonical_id
from conveyor.registry.model import ConsumerSpec, FunctionSpec, Registry
from conveyor.security.context import activate as activate_security
from conveyor.security.context import context_from_block
from conveyor.security.context import current as current_security
from conveyor.security.policy import PolicyEngine, set_engine_resolver

__all__ = ["DEFAULT_GRACE", "App"]

log = logging.getLogger("conveyor.app")

T = TypeVar("T")

DEFAULT_GRACE = 30.0


def _problem(where: str, entry: str, field: str, message: str) -> dict[str, Any]:
    file = where.partition(": entry ")[0] if ": entry " in where else ""
    return {"file": file, "entry": entry, "field": field, "message": message, "line": None}


def _problem_line(problem: dict[str, Any]) -> str:
    head = f"{problem['file']}: entry {problem['entry']}" if problem["file"] else f"entry {problem['entry']}"
    return f"{head}: field {problem['field']}: {problem['message']}"


class _Ids:
    """Message IDs: a random per-process prefix and a counter (cheap, unique, fork-safe)."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}-{next(self.counter)}"


_ids = _Ids()


def _resolve_engine() -> PolicyEngine | None:
    app = qctx.current_app_or_none()
    return app._engine if app is not None else None


set_engine_resolver(_resolve_engine)


class App:
    """A loaded app. ``with app`` / ``async with app`` start it without consumers."""

    def __init__(self, registry: Registry, *, log_bodies: bool = False) -> None:
        self.registry = registry
        self.log_bodies = log_bodies
        self.running = False
        self.consumers: dict[str, Consumer] = {}
        self.stopped_stats: dict[str, dict[str, int]] = {}  # stats of consumers since stopped
        self._engine = PolicyEngine(registry.policies, registry.strict_security)
        self._drivers: dict[str, Driver] = {}
        self._queues: dict[str, BoundQueue] = {}
        self._functions: dict[str, Callable[..., Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: LoopThread | None = None
        self._tokens: list[contextvars.Token[Any]] = []
        self._force_stop: asyncio.Event | None = None
        self._stop_requested = threading.Event()
        self._signals = 0
        self._on_start_done = False

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<conveyor.App {len(self.registry.queues)} queues, {state}>"

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
        self._tokens.append(qctx.entered_app.set(self))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._tokens:
            qctx.entered_app.reset(self._tokens.pop())
        self.stop()

    async def __aenter__(self) -> App:
        await self.astart(consumers=False)
        self._tokens.append(qctx.entered_app.set(self))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._tokens:
            qctx.entered_app.reset(self._tokens.pop())
        await self.astop()

    # -- async lifecycle -------------------------------------------------------------

    async def astart(self, consumers: bool = False) -> App:
        if self.running:
            raise errors.invalid("app is already started")
        self._loop = asyncio.get_running_loop()
        self._force_stop = asyncio.Event()
        try:
            self.preflight(consumers)
            await self._open_drivers()
            await self._declare_queues()
        except BaseException:
            await self._close_drivers()
            self._loop = None
            raise
        self.running = True
        qctx.register_started(self)
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
        self.running = False
        self._on_start_done = False
        qctx.unregister_started(self)
        self._loop = None

    def preflight(self, consumers: bool = True) -> None:
        """Resolve every driver class and (with ``consumers``) every handler without starting.

        Raises one INVALID error listing every problem (``details["problems"]`` holds
        dicts with ``file``, ``entry``, ``field`` and ``message``). ``start`` runs this
        first, so nothing is opened for an app that cannot run; ``conveyor check``
        runs it to catch import errors before deployment.
        """
        problems: list[dict[str, Any]] = []
        for spec in self.registry.drivers.values():
            try:
                driver_class(spec.kind)
            except errors.Error as exc:
                problems.append(_problem(spec.where, spec.id, "kind", exc.message))
        if consumers:
            for cspec in self._consumer_order(None):  # auto_start ones and their dependencies
                field = "func" if cspec.func else "handler" if cspec.handler else "method"
                resolve = partial(self._handler_for, cspec)
                self._check_resolves(problems, cspec.where, cspec.id, field, resolve)
            for fspec in self.registry.functions.values():
                if fspec.on_start:
                    self._check_resolves(
                        problems, fspec.where, fspec.id, "source", partial(self._function, fspec.id)
                    )
        if problems:
            lines = [_problem_line(p) for p in problems]
            raise errors.invalid("cannot start the app:\n  " + "\n  ".join(lines), problems=problems)

    @staticmethod
    def _check_resolves(
        problems: list[dict[str, Any]], where: str, entry: str, field: str, resolve: Callable[[], Any]
    ) -> None:
        try:
            resolve()
        except errors.Error as exc:
            message = exc.message.removeprefix(f"{where}: ").removeprefix(f"{entry}: ")
            problems.append(_problem(where, entry, field, message))

    async def _open_drivers(self) -> None:
        for spec in self.registry.drivers.values():
            driver = create_driver(spec)
            await driver.open()
            self._drivers[spec.id] = driver

    async def _declare_queues(self) -> None:
        for spec in self.registry.queues.values():
            driver = self._drivers[spec.driver]
            await driver.declare(spec)
            self._queues[spec.id] = BoundQueue(spec, get_codec(spec.codec), driver)

    async def _close_drivers(self) -> None:
        drivers, self._drivers = list(self._drivers.values()), {}
        self._queues = {}
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
            await asyncio.gather(*(c.stop(grace, self._force_stop) for c in consumers))
        self.stopped_stats.update({c.spec.id: c.stats.as_dict() for c in consumers})
        self.consumers.clear()

    async def astart_consumers(self, ids: Iterable[str] | None = None) -> None:
        """Start the given consumers (default: every ``auto_start`` one) in dependency order."""
        if not self.running:
            raise errors.invalid("app is not started")
        wanted = self._consumer_order(ids)
        for spec in wanted:
            await self._start_consumer(spec)
        if ids is None and not self._on_start_done:
            self._on_start_done = True
            await self._run_on_start()

    async def _start_consumer(self, spec: ConsumerSpec) -> None:
        if spec.id in self.consumers:
            return
        handler = self._handler_for(spec)
        security_context = context_from_block(spec.security) if spec.security else None
        consumer = Consumer(
            self,
            spec,
            self._bound_queue(spec.queue),
            handler,
            security_context=security_context,
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

    def _handler_for(self, spec: ConsumerSpec) -> Handler:
        if spec.func is not None:
            return self._function(spec.func)
        if spec.handler is not None:
            return import_callable(spec.handler, spec.base_dir, where=spec.where or spec.id)
        if spec.method is not None and spec.lua_source is not None:
            lua_spec = FunctionSpec(
                id=spec.id,
                kind="function.lua",
                source=str(spec.lua_source),
                method=spec.method,
                base_dir=spec.base_dir or spec.lua_source.parent,  # require() looks next to the YAML
                where=spec.where,
            )
            return resolve_function(lua_spec)
        raise errors.invalid(f"{spec.where or spec.id}: consumer has no handler")

    def _function(self, func_id: str) -> Callable[..., Any]:
        fn = self._functions.get(func_id)
        if fn is None:
            try:
                spec = self.registry.functions[func_id]
            except KeyError:
                raise errors.not_found(f"function {func_id} is not declared", function=func_id) from None
            fn = self._functions[func_id] = resolve_function(spec)
        return fn

    # -- running until a signal --------------------------------------------------------

    def run(self, *, grace: float | None = None, until: Callable[[], bool] | None = None) -> None:
        """Start with consumers and block until SIGINT/SIGTERM (or ``until()``), then stop.

        The first signal stops gracefully; a second one stops at once.
        """
        forbid_running_loop("app.arun")
        self._stop_requested.clear()
        self._signals = 0
        restore = self._install_signal_handlers()
        try:
            self.start(consumers=True)
            try:
                while not self._stop_requested.wait(0.1):
                    if until is not None and until():
                        break
            finally:
                self.stop(grace)
        finally:
            restore()

    def request_stop(self, immediate: bool = False) -> None:
        """Ask a running :meth:`run` to stop (thread-safe); ``immediate`` skips the grace period."""
        self._stop_requested.set()
        loop, force = self._loop, self._force_stop
        if immediate and loop is not None and force is not None:
            loop.call_soon_threadsafe(force.set)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("received %s: stopping gracefully (again to stop at once)", signal.Signals(signum).name)
        else:
            log.warning("received %s again: stopping at once", signal.Signals(signum).name)
        self.request_stop(immediate=self._signals > 1)

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    async def arun(self, *, grace: float | None = None) -> None:
        """Async form of :meth:`run`: runs until cancelled or signalled."""
        await self.astart(consumers=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_async_signal, stop)
                installed.append(sig)
        try:
            await stop.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await asyncio.shield(self.astop(grace))

    def _on_async_signal(self, stop: asyncio.Event) -> None:
        if stop.is_set() and self._force_stop is not None:
            self._force_stop.set()
        stop.set()

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

    # -- functions -------------------------------------------------------------------

    def call(self, func_id: str, *args: Any) -> Any:
        """Invoke a function entry in the app's context and return its result."""
        forbid_running_loop("app.acall")
        fid = canonical_id(func_id, what="function ID")
        fn = self._function(fid)
        if is_async_handler(fn):
            return self._blocking(self._call_async(fn, args), "app.acall")
        ctx = contextvars.copy_context()
        ctx.run(qctx.entered_app.set, self)
        return ctx.run(fn, *args)

    async def acall(self, func_id: str, *args: Any) -> Any:
        fid = canonical_id(func_id, what="function ID")
        fn = self._function(fid)
        if is_async_handler(fn):
            return await self._call_async(fn, args)
        ctx = contextvars.copy_context()
        ctx.run(qctx.entered_app.set, self)
        return await asyncio.to_thread(ctx.run, fn, *args)

    async def _call_async(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        token = qctx.entered_app.set(self)
        try:
            return await fn(*args)
        finally:
            qctx.entered_app.reset(token)

    # -- the queue operations (called by conveyor.queue) -------------------------------

    def _bound_queue(self, queue_id: str) -> BoundQueue:
        bound = self._queues.get(queue_id)
        if bound is None:
            if not self.running:
                raise errors.invalid("app is not started")
            raise errors.not_found(f"queue {queue_id} is not declared", queue=queue_id)
        return bound

    def _enter_context(self, security_context: Any) -> None:
        """Set the contextvars a consumer's workers run with (called inside their Context)."""
        qctx.entered_app.set(self)
        # Always set it, None included: handlers must not inherit the security context
        # of whoever happened to start the consumers.
        activate_security(security_context)

    async def apublish(self, queue_id: str, data: Any, headers: Mapping[str, Any] | None = None) -> bool:
        if asyncio.get_running_loop() is not self._loop:
            return await self._on_own_loop(self.apublish(queue_id, data, headers))
        qid = canonical_id(queue_id)
        check_data(data)
        checked = check_headers(headers) if headers is not None else {}
        self._engine.check_publish(current_security(), qid)
        bound = self._bound_queue(qid)
        body = bound.codec.encode(data)
        await bound.driver.publish(bound.spec, [Outgoing(_ids.next(), body, checked)])
        return True

    async def apublish_many(
        self, queue_id: str, items: Iterable[Any], headers: Mapping[str, Any] | None = None
    ) -> int:
        if asyncio.get_running_loop() is not self._loop:
            return await self._on_own_loop(self.apublish_many(queue_id, items, headers))
        qid = canonical_id(queue_id)
        common = check_headers(headers) if headers is not None else {}
        self._engine.check_publish(current_security(), qid)
        bound = self._bound_queue(qid)
        batch = [self._outgoing(bound, index, item, common) for index, item in enumerate(items)]
        if not batch:
            raise errors.invalid("publish_many needs at least one item")
        await bound.driver.publish(bound.spec, batch)
        return len(batch)

    def _outgoing(self, bound: BoundQueue, index: int, item: Any, common: dict[str, Any]) -> Outgoing:
        data, extra = item if isinstance(item, tuple) and len(item) == 2 else (item, None)
        try:
            check_data(data)
            headers = {**common, **check_headers(extra)} if extra is not None else dict(common)
            body = bound.codec.encode(data)
        except errors.Error as exc:
            raise errors.Error(
                exc.kind, f"item {index}: {exc.message}", details={**exc.details, "index": index}
            ) from None
        return Outgoing(_ids.next(), body, headers)

    def info(self, queue_id: str) -> dict[str, Any]:
        """Blocking form of :meth:`ainfo` (usable whether or not this app is current)."""
        return self._blocking(self.ainfo(queue_id), "app.ainfo")

    async def ainfo(self, queue_id: str) -> dict[str, Any]:
        if asyncio.get_running_loop() is not self._loop:
            return await self._on_own_loop(self.ainfo(queue_id))
        qid = canonical_id(queue_id)
        bound = self._bound_queue(qid)
        try:
            return await bound.driver.info(bound.spec)
        except errors.Error as exc:
            if exc.kind == errors.NOT_FOUND:
                raise
            raise errors.Error(errors.INTERNAL, exc.message, details=exc.details) from None

    async def _on_own_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the app's loop when called from another loop (thread)."""
        loop = self._loop
        if loop is None:
            coro.close()
            raise errors.invalid("app is not started")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    def _blocking(self, coro: Coroutine[Any, Any, T], async_name: str) -> T:
        try:
            forbid_running_loop(async_name)
        except errors.Error:
            coro.close()
            raise
        loop = self._loop
        if loop is None:
            coro.close()
            raise errors.invalid("app is not started")
        return run_blocking(loop, coro)

    # -- stats -------------------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, int]]:
        """Per-consumer counters: running consumers and those stopped since the app started."""
        merged = dict(self.stopped_stats)
        merged.update({cid: c.stats.as_dict() for cid, c in self.consumers.items()})
        return merged
