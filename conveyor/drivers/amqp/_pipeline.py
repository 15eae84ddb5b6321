"""Confirmed publishing with one socket write per event-loop turn, not one per message.

aiormq's ``basic_publish`` writes every message separately (one ``send`` system
call each, the largest single cost of a publish here) and holds the channel lock
while doing so. Many publishers share the driver's confirm channel, so the
pipeline collects every publish made during one turn of the event loop and writes
their frames in one go; each caller still gets its own future that resolves only
on the broker's confirm for that message (``basic.ack``), or fails on a nack, a
return (``mandatory``) or the channel closing.

The bookkeeping is aiormq's own, so its frame reader settles our futures exactly
as it settles its own: a delivery tag per message in ``channel.confirmations``
(acks, multiple acks, nacks) and ``channel.message_id_delivery_tag`` (returns).
Publishes are numbered in the order they are written, which is the order the
broker numbers its confirms. The pipeline is the only publisher on its channel.

When the broker refuses one publish by closing the channel (a message over its
``max_message_size``, a ``user_id`` that is not the connection's user, access
refused), every unconfirmed publish of the channel fails with the same error. The
pipeline remembers its unconfirmed publishes (:class:`Sent`) so that
:meth:`Pipeline.culprit` can tell which one the broker refused: the broker handles a
channel's frames in order and drops everything after the refused publish, so a
publish before it may or may not be stored, and one after it is not stored.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiormq
import aiormq.exceptions as amqp_exc
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.header import ContentHeader

__all__ = ["Pipeline", "Sent", "supported"]

_NEEDED = ("confirmations", "message_id_delivery_tag", "delivery_tag", "write_queue", "_split_body")


def supported(channel: object) -> bool:
    """Whether this aiormq version keeps the bookkeeping the pipeline relies on."""
    return all(hasattr(channel, name) for name in _NEEDED)


@dataclass(slots=True, eq=False)
class Sent:
    """One publish written (or about to be) on the pipeline's channel."""

    tag: int  # the channel's delivery tag: the order the broker handles publishes in
    size: int  # body bytes, as the broker's max_message_size counts them
    user_id: str | None
    future: asyncio.Future[Any]  # the broker's confirm frame, or why there is none

    @property
    def confirmed(self) -> bool:
        fut = self.future
        return fut.done() and not fut.cancelled() and fut.exception() is None


class Pipeline:
    """Batched confirmed publishing on one confirm-mode channel."""

    def __init__(self, channel: aiormq.Channel) -> None:
        self.channel = channel
        self._frames: list[Any] = []
        self._futures: list[asyncio.Future[Any]] = []
        self._writer: asyncio.Task[None] | None = None
        # Unconfirmed publishes by tag. A publish failed by the channel closing stays
        # (the channel is dead, and so is this pipeline, soon replaced).
        self._unconfirmed: dict[int, Sent] = {}

    def publish(
        self, routing_key: str, body: bytes, properties: spec.Basic.Properties, mandatory: bool
    ) -> Sent:
        """Queue one publish; its future resolves with the broker's confirm frame."""
        channel = self.channel
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        message_id = properties.message_id
        assert message_id, "returns are matched by message_id"
        channel.delivery_tag += 1
        tag = channel.delivery_tag
        confirmation = channel.create_future()
        channel.confirmations[tag] = confirmation
        channel.message_id_delivery_tag[message_id] = tag
        sent = Sent(tag, len(body), properties.user_id, confirmation)
        self._unconfirmed[tag] = sent
        confirmation.add_done_callback(lambda fut: self._done(fut, message_id, tag))
        self._frames.append(spec.Basic.Publish(routing_key=routing_key, mandatory=mandatory))
        self._frames.append(ContentHeader(properties=properties, body_size=len(body)))
        self._frames.extend(channel._split_body(body))
        self._futures.append(confirmation)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())
        return sent

    def _done(self, fut: asyncio.Future[Any], message_id: str, tag: int) -> None:
        _forget(self.channel, message_id, tag)
        if fut.cancelled() or not isinstance(fut.exception(), amqp_exc.ChannelClosed):
            self._unconfirmed.pop(tag, None)

    def culprit(self, refused: Callable[[Sent], bool]) -> int | None:
        """The tag of the first unconfirmed publish ``refused`` picks out, if any.

        Called after the broker closed the channel: the first publish the refusal
        applies to is the one the broker refused (it handles a channel's publishes in
        order and drops everything after that one).
        """
        found = [tag for tag, sent in self._unconfirmed.items() if not sent.confirmed and refused(sent)]
        return min(found, default=None)

    async def _write(self) -> None:
        """Write what accumulated (a task, so it runs after this turn's publishes)."""
        try:
            while self._frames:
                frames, self._frames = self._frames, []
                futures, self._futures = self._futures, []
                payload = ChannelFrame.marshall(channel_number=self.channel.number, frames=frames)
                try:
                    await self.channel.write_queue.put(payload)
                except BaseException as exc:
                    _fail(futures, exc)
                    raise
        finally:
            self._writer = None

    async def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(BaseException):
                await self._writer


def _forget(channel: aiormq.Channel, message_id: str, tag: int) -> None:
    if channel.message_id_delivery_tag.get(message_id) == tag:
        channel.message_id_delivery_tag.pop(message_id, None)


def _fail(futures: list[asyncio.Future[Any]], exc: BaseException) -> None:
    error = (
        exc if isinstance(exc, Exception) else aiormq.exceptions.ChannelInvalidStateError("publish cancelled")
    )
    for fut in futures:
        if not fut.done():
            fut.set_exception(error)
