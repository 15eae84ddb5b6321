"""How one consumer settles deliveries: ack, retry with backoff, dead letters.

The rules (docs/semantics.md#retries-and-dead-letters): a failed attempt is retried
after ``delay * backoff ** (attempts - 1)`` capped at ``max_delay``; the attempt that
reaches ``max_attempts`` moves the message to the dead-letter queue with the
``x_*`` headers; a message that cannot be decoded never reaches the handler; a
message delivered more often than ``max_attempts`` without ever being settled (its
consumers died mid-handler) is dead-lettered without running again. A settlement the
driver refuses leaves the message unsettled: the driver hands it out again.

:class:`Settlement` is what a :class:`~conveyor.queue.message.Message` settles
through (its ``Settler``); the worker pool in :mod:`conveyor.consumer.runtime` uses
it for auto-settling.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sysconfig
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from conveyor import errors
from conveyor.consumer.retry import RetryRule
from conveyor.drivers.base import Delivery, Outgoing, Subscription
from conveyor.queue.bound import BoundQueue
from conveyor.queue.codecs import DecodeError
from conveyor.queue.message import Message
from conveyor.registry.model import ConsumerSpec

__all__ = ["DURATION_BUCKETS", "ConsumerStats", "Durations", "Observer", "Settlement", "error_text"]

log = logging.getLogger("conveyor.consumer")


# Upper bounds (seconds) of the handler-duration histogram's buckets; +Inf is implied.
DURATION_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class Durations:
    """How long handlers ran: a fixed-bucket histogram, cheap enough for every message.

    ``counts[i]`` counts durations ``<= DURATION_BUCKETS[i]`` and above the bucket
    before (not cumulative); the last slot counts those above every bound.
    """

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, seconds: float) -> None:
        # The consumer's hot path inlines these two lines; keep them in step.
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sum += seconds


@dataclass(slots=True)
class ConsumerStats:
    delivered: int = 0
    acked: int = 0
    failed: int = 0  # failed attempts (nacks, errors, timeouts)
    dead_lettered: int = 0
    undecodable: int = 0
    dropped: int = 0  # not retryable, no dead-letter queue: acked with an ERROR log
    worker_restarts: int = 0  # workers replaced after ending unexpectedly
    durations: Durations = field(default_factory=Durations)  # handler run times (not in as_dict)

    def as_dict(self) -> dict[str, int]:
        return {
            "delivered": self.delivered,
            "acked": self.acked,
            "failed": self.failed,
            "dead_lettered": self.dead_lettered,
            "undecodable": self.undecodable,
            "dropped": self.dropped,
            "worker_restarts": self.worker_restarts,
        }


# Told what became of each delivery: (delivery, outcome, reason, error); outcomes are
# acked, retried, dead_lettered, dropped, released, unsettled (see conveyor.tracing).
Observer = Callable[[Delivery, str, str | None, BaseException | None], None]


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_STDLIB = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
_INSTALLED = tuple({os.path.abspath(sysconfig.get_paths()[key]) + os.sep for key in ("purelib", "platlib")})


def _internal(filename: str) -> bool:
    """A frame of conveyor itself or of the standard library (asyncio, threading, ...)."""
    if filename.startswith(_PACKAGE):
        return True
    return filename.startswith(_STDLIB) and not filename.startswith(_INSTALLED)


def _exc_info(
    error: BaseException | None,
) -> tuple[type[BaseException], BaseException, TracebackType] | None:
    """What a log record's ``exc_info`` gets: the failure, when it has a traceback to show.

    The traceback starts at the first frame that is neither conveyor's nor the standard
    library's (the handler's own). A failure with no such frame (a Lua handler's error,
    a timeout, a check of conveyor's) shows no traceback: its message says it all, and
    conveyor's own frames would only hide that. The exception itself is left as it is.
    """
    if error is None or error.__traceback__ is None:
        return None
    first: TracebackType | None = error.__traceback__
    while first is not None and _internal(first.tb_frame.f_code.co_filename):
        first = first.tb_next
    if first is None:
        return None
    return type(error), error, first


def error_text(exc: BaseException) -> str:
    if isinstance(exc, errors.Error):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Settlement:
    """The settlement rules of one consumer over one subscription.

    ``dead_letter`` is the consumer's dead-letter queue, resolved once when the
    consumer is built (None when the queue has none).
    """

    def __init__(
        self,
        spec: ConsumerSpec,
        queue: BoundQueue,
        dead_letter: BoundQueue | None,
        stats: ConsumerStats,
        *,
        loop: asyncio.AbstractEventLoop,
        log_bodies: bool = False,
        retry: RetryRule | None = None,
    ) -> None:
        self.spec = spec
        self.retry = retry if retry is not None else RetryRule()
        self.queue = queue
        self.target = dead_letter
        self.stats = stats
        self._loop = loop
        self._log_bodies = log_bodies
        self._sub: Subscription | None = None
        self.log_extra = {"consumer": spec.id, "queue": queue.id}
        self.observe: Observer | None = None  # set by the consumer when deliveries are traced

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def subscription(self) -> Subscription:
        assert self._sub is not None, "consumer not started"
        return self._sub

    def bind(self, subscription: Subscription) -> None:
        self._sub = subscription

    # -- the Settler interface (Message.ack / Message.nack) ------------------------------

    async def ack(self, delivery: Delivery) -> None:
        await self.subscription.ack(delivery)
        self.stats.acked += 1
        if self.observe is not None:
            self.observe(delivery, "acked", None, None)

    async def nack(self, delivery: Delivery, reason: str, error: BaseException | None = None) -> None:
        """A failed attempt: dead-letter when attempts are exhausted, else retry later.

        ``error``: the handler's exception, if it raised one (its traceback is logged).
        """
        self.stats.failed += 1
        dead_letter = self.queue.spec.dead_letter
        attempts = delivery.attempts
        exhausted = dead_letter is not None and attempts >= dead_letter.max_attempts
        if exhausted and await self.dead_letter(delivery, reason, error):
            return
        delay = self.queue.spec.retry.delay_for(attempts)
        self._log_attempt(delivery, reason, delay, error)
        await self.subscription.nack(delivery, delay)
        if self.observe is not None:
            self.observe(delivery, "retried", reason, error)

    # -- after the handler -----------------------------------------------------------------

    async def auto_settle(self, msg: Message, delivery: Delivery, failure: BaseException | None) -> None:
        """Settle what the handler left open: ack on success, nack on failure."""
        if self.spec.auto_ack:
            if failure is not None:
                self._log_failure(delivery, failure, "auto_ack: message already settled, not retried")
                if self.observe is not None:
                    self.observe(delivery, "acked", None, failure)
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
                    exc_info=_exc_info(failure),
                    extra={**self.log_extra, "message_id": delivery.id},
                )
            return
        try:
            if failure is None:
                await self.ack(delivery)
            elif self.retry.retries(failure):
                await self.nack(delivery, error_text(failure), failure)
            else:
                await self.give_up(delivery, f"not retryable: {error_text(failure)}", failure)
        except errors.Error as exc:
            self.log_settle_error(delivery, exc)

    async def give_up(self, delivery: Delivery, reason: str, error: BaseException | None = None) -> None:
        """A failure that retrying cannot fix: dead-letter it now, whatever the attempt.

        Without a dead-letter queue the message is acked and reported at ERROR (and
        counted as ``dropped``); if dead-lettering fails it stays and is retried.
        """
        self.stats.failed += 1
        if self.target is not None:
            if await self.dead_letter(delivery, reason, error):
                return
            delay = self.queue.spec.retry.delay_for(delivery.attempts)
            self._log_attempt(delivery, reason, delay, error)
            await self.subscription.nack(delivery, delay)
            if self.observe is not None:
                self.observe(delivery, "retried", reason, error)
            return
        await self.subscription.ack(delivery)
        self.stats.dropped += 1
        if self.observe is not None:
            self.observe(delivery, "dropped", reason, error)
        extra = {**self.log_extra, "message_id": delivery.id, "attempt": delivery.attempts, "error": reason}
        if self._log_bodies:
            extra["body"] = delivery.body.decode(errors="replace")
        log.error(
            "message %s on %s dropped after attempt %d: %s; the queue has no dead-letter queue",
            delivery.id,
            self.queue.id,
            delivery.attempts,
            reason,
            exc_info=_exc_info(error),
            extra=extra,
        )

    def log_settle_error(self, delivery: Delivery, exc: errors.Error) -> None:
        # The driver could not settle: the message stays unsettled and the driver
        # hands it out again (lease expiry / channel close / subscription close).
        if self.observe is not None:
            self.observe(delivery, "unsettled", str(exc), None)
        log.error(
            "could not settle message %s on %s: %s",
            delivery.id,
            self.queue.id,
            exc,
            extra={**self.log_extra, "message_id": delivery.id, "error": str(exc)},
        )

    # -- before the handler ------------------------------------------------------------------

    async def exhausted(self, delivery: Delivery) -> bool:
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
        if not await self.dead_letter(delivery, reason):
            await self.subscription.nack(delivery, self.queue.spec.retry.max_delay)
        return True

    async def undecodable(self, delivery: Delivery, exc: DecodeError) -> None:
        """Never hand garbage to the handler: dead-letter it now, or keep and report it."""
        self.stats.undecodable += 1
        reason = f"undecodable with codec {self.queue.codec.name}: {exc}"
        extra = {**self.log_extra, "message_id": delivery.id, "error": reason}
        if self.spec.auto_ack:
            log.error(
                "message %s on %s is undecodable and was auto-acked: %s",
                delivery.id,
                self.queue.id,
                reason,
                extra=extra,
            )
            return
        if self.target is not None and await self.dead_letter(delivery, reason):
            return
        delay = self.queue.spec.retry.max_delay
        log.error(
            "message %s on %s is undecodable and has no dead-letter queue; kept, next try in %.1fs: %s",
            delivery.id,
            self.queue.id,
            delay,
            reason,
            extra=extra,
        )
        await self.subscription.nack(delivery, delay)

    # -- dead letters ------------------------------------------------------------------------

    async def dead_letter(self, delivery: Delivery, reason: str, error: BaseException | None = None) -> bool:
        """Move the message to the dead-letter queue; False (and logged) if that failed.

        ``error``: the handler's exception that led here, if any (its traceback is logged).
        """
        target = self.target
        assert target is not None, "dead_letter() without a dead-letter queue"
        copy = Outgoing(delivery.id, delivery.body, self._dead_letter_headers(delivery, reason))
        try:
            if target.driver is self.queue.driver:
                await self.subscription.dead_letter(delivery, target.spec, copy)
            else:
                # Different drivers: store the copy first, then remove the original.
                await target.driver.publish(target.spec, [copy])
                await self.subscription.ack(delivery)
        except errors.Error as exc:
            log.error(
                "could not dead-letter message %s from %s to %s: %s; it stays on %s",
                delivery.id,
                self.queue.id,
                target.id,
                exc,
                self.queue.id,
                extra={**self.log_extra, "message_id": delivery.id, "error": str(exc)},
            )
            return False
        self.stats.dead_lettered += 1
        if self.observe is not None:
            self.observe(delivery, "dead_lettered", reason, error)
        log.warning(
            "message %s on %s dead-lettered to %s after %d attempt(s): %s",
            delivery.id,
            self.queue.id,
            target.id,
            delivery.attempts,
            reason,
            exc_info=_exc_info(error),
            extra={
                **self.log_extra,
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

    # -- logs --------------------------------------------------------------------------------

    def _log_attempt(
        self, delivery: Delivery, reason: str, delay: float, error: BaseException | None = None
    ) -> None:
        extra = {
            **self.log_extra,
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
            exc_info=_exc_info(error),
            extra=extra,
        )

    def _log_failure(self, delivery: Delivery, failure: BaseException, note: str) -> None:
        log.warning(
            "handler failed on message %s on %s (%s): %s",
            delivery.id,
            self.queue.id,
            note,
            error_text(failure),
            exc_info=_exc_info(failure),
            extra={**self.log_extra, "message_id": delivery.id, "error": error_text(failure)},
        )
