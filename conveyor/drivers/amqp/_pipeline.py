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
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.header import ContentHeader

__all__ = ["Pipeline", "supported"]

_NEEDED = ("confirmations", "message_id_delivery_tag", "delivery_tag", "write_queue", "_split_body")


def supported(channel: object) -> bool:
    """Whether this aiormq version keeps the bookkeeping the pipeline relies on."""
    return all(hasattr(channel, name) for name in _NEEDED)


class Pipeline:
    """Batched confirmed publishing on one confirm-mode channel."""

    def __init__(self, channel: aiormq.Channel) -> None:
        self.channel = channel
        self._frames: list[Any] = []
        self._futures: list[asyncio.Future[Any]] = []
        self._writer: asyncio.Task[None] | None = None

    def publish(
        self, routing_key: str, body: bytes, properties: spec.Basic.Properties, mandatory: bool
    ) -> asyncio.Future[Any]:
        """Queue one publish; the future resolves with the broker's confirm frame."""
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
        confirmation.add_done_callback(lambda _f: _forget(channel, message_id, tag))
        self._frames.append(spec.Basic.Publish(routing_key=routing_key, mandatory=mandatory))
        self._frames.append(ContentHeader(properties=properties, body_size=len(body)))
        self._frames.extend(channel._split_body(body))
        self._futures.append(confirmation)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())
        return confirmation

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
