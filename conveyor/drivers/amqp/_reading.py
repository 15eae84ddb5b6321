"""Reading a RabbitMQ queue for the tools: ``basic.get`` and giving back (see _tooling.py).

A :class:`Reader` takes messages from the front of broker queues with ``basic.get``
(manual acknowledgement), one channel per broker queue, holds them and gives back
whatever the tool did not remove: a classic queue's with ``basic.recover(requeue=True)``,
which puts each in its old place before the broker answers (so the next operation
sees them), then closes the channel; a quorum queue's by closing the channel only
(RabbitMQ 3.10 appends messages returned by ``basic.recover`` or ``basic.nack`` to
the back of a quorum queue, while those of a closed channel go back to the front,
in order). One reader takes at most :data:`SCAN_LIMIT` messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp import commands as spec

from conveyor import errors
from conveyor.drivers.amqp._headers import attempts_of, decode_headers, has_delivery_count
from conveyor.drivers.base import Stored
from conveyor.registry.model import QueueSpec

if TYPE_CHECKING:
    from conveyor.drivers.amqp.driver import AmqpDriver

__all__ = ["SCAN_LIMIT", "Held", "Reader", "closing", "message_id_of"]

T = TypeVar("T")

SCAN_LIMIT = 10_000  # messages one browse, purge or move may take from the front of a queue


def message_id_of(props: spec.Basic.Properties, body: bytes) -> str:
    """The message's ``message_id``; for a foreign message without one, a stable digest.

    Tools need an ID that is the same on every read (``after``, ``ids``): a digest of
    the body and the neutral headers (identical messages share it).
    """
    if props.message_id:
        return str(props.message_id)
    digest = hashlib.sha256(body)
    digest.update(repr(sorted(decode_headers(props).items())).encode())
    return f"amqp-{digest.hexdigest()[:32]}"


@dataclass(slots=True)
class Held:
    """A message taken with ``basic.get`` and not settled: given back unless removed."""

    queue_name: str
    channel: AbstractChannel
    tag: int
    body: bytes
    props: spec.Basic.Properties
    stored: Stored


class Reader:
    """The channels one tool call reads with (one per broker queue), and giving back."""

    def __init__(self, driver: AmqpDriver, queue: QueueSpec, action: str, *, tx: bool = False) -> None:
        self.driver = driver
        self.queue = queue
        self.action = action
        self.tx = tx
        self.channels: dict[str, AbstractChannel] = {}
        self.quorum: set[str] = set()  # broker queues whose messages carry x-delivery-count
        self.taken = 0

    async def call(self, step: Awaitable[T]) -> T:
        """One broker call, bounded by the link timeout; client errors become ``errors.Error``."""
        try:
            async with asyncio.timeout(self.driver.link.timeout):
                return await step
        except errors.Error:
            raise
        except Exception as exc:
            raise self.driver.declare_error(self.queue, exc, self.action) from None

    async def channel(self, name: str) -> AbstractChannel:
        channel = self.channels.get(name)
        if channel is None:
            channel = await self.driver.link.channel(confirms=False)
            self.channels[name] = channel
            if self.tx:
                await self.call(channel.tx_select())
        return channel

    async def take(self, name: str, state: str) -> Held | None:
        """The next message of broker queue ``name`` (None: no more ready ones)."""
        if self.taken >= SCAN_LIMIT:
            raise errors.invalid(
                f"cannot {self.action} {self.queue.id} beyond its first {SCAN_LIMIT} messages: "
                "RabbitMQ can only be read from the front, by taking messages and giving them back. "
                "Purge or replay the front of the queue first",
                queue=self.queue.id,
                reason="scan_limit",
                limit=SCAN_LIMIT,
            )
        channel = await self.channel(name)
        message: DeliveredMessage = await self.call(channel.basic_get(name, no_ack=False))
        if not isinstance(message.delivery, spec.Basic.GetOk):
            return None
        self.taken += 1
        props = message.header.properties
        if has_delivery_count(props):
            self.quorum.add(name)
        body = bytes(message.body)
        stored = Stored(
            id=message_id_of(props, body),
            body=body,
            headers=decode_headers(props),
            # What the next consumer would be told, minus that delivery itself.
            attempts=attempts_of(props, bool(message.delivery.redelivered)) - 1,
            state=state,
            seq=self.taken,
        )
        return Held(name, channel, int(message.delivery.delivery_tag or 0), body, props, stored)

    async def give_back(self) -> None:
        """Return every message still held to its place and close the channels. Never raises."""
        channels, self.channels = self.channels, {}
        for name, channel in channels.items():
            if channel.is_closed:
                continue  # the broker returns what a closed channel held
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.driver.link.timeout):
                    if name not in self.quorum:
                        await channel.basic_recover(requeue=True)
                    await channel.close()


async def closing(sources: AsyncIterator[tuple[str, str]]) -> AsyncIterator[tuple[str, str]]:
    """``sources``, closed as soon as the caller stops iterating (no generator left pending)."""
    async with contextlib.aclosing(sources) as opened:  # type: ignore[type-var]
        async for item in opened:
            yield item
