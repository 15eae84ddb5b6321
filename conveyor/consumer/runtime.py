"""One consumer: a subscription, ``concurrency`` workers and the settlement rules.

Hot path: each worker is a long-lived coroutine that takes a delivery (without
awaiting when one is ready), decodes it, runs the handler — on the loop for async
handlers, in a bounded thread pool for sync ones — and settles. No task is created
per message.

Stop order (graceful): refuse new deliveries (idle workers are cancelled; ``get`` is
cancellation-safe), let busy workers finish within the grace period, cancel the
stragglers (their messages stay unsettled), then close the subscription, which hands
every unsettled message back to the queue.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from conveyor import errors
from conveyor.consumer.threads import HandlerThreads
from conveyor.drivers.base import Delivery, Outgoing, Subscription
from conveyor.queue.bound import BoundQueue
from conveyor.queue.codecs import DecodeError
from conveyor.queue.context import deadline_var, message_var
from conveyor.queue.message import Message
from conveyor.registry.model import ConsumerSpec

if TYPE_CHECKING:
    from conveyor.app import App

__all__ = ["Consumer", "ConsumerStats", "Handler"]

log = logging.getLogger("conveyor.consumer")

Handler = Callable[[Any], Any]


@dataclass(slots=True)
class ConsumerStats:
    delivered: int = 0
    acked: int = 0
    failed: int = 0  # failed attempts (nacks, errors, timeouts)
    dead_lettered: int = 0
    undecodable: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "delivered": self.delivered,
            "acked": self.acked,
            "failed": self.failed,
            "dead_lettered": self.dead_lettered,
            "undecodable": self.undecodable,
        }


def is_async_handler(fn: Handler) -> bool:
    target: Any = inspect.unwrap(fn)
    while hasattr(target, "func") and not inspect.isfunction(target):  # functools.partial
        target = target.func
    if inspect.iscoroutinefunction(target):
        return True
    call = getattr(target, "__call__", None)  # noqa: B004 - callable objects
    return call is not None and inspect.iscoroutinefunction(call)


def error_text(exc: BaseException) -> str:
    if isinstance(exc, errors.Error):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Consumer:
    """Runs ``spec``'s handler over ``queue`` with a worker pool."""

    def __init__(
        self,
        app: App,
        spec: ConsumerSpec,
        queue: BoundQueue,
        handler: Handler,
        *,
        security_context: Any = None,
        log_bodies: bool = False,
    ) -> None:
        self.app = app
        self.spec = spec
        self.queue = queue
        self.handler = handler
        self.is_async = is_async_handler(handler)
        self.stats = ConsumerStats()
        self.loop: asyncio.AbstractEventLoop = asyncio.get_running_loop()
        self._security_context = security_context
        self._log_bodies = log_bodies
        self._sub: Subscription | None = None
        self._workers: set[asyncio.Task[None]] = set()
        self._idle: set[asyncio.Task[None]] = set()
        self._busy = 0
        self._stopping = False
        self._threads: HandlerThreads | None = None
        self._log_extra = {"consumer": spec.id, "queue": queue.id}
        # The common case (async handler, no timeout) skips a layer of coroutines.
        self._fast = self.is_async and spec.timeout is None

    # -- lifecycle -------------------------------------------------------------------

    @property
    def _subscription(self) -> Subscription:
        assert self._sub is not None, "consumer not started"
        return self._sub

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def in_flight(self) -> int:
        return self._busy

    async def start(self) -> None:
        spec = self.spec
        driver = self.queue.driver
        self._sub = await driver.subscribe(
            self.queue.spec,
            prefetch=spec.prefetch,
            auto_ack=spec.auto_ack,
            options=spec.driver_options.get(driver.kind.rsplit(".", 1)[-1], {}),
        )
        if not self.is_async:
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
        ctx = contextvars.copy_context()
        ctx.run(self.app._enter_context, self._security_context)
        task = self.loop.create_task(self._work(), name=f"{self.spec.id}#{index}", context=ctx)
        self._workers.add(task)
        task.add_done_callback(self._workers.discard)

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
        if self._sub is not None:
            await self._sub.close()
        if self._threads is not None:
            # Threads of handlers that outlived the grace period are abandoned, not joined.
            self._threads.shutdown()
        log.info("consumer %s stopped (%s)", self.spec.id, self.stats.as_dict(), extra=self._log_extra)

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
            await asyncio.wait(left)

    # -- the worker loop -------------------------------------------------------------

    async def _work(self) -> None:
        sub = self._sub
        assert sub is not None
        task = asyncio.current_task()
        assert task is not None
        while not self._stopping:
            delivery = sub.get_nowait()
            if delivery is None:
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
            self._busy += 1
            try:
                await self._process(delivery)
            finally:
                self._busy -= 1

    async def _process(self, delivery: Delivery) -> None:
        self.stats.delivered += 1
        if await self._exhausted(delivery):
            return
        try:
            payload = self.queue.codec.decode(delivery.body)
        except DecodeError as exc:
            await self._undecodable(delivery, exc)
            return
        msg = Message(self, delivery, payload, settled=self.spec.auto_ack)
        token = message_var.set(msg)
        if self.spec.timeout is not None:
            deadline_var.set(time.monotonic() + self.spec.timeout)
        failure: BaseException | None = None
        try:
            if self._fast:
                await self.handler(payload)
            else:
                await self._invoke(msg, payload)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                msg._release()  # stopping: left unsettled, returned by close()
                raise
            failure = errors.Error(errors.CANCELED, "handler was cancelled")
        except BaseException as exc:  # handlers may raise anything; none may kill the worker
            failure = exc
        finally:
            message_var.reset(token)
        try:
            if failure is None and not self.spec.auto_ack and msg._try_claim():
                try:  # the common case, inlined: success -> ack
                    await self._subscription.ack(delivery)
                    self.stats.acked += 1
                except errors.Error as exc:
                    self._log_settle_error(delivery, exc)
            else:
                await self._auto_settle(msg, delivery, failure)
        finally:
            msg._release()

    async def _exhausted(self, delivery: Delivery) -> bool:
        """Attempts beyond ``max_attempts`` mean earlier ones never settled (the consumer
        died mid-handler): dead-letter now instead of letting a poison message kill
        every worker that takes it. Returns True when the delivery was taken care of."""
        dead_letter = self.queue.spec.dead_letter
        if dead_letter is None or self.spec.auto_ack or delivery.attempts <= dead_letter.max_attempts:
            return False
        reason = (
            f"attempts exhausted: delivered {delivery.attempts} times (max_attempts "
            f"{dead_letter.max_attempts}) without being settled; a consumer probably died handling it"
        )
        self.stats.failed += 1
        if not await self._dead_letter(delivery, reason):
            assert self._sub is not None
            await self._sub.nack(delivery, self.queue.spec.retry.max_delay)
        return True

    async def _invoke(self, msg: Message, payload: Any) -> None:
        timeout = self.spec.timeout
        if self.is_async:
            if timeout is None:
                await self.handler(payload)
            else:
                try:
                    async with asyncio.timeout(timeout):
                        await self.handler(payload)
                except TimeoutError:
                    raise _timed_out(timeout) from None
            return
        await self._invoke_sync(msg, payload, timeout)

    async def _invoke_sync(self, msg: Message, payload: Any, timeout: float | None) -> None:
        ctx = contextvars.copy_context()
        assert self._threads is not None
        future = self._threads.submit(ctx, self._call_sync, payload)
        if timeout is None:
            await future
            return
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            # The thread cannot be killed: settle now so the message is not held, then
            # keep this worker (and its thread) until the handler really returns, so
            # the number of handler threads stays bounded by `concurrency`.
            await self._auto_settle(msg, msg._delivery, _timed_out(timeout))
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

    # -- settlement ------------------------------------------------------------------

    async def _auto_settle(self, msg: Message, delivery: Delivery, failure: BaseException | None) -> None:
        if self.spec.auto_ack:
            if failure is not None:
                self._log_failure(delivery, failure, "auto_ack: message already settled, not retried")
            else:
                self.stats.acked += 1
            return
        if not msg._try_claim():
            if failure is not None:
                log.warning(
                    "handler raised after settling message %s on %s: %s",
                    delivery.id,
                    self.queue.id,
                    error_text(failure),
                    extra={**self._log_extra, "message_id": delivery.id},
                )
            return
        try:
            if failure is None:
                await self.settle_ok(delivery)
            else:
                await self.settle_failed(delivery, error_text(failure))
        except errors.Error as exc:
            self._log_settle_error(delivery, exc)

    def _log_settle_error(self, delivery: Delivery, exc: errors.Error) -> None:
        # The driver could not settle: the message stays unsettled and the driver
        # hands it out again (lease expiry / channel close / subscription close).
        log.error(
            "could not settle message %s on %s: %s",
            delivery.id,
            self.queue.id,
            exc,
            extra={**self._log_extra, "message_id": delivery.id, "error": str(exc)},
        )

    async def settle_ok(self, delivery: Delivery) -> None:
        assert self._sub is not None
        await self._sub.ack(delivery)
        self.stats.acked += 1

    async def settle_failed(self, delivery: Delivery, reason: str) -> None:
        """A failed attempt: dead-letter when attempts are exhausted, else retry later."""
        assert self._sub is not None
        self.stats.failed += 1
        dead_letter = self.queue.spec.dead_letter
        attempts = delivery.attempts
        exhausted = dead_letter is not None and attempts >= dead_letter.max_attempts
        if exhausted and await self._dead_letter(delivery, reason):
            return
        delay = self.queue.spec.retry.delay_for(attempts)
        self._log_attempt(delivery, reason, delay)
        await self._sub.nack(delivery, delay)

    async def _dead_letter(self, delivery: Delivery, reason: str) -> bool:
        """Move the message to the dead-letter queue; False (and logged) if that failed."""
        assert self._sub is not None and self.queue.spec.dead_letter is not None
        target = self.app._bound_queue(self.queue.spec.dead_letter.queue)
        copy = Outgoing(delivery.id, delivery.body, self._dead_letter_headers(delivery, reason))
        try:
            if target.driver is self.queue.driver:
                await self._sub.dead_letter(delivery, target.spec, copy)
            else:
                # Different drivers: store the copy first, then remove the original.
                await target.driver.publish(target.spec, [copy])
                await self._sub.ack(delivery)
        except errors.Error as exc:
            log.error(
                "could not dead-letter message %s from %s to %s: %s; it stays on %s",
                delivery.id,
                self.queue.id,
                target.id,
                exc,
                self.queue.id,
                extra={**self._log_extra, "message_id": delivery.id, "error": str(exc)},
            )
            return False
        self.stats.dead_lettered += 1
        log.warning(
            "message %s on %s dead-lettered to %s after %d attempt(s): %s",
            delivery.id,
            self.queue.id,
            target.id,
            delivery.attempts,
            reason,
            extra={
                **self._log_extra,
                "message_id": delivery.id,
                "attempt": delivery.attempts,
                "error": reason,
                "dead_letter_queue": target.id,
            },
        )
        return True

    def _dead_letter_headers(self, delivery: Delivery, reason: str) -> dict[str, Any]:
        headers = dict(delivery.headers)
        headers["x_original_queue"] = self.queue.id
        headers["x_dead_letter_reason"] = reason
        headers["x_dead_letter_time"] = (
            datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        )
        headers["attempts"] = delivery.attempts
        return headers

    async def _undecodable(self, delivery: Delivery, exc: DecodeError) -> None:
        """Never hand garbage to the handler: dead-letter it now, or keep and report it."""
        self.stats.undecodable += 1
        reason = f"undecodable with codec {self.queue.codec.name}: {exc}"
        assert self._sub is not None
        if self.spec.auto_ack:
            log.error(
                "message %s on %s is undecodable and was auto-acked: %s",
                delivery.id,
                self.queue.id,
                reason,
                extra={**self._log_extra, "message_id": delivery.id, "error": reason},
            )
            return
        if self.queue.spec.dead_letter is not None and await self._dead_letter(delivery, reason):
            return
        delay = self.queue.spec.retry.max_delay
        log.error(
            "message %s on %s is undecodable and has no dead-letter queue; kept, next try in %.1fs: %s",
            delivery.id,
            self.queue.id,
            delay,
            reason,
            extra={**self._log_extra, "message_id": delivery.id, "error": reason},
        )
        await self._sub.nack(delivery, delay)

    def _log_attempt(self, delivery: Delivery, reason: str, delay: float) -> None:
        extra = {
            **self._log_extra,
            "message_id": delivery.id,
            "attempt": delivery.attempts,
            "error": reason,
            "retry_in": delay,
        }
        if self._log_bodies:
            extra["body"] = delivery.body.decode(errors="replace")
        log.warning(
            "attempt %d of message %s on %s failed: %s; retry in %.3gs",
            delivery.attempts,
            delivery.id,
            self.queue.id,
            reason,
            delay,
            extra=extra,
        )

    def _log_failure(self, delivery: Delivery, failure: BaseException, note: str) -> None:
        log.warning(
            "handler failed on message %s on %s (%s): %s",
            delivery.id,
            self.queue.id,
            note,
            error_text(failure),
            extra={**self._log_extra, "message_id": delivery.id, "error": error_text(failure)},
        )


def _timed_out(timeout: float) -> errors.Error:
    return errors.Error(errors.TIMEOUT, f"handler exceeded its {timeout:g}s timeout")


def _check_sync_result(result: Any) -> Any:
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise errors.invalid("handler returned an awaitable from a sync call; declare it `async def`")
    return result
