"""Browse, purge and move on RabbitMQ, where a queue cannot be read without taking from it.

AMQP 0-9-1 has no non-destructive read, so every tool reads with ``basic.get``
(manual acknowledgement) on channels of its own, one per broker queue it reads
(the queue, then the delay queues this process has used, shortest delay first),
holds what it read, removes what it was asked to remove and gives the rest back:

- **browse** takes messages from the front until the page is full (the ones
  before ``after`` included), converts each as the consumer side does (the same
  header decoding, the same attempt counting), and gives every one back.
- **purge** of everything is ``queue.purge`` on the queue and on each delay queue
  its retry policy (or this process) uses that exists. Purge by ID takes messages
  until every ID has been found, acks those and gives back the rest.
- **move** reads on channels in transaction mode (``tx.select``). For each message:
  ``basic.get`` from the source, ``basic.publish`` of ``rewrite(stored)`` to the
  target (persistent, mandatory, no ``x-conveyor-attempts``: its attempts start
  over), ``basic.ack`` of the get, ``tx.commit``. RabbitMQ handles a commit whole
  (the channel process finishes it before it handles the connection going away),
  so a connection lost at any point leaves the message on exactly one queue:
  before the commit the publish is discarded and the unacked get is requeued;
  after it both happened.

Giving back and the read limit: _reading.py. The transaction, and what RabbitMQ's
transactions do not guarantee: _moving.py.

What RabbitMQ does not give (docs/rabbitmq.md, "Browsing, purging, replaying"):

- Side effect of reading (``Capabilities.browse_counts_delivery``): every message a
  tool took and gave back is flagged ``redelivered`` (classic queue) or has its
  ``x-delivery-count`` raised (quorum queue), so its next delivery counts one more
  attempt (and on a classic queue is recorded by republishing it, which moves it to
  the back of the queue: see _subscription.py).
- Messages delivered to a consumer (prefetched or being handled, in any process)
  are invisible to ``basic.get``; browse does not list them (no ``in_flight``).
- Delayed messages are listed from the delay queues this process has used (the ones
  ``info()`` counts); a purge of everything also empties the delay queues the
  queue's retry policy names, wherever they were created.
- A target's ``max_length`` is the broker's: a move to a full target stops.
- One call may take at most ``_reading.SCAN_LIMIT`` messages; beyond that, INVALID.
- What one tool holds, nothing else sees: consumers skip it meanwhile, and tools of
  one driver reading the same queue take turns (a browse must not make a replay
  running alongside find the queue empty). By ID, a purge or move stops reading once
  it has found every ID: with two copies of one ID, the first is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Collection
from typing import TYPE_CHECKING

import aiormq.exceptions as amqp_exc
from aiormq.abc import AbstractChannel

from conveyor import errors
from conveyor.drivers.amqp._errors import describe
from conveyor.drivers.amqp._moving import Move, bound, with_moved
from conveyor.drivers.amqp._reading import Held, Reader, closing
from conveyor.drivers.amqp._topology import delay_name
from conveyor.drivers.base import Rewrite, Stored, browse_gone, check_limit, same_queue
from conveyor.registry.model import QueueSpec, RetrySpec

if TYPE_CHECKING:
    from conveyor.drivers.amqp.driver import AmqpDriver

__all__ = ["Tooling"]

_MAX_DELAY_QUEUES = 32  # delay queues of one retry policy a purge looks for


class Tooling:
    """The driver's ``browse``, ``purge`` and ``move`` (see the module docstring)."""

    def __init__(self, driver: AmqpDriver) -> None:
        self.driver = driver
        self._locks: dict[str, asyncio.Lock] = {}

    def _reading(self, queue: QueueSpec) -> asyncio.Lock:
        """One tool at a time reads a queue through this driver.

        What one read holds, no other read sees: without this, a browse running while
        a replay pages through the same queue would make the replay find it empty.
        """
        return self._locks.setdefault(queue.queue_name, asyncio.Lock())

    async def _sources(self, queue: QueueSpec) -> AsyncIterator[tuple[str, str]]:
        """The broker queues to read, in hand-out order: the queue, then its delay queues.

        The delay queues are only looked at (re-declared and counted) once the queue
        itself has been read to its end.
        """
        yield self.driver.declaration(queue).name, "ready"
        for name, count in (await self.driver.delay_counts(queue)).items():
            if count:
                yield name, "delayed"

    # -- browse ---------------------------------------------------------------------------

    async def browse(self, queue: QueueSpec, *, limit: int, after: str | None) -> list[Stored]:
        check_limit(limit)
        self.driver.declaration(queue)
        async with self._reading(queue):
            page, found = await self._browse(queue, limit, after)
        if not found:
            assert after is not None  # only an `after` can be missing
            raise browse_gone(queue, after)
        return page

    async def _browse(self, queue: QueueSpec, limit: int, after: str | None) -> tuple[list[Stored], bool]:
        reader = Reader(self.driver, queue, "browse")
        page: list[Stored] = []
        found = after is None
        try:
            async for name, state in closing(self._sources(queue)):
                while len(page) < limit:
                    held = await reader.take(name, state)
                    if held is None:
                        break
                    if found:
                        page.append(held.stored)
                    elif held.stored.id == after:
                        found = True
                if len(page) >= limit:
                    break
        finally:
            await reader.give_back()
        return page, found

    # -- purge ----------------------------------------------------------------------------

    async def purge(self, queue: QueueSpec, ids: Collection[str] | None) -> int:
        async with self._reading(queue):
            if ids is not None:
                return await self._purge_ids(queue, set(ids))
            return await self._purge_all(queue)

    async def _purge_all(self, queue: QueueSpec) -> int:
        decl = self.driver.declaration(queue)
        known = set((await self.driver.delay_counts(queue)).keys())
        candidates = sorted(known | {delay_name(decl.name, ms) for ms in _retry_delays(queue.retry)})
        removed = 0
        channel: AbstractChannel | None = None
        try:
            # The delay queues first: a message coming back from one meanwhile is still caught.
            for name in [*candidates, decl.name]:
                if channel is None or channel.is_closed:
                    channel = await self.driver.link.channel(confirms=False)
                try:
                    async with asyncio.timeout(self.driver.link.timeout):
                        ok = await channel.queue_purge(name)
                except amqp_exc.ChannelNotFoundEntity as exc:
                    if name == decl.name:
                        raise self.driver.declare_error(queue, exc, "purge") from None
                    continue  # that delay queue does not exist (the broker closed the channel)
                except Exception as exc:
                    raise _purge_error(queue, exc, removed) from None
                removed += int(ok.message_count or 0)
        finally:
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(channel.close(), self.driver.link.timeout)
        return removed

    async def _purge_ids(self, queue: QueueSpec, wanted: set[str]) -> int:
        """Find every ID first (nothing is removed if the search fails), then ack those."""
        self.driver.declaration(queue)
        if not wanted:
            return 0
        reader = Reader(self.driver, queue, "purge")
        chosen: list[Held] = []
        left = set(wanted)
        try:
            async for name, state in closing(self._sources(queue)):
                while left:
                    held = await reader.take(name, state)
                    if held is None:
                        break
                    if held.stored.id in left:
                        left.discard(held.stored.id)
                        chosen.append(held)
                if not left:
                    break
            for n, held in enumerate(chosen):
                try:
                    await reader.call(held.channel.basic_ack(held.tag))
                except errors.Error as exc:
                    raise _purge_error(queue, exc, n) from None
        finally:
            await reader.give_back()  # after the acks on the same channels: they are applied first
        return len(chosen)

    # -- move -----------------------------------------------------------------------------

    async def move(
        self,
        source: QueueSpec,
        target: QueueSpec,
        rewrite: Rewrite,
        *,
        ids: Collection[str] | None,
        limit: int,
    ) -> int:
        check_limit(limit)
        src, dst = self.driver.declaration(source), self.driver.declaration(target)
        if src.name == dst.name:
            raise same_queue(source)
        left = None if ids is None else set(ids)
        if left is not None and not left:
            return 0
        move = Move(self.driver, source, target, rewrite, bound(dst.arguments))
        try:
            await self.driver.queue_counts(target)  # the target exists (else a publish would be lost)
            async with self._reading(source):
                await self._move(move, left, limit)
        except errors.Error as exc:
            raise with_moved(exc, move.moved) from None
        return move.moved

    async def _move(self, move: Move, left: set[str] | None, limit: int) -> None:
        source = move.source
        reader = Reader(self.driver, source, f"move messages to {move.target.id} from", tx=True)
        try:
            async for name, state in closing(self._sources(source)):
                while move.moved < limit and (left is None or left):
                    held = await reader.take(name, state)
                    if held is None:
                        break
                    if left is not None:
                        if held.stored.id not in left:
                            continue  # not asked for: given back at the end
                        left.discard(held.stored.id)
                    await move.one(held)
                if move.moved >= limit or (left is not None and not left):
                    break
        finally:
            await reader.give_back()


def _retry_delays(retry: RetrySpec) -> list[int]:
    """The delays (ms) a retry policy uses, as its delay queues are named."""
    found: list[int] = []
    for attempt in range(1, 65):
        delay = retry.delay_for(attempt)
        if delay <= 0:
            break
        ms = max(round(delay * 1000), 1)
        if ms not in found:
            found.append(ms)
        if delay >= retry.max_delay or len(found) >= _MAX_DELAY_QUEUES:
            break
    return found


def _purge_error(queue: QueueSpec, exc: BaseException, removed: int) -> errors.Error:
    why = exc.message if isinstance(exc, errors.Error) else describe(exc)
    return errors.internal(
        f"purge of {queue.id} was interrupted ({why}) after removing {removed} message(s); "
        "some of the others may have been removed too",
        queue=queue.id,
        reason="interrupted",
        removed=removed,
        retryable=True,
    )
