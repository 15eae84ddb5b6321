"""``queue.driver.amqp``: RabbitMQ (AMQP 0-9-1) through aiormq.

One connection per driver (kept up by :class:`Link`), one confirm-mode channel
shared by every publisher (confirms are pipelined: many publishes wait on the same
channel at once), one channel for declarations and counts, one channel per
consumer, and short-lived channels for browse, purge and move (``_tooling.py``).
See docs/rabbitmq.md for the topology and the guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection, Mapping
from typing import Any, cast

import aiormq
import aiormq.exceptions as amqp_exc
from aiormq.abc import AbstractChannel
from pamqp import commands as spec

from conveyor import errors
from conveyor.drivers.amqp._errors import describe, not_stored_error, publish_error, refusal_of, too_large
from conveyor.drivers.amqp._headers import encode_headers, republished
from conveyor.drivers.amqp._link import Link
from conveyor.drivers.amqp._pipeline import Pipeline, Sent
from conveyor.drivers.amqp._pipeline import supported as pipeline_supported
from conveyor.drivers.amqp._subscription import AmqpSubscription
from conveyor.drivers.amqp._tooling import Tooling
from conveyor.drivers.amqp._topology import (
    REDECLARE_AFTER,
    Declaration,
    Difference,
    apply_difference,
    delay_declaration,
    mismatch_error,
    parse_difference,
    queue_declaration,
)
from conveyor.drivers.base import Capabilities, Delivery, Driver, Outgoing, Rewrite, Stored, Subscription
from conveyor.drivers.options.amqp import SCHEMA
from conveyor.registry.model import DriverSpec, QueueSpec
from conveyor.registry.options import Options

__all__ = ["AmqpDriver"]

log = logging.getLogger("conveyor.drivers.amqp")

_MAX_DIAGNOSIS_STEPS = 12


class AmqpDriver(Driver):
    """RabbitMQ driver: confirmed publishes, delay-queue retries, confirmed dead letters."""

    kind = "queue.driver.amqp"
    capabilities = Capabilities(
        durable=True,
        atomic_batches=False,
        atomic_dead_letter=False,
        max_length=True,
        cross_process=True,
        native_delay=True,
        browse_counts_delivery=True,  # basic.get, then give back: see _tooling.py
    )

    def __init__(self, spec: DriverSpec) -> None:
        super().__init__(spec)
        self.options = SCHEMA.driver_options(spec.options)
        self.link = Link(self.options, name=f"conveyor {spec.id}")
        self._declared: dict[str, Declaration] = {}  # queue_name -> source declaration
        self._specs: dict[str, QueueSpec] = {}
        self._delays_of: dict[str, dict[str, Declaration]] = {}  # queue_name -> its delay queues
        self._delay_fresh: dict[str, float] = {}  # delay queue -> when this process last declared it
        self._subs: set[AmqpSubscription] = set()
        self._publish_channel: AbstractChannel | None = None
        self._publisher: Pipeline | None = None
        self._rpc_channel: AbstractChannel | None = None
        self._channel_lock = asyncio.Lock()
        # The broker's max_message_size, once a refusal named it; forgotten on reconnect
        # (the broker may have restarted with another limit).
        self._broker_max_size: int | None = None
        self._tools = Tooling(self)

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        await self.link.open()
        self.link.add_listener(self)

    async def close(self) -> None:
        for sub in list(self._subs):
            await sub.close()
        await self.link.close()
        self._publish_channel = self._rpc_channel = None

    @property
    def connected(self) -> bool:
        return self.link.is_up

    def link_down(self) -> None:
        self._publish_channel = self._rpc_channel = None
        self._broker_max_size = None
        self._delay_fresh = {}  # re-declare delay queues before the next use (they may be gone)

    async def link_up(self) -> None:
        for name, decl in list(self._declared.items()):
            try:
                await self._declare(self._specs[name], decl)
            except errors.Error as exc:
                log.error("re-declaring %s after reconnecting failed: %s", self._specs[name].id, exc)

    def forget(self, sub: AmqpSubscription) -> None:
        self._subs.discard(sub)
        self.link.remove_listener(sub)

    def qos_for(self, prefetch: int) -> int:
        """``basic.qos`` for a consumer: its prefetch, lowered to ``prefetch_count`` if set."""
        cap = self.options.prefetch_count
        return min(prefetch, cap) if cap else prefetch

    # -- channels ----------------------------------------------------------------------------

    async def _channel(self, confirms: bool) -> AbstractChannel:
        current = self._publish_channel if confirms else self._rpc_channel
        if current is not None and not current.is_closed:
            return current
        async with self._channel_lock:
            current = self._publish_channel if confirms else self._rpc_channel
            if current is None or current.is_closed:
                current = await self.link.channel(confirms=confirms)
                if confirms:
                    self._publish_channel = current
                else:
                    self._rpc_channel = current
            return current

    # -- declaring ---------------------------------------------------------------------------

    async def declare(self, queue: QueueSpec) -> None:
        decl = queue_declaration(queue, self.options)
        await self._declare(queue, decl)
        self._declared[queue.queue_name] = decl
        self._specs[queue.queue_name] = queue

    async def _declare(self, queue: QueueSpec, decl: Declaration) -> spec.Queue.DeclareOk:
        try:
            return await self._queue_declare(decl)
        except amqp_exc.ChannelPreconditionFailed as exc:
            raise await self._mismatch(queue, decl, exc) from None
        except Exception as exc:
            raise self.declare_error(queue, exc, "declare") from None

    async def _queue_declare(self, decl: Declaration, *, passive: bool = False) -> spec.Queue.DeclareOk:
        channel = await self._channel(confirms=False)
        async with asyncio.timeout(self.link.timeout):
            return await channel.queue_declare(
                decl.name,
                passive=passive,
                durable=decl.durable,
                exclusive=decl.exclusive,
                auto_delete=decl.auto_delete,
                arguments=decl.arguments,
            )

    async def _mismatch(
        self, queue: QueueSpec, decl: Declaration, first: amqp_exc.ChannelPreconditionFailed
    ) -> errors.Error:
        """Find every argument that differs from the existing queue (the broker names one per try).

        Each step re-declares with the broker's value for the argument it named, which
        never changes the existing queue: an equivalent declaration is a no-op.
        """
        reply = _reply_text(first)
        trial = Declaration(decl.name, decl.durable, decl.auto_delete, decl.exclusive, dict(decl.arguments))
        found: list[Difference] = []
        exc: BaseException | None = first
        for _ in range(_MAX_DIAGNOSIS_STEPS):
            diff = parse_difference(_reply_text(exc)) if exc is not None else None
            if diff is None or diff in found or not apply_difference(trial, diff):
                break
            found.append(diff)
            try:
                await self._queue_declare(trial)
                exc = None
            except amqp_exc.ChannelPreconditionFailed as again:
                exc = again
            except Exception:
                break
        return mismatch_error(queue, found, reply)

    def declare_error(self, queue: QueueSpec, exc: BaseException, action: str) -> errors.Error:
        """Translate a failure to declare / consume ``queue``."""
        if isinstance(exc, errors.Error):
            return exc
        text = f"cannot {action} queue {queue.id} ({queue.queue_name!r}): {describe(exc)}"
        if isinstance(exc, amqp_exc.ChannelAccessRefused):
            return errors.permission_denied(text, queue=queue.id)
        if isinstance(exc, amqp_exc.ChannelLockedResource):
            return errors.Error(
                errors.CONFLICT,
                text + " (an exclusive queue or consumer held by another connection)",
                details={"queue": queue.id},
            )
        if isinstance(exc, amqp_exc.ChannelNotFoundEntity):
            return errors.internal(
                text + " (the queue does not exist on the broker)", queue=queue.id, retryable=True
            )
        return errors.internal(text, queue=queue.id, retryable=True)

    def declaration(self, queue: QueueSpec) -> Declaration:
        try:
            return self._declared[queue.queue_name]
        except KeyError:
            raise errors.not_found(
                f"queue {queue.id} is not declared on this driver", queue=queue.id
            ) from None

    async def _delay_queue(self, queue: QueueSpec, delay: float) -> str:
        """The delay queue for ``delay`` seconds, declared recently enough not to expire."""
        source = self.declaration(queue)
        decl = delay_declaration(source, max(round(delay * 1000), 1))
        declared_at = self._delay_fresh.get(decl.name)
        if declared_at is None or time.monotonic() - declared_at > REDECLARE_AFTER:
            await self._declare(queue, decl)
            self._delay_fresh[decl.name] = time.monotonic()
            self._delays_of.setdefault(queue.queue_name, {})[decl.name] = decl
        return decl.name

    # -- publishing --------------------------------------------------------------------------

    async def publish(self, queue: QueueSpec, batch: list[Outgoing]) -> None:
        """Publish ``batch`` persistently; return once the broker confirmed every message.

        On failure: ``details["stored"]`` = the indexes the broker did confirm
        (publishes are not atomic on AMQP) and ``details["not_stored"]`` those it
        definitely did not store. A message the broker refused for what it is (over
        its ``max_message_size``, a foreign ``amqp.user_id``, access refused) raises
        INVALID or PERMISSION_DENIED, not retryable; everything else INTERNAL,
        retryable (see :meth:`_send`).
        """
        decl = self.declaration(queue)
        encoded = [encode_headers(out.headers, out.id) for out in batch]  # INVALID before sending
        messages = [
            (out.body, enc.properties, enc.mandatory) for out, enc in zip(batch, encoded, strict=True)
        ]
        await self._send(queue, decl.name, messages, full="x-max-length" in decl.arguments)

    async def publish_raw(self, queue: QueueSpec, body: bytes, properties: spec.Basic.Properties) -> None:
        """Republish a delivered message's body and properties to ``queue`` (confirmed)."""
        decl = self.declaration(queue)
        await self._send(queue, decl.name, [(body, properties, True)], full="x-max-length" in decl.arguments)

    async def retry(
        self, queue: QueueSpec, delivery: Delivery, properties: spec.Basic.Properties, delay: float
    ) -> None:
        """Park a failed delivery for ``delay`` s (0: straight back), its attempts recorded."""
        copy = republished(properties, delivery.attempts, keep_expiration=delay <= 0)
        if delay <= 0:
            await self.publish_raw(queue, delivery.body, copy)
            return
        name = await self._delay_queue(queue, delay)
        await self._send(queue, name, [(delivery.body, copy, True)], full=False)

    async def _send(
        self, queue: QueueSpec, routing_key: str, messages: list[_Message], *, full: bool
    ) -> None:
        """Persistent publishes that return once each is confirmed; bounded by the link timeout.

        Raises ``errors.Error`` whose details say what became of each of ``messages``:
        ``stored`` lists the indexes the broker confirmed, ``not_stored`` those it
        definitely did not store (returned, nacked, refused, or dropped with a channel
        the broker closed because of another message); the outcome of the rest is
        unknown (a timeout, a lost connection).
        """
        self._check_size(queue, messages)
        sent: list[Sent] = []
        pipeline: Pipeline | None = None
        failure: BaseException | None = None
        try:
            async with asyncio.timeout(self.link.timeout):
                pipeline = await self._pipeline()
                for body, props, mandatory in messages:
                    sent.append(pipeline.publish(routing_key, body, props, mandatory))
                await asyncio.wait([one.future for one in sent])  # every outcome, not just the first failure
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            _cancel(sent)
            raise
        except BaseException as exc:
            _cancel(sent)
            failure = exc
        if failure is None and all(one.confirmed for one in sent):
            return
        raise self._send_error(queue, len(messages), sent, pipeline, failure, full=full) from None

    def _send_error(
        self,
        queue: QueueSpec,
        total: int,
        sent: list[Sent],
        pipeline: Pipeline | None,
        failure: BaseException | None,
        *,
        full: bool,
    ) -> errors.Error:
        """The one error for a :meth:`_send` that did not have every message confirmed."""
        outcomes = [_outcome(one) for one in sent]
        refusal = next((r for r in map(refusal_of, outcomes) if r is not None), None)
        culprit = None
        if refusal is not None and pipeline is not None:
            culprit = pipeline.culprit(lambda one: refusal.applies_to(one.size, one.user_id))
        if refusal is not None and refusal.limit is not None and culprit is not None:
            self._broker_max_size = refusal.limit  # refuse such messages here from now on
        stored = [i for i, one in enumerate(sent) if one.confirmed]
        not_stored = list(range(len(sent), total))  # never handed to the channel
        refused: int | None = None
        for i, (one, exc) in enumerate(zip(sent, outcomes, strict=True)):
            if isinstance(exc, amqp_exc.PublishError | amqp_exc.DeliveryError):
                not_stored.append(i)
            elif refusal is not None and culprit is not None and one.tag >= culprit and refusal_of(exc):
                not_stored.append(i)  # the broker drops every publish after the refused one
                if refused is None and refusal.applies_to(one.size, one.user_id):
                    refused = i
        details: dict[str, Any] = {"stored": stored, "not_stored": sorted(not_stored), "total": total}
        if refusal is not None and refused is not None:
            return refusal.error(queue.id, sent[refused].size, index=refused, **details)
        if failure is not None:
            if isinstance(failure, errors.Error):
                return _with_details(failure, details)
            if isinstance(failure, TimeoutError) and not self.link.is_up:
                return _with_details(self.link.unreachable(), details)
            return publish_error(failure, queue.id, full=full, **details)
        found = next(((i, exc) for i, exc in enumerate(outcomes) if exc is not None), None)
        if found is None:  # cancelled by the client library: nothing says how far it got
            return publish_error(
                amqp_exc.ChannelInvalidStateError("cancelled"), queue.id, full=full, **details
            )
        first, exc = found
        if refusal is not None and first in not_stored and refusal_of(exc):
            return not_stored_error(refusal, queue.id, **details)
        return publish_error(exc, queue.id, full=full, **details)

    def _check_size(self, queue: QueueSpec, messages: list[_Message]) -> None:
        """INVALID before sending anything when a body is over the broker's known limit.

        The limit is learned from the broker's own refusal: sending such a message
        again would only make the broker close the shared publishing channel again,
        failing the other publishes on it.
        """
        limit = self._broker_max_size
        if limit is None:
            return
        for i, (body, _props, _mandatory) in enumerate(messages):
            if len(body) > limit:
                raise too_large(
                    queue.id,
                    len(body),
                    limit,
                    sent=False,
                    index=i,
                    stored=[],
                    not_stored=list(range(len(messages))),
                    total=len(messages),
                )

    async def _pipeline(self) -> Pipeline:
        channel = await self._channel(confirms=True)
        if self._publisher is None or self._publisher.channel is not channel:
            if not pipeline_supported(channel):
                raise errors.internal(
                    "this aiormq version lacks the confirm bookkeeping the AMQP driver uses; "
                    "install aiormq 7.x (pip install 'conveyor[amqp]')",
                    retryable=False,
                )
            self._publisher = Pipeline(cast(aiormq.Channel, channel))
        return self._publisher

    # -- consuming ---------------------------------------------------------------------------

    async def subscribe(
        self, queue: QueueSpec, *, prefetch: int, auto_ack: bool, options: Mapping[str, Options]
    ) -> Subscription:
        self.declaration(queue)
        settings = SCHEMA.consumer_options(options)
        assert settings is not None  # the AMQP driver declares consumer options
        sub = AmqpSubscription(self, queue, prefetch=prefetch, auto_ack=auto_ack, options=settings)
        await sub.attach()
        self._subs.add(sub)
        self.link.add_listener(sub)
        return sub

    # -- counting ----------------------------------------------------------------------------

    async def queue_counts(self, queue: QueueSpec) -> spec.Queue.DeclareOk:
        """The broker's ``queue.declare-ok`` counts (ready messages, consumers) for ``queue``."""
        decl = self.declaration(queue)
        try:
            return await self._queue_declare(decl, passive=True)
        except Exception as exc:
            raise self.declare_error(queue, exc, "count") from None

    async def info(self, queue: QueueSpec) -> dict[str, Any]:
        """Counts: the broker's ready messages and consumers, this process's deliveries, delays.

        ``ready`` = ready on the broker + delivered to this process but not yet handed
        to a handler; ``in_flight`` = handed to this process's handlers, unsettled;
        ``delayed`` = waiting in the delay queues this process has used;
        ``message_count`` = all three. Unacked deliveries of *other* processes are not
        visible through AMQP and are not counted.
        """
        counts = await self.queue_counts(queue)
        subs = [s for s in self._subs if s.queue_name == queue.queue_name]
        buffered = sum(s.buffered for s in subs)
        in_flight = sum(s.in_flight for s in subs)
        delayed = await self._delayed(queue)
        ready = int(counts.message_count or 0) + buffered
        return {
            "message_count": ready + in_flight + delayed,
            "ready": ready,
            "in_flight": in_flight,
            "delayed": delayed,
            "consumer_count": int(counts.consumer_count or 0),
            "queue_name": queue.queue_name,
        }

    async def _delayed(self, queue: QueueSpec) -> int:
        return sum((await self.delay_counts(queue)).values())

    async def delay_counts(self, queue: QueueSpec) -> dict[str, int]:
        """Messages waiting in each delay queue of ``queue`` this process has used, shortest delay first."""
        counts: dict[str, int] = {}
        known = self._delays_of.get(queue.queue_name, {})
        for name, decl in sorted(known.items(), key=lambda item: item[1].arguments["x-message-ttl"]):
            # A plain (not passive) declare: it cannot fail on a queue that expired meanwhile.
            with contextlib.suppress(errors.Error):
                counts[name] = int((await self._declare(queue, decl)).message_count or 0)
                self._delay_fresh[name] = time.monotonic()
        return counts

    # -- queue tooling (see _tooling.py) --------------------------------------------------------

    async def browse(self, queue: QueueSpec, *, limit: int, after: str | None = None) -> list[Stored]:
        return await self._tools.browse(queue, limit=limit, after=after)

    async def purge(self, queue: QueueSpec, ids: Collection[str] | None = None) -> int:
        return await self._tools.purge(queue, ids)

    async def move(
        self,
        source: QueueSpec,
        target: QueueSpec,
        rewrite: Rewrite,
        *,
        ids: Collection[str] | None = None,
        limit: int,
    ) -> int:
        return await self._tools.move(source, target, rewrite, ids=ids, limit=limit)


def _reply_text(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    if exc.args and isinstance(exc.args[-1], str):
        return exc.args[-1]
    return str(exc)


_Message = tuple[bytes, spec.Basic.Properties, bool]  # body, properties, mandatory


def _outcome(one: Sent) -> BaseException | None:
    """Why ``one`` was not confirmed (None: confirmed, or no answer before we stopped waiting)."""
    fut = one.future
    if not fut.done() or fut.cancelled():
        return None
    return fut.exception()


def _cancel(sent: list[Sent]) -> None:
    # A confirm that arrives later finds its future cancelled and is dropped by aiormq.
    for one in sent:
        if not one.future.done():
            one.future.cancel()


def _with_details(exc: errors.Error, details: dict[str, Any]) -> errors.Error:
    if "stored" in exc.details:
        return exc
    return errors.Error(exc.kind, exc.message, retryable=exc.retryable, details={**exc.details, **details})
