"""``queue.driver.sqlite``: a durable queue in one SQLite file, shared by processes.

Model (see docs/sqlite.md): each message is a row. Handing a message out *leases* it
(``lease_owner``, ``lease_until``) and counts the attempt in the same transaction, so
a process that dies mid-handler has used an attempt. The holder extends its leases
while handlers run; an expired lease, or one held by a process that is provably dead
(same host, PID gone), makes the message available again. ``ack`` deletes the row,
``nack`` clears the lease and moves ``available_at`` by the retry delay, and a
dead-letter move (insert the copy, delete the original) is one transaction.

Idle consumers do not poll the table: they sleep until a publish in this process
wakes them, until the next known ``available_at``, or for ``poll_interval``, after
which one cheap read (``PRAGMA data_version``) tells whether another process wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import Mapping
from typing import Any

import msgpack

from conveyor import errors
from conveyor.drivers.base import (
    Capabilities,
    Delivery,
    Driver,
    Headers,
    Outgoing,
    Subscription,
    queue_full,
)
from conveyor.drivers.options.sqlite import SCHEMA
from conveyor.drivers.sqlite_store import Database, owner_alive, owner_id
from conveyor.drivers.waiters import Waiters
from conveyor.registry.model import DriverSpec, QueueSpec
from conveyor.registry.options import Options

__all__ = ["SqliteDriver"]

log = logging.getLogger("conveyor.sqlite")

_INSERT = (
    "INSERT INTO messages (queue, id, body, headers, attempts, available_at, created_at) "
    "VALUES (?, ?, ?, ?, 0, ?, ?)"
)
_LEASE = (
    "UPDATE messages SET lease_owner = ?, lease_until = ?, attempts = attempts + 1 "
    "WHERE seq IN (SELECT seq FROM messages WHERE queue = ? AND lease_owner IS NULL "
    "AND available_at <= ? ORDER BY available_at, seq LIMIT ?) "
    "RETURNING seq, id, body, headers, attempts"
)
_TAKE = (  # auto_ack: hand out and delete in one step (at most once)
    "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages WHERE queue = ? "
    "AND lease_owner IS NULL AND available_at <= ? ORDER BY available_at, seq LIMIT ?) "
    "RETURNING seq, id, body, headers, attempts + 1, available_at, created_at"
)
_PUT_BACK = (  # auto_ack: a taken row that was never handed out, as it was
    "INSERT INTO messages (seq, queue, id, body, headers, attempts, available_at, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def _pack(headers: Headers) -> bytes:
    packed: bytes = msgpack.packb(headers, use_bin_type=True)
    return packed


def _unpack(blob: bytes) -> Headers:
    headers: Headers = msgpack.unpackb(blob, raw=False)
    return headers


def _check_room(conn: sqlite3.Connection, queue: QueueSpec, adding: int) -> None:
    limit = SCHEMA.queue_options(queue.driver_options).max_length
    if limit is None:
        return
    (count,) = conn.execute("SELECT COUNT(*) FROM messages WHERE queue = ?", (queue.queue_name,)).fetchone()
    if count + adding > limit:
        raise queue_full(queue, limit)


class SqliteDriver(Driver):
    kind = "queue.driver.sqlite"
    capabilities = Capabilities(
        durable=True,
        atomic_batches=True,
        atomic_dead_letter=True,
        max_length=True,
        cross_process=True,
        native_delay=True,
    )

    def __init__(self, spec: DriverSpec) -> None:
        super().__init__(spec)
        options = SCHEMA.driver_options(spec.options)
        self.path = options.path
        self.poll_interval = options.poll_interval
        self.lease_duration = options.lease_duration
        self.owner = owner_id()
        self.db = Database(self.path, synchronous=options.synchronous, busy_timeout=options.busy_timeout)
        self._subscriptions: dict[str, set[_SqliteSubscription]] = {}
        self._maintenance: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self.db.open()
        await self.db.submit(self._reclaim)
        self._maintenance = asyncio.get_running_loop().create_task(
            self._maintain(), name=f"conveyor-sqlite-maintenance:{self.spec.id}"
        )

    async def close(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        for subs in list(self._subscriptions.values()):
            for sub in list(subs):
                await sub.close()
        await self.db.close()

    async def declare(self, queue: QueueSpec) -> None:
        return None  # queues are rows' `queue` column: nothing to create

    # -- publishing ------------------------------------------------------------------

    async def publish(self, queue: QueueSpec, batch: list[Outgoing]) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            _check_room(conn, queue, len(batch))
            now = time.time()
            rows = [(queue.queue_name, m.id, m.body, _pack(m.headers), now, now) for m in batch]
            conn.executemany(_INSERT, rows)

        await self.db.submit(insert)
        self._notify(queue.queue_name)

    def _notify(self, queue_name: str) -> None:
        for sub in self._subscriptions.get(queue_name, ()):
            sub.poke()

    # -- consuming -------------------------------------------------------------------

    async def subscribe(
        self, queue: QueueSpec, *, prefetch: int, auto_ack: bool, options: Mapping[str, Options]
    ) -> Subscription:
        sub = _SqliteSubscription(self, queue, prefetch, auto_ack)
        await self.db.submit(sub.register)
        self._subscriptions.setdefault(queue.queue_name, set()).add(sub)
        sub.start()
        return sub

    def _forget(self, sub: _SqliteSubscription) -> None:
        self._subscriptions.get(sub.queue.queue_name, set()).discard(sub)

    async def info(self, queue: QueueSpec) -> dict[str, Any]:
        name = queue.queue_name
        heartbeat_window = self.lease_duration

        def counts(conn: sqlite3.Connection) -> dict[str, Any]:
            now = time.time()
            row = conn.execute(
                "SELECT COUNT(*), "
                "COALESCE(SUM(lease_owner IS NULL AND available_at <= ?), 0), "
                "COALESCE(SUM(lease_owner IS NULL AND available_at > ?), 0), "
                "COALESCE(SUM(lease_owner IS NOT NULL AND lease_until >= ?), 0), "
                "COALESCE(SUM(lease_owner IS NOT NULL AND lease_until < ?), 0) "
                "FROM messages WHERE queue = ?",
                (now, now, now, now, name),
            ).fetchone()
            (consumers,) = conn.execute(
                "SELECT COUNT(*) FROM consumers WHERE queue = ? AND heartbeat >= ?",
                (name, now - heartbeat_window),
            ).fetchone()
            total, ready, delayed, leased, expired = row
            return {
                "message_count": total,
                "ready": ready + expired,  # an expired lease is available again
                "in_flight": leased,
                "delayed": delayed,
                "consumer_count": consumers,
            }

        result: dict[str, Any] = await self.db.submit(counts, write=False)
        return result

    # -- leases: extension, expiry, dead holders ---------------------------------------

    async def _maintain(self) -> None:
        """Extend this process's leases and heartbeats; reclaim what dead holders left."""
        interval = max(min(self.lease_duration / 3, 5.0), 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                if any(self._subscriptions.values()):
                    await self.db.submit(self._extend)
                await self.db.submit(self._reclaim)
            except errors.Error as exc:
                log.error("SQLite lease maintenance on %s failed: %s", self.path, exc)

    def _extend(self, conn: sqlite3.Connection) -> None:
        now = time.time()
        conn.execute(
            "UPDATE messages SET lease_until = ? WHERE lease_owner = ?",
            (now + self.lease_duration, self.owner),
        )
        conn.execute("UPDATE consumers SET heartbeat = ? WHERE owner = ?", (now, self.owner))

    def _reclaim(self, conn: sqlite3.Connection) -> int:
        """Free leases of dead processes and expired leases; drop dead consumers' rows."""
        now = time.time()
        owners = [
            row[0]
            for row in conn.execute(
                "SELECT DISTINCT lease_owner FROM messages WHERE lease_owner IS NOT NULL "
                "UNION SELECT DISTINCT owner FROM consumers"
            )
        ]
        dead = [o for o in owners if o != self.owner and not owner_alive(o)]
        freed = 0
        for owner in dead:
            cursor = conn.execute(
                "UPDATE messages SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?", (owner,)
            )
            freed += cursor.rowcount
            conn.execute("DELETE FROM consumers WHERE owner = ?", (owner,))
        cursor = conn.execute(
            "UPDATE messages SET lease_owner = NULL, lease_until = NULL "
            "WHERE lease_owner IS NOT NULL AND lease_until < ?",
            (now,),
        )
        freed += cursor.rowcount
        conn.execute("DELETE FROM consumers WHERE heartbeat < ?", (now - 10 * self.lease_duration,))
        if freed:
            log.warning("reclaimed %d message lease(s) of dead or stalled consumers in %s", freed, self.path)
            for subs in self._subscriptions.values():
                for sub in subs:
                    sub.poke()
        return freed


class _SqliteSubscription(Subscription):
    """One consumer's window on a queue: a leasing task fills a buffer of deliveries."""

    def __init__(self, driver: SqliteDriver, queue: QueueSpec, prefetch: int, auto_ack: bool) -> None:
        self.driver = driver
        self.queue = queue
        self.id = uuid.uuid4().hex
        self._prefetch = prefetch
        self._auto_ack = auto_ack
        self._buffer: deque[Delivery] = deque()  # leased, not handed out yet
        self._handed: dict[int, Delivery] = {}  # handed out, not settled
        # auto_ack: rows taken (deleted) into the buffer, to put back if never handed out
        self._taken: dict[Delivery, tuple[Any, ...]] = {}
        self._getters = Waiters()
        self._wake = asyncio.Event()
        self._dirty = True  # a lease attempt may find something
        self._next_due: float | None = None
        self._version: int | None = None
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    # -- registration and the leasing task ---------------------------------------------

    def register(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO consumers (id, queue, owner, heartbeat) VALUES (?, ?, ?, ?)",
            (self.id, self.queue.queue_name, self.driver.owner, time.time()),
        )

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"conveyor-sqlite-lease:{self.queue.id}"
        )

    def poke(self) -> None:
        """Something may have become available (a publish, a nack, a reclaimed lease)."""
        self._dirty = True
        self._wake.set()

    def _room(self) -> int:
        return self._prefetch - len(self._buffer) - len(self._handed)

    async def _run(self) -> None:
        while not self._closing:
            room = self._room()
            if room > 0 and self._dirty:
                self._dirty = False
                try:
                    leased = await self._lease(room)
                except errors.Error as exc:
                    log.error("leasing from %s failed: %s", self.queue.id, exc)
                    leased = 0
                    await asyncio.sleep(self.driver.poll_interval)
                    self._dirty = True
                if leased:
                    self._dirty = leased == room  # a full batch: there may be more
                    continue
            if not await self._sleep() and self._room() > 0:
                await self._probe()

    async def _sleep(self) -> bool:
        """Wait for a poke or the next deadline; True when poked."""
        timeout = self.driver.poll_interval
        if self._next_due is not None:
            timeout = max(0.0, min(timeout, self._next_due - time.time()))
        self._wake.clear()
        if self._dirty and self._room() > 0:
            return True
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _probe(self) -> None:
        """Cheap read: did another process write, or is a delayed message due?"""
        name = self.queue.queue_name

        def probe(conn: sqlite3.Connection) -> tuple[int, float | None]:
            (version,) = conn.execute("PRAGMA data_version").fetchone()
            (due,) = conn.execute(
                "SELECT MIN(available_at) FROM messages WHERE queue = ? AND lease_owner IS NULL", (name,)
            ).fetchone()
            return int(version), due

        try:
            version, due = await self.driver.db.submit(probe, write=False)
        except errors.Error as exc:
            log.error("polling %s failed: %s", self.queue.id, exc)
            return
        if version != self._version or (due is not None and due <= time.time()):
            self._dirty = True
        self._version = version
        self._next_due = due

    async def _lease(self, room: int) -> int:
        owner, lease = self.driver.owner, self.driver.lease_duration
        name, auto_ack = self.queue.queue_name, self._auto_ack

        def lease_rows(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            now = time.time()
            if auto_ack:
                return conn.execute(_TAKE, (name, now, room)).fetchall()
            return conn.execute(_LEASE, (owner, now + lease, name, now, room)).fetchall()

        rows = await self.driver.db.submit(lease_rows)
        rows.sort(key=lambda r: r[0])
        if self._closing and not auto_ack:
            # Leased while closing: hand straight back without counting the attempt.
            await self.driver.db.submit(self._release_rows([r[0] for r in rows]))
            return 0
        for seq, msg_id, body, headers, attempts, *taken in rows:
            delivery = Delivery(msg_id, body, _unpack(headers), attempts, None if auto_ack else seq)
            if auto_ack:
                self._taken[delivery] = (
                    seq,
                    self.queue.queue_name,
                    msg_id,
                    body,
                    headers,
                    attempts - 1,
                    *taken,
                )
            self._buffer.append(delivery)
        self._getters.wake(len(rows))
        return len(rows)

    # -- handing out -----------------------------------------------------------------

    def get_nowait(self) -> Delivery | None:
        if self._closing or not self._buffer:
            return None
        delivery = self._buffer.popleft()
        if delivery.token is not None:
            self._handed[delivery.token] = delivery
        else:
            del self._taken[delivery]  # auto_ack: settled now, by being handed out
            if not self._buffer:
                self.poke()  # nothing is held, so room is back at once
        return delivery

    async def get(self) -> Delivery | None:
        # Cancellation-safe: a cancelled wait has taken nothing out of the buffer.
        while not self._closing:
            delivery = self.get_nowait()
            if delivery is not None:
                return delivery
            await self._getters.wait()
        return None

    # -- settlement ------------------------------------------------------------------

    def _held(self, delivery: Delivery) -> int:
        """The row of ``delivery``, if this subscription holds that very delivery.

        Identity, not the row alone: after a nack and a redelivery the old delivery
        must not settle the new one.
        """
        seq = delivery.token
        if seq is None or self._handed.get(seq) is not delivery:
            raise errors.invalid(f"delivery {delivery.id} is not held by this subscription")
        return int(seq)

    def _done(self, seq: int) -> None:
        self._handed.pop(seq, None)
        self._wake.set()  # room for the leasing task

    async def _settle(self, delivery: Delivery, sql: str, params: tuple[Any, ...]) -> None:
        seq = self._held(delivery)
        owner = self.driver.owner

        def run(conn: sqlite3.Connection) -> None:
            cursor = conn.execute(sql, (*params, seq, owner))
            if cursor.rowcount != 1:
                raise _lease_lost(delivery, self.queue)

        await self._settling(seq, run)

    async def ack(self, delivery: Delivery) -> None:
        await self._settle(delivery, "DELETE FROM messages WHERE seq = ? AND lease_owner = ?", ())

    async def nack(self, delivery: Delivery, delay: float) -> None:
        await self._settle(
            delivery,
            "UPDATE messages SET lease_owner = NULL, lease_until = NULL, available_at = ? "
            "WHERE seq = ? AND lease_owner = ?",
            (time.time() + delay,),
        )
        self._note_due(time.time() + delay)

    async def release(self, delivery: Delivery) -> None:
        await self._settle(
            delivery,
            "UPDATE messages SET lease_owner = NULL, lease_until = NULL, attempts = attempts - 1 "
            "WHERE seq = ? AND lease_owner = ?",
            (),
        )
        self.poke()

    async def dead_letter(self, delivery: Delivery, target: QueueSpec, copy: Outgoing) -> None:
        seq = self._held(delivery)
        owner = self.driver.owner

        def move(conn: sqlite3.Connection) -> None:
            _check_room(conn, target, 1)
            cursor = conn.execute("DELETE FROM messages WHERE seq = ? AND lease_owner = ?", (seq, owner))
            if cursor.rowcount != 1:
                raise _lease_lost(delivery, self.queue)
            now = time.time()
            conn.execute(_INSERT, (target.queue_name, copy.id, copy.body, _pack(copy.headers), now, now))

        await self._settling(seq, move)
        self.driver._notify(target.queue_name)

    async def _settling(self, seq: int, job: Any) -> None:
        """Run a settlement of row ``seq``; the delivery stays held if it was refused.

        A refused settlement (a full dead-letter queue, a busy or failing database)
        changed nothing: the holder may try again, and ``close`` returns the message.
        Only a lost lease means the row is no longer this subscription's.
        """
        try:
            await self.driver.db.submit(job)
        except errors.Error as exc:
            if exc.details.get("reason") == "lease_lost":
                self._done(seq)
            raise
        self._done(seq)

    def _note_due(self, due: float) -> None:
        if due <= time.time():
            self.poke()
            return
        if self._next_due is None or due < self._next_due:
            self._next_due = due
            self._wake.set()

    def _release_rows(self, seqs: list[int], *, count_attempt: bool = False) -> Any:
        owner = self.driver.owner
        attempts = "attempts" if count_attempt else "attempts - 1"

        def run(conn: sqlite3.Connection) -> None:
            conn.executemany(
                f"UPDATE messages SET lease_owner = NULL, lease_until = NULL, attempts = {attempts} "
                "WHERE seq = ? AND lease_owner = ?",
                [(seq, owner) for seq in seqs],
            )

        return run

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        self._getters.wake_all()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        unstarted = [d.token for d in self._buffer if d.token is not None]
        started = list(self._handed)
        taken = list(self._taken.values())
        self._buffer.clear()
        self._handed.clear()
        self._taken.clear()
        sub_id = self.id

        def give_back(conn: sqlite3.Connection) -> None:
            self._release_rows(unstarted)(conn)  # never handed to a handler: no attempt
            self._release_rows(started, count_attempt=True)(conn)
            conn.executemany(_PUT_BACK, taken)  # auto_ack rows taken but never handed out
            conn.execute("DELETE FROM consumers WHERE id = ?", (sub_id,))

        try:
            await self.driver.db.submit(give_back)
        except errors.Error as exc:
            log.error(
                "could not return leased messages of %s: %s (they come back when their lease expires)",
                self.queue.id,
                exc,
            )
        self.driver._forget(self)
        for sub in self.driver._subscriptions.get(self.queue.queue_name, ()):
            sub.poke()


def _lease_lost(delivery: Delivery, queue: QueueSpec) -> errors.Error:
    return errors.internal(
        f"message {delivery.id} on {queue.id}: its lease expired and it was handed out again; "
        "this settlement was ignored",
        retryable=False,
        queue=queue.id,
        message_id=delivery.id,
        reason="lease_lost",
    )
