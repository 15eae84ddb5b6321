"""``queue.driver.memory``: an in-process driver with real queue semantics.

Nothing survives the process, but within it nothing is lost either: a leased message
stays counted (``in_flight``) until it is settled, nacks never need room in a full
queue (the message never left it), and closing a subscription returns whatever it
still holds. Everything runs on the app's event loop thread.

Browsing lists a queue's ready messages (FIFO), then its delayed ones (by due time),
then the ones its subscriptions hold (``in_flight``); purge and move take waiting
messages only, and a move is one step on the loop (atomic by construction).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from conveyor import errors
from conveyor.drivers.base import (
    Capabilities,
    Delivery,
    Driver,
    Headers,
    Outgoing,
    Rewrite,
    Stored,
    Subscription,
    browse_gone,
    check_limit,
    queue_full,
    same_queue,
)
from conveyor.drivers.options.memory import SCHEMA
from conveyor.drivers.waiters import Waiters
from conveyor.registry.model import DriverSpec, QueueSpec
from conveyor.registry.options import NoOptions, Options

__all__ = ["MemoryDriver"]


class _Stored:
    __slots__ = ("attempts", "body", "headers", "id")

    def __init__(self, id: str, body: bytes, headers: Headers) -> None:
        self.id = id
        self.body = body
        self.headers = headers
        self.attempts = 0


class _Queue:
    """One named queue: ready FIFO, delayed heap, leased set."""

    def __init__(self, name: str, max_length: int | None) -> None:
        self.name = name
        self.max_length = max_length
        self.ready: deque[_Stored] = deque()
        self.delayed: list[tuple[float, int, _Stored]] = []
        self.leased = 0
        self.waiters = Waiters()  # consumers waiting for a ready message
        self.subscriptions: set[_MemorySubscription] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._seq = itertools.count()

    @property
    def size(self) -> int:
        return len(self.ready) + len(self.delayed) + self.leased

    def put(self, stored: _Stored) -> None:
        self.ready.append(stored)
        self.waiters.wake()

    def put_front(self, stored: _Stored) -> None:
        self.ready.appendleft(stored)
        self.waiters.wake()

    def put_later(self, stored: _Stored, delay: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        heapq.heappush(self.delayed, (due, next(self._seq), stored))
        if self.delayed[0][2] is stored:
            self._arm(loop, due)

    def _arm(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(due, self._promote)

    def _promote(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self.delayed and self.delayed[0][0] <= now:
            self.put(heapq.heappop(self.delayed)[2])
        if self.delayed:
            self._arm(loop, self.delayed[0][0])

    def wake_all(self) -> None:
        self.waiters.wake_all()

    # -- tooling: what browse lists, what purge and move take ------------------------------

    def listing(self) -> Iterator[tuple[_Stored, str]]:
        """Every message with its state, in hand-out order: ready, delayed, held."""
        for stored in self.ready:
            yield stored, "ready"
        for _due, _seq, stored in sorted(self.delayed, key=lambda item: item[:2]):
            yield stored, "delayed"
        for sub in self.subscriptions:
            for stored in sub.held():
                yield stored, "in_flight"

    def remove_waiting(self, chosen: Collection[_Stored]) -> None:
        """Take ``chosen`` (ready or delayed messages) off the queue."""
        if not chosen:
            return
        gone = {id(stored) for stored in chosen}
        self.ready = deque(s for s in self.ready if id(s) not in gone)
        kept = [item for item in self.delayed if id(item[2]) not in gone]
        if len(kept) != len(self.delayed):
            heapq.heapify(kept)
            self.delayed = kept
            self.clear_timer()
            if kept:
                self._arm(asyncio.get_running_loop(), kept[0][0])

    def clear_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _MemorySubscription(Subscription):
    def __init__(self, queues: dict[str, _Queue], queue: _Queue, prefetch: int, auto_ack: bool) -> None:
        self._queues = queues
        self._q = queue
        self._prefetch = prefetch
        self._auto_ack = auto_ack
        self._unsettled: dict[_Stored, Delivery] = {}  # stored -> its current delivery, in lease order
        self._capacity_waiters = Waiters()  # workers waiting for a settlement to free room
        self._closed = False

    def get_nowait(self) -> Delivery | None:
        q = self._q
        if self._closed or not q.ready or len(self._unsettled) >= self._prefetch:
            return None
        stored = q.ready.popleft()
        stored.attempts += 1
        if self._auto_ack:
            return Delivery(stored.id, stored.body, stored.headers, stored.attempts, None)
        q.leased += 1
        delivery = Delivery(stored.id, stored.body, stored.headers, stored.attempts, stored)
        self._unsettled[stored] = delivery
        return delivery

    async def get(self) -> Delivery | None:
        # Cancellation-safe: a cancelled wait has leased nothing.
        while not self._closed:
            delivery = self.get_nowait()
            if delivery is not None:
                return delivery
            if len(self._unsettled) >= self._prefetch:
                if self._q.ready:
                    self._q.waiters.wake()  # ready work this subscription cannot take now
                await self._capacity_waiters.wait()
            else:
                await self._q.waiters.wait()
        return None

    def held(self) -> list[_Stored]:
        """The messages this subscription holds, in the order it leased them."""
        return list(self._unsettled)

    def _held(self, delivery: Delivery) -> _Stored:
        """The stored message of ``delivery``, if this subscription holds that very delivery.

        Identity, not the stored message alone: after a nack and a redelivery the old
        delivery must not settle the new one.
        """
        stored = delivery.token
        if stored is None or self._unsettled.get(stored) is not delivery:
            raise errors.invalid(f"delivery {delivery.id} is not held by this subscription")
        return stored  # type: ignore[no-any-return]

    def _settle(self, delivery: Delivery) -> _Stored:
        stored = self._held(delivery)
        del self._unsettled[stored]
        self._q.leased -= 1
        self._capacity_waiters.wake()
        return stored

    async def ack(self, delivery: Delivery) -> None:
        self._settle(delivery)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        stored = self._settle(delivery)
        if delay > 0:
            self._q.put_later(stored, delay)
        else:
            self._q.put(stored)

    async def release(self, delivery: Delivery) -> None:
        stored = self._settle(delivery)
        stored.attempts -= 1
        self._q.put_front(stored)

    async def dead_letter(self, delivery: Delivery, target: QueueSpec, copy: Outgoing) -> None:
        self._held(delivery)  # before anything is stored: a refused move stores nothing
        driver_queue = self._queues[target.queue_name]
        if driver_queue.max_length is not None and driver_queue.size >= driver_queue.max_length:
            raise queue_full(target, driver_queue.max_length)
        driver_queue.put(_Stored(copy.id, copy.body, copy.headers))
        self._settle(delivery)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._q.subscriptions.discard(self)
        # Hand back what is still held, oldest first, ahead of newer messages.
        for stored in reversed(list(self._unsettled)):
            self._q.leased -= 1
            self._q.put_front(stored)
        self._unsettled.clear()
        self._capacity_waiters.wake_all()
        self._q.wake_all()


class MemoryDriver(Driver):
    kind = "queue.driver.memory"
    capabilities = Capabilities(
        atomic_batches=True, atomic_dead_letter=True, max_length=True, browse_in_flight=True
    )

    def __init__(self, spec: DriverSpec) -> None:
        super().__init__(spec)
        if not isinstance(spec.options, NoOptions):  # a spec built in Python: the defaults
            SCHEMA.driver_options(spec.options)  # its own record, not someone else's
        self._queues: dict[str, _Queue] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        for q in self._queues.values():
            q.clear_timer()
            for sub in list(q.subscriptions):
                await sub.close()  # waiting getters return None; held messages go back
            q.wake_all()

    async def declare(self, queue: QueueSpec) -> None:
        max_length = SCHEMA.queue_options(queue.driver_options).max_length
        existing = self._queues.get(queue.queue_name)
        if existing is None:
            self._queues[queue.queue_name] = _Queue(queue.queue_name, max_length)
        elif max_length is not None:
            existing.max_length = max_length

    def _queue(self, queue: QueueSpec) -> _Queue:
        try:
            return self._queues[queue.queue_name]
        except KeyError:
            raise errors.not_found(f"queue {queue.id} is not declared on this driver") from None

    async def publish(self, queue: QueueSpec, batch: list[Outgoing]) -> None:
        q = self._queue(queue)
        limit = q.max_length
        if limit is not None and q.size + len(batch) > limit:
            raise queue_full(queue, limit)
        for out in batch:
            q.put(_Stored(out.id, out.body, out.headers))

    async def subscribe(
        self, queue: QueueSpec, *, prefetch: int, auto_ack: bool, options: Mapping[str, Options]
    ) -> Subscription:
        q = self._queue(queue)
        sub = _MemorySubscription(self._queues, q, prefetch, auto_ack)
        q.subscriptions.add(sub)
        return sub

    async def info(self, queue: QueueSpec) -> dict[str, Any]:
        q = self._queue(queue)
        return {
            "message_count": q.size,
            "ready": len(q.ready),
            "in_flight": q.leased,
            "delayed": len(q.delayed),
            "consumer_count": len(q.subscriptions),
        }

    # -- queue tooling ---------------------------------------------------------------------

    async def browse(self, queue: QueueSpec, *, limit: int, after: str | None = None) -> list[Stored]:
        check_limit(limit)
        listing = list(self._queue(queue).listing())
        start = 0
        if after is not None:
            start = next((n + 1 for n, (s, _) in enumerate(listing) if s.id == after), -1)
            if start < 0:
                raise browse_gone(queue, after)
        page = listing[start : start + limit]
        return [_stored(s, state, start + n + 1) for n, (s, state) in enumerate(page)]

    async def purge(self, queue: QueueSpec, ids: Collection[str] | None = None) -> int:
        q = self._queue(queue)
        chosen = _waiting(q, ids, None)
        q.remove_waiting([stored for stored, _ in chosen])
        return len(chosen)

    async def move(
        self,
        source: QueueSpec,
        target: QueueSpec,
        rewrite: Rewrite,
        *,
        ids: Collection[str] | None = None,
        limit: int,
    ) -> int:
        check_limit(limit)
        src, dst = self._queue(source), self._queue(target)
        if src is dst:
            raise same_queue(source)
        chosen = _waiting(src, ids, limit)
        # Every copy is built before anything changes: a rewrite that fails moves nothing.
        copies = [rewrite(listed) for _, listed in chosen]
        src.remove_waiting([stored for stored, _ in chosen])
        for out in copies:
            dst.put(_Stored(out.id, out.body, dict(out.headers)))
        return len(copies)


def _stored(stored: _Stored, state: str, seq: int) -> Stored:
    return Stored(stored.id, stored.body, dict(stored.headers), stored.attempts, state, seq)


def _waiting(q: _Queue, ids: Collection[str] | None, limit: int | None) -> list[tuple[_Stored, Stored]]:
    """The waiting (ready, then delayed) messages of ``q`` whose ID is in ``ids`` (all
    with None), in queue order, at most ``limit``: each as kept and as listed."""
    wanted = None if ids is None else set(ids)
    chosen: list[tuple[_Stored, Stored]] = []
    for n, (stored, state) in enumerate(q.listing()):
        if limit is not None and len(chosen) >= limit:
            break
        if state != "in_flight" and (wanted is None or stored.id in wanted):
            chosen.append((stored, _stored(stored, state, n + 1)))
    return chosen
