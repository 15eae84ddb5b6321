"""One consumer: a subscription, ``concurrency`` workers, and its handler.

Hot path: each worker is a long-lived coroutine that takes a delivery (without
awaiting when one is ready), decodes it, runs the handler — on the loop for async
handlers, in a bounded thread pool for sync ones — and settles through its
:class:`~conveyor.consumer.settlement.Settlement`. No task is created per message.

A consumer is given everything it needs when it is built: its bound queue, its
dead-letter queue (resolved once), and a factory for the context its workers run in
(which app is current, which security context is active). It never reaches back
into the app that built it.

Stop order (graceful): refuse new deliveries (idle workers are cancelled; ``get`` is
cancellation-safe), let busy workers finish within the grace period, cancel the
stragglers (their messages stay unsettled), then close the subscription, which hands
every unsettled message back to the queue.

Size: about 500 lines because the worker loop, its hot path and the stop order share
the consumer's state (busy count, strays, respawn backoff); split, each part would
reach into the others' attributes.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from bisect import bisect_left
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from conveyor import errors
from conveyor.consumer.processes import HandlerFactory, HandlerProcesses
from conveyor.consumer.retry import RetryRule
from conveyor.consumer.settlement import DURATION_BUCKETS, ConsumerStats, Settlement
from conveyor.consumer.threads import HandlerThreads
from conveyor.drivers.base import Delivery, Subscription
from conveyor.queue.bound import BoundQueue
from conveyor.queue.codecs import DecodeError
from conveyor.queue.context import deadline_var, message_var
from conveyor.queue.message import Message
from conveyor.registry.model import ConsumerSpec

__all__ = ["Consumer", "ConsumerStats", "DeliveryTracer", "Handler", "is_async_handler"]

log = logging.getLogger("conveyor.consumer")

YIELD_EVERY = 0.002  # seconds a worker may keep the loop while it drains ready deliveries
CANCEL_WAIT = 1.0  # seconds a cancelled handler gets to end before it is abandoned
RESPAWN_FIRST = 0.1  # seconds before a crashed worker is replaced ...
RESPAWN_MAX = 30.0  # ... doubling while workers keep crashing, up to this
RESPAWN_RESET = 60.0  # seconds without a crash after which the delay starts over

Handler = Callable[[Any], Any]


class DeliveryTracer(Protocol):
    """What traces deliveries (a consumer span each), when tracing is on.

    ``start`` runs in the worker's context before the handler and returns a handle;
    ``settled`` is the settlement's ``Observer``; ``end`` runs in the same context after
    the settlement (or a stop), with the handler's failure, and undoes what ``start`` set.
    """

    def start(self, consumer: ConsumerSpec, queue: BoundQueue, delivery: Delivery) -> Any: ...

    def settled(
        self, delivery: Delivery, outcome: str, reason: str | None, error: BaseException | None
    ) -> None: ...

    def end(self, handle: Any, failure: BaseException | None) -> None: ...


def is_async_handler(fn: Handler) -> bool:
    target: Any = inspect.unwrap(fn)
    while hasattr(target, "func") and not inspect.isfunction(target):  # functools.partial
        target = target.func
    if inspect.iscoroutinefunction(target):
        return True
    call = getattr(target, "__call__", None)  # noqa: B004 - callable objects
    return call is not None and inspect.iscoroutinefunction(call)


class Consumer:
    """Runs ``spec``'s handler over ``queue`` with a worker pool.

    ``context`` makes the :class:`contextvars.Context` each worker runs in (one call
    per worker); ``dead_letter`` is the queue's dead-letter queue, or None.
    """

    def __init__(
        self,
        spec: ConsumerSpec,
        queue: BoundQueue,
        handler: Handler,
        *,
        dead_letter: BoundQueue | None = None,
        context: Callable[[], contextvars.Context] = contextvars.copy_context,
        log_bodies: bool = False,
        retry: RetryRule | None = None,
        process_factory: HandlerFactory | None = None,
        tracer: DeliveryTracer | None = None,
        timed: bool = True,
    ) -> None:
        self.spec = spec
        self.tracer = tracer
        self.timed = timed  # handler durations into stats.durations (for the metrics)
        self.queue = queue
        self.handler = handler
        self.is_async = is_async_handler(handler)
        self.stats = ConsumerStats()
        self.loop: asyncio.AbstractEventLoop = asyncio.get_running_loop()
        self.settlement = Settlement(
            spec,
            queue,
            dead_letter,
            self.stats,
            loop=self.loop,
            log_bodies=log_bodies,
            retry=retry if retry is not None else RetryRule.of(spec),
        )
        self.settlement.observe = tracer.settled if tracer is not None else None
        self._context = context
        self._sub: Subscription | None = None
        self._workers: set[asyncio.Task[None]] = set()
        self._idle: set[asyncio.Task[None]] = set()
        self._strays: set[asyncio.Task[Any]] = set()  # handlers that outlived a cancellation
        self._respawn_delay = RESPAWN_FIRST
        self._last_crash = float("-inf")
        self._busy = 0
        self._stopping = False
        self._threads: HandlerThreads | None = None
        self._processes: HandlerProcesses | None = None
        # hard_timeout: a sync handler runs in worker processes that can be killed
        self._process_factory = process_factory if spec.hard_timeout is not None else None
        self._log_extra = self.settlement.log_extra
        # The common case (async handler, no timeout) skips a layer of coroutines.
        self._fast = self.is_async and spec.timeout is None

    # -- lifecycle -------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def in_flight(self) -> int:
        return self._busy

    async def start(self) -> None:
        spec = self.spec
        self._sub = await self.queue.driver.subscribe(
            self.queue.spec, prefetch=spec.prefetch, auto_ack=spec.auto_ack, options=spec.driver_options
        )
        self.settlement.bind(self._sub)
        if not self.is_async and self._process_factory is not None:
            self._processes = HandlerProcesses(
                spec.concurrency, f"conveyor-{spec.id}", self.loop, self._process_factory
            )
        elif not self.is_async:
            self._threads = HandlerThreads(spec.concurrency, f"conveyor-{spec.id}", self.loop)
        for index in range(spec.concurrency):
            self._spawn_worker(index)
        log.info(
            "consumer %s started on %s (concurrency=%d, prefetch=%d, %s handler)",
            spec.id,
            self.queue.id,
            spec.concurrency,
            spec.prefetch,
            "async" if self.is_async else "sync",
            extra=self._log_extra,
        )

    def _spawn_worker(self, index: int) -> None:
        task = self.loop.create_task(self._work(), name=f"{self.spec.id}#{index}", context=self._context())
        self._workers.add(task)
        task.add_done_callback(self._workers.discard)
        task.add_done_callback(partial(self._worker_ended, index))

    def _worker_ended(self, index: int, task: asyncio.Task[None]) -> None:
        """A worker that ends while the consumer runs has crashed: report it, replace it.

        Handler failures never end a worker (they are failed attempts); this is the
        safety net for a bug in the worker loop or a driver, so the pool never
        silently shrinks. Replacements back off (``RESPAWN_FIRST`` doubling up to
        ``RESPAWN_MAX`` seconds) while workers keep dying.
        """
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        if exc is None:
            return  # the subscription ended (get() returned None): nothing left to take
        now = self.loop.time()
        if now - self._last_crash > RESPAWN_RESET:
            self._respawn_delay = RESPAWN_FIRST
        self._last_crash = now
        delay, self._respawn_delay = self._respawn_delay, min(self._respawn_delay * 2, RESPAWN_MAX)
        self.stats.worker_restarts += 1
        log.error(
            "consumer %s: worker %d ended unexpectedly; a new one starts in %.1fs",
            self.spec.id,
            index,
            delay,
            exc_info=exc,
            extra=self._log_extra,
        )
        self.loop.call_later(delay, self._respawn, index)

    def _respawn(self, index: int) -> None:
        if not self._stopping:
            self._spawn_worker(index)

    async def stop(self, grace: float, force: asyncio.Event | None = None) -> None:
        """Graceful stop; see the module docstring for the order."""
        if self._stopping:
            return
        self._stopping = True
        for task in list(self._idle):
            task.cancel()
        busy = [t for t in self._workers if not t.done()]
        if busy:
            await self._wait_busy(busy, grace, force)
        if self._strays:
            await self._stop_strays()
        if self._sub is not None:
            await self._sub.close()
        if self._threads is not None:
            # Threads of handlers that outlived the grace period are abandoned, not joined.
            self._threads.shutdown()
        if self._processes is not None:
            await self._processes.close(0)  # busy ones were cancelled above: killed
        log.info("consumer %s stopped (%s)", self.spec.id, self.stats.as_dict(), extra=self._log_extra)

    async def _stop_strays(self) -> None:
        strays = list(self._strays)
        for task in strays:
            task.cancel()
        await asyncio.wait(strays, timeout=CANCEL_WAIT)
        left = 0
        for task in strays:
            if not task.done():
                _abandon(task)
                left += 1
        if left:
            log.error(
                "consumer %s: %d timed-out handler(s) still ignore cancellation; abandoned",
                self.spec.id,
                left,
                extra=self._log_extra,
            )

    async def _wait_busy(
        self, busy: list[asyncio.Task[None]], grace: float, force: asyncio.Event | None
    ) -> None:
        waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(asyncio.wait(busy))}
        force_wait = asyncio.ensure_future(force.wait()) if force is not None else None
        if force_wait is not None:
            waiters.add(force_wait)
        await asyncio.wait(waiters, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        for fut in waiters:
            fut.cancel()
        left = [t for t in busy if not t.done()]
        if left:
            why = (
                "the stop was forced"
                if force is not None and force.is_set()
                else f"the {grace:.1f}s grace period is over"
            )
            log.warning(
                "consumer %s: %d handler(s) still running and %s; "
                "cancelling them, their messages go back to the queue",
                self.spec.id,
                len(left),
                why,
                extra=self._log_extra,
            )
            for task in left:
                task.cancel()
            await asyncio.wait(left, timeout=CANCEL_WAIT)
            stuck = [t for t in left if not t.done()]
            for task in stuck:
                _abandon(task)
            if stuck:
                log.error(
                    "consumer %s: %d handler(s) ignored cancellation; abandoned "
                    "(their messages go back to the queue when the subscription closes)",
                    self.spec.id,
                    len(stuck),
                    extra=self._log_extra,
                )

    # -- the worker loop -------------------------------------------------------------

    async def _work(self) -> None:
        sub = self._sub
        assert sub is not None
        task = asyncio.current_task()
        assert task is not None
        loop_time = self.loop.time
        since_yield = loop_time()
        while not self._stopping:
            delivery = sub.get_nowait()
            if delivery is not None:
                # A backlog of ready deliveries and a handler that never awaits would
                # otherwise keep the loop to this worker until the backlog is empty.
                now = loop_time()
                if now - since_yield >= YIELD_EVERY:
                    await asyncio.sleep(0)
                    since_yield = loop_time()
                    if self.stopping:  # stop() began while we yielded: give it back
                        await sub.release(delivery)
                        return
            else:
                self._idle.add(task)
                try:
                    delivery = await sub.get()
                finally:
                    self._idle.discard(task)
                if delivery is None:
                    return
                if self.stopping:  # woke up with a delivery while stopping: give it back
                    await sub.release(delivery)
                    return
                since_yield = loop_time()
            self._busy += 1
            try:
                await self._process(delivery, task)
            finally:
                self._busy -= 1

    async def _process(self, delivery: Delivery, worker: asyncio.Task[None]) -> None:  # noqa: PLR0915 - the hot path stays in one frame
        self.stats.delivered += 1
        settlement = self.settlement
        if await settlement.exhausted(delivery):
            return
        try:
            payload = self.queue.codec.decode(delivery.body)
        except DecodeError as exc:
            await settlement.undecodable(delivery, exc)
            return
        msg = Message(settlement, delivery, payload, settled=self.spec.auto_ack)
        token = message_var.set(msg)
        if self.spec.timeout is not None:
            deadline_var.set(time.monotonic() + self.spec.timeout)
        tracer = self.tracer
        traced = tracer.start(self.spec, self.queue, delivery) if tracer is not None else None
        failure: BaseException | None = None
        durations = self.stats.durations if self.timed else None
        started = _clock() if durations is not None else 0.0
        try:
            if self._fast:
                await self.handler(payload)
            else:
                await self._invoke(msg, delivery, payload)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                msg._release()  # stopping: left unsettled, returned by close()
                if tracer is not None:
                    tracer.settled(delivery, "released", "the consumer stopped", None)
                    tracer.end(traced, None)
                raise
            failure = errors.Error(errors.CANCELED, "handler was cancelled", retryable=True)
        except BaseException as exc:  # handlers may raise anything; none may kill the worker
            if isinstance(exc, GeneratorExit) and _running_task() is not worker:
                raise  # not the handler: this abandoned worker's coroutine is being closed
            failure = exc
        finally:
            if durations is not None:
                elapsed = _clock() - started  # Durations.observe, inlined
                durations.counts[bisect_left(DURATION_BUCKETS, elapsed)] += 1
                durations.sum += elapsed
            try:  # noqa: SIM105 - hot path: no context manager per message
                message_var.reset(token)
            except ValueError:  # closed from another context (see above)
                pass
        try:
            if failure is None and not self.spec.auto_ack and msg._try_claim():
                try:  # the common case, inlined: success -> ack
                    await settlement.subscription.ack(delivery)
                    self.stats.acked += 1
                except errors.Error as exc:
                    settlement.log_settle_error(delivery, exc)
            else:
                await settlement.auto_settle(msg, delivery, failure)
        finally:
            msg._release()
            if tracer is not None:
                tracer.end(traced, failure)

    async def _invoke(self, msg: Message, delivery: Delivery, payload: Any) -> None:
        timeout = self.spec.timeout
        if self.is_async:
            if timeout is None:
                await self.handler(payload)
            else:
                await self._invoke_async(payload, timeout)
            return
        await self._invoke_sync(msg, delivery, payload, timeout)

    async def _invoke_async(self, payload: Any, timeout: float) -> None:
        """Run an async handler in its own task so its timeout holds even when it
        swallows the cancellation: the worker moves on, the stray task is tracked."""
        child = self.loop.create_task(self.handler(payload), name=f"{self.spec.id} handler")
        try:
            await asyncio.wait((child,), timeout=timeout)
        except asyncio.CancelledError:
            child.cancel()
            if not child.done():
                self._track_stray(child)
            raise
        if child.done():
            child.result()  # the handler's exception, if any
            return
        child.cancel()
        await asyncio.wait((child,), timeout=CANCEL_WAIT)
        if not child.done():
            log.error(
                "consumer %s: async handler ignored cancellation after its %.1fs timeout; "
                "it keeps running unowned (the message is settled as timed out)",
                self.spec.id,
                timeout,
                extra=self._log_extra,
            )
            self._track_stray(child)
        raise _timed_out(timeout)

    def _track_stray(self, task: asyncio.Task[Any]) -> None:
        """Keep a handler task that refused to stop, so stop() can try once more."""
        self._strays.add(task)
        task.add_done_callback(_forget_stray(self._strays))

    async def _invoke_sync(
        self, msg: Message, delivery: Delivery, payload: Any, timeout: float | None
    ) -> None:
        future: asyncio.Future[Any]
        if self._processes is not None:
            future = asyncio.ensure_future(self._processes.run(payload, self.spec.hard_timeout))
        else:
            assert self._threads is not None
            future = self._threads.submit(contextvars.copy_context(), self._call_sync, payload)
        if timeout is None:
            await future
            return
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            # The thread cannot be killed: settle now so the message is not held, then
            # keep this worker (and its thread) until the handler really returns, so
            # the number of handler threads stays bounded by `concurrency`.
            await self.settlement.auto_settle(msg, delivery, _timed_out(timeout))
            msg._release()
            log.warning(
                "consumer %s: sync handler ignored its %.1fs timeout; worker waits for it",
                self.spec.id,
                timeout,
                extra=self._log_extra,
            )
            await asyncio.gather(future, return_exceptions=True)

    def _call_sync(self, payload: Any) -> Any:
        return _check_sync_result(self.handler(payload))


_clock = time.perf_counter

_ABANDONED: set[asyncio.Task[Any]] = set()


def _abandon(task: asyncio.Task[Any]) -> None:
    """A task that ignored its cancellation: already reported at ERROR. Keep it
    referenced so it is not collected mid-flight (which runs its clean-up code in
    whatever thread collects it), and silence asyncio's "destroyed but pending"."""
    task._log_destroy_pending = False  # type: ignore[attr-defined]
    _ABANDONED.add(task)
    task.add_done_callback(_ABANDONED.discard)


def _running_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop
        return None


def _forget_stray(strays: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def forget(task: asyncio.Task[Any]) -> None:
        strays.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: nobody awaits a stray

    return forget


def _timed_out(timeout: float) -> errors.Error:
    return errors.Error(errors.TIMEOUT, f"handler exceeded its {timeout:g}s timeout", retryable=True)


def _check_sync_result(result: Any) -> Any:
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        # The code is wrong, not the message: retryable is left unsaid so the message
        # is retried (and survives until the handler is fixed) rather than given up.
        raise errors.Error(
            errors.INVALID, "handler returned an awaitable from a sync call; declare it `async def`"
        )
    return result
