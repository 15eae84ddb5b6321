"""One consumer's attachment to one queue: deliveries in, settlements out.

Size: one concern, kept in one file of a little over 500 lines: attaching, the buffer,
every settlement and the return of deliveries on close all share one piece of
bookkeeping (the lease of each delivery and the channel it came on), which would
have to be passed between files if it were split.

The broker pushes up to ``basic.qos`` unacknowledged messages into a local buffer;
the core's workers take them with ``get_nowait``/``get`` and settle them here.

- ack: batched. Acks collect during one turn of the event loop and go out as one
  ``basic.ack multiple=True`` for the longest run of settled delivery tags, plus
  single acks for the rest. Nothing is weakened: an ack has no reply in AMQP, so an
  ack that is written a few microseconds later is exactly as (un)safe as one
  written now, and ``multiple`` never covers a tag that is not settled.
- nack(delay): the message is republished, with its attempt count recorded in
  ``x-conveyor-attempts``, to the queue's delay queue (or straight back to the
  queue for delay 0) and confirmed, then the original is acked. Republishing,
  rather than ``basic.nack requeue``, is what lets a classic queue count attempts
  at all and keeps quorum queues clear of RabbitMQ 4's delivery limit. If the
  republish fails, the original is requeued with ``basic.nack`` (the broker's
  redelivered flag / delivery count still counts that attempt).
- dead_letter: the copy is published to the dead-letter queue and confirmed; only
  then is the original acked. A failure leaves the original unsettled.
- release / close: unstarted deliveries are republished with their attempt count
  unchanged, so a stop does not cost them an attempt; whatever is still unsettled
  (handlers cut off after the grace period) is returned when the channel closes,
  and the broker counts that attempt.

A delivery remembers the channel it came on. After that channel is gone (a
reconnect) the broker has already put the message back, so settling it does
nothing on the new channel: an ack raises a retryable INTERNAL error that says so,
a nack or release is a no-op. Nothing is ever sent with a stale delivery tag,
which would make the broker close the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp import commands as spec

from conveyor import errors
from conveyor.drivers.amqp._errors import describe
from conveyor.drivers.amqp._headers import attempts_of, decode_headers, has_delivery_count, republished
from conveyor.drivers.amqp._link import backoff_delays
from conveyor.drivers.base import Delivery, Outgoing, Subscription
from conveyor.drivers.options.amqp import AmqpConsumerOptions
from conveyor.drivers.waiters import Waiters
from conveyor.registry.model import QueueSpec

if TYPE_CHECKING:
    from conveyor.drivers.amqp.driver import AmqpDriver

__all__ = ["AmqpSubscription"]

log = logging.getLogger("conveyor.drivers.amqp")

ACK_DELAY = 0.02  # seconds an ack may wait to share a basic.ack(multiple) with others


class _Lease:
    """The driver-private token of a delivery: where it came from and whether it is settled."""

    __slots__ = ("channel", "properties", "settled", "sub", "tag")

    def __init__(
        self, sub: AmqpSubscription, channel: AbstractChannel, tag: int, properties: spec.Basic.Properties
    ) -> None:
        self.sub = sub
        self.channel = channel
        self.tag = tag
        self.properties = properties
        self.settled = False


class AmqpSubscription(Subscription):
    """A consumer on one queue (see the module docstring for the settlement rules)."""

    def __init__(
        self,
        driver: AmqpDriver,
        queue: QueueSpec,
        *,
        prefetch: int,
        auto_ack: bool,
        options: AmqpConsumerOptions,
    ) -> None:
        self._driver = driver
        self._queue = queue
        self._prefetch = prefetch
        self._auto_ack = auto_ack
        self._options = options
        self._channel: AbstractChannel | None = None
        self._consumer_tag: str | None = None
        self._buffer: deque[Delivery] = deque()  # received, not handed out yet
        self._handed: dict[int, Delivery] = {}  # handed out, unsettled (current channel)
        self._open_tags: dict[int, None] = {}  # every unsettled tag of the channel, ascending
        self._pending_acks: list[int] = []
        self._flushing: asyncio.Task[None] | None = None
        self._ack_timer: asyncio.TimerHandle | None = None
        # Acks go out when a quarter of the broker's window is settled, or after
        # ACK_DELAY at the latest. Pending acks never hold up deliveries: with less
        # than a quarter of the window pending, the broker may still send 3/4 of it.
        self._ack_batch = max(1, driver.qos_for(prefetch) // 4)
        self._waiters = Waiters()
        self._attaching: asyncio.Task[None] | None = None
        self._held: dict[str, asyncio.Event] = {}  # message_id -> "original settled"
        self._background: set[asyncio.Task[None]] = set()
        self._receiving: set[asyncio.Task[Any]] = set()  # _on_message calls still running
        self._closed = False
        self.attached = asyncio.Event()  # set while a verified consumer is on the broker

    # -- figures for info() ---------------------------------------------------------------

    @property
    def queue_name(self) -> str:
        return self._queue.queue_name

    @property
    def buffered(self) -> int:
        """Delivered to this process, not handed out yet: in the buffer or still being
        received (a classic queue's redelivery being recorded, say)."""
        return len(self._buffer) + len(self._receiving)

    @property
    def in_flight(self) -> int:
        return len(self._handed)

    # -- attaching -----------------------------------------------------------------------------

    async def attach(self) -> None:
        """Open a channel, set ``basic.qos``, start consuming; raises ``Error`` on failure."""
        link = self._driver.link
        channel = await link.channel(confirms=False)
        try:
            async with asyncio.timeout(link.timeout):
                await channel.basic_qos(prefetch_count=self._driver.qos_for(self._prefetch))
                self._use_channel(channel)
                ok = await channel.basic_consume(
                    self.queue_name,
                    self._on_message,
                    exclusive=self._options.exclusive,
                    consumer_tag=self._options.consumer_tag,
                )
        except Exception as exc:
            self._forget_channel(channel)
            with contextlib.suppress(Exception):
                await channel.close()
            raise self._driver.declare_error(self._queue, exc, "start consuming") from None
        self._consumer_tag = ok.consumer_tag
        self.attached.set()

    def _use_channel(self, channel: AbstractChannel) -> None:
        self._channel = channel
        channel.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
        channel.closing.add_done_callback(lambda _f: self._on_channel_closed(channel))

    def _forget_channel(self, channel: AbstractChannel) -> None:
        """Everything received on ``channel`` is void: the broker takes it back."""
        if self._channel is not channel:
            return
        self._channel = None
        self._consumer_tag = None
        self.attached.clear()
        self._buffer.clear()
        self._handed.clear()
        self._open_tags.clear()
        self._pending_acks.clear()
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None

    def _on_channel_closed(self, channel: AbstractChannel) -> None:
        if self._channel is not channel or self._closed:
            return
        log.warning("consumer channel of %s closed; re-attaching", self._queue.id)
        self._forget_channel(channel)
        self.reattach()

    async def _on_broker_cancel(self, frame: Any) -> None:
        # The broker cancels a consumer whose queue was deleted (or lost its leader).
        if self._closed or frame.consumer_tag != self._consumer_tag:
            return
        log.warning("the broker cancelled the consumer of %s; re-declaring and re-attaching", self._queue.id)
        channel = self._channel
        if channel is not None:
            self._forget_channel(channel)
            # Not awaited here: this callback runs inside the channel's own reader task.
            closing = asyncio.get_running_loop().create_task(_close_quietly(channel))
            self._background.add(closing)
            closing.add_done_callback(self._background.discard)
        self.reattach(redeclare=True)

    def link_down(self) -> None:
        if self._channel is not None:
            self._forget_channel(self._channel)

    async def link_up(self) -> None:
        self.reattach()

    def reattach(self, *, redeclare: bool = False) -> None:
        """Re-attach in the background with backoff until it works or the subscription closes."""
        if self._closed or (self._attaching is not None and not self._attaching.done()):
            return
        self._attaching = asyncio.get_running_loop().create_task(
            self._reattach_loop(redeclare), name=f"conveyor-amqp-attach:{self._queue.id}"
        )

    async def _reattach_loop(self, redeclare: bool) -> None:
        opts = self._driver.options
        delays = backoff_delays(opts.reconnect_delay, opts.reconnect_max_delay)
        while not self._closed:
            try:
                if redeclare:
                    await self._driver.declare(self._queue)
                await self.attach()
                await self._verify()
            except errors.Error as exc:
                log.warning("re-attaching the consumer of %s failed: %s", self._queue.id, exc.message)
                await asyncio.sleep(next(delays))
                continue
            log.info("consumer of %s re-attached and verified", self._queue.id)
            return

    async def _verify(self) -> None:
        """The consumer is live: the broker counts it on the queue."""
        counts = await self._driver.queue_counts(self._queue)
        if not counts.consumer_count:
            raise errors.internal(
                f"the broker shows no consumer on {self._queue.id} after attaching", retryable=True
            )

    # -- receiving and handing out -----------------------------------------------------------

    async def _on_message(self, message: DeliveredMessage) -> None:
        # aiormq runs this in a task of its own per delivery, so it may await; close()
        # waits for these tasks before it gives up the channel (see _settle_receiving).
        task = asyncio.current_task()
        if task is None:
            await self._receive(message)
            return
        self._receiving.add(task)
        try:
            await self._receive(message)
        finally:
            self._receiving.discard(task)

    async def _receive(self, message: DeliveredMessage) -> None:
        channel = message.channel
        if channel is not self._channel:
            return  # a late frame from a channel we gave up: the broker takes it back
        deliver = message.delivery
        assert isinstance(deliver, spec.Basic.Deliver)
        props = message.header.properties
        tag = int(deliver.delivery_tag or 0)
        redelivered = bool(deliver.redelivered)
        if not props.message_id:  # a foreign publisher's message: republished copies need an id
            props.message_id = f"amqp-{uuid.uuid4().hex}"
        # Unsettled from now on: registered before any await, so _open_tags stays in
        # ascending tag order (deliveries start in order; a copy that waits for its
        # original below must not be covered by a multiple-ack meanwhile).
        self._open_tags[tag] = None
        hold = self._held.get(props.message_id)
        if hold is not None:
            await hold.wait()  # our own republished copy, early: let the original be acked first
            if channel is not self._channel:
                return  # that channel's tags were forgotten when it was dropped
        lease = _Lease(self, channel, tag, props)
        if redelivered and not has_delivery_count(props) and await self._checkpoint(lease, message.body):
            return
        delivery = Delivery(
            props.message_id,
            message.body,
            decode_headers(props),
            attempts_of(props, redelivered),
            lease,
        )
        self._buffer.append(delivery)
        self._waiters.wake()

    async def _checkpoint(self, lease: _Lease, body: bytes) -> bool:
        """Record a classic queue's redelivery in the message itself; True if done.

        A classic queue only flags a redelivery, it does not count them: a message
        whose handler crashed the process twice would look like a second attempt
        forever and never reach ``max_attempts``. So a redelivered message is
        republished (confirmed) with the attempt it stands for added to
        ``x-conveyor-attempts``, and the original acked; the copy arrives unflagged
        with an exact count, and the next crash is counted the same way. The price,
        paid only after a crash or a lost channel: one confirmed publish, and the
        copy queues up behind the messages already waiting.
        """
        props = lease.properties
        copy = republished(props, attempts_of(props, True) - 1, keep_expiration=True)
        async with self._republishing(lease):
            try:
                await self._driver.publish_raw(self._queue, body, copy)
            except errors.Error as exc:
                # Handed out all the same: counted, but not recorded, so a crash in its
                # handler would not raise the count again. (A lost channel never gets
                # here: closing a channel cancels aiormq's delivery callbacks.)
                log.warning(
                    "could not record the redelivery of message %s on %s: %s",
                    props.message_id,
                    self._queue.id,
                    exc.message,
                )
                return False
            lease.settled = True
            await self._ack_now(lease)  # a no-op if the channel was lost: both exist (at-least-once)
        return True

    def get_nowait(self) -> Delivery | None:
        if self._closed or not self._buffer:
            return None
        delivery = self._buffer.popleft()
        lease: _Lease = delivery.token
        if self._auto_ack:
            lease.settled = True
            self._queue_ack(lease)
        else:
            self._handed[lease.tag] = delivery
        return delivery

    async def get(self) -> Delivery | None:
        # Cancellation-safe: a cancelled wait has taken nothing out of the buffer.
        while not self._closed:
            delivery = self.get_nowait()
            if delivery is not None:
                return delivery
            await self._waiters.wait()
        return None

    # -- settling ------------------------------------------------------------------------------

    def _claim(self, delivery: Delivery) -> _Lease:
        lease = delivery.token
        if not isinstance(lease, _Lease) or lease.sub is not self:
            raise errors.invalid(f"delivery {delivery.id} is not held by this subscription")
        if lease.settled:
            raise errors.invalid(f"delivery {delivery.id} is already settled")
        return lease

    def _is_current(self, lease: _Lease) -> bool:
        return lease.channel is self._channel and not lease.channel.is_closed

    def _settled(self, lease: _Lease) -> None:
        lease.settled = True
        if lease.channel is self._channel:
            self._handed.pop(lease.tag, None)

    async def ack(self, delivery: Delivery) -> None:
        lease = self._claim(delivery)
        self._settled(lease)
        if not self._is_current(lease):
            raise _stale(delivery, self._queue)
        self._queue_ack(lease)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        lease = self._claim(delivery)
        if not self._is_current(lease):
            self._settled(lease)  # the broker already took it back (and counts the attempt)
            return
        async with self._republishing(lease):
            try:
                await self._driver.retry(self._queue, delivery, lease.properties, delay)
            except errors.Error as exc:
                log.warning(
                    "could not park message %s of %s for its %.3gs retry delay (%s); "
                    "returning it to the queue now instead",
                    delivery.id,
                    self._queue.id,
                    delay,
                    exc.message,
                )
                await self._requeue(lease)
                return
            self._settled(lease)
            await self._ack_now(lease)

    async def release(self, delivery: Delivery) -> None:
        lease = self._claim(delivery)
        if not self._is_current(lease):
            self._settled(lease)
            return
        await self._return_unstarted(delivery, lease)

    async def _return_unstarted(self, delivery: Delivery, lease: _Lease) -> None:
        """Back to the queue with the attempt count unchanged (republish), else requeue."""
        props = republished(lease.properties, delivery.attempts - 1, keep_expiration=True)
        async with self._republishing(lease):
            try:
                await self._driver.publish_raw(self._queue, delivery.body, props)
            except errors.Error:
                await self._requeue(lease)
                return
            self._settled(lease)
            await self._ack_now(lease)

    async def dead_letter(self, delivery: Delivery, target: QueueSpec, copy: Outgoing) -> None:
        lease = self._claim(delivery)
        if not self._is_current(lease):
            raise _stale(delivery, self._queue)
        await self._driver.publish(target, [copy])  # raises: the original stays unsettled
        self._settled(lease)
        if self._is_current(lease):
            await self._ack_now(lease)
        else:  # lost its channel meanwhile: the broker redelivers the original (at-least-once)
            log.warning(
                "message %s of %s was dead-lettered, but its channel was lost before the ack; "
                "it will be delivered again",
                delivery.id,
                self._queue.id,
            )

    async def _requeue(self, lease: _Lease) -> None:
        self._settled(lease)
        if not self._is_current(lease):
            return
        try:
            await lease.channel.basic_nack(lease.tag, requeue=True, wait=False)
        except Exception as exc:  # the channel died: the broker requeues it anyway
            log.debug("requeue of tag %d failed: %s", lease.tag, describe(exc))
        finally:
            # Only now: a batched multiple-ack must not cover this tag before the nack is sent.
            if lease.channel is self._channel:
                self._open_tags.pop(lease.tag, None)

    # -- batched acks --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _republishing(self, lease: _Lease) -> AsyncIterator[None]:
        """Hold back a copy of ``lease``'s message until the original is settled.

        The broker may deliver the republished copy to this very consumer before the
        confirm for it reaches us, so before the original is acked. Were the copy
        handled (and the process to crash in that handler) first, both would come
        back. Copies carry the original's message_id; ``_on_message`` waits here.
        """
        key = lease.properties.message_id or ""
        done = self._held.setdefault(key, asyncio.Event())
        try:
            yield
        finally:
            if self._held.get(key) is done:
                del self._held[key]
            done.set()

    async def _ack_now(self, lease: _Lease) -> None:
        """Ack at once, written to the socket before returning (after a republish).

        The original of a republished message is acked without batching: were the
        process to die before a batched ack went out, both the original and its copy
        would come back, and a poison message that kills its consumer would multiply.
        """
        if lease.channel is not self._channel:
            return
        try:
            await lease.channel.basic_ack(lease.tag, wait=True)
        except Exception as exc:  # the channel died: the broker redelivers it
            log.debug("ack of tag %d lost with its channel: %s", lease.tag, describe(exc))
        finally:
            # Only now: a batched multiple-ack must not cover this tag as well.
            if lease.channel is self._channel:
                self._open_tags.pop(lease.tag, None)

    def _queue_ack(self, lease: _Lease) -> None:
        if lease.channel is not self._channel:
            return
        self._open_tags.pop(lease.tag, None)
        self._pending_acks.append(lease.tag)
        if len(self._pending_acks) >= self._ack_batch:
            self._kick_flush()
        elif self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._kick_flush)

    def _kick_flush(self) -> None:
        """Start the flusher now (batch full, consumer idle, or the safety timer fired)."""
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if self._flushing is None and self._pending_acks:
            self._flushing = asyncio.get_running_loop().create_task(self._flush_acks())

    async def _flush_acks(self) -> None:
        """Send pending acks; one flusher at a time so no tag is ever acked twice."""
        try:
            while self._pending_acks and self._channel is not None:
                channel = self._channel
                tags, self._pending_acks = sorted(self._pending_acks), []
                floor = next(iter(self._open_tags), None)  # lowest tag still unsettled
                covered = [t for t in tags if floor is None or t < floor]
                single = tags[len(covered) :]
                try:
                    if covered:
                        await channel.basic_ack(covered[-1], multiple=len(covered) > 1, wait=False)
                    for tag in single:
                        await channel.basic_ack(tag, wait=False)
                except Exception as exc:  # the channel died: the broker redelivers them
                    log.debug("acks lost with their channel: %s", describe(exc))
        finally:
            self._flushing = None

    async def _drain_acks(self) -> None:
        self._kick_flush()
        while self._flushing is not None:
            await asyncio.shield(self._flushing)

    # -- closing -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Cancel the consumer, let deliveries being received finish, return unstarted
        deliveries uncounted, close the channel."""
        if self._closed:
            return
        self._closed = True
        self._waiters.wake_all()
        self._driver.forget(self)
        if self._attaching is not None:
            self._attaching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._attaching
        channel = self._channel
        if channel is None or channel.is_closed:
            return
        with contextlib.suppress(Exception):
            await self._cancel_consumer(channel)
            await self._settle_receiving()
            unstarted, self._buffer = list(self._buffer), deque()
            await asyncio.gather(*(self._return_unstarted(d, d.token) for d in unstarted))
            await self._drain_acks()
        self._channel = None
        # Closing the channel returns everything still unacked (handlers cut off after
        # the grace period); the close-ok comes after the broker has requeued them.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(channel.close(), self._driver.link.timeout)

    async def _settle_receiving(self) -> None:
        """Let deliveries that arrived before the cancel finish being received.

        A redelivered message from a classic queue is being republished with its
        attempt recorded (:meth:`_checkpoint`); its original must be acked on this
        channel before it closes, or both would be on the queue.
        """
        pending = {task for task in self._receiving if task is not asyncio.current_task()}
        if pending:
            await asyncio.wait(pending, timeout=self._driver.link.timeout)

    async def _cancel_consumer(self, channel: AbstractChannel) -> None:
        if self._consumer_tag is None:
            return
        async with asyncio.timeout(self._driver.link.timeout):
            await channel.basic_cancel(self._consumer_tag)
        self._consumer_tag = None
        self.attached.clear()


async def _close_quietly(channel: AbstractChannel) -> None:
    with contextlib.suppress(Exception):
        await channel.close()


def _stale(delivery: Delivery, queue: QueueSpec) -> errors.Error:
    return errors.internal(
        f"message {delivery.id} of {queue.id} came on a connection or channel that has since "
        "been lost; the broker has returned it to the queue and will deliver it again",
        queue=queue.id,
        reason="stale_delivery",
        retryable=True,
    )
