"""Moving one message between RabbitMQ queues in a transaction (see _tooling.py).

Each message moves in its own transaction on the channel it was read on:
``basic.publish`` of the rewritten copy to the target (persistent, mandatory),
``basic.ack`` of the original, ``tx.commit``. RabbitMQ handles a commit whole (the
channel process finishes it before it handles the connection going away), so a
connection lost at any point leaves the message on exactly one queue: before the
commit the publish is discarded and the unacked original is requeued; after it,
both happened.

But a commit applies the ack even when the target refuses the copy (a full queue
with ``reject-publish``: the commit fails with "partial tx completion") or cannot
route it (the queue was deleted: a ``basic.return``, then ``commit-ok``). So the
target's existence and room are checked before each move, and if the broker still
refuses or returns the copy (a race), the original is put back on the source
(confirmed, at its back) and the move stops with an error.

Not covered: a crash of the broker itself during a commit. RabbitMQ's transactions
are not atomic across queues; the copy and the removal are written to disk by two
queues independently.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import TYPE_CHECKING, Any, cast

import aiormq
import aiormq.exceptions as amqp_exc
from aiormq.abc import AbstractChannel

from conveyor import errors
from conveyor.drivers.amqp._errors import describe
from conveyor.drivers.amqp._headers import encode_headers, republished
from conveyor.drivers.amqp._pipeline import supported as bookkeeping_supported
from conveyor.drivers.amqp._reading import Held
from conveyor.drivers.base import Outgoing, Rewrite
from conveyor.registry.model import QueueSpec

if TYPE_CHECKING:
    from conveyor.drivers.amqp.driver import AmqpDriver

__all__ = ["Move", "bound", "with_moved"]

log = logging.getLogger("conveyor.drivers.amqp")

_REFUSING = frozenset({"reject-publish", "reject-publish-dlx"})  # overflow modes that refuse publishes
_return_keys = itertools.count(1)


class _ReturnWatch:
    """Tells whether the broker returned (could not route) one mandatory publish.

    Channels without publisher confirms drop returns in aiormq unless a confirmation
    future is registered under the message's ID; the watch registers one under a key
    no confirm can use (negative), and forgets it afterwards. RabbitMQ sends a
    return before the ``tx.commit-ok`` of its transaction.
    """

    def __init__(self, channel: AbstractChannel, message_id: str) -> None:
        if not bookkeeping_supported(channel):
            raise errors.internal(
                "this aiormq version lacks the bookkeeping the AMQP driver's move relies on; "
                "install aiormq 7.x",
                retryable=False,
            )
        self.channel = cast(aiormq.Channel, channel)
        self.message_id = message_id
        self.key = -next(_return_keys)
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.channel.confirmations[self.key] = self.future
        self.channel.message_id_delivery_tag[message_id] = self.key

    def returned(self) -> bool:
        """Stop watching; True if the publish came back."""
        self.channel.confirmations.pop(self.key, None)
        if self.channel.message_id_delivery_tag.get(self.message_id) == self.key:
            self.channel.message_id_delivery_tag.pop(self.message_id, None)
        fut = self.future
        if not fut.done():
            fut.cancel()
            return False
        # A closing channel fails every registered future too: only a return counts.
        return not fut.cancelled() and isinstance(fut.exception(), amqp_exc.PublishError)


class Move:
    """One move call: the step that moves one held message, and its count."""

    def __init__(
        self,
        driver: AmqpDriver,
        source: QueueSpec,
        target: QueueSpec,
        rewrite: Rewrite,
        max_length: int | None,
    ) -> None:
        self.driver = driver
        self.source = source
        self.target = target
        self.rewrite = rewrite
        self.max_length = max_length  # the target's, when the broker refuses publishes beyond it
        self.target_name = driver.declaration(target).name
        self.moved = 0

    async def one(self, held: Held) -> None:
        """Publish the copy, ack the original, commit: one transaction per message."""
        await self._check_room()
        out: Outgoing = self.rewrite(held.stored)
        encoded = encode_headers(out.headers, out.id)  # INVALID before anything is sent
        channel = held.channel
        watch = _ReturnWatch(channel, out.id)
        failure: Exception | None = None
        try:
            async with asyncio.timeout(self.driver.link.timeout):
                await channel.basic_publish(
                    out.body, routing_key=self.target_name, properties=encoded.properties, mandatory=True
                )
                await channel.basic_ack(held.tag)
                await channel.tx_commit()
        except Exception as exc:
            failure = exc
        finally:
            returned = watch.returned()  # also on cancellation: nothing left registered
        if isinstance(failure, amqp_exc.ChannelPreconditionFailed) and _partial(failure):
            # The target refused the copy, but RabbitMQ applied the ack all the same.
            await self._put_back(held, f"the broker refused it ({describe(failure)})")
            raise self._refused(held, "refused the copy (full?)")
        if failure is not None:
            raise self._interrupted(held, failure)
        if returned:
            await self._put_back(held, "the broker could not route it to the target")
            raise self._refused(held, "does not exist on the broker (deleted?)")
        self.moved += 1

    async def _check_room(self) -> None:
        if self.max_length is None:
            return
        counts = await self.driver.queue_counts(self.target)
        if int(counts.message_count or 0) >= self.max_length:
            raise errors.internal(
                f"queue {self.target.id} is full (max_length {self.max_length}); "
                f"the message stays on {self.source.id}",
                queue=self.target.id,
                reason="queue_full",
                max_length=self.max_length,
                retryable=True,
            )

    async def _put_back(self, held: Held, why: str) -> None:
        """Publish the original to the source again (confirmed): its ack was applied."""
        copy = republished(held.props, held.stored.attempts, keep_expiration=True)
        copy.message_id = held.stored.id
        try:
            await self.driver.publish_raw(self.source, held.body, copy)
        except errors.Error as exc:
            log.error(
                "message %s was removed from %s while moving it to %s, %s, and could not be put "
                "back: %s; the message is lost",
                held.stored.id,
                self.source.id,
                self.target.id,
                why,
                exc.message,
            )
            raise errors.internal(
                f"message {held.stored.id} was removed from {self.source.id} but {why}, and putting "
                f"it back failed ({exc.message}): the message is lost",
                queue=self.source.id,
                id=held.stored.id,
                reason="lost",
                retryable=False,
            ) from None
        log.warning(
            "moving message %s from %s to %s: %s; put it back at the end of %s",
            held.stored.id,
            self.source.id,
            self.target.id,
            why,
            self.source.id,
        )

    def _refused(self, held: Held, what: str) -> errors.Error:
        return errors.internal(
            f"queue {self.target.id} {what}: message {held.stored.id} was put back at the end of "
            f"{self.source.id}",
            queue=self.target.id,
            id=held.stored.id,
            reason="target_refused",
            retryable=True,
        )

    def _interrupted(self, held: Held, exc: BaseException) -> errors.Error:
        return errors.internal(
            f"moving message {held.stored.id} from {self.source.id} to {self.target.id} was "
            f"interrupted ({describe(exc)}); it is on exactly one of the two queues",
            queue=self.source.id,
            id=held.stored.id,
            reason="interrupted",
            retryable=True,
        )


def _partial(exc: amqp_exc.ChannelPreconditionFailed) -> bool:
    """The commit failed because a queue refused a publish of it: the acks were applied."""
    return "partial tx completion" in describe(exc)


def bound(arguments: dict[str, Any]) -> int | None:
    """The target's length limit if the broker refuses publishes beyond it."""
    limit = arguments.get("x-max-length")
    if isinstance(limit, int) and arguments.get("x-overflow", "drop-head") in _REFUSING:
        return limit
    return None


def with_moved(exc: errors.Error, moved: int) -> errors.Error:
    details = {**exc.details, "moved": moved}
    return errors.Error(exc.kind, exc.message, retryable=exc.retryable, details=details)
