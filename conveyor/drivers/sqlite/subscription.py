"""``SqliteSubscription``: one consumer's window on a queue.

A leasing task fills a buffer of deliveries (leased rows) up to ``prefetch``; the
core's workers take them with ``get_nowait``/``get`` and settle them here, each
settlement one statement on the database thread, matched on the row, the holder and
the lease token (so a settlement from a lost lease matches nothing).

A buffered delivery is handed out only while its lease has a good while left (a
third of ``lease_duration``). One whose lease ran low (the process was stalled: a
SIGSTOP, a long pause) is first renewed in the database, which succeeds only if the
lease is still this one; if another consumer has taken the message meanwhile, the
delivery is dropped instead of run a second time.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any

from conveyor import errors
from conveyor.drivers.base import Delivery, Outgoing, Subscription
from conveyor.drivers.sqlite import leases
from conveyor.drivers.sqlite.rows import (
    INSERT,
    LEASE,
    PUT_BACK,
    TAKE,
    Lease,
    check_delay,
    check_room,
    encode,
    lease_lost,
    unpack,
)
from conveyor.drivers.waiters import Waiters
from conveyor.registry.model import QueueSpec

if TYPE_CHECKING:
    from conveyor.drivers.sqlite.driver import SqliteDriver

__all__ = ["SqliteSubscription"]

log = logging.getLogger("conveyor.sqlite")


class SqliteSubscription(Subscription):
    """One consumer's window on a queue: a leasing task fills a buffer of deliveries."""

    def __init__(self, driver: SqliteDriver, queue: QueueSpec, prefetch: int, auto_ack: bool) -> None:
        self.driver = driver
        self.queue = queue
        self.id = uuid.uuid4().hex
        self._prefetch = prefetch
        self._auto_ack = auto_ack
        self._buffer: deque[Delivery] = deque()  # leased, not handed out yet
        self._stale: list[Delivery] = []  # leased, lease ran low before hand-out: renew first
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
        # Hand a delivery out only with this much of its lease left; less means the
        # maintenance task (every lease_duration / 3 at most) did not renew it in time.
        self._margin = driver.lease_duration / 3

    # -- registration and the leasing task ---------------------------------------------

    def register(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO consumers (id, queue, owner, seen_at) VALUES (?, ?, ?, ?)",
            (self.id, self.queue.queue_name, self.driver.owner, leases.now()),
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
        return self._prefetch - len(self._buffer) - len(self._stale) - len(self._handed)

    async def _run(self) -> None:
        while not self._closing:
            if self._stale:
                await self._renew_stale()
                continue
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
            timeout = max(0.0, min(timeout, self._next_due - leases.now()))
        self._wake.clear()
        if (self._dirty and self._room() > 0) or self._stale:
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
                "SELECT MIN(ready_at) FROM messages WHERE queue = ? AND lease_owner IS NULL", (name,)
            ).fetchone()
            return int(version), due

        try:
            version, due = await self.driver.db.submit(probe, write=False)
        except errors.Error as exc:
            log.error("polling %s failed: %s", self.queue.id, exc)
            return
        if version != self._version or (due is not None and due <= leases.now()):
            self._dirty = True
        self._version = version
        self._next_due = due

    async def _lease(self, room: int) -> int:
        owner, lease = self.driver.owner, self.driver.lease_duration
        name, auto_ack = self.queue.queue_name, self._auto_ack
        token = self.driver.next_token()

        def lease_rows(conn: sqlite3.Connection) -> tuple[float, list[tuple[Any, ...]]]:
            now = leases.now()
            if auto_ack:
                return now, conn.execute(TAKE, (name, now, room)).fetchall()
            expires = now + lease
            return expires, conn.execute(LEASE, (owner, token, expires, name, now, room)).fetchall()

        expires, rows = await self.driver.db.submit(lease_rows)
        rows.sort(key=lambda r: (r[5], r[0]))  # RETURNING has no order: (ready_at, seq)
        if self._closing and not auto_ack:
            # Leased while closing: hand straight back without counting the attempt.
            await self.driver.db.submit(self._release_rows([(r[0], token) for r in rows]))
            return 0
        for seq, msg_id, body, headers, attempts, *taken in rows:
            lease_token = None if auto_ack else Lease(seq, token, expires)
            delivery = Delivery(msg_id, body, unpack(headers), attempts, lease_token)
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

    def renewed(self, expires: float, held: set[tuple[int, int]]) -> None:
        """The driver extended the leases ``held`` (row, token) to ``expires``."""
        for delivery in self._buffer:
            lease = delivery.token
            if isinstance(lease, Lease) and (lease.seq, lease.token) in held:
                lease.expires = expires

    async def _renew_stale(self) -> None:
        """Renew the leases that ran low before hand-out; drop the deliveries whose lease is gone."""
        stale, self._stale = self._stale, []
        owner, duration = self.driver.owner, self.driver.lease_duration
        keys = [(d.token.seq, d.token.token) for d in stale if isinstance(d.token, Lease)]

        def renew(conn: sqlite3.Connection) -> tuple[float, set[tuple[int, int]]]:
            expires = leases.now() + duration
            kept: set[tuple[int, int]] = set()
            for seq, token in keys:
                cursor = conn.execute(
                    "UPDATE messages SET lease_expires = ? "
                    "WHERE seq = ? AND lease_owner = ? AND lease_token = ?",
                    (expires, seq, owner, token),
                )
                if cursor.rowcount == 1:
                    kept.add((seq, token))
            return expires, kept

        try:
            expires, kept = await self.driver.db.submit(renew)
        except errors.Error as exc:
            log.error("renewing leases on %s failed: %s", self.queue.id, exc)
            self._stale[:0] = stale  # try again later; never hand them out unrenewed
            await asyncio.sleep(self.driver.poll_interval)
            return
        back: list[Delivery] = []
        for delivery in stale:
            lease = delivery.token
            assert isinstance(lease, Lease)
            if (lease.seq, lease.token) in kept:
                lease.expires = expires
                back.append(delivery)
            else:
                log.warning(
                    "message %s on %s: this consumer's lease on it ran out before a handler got it "
                    "(the process was stalled) and the message went back to the queue or to another "
                    "consumer; it is not run here",
                    delivery.id,
                    self.queue.id,
                )
        self._buffer.extendleft(reversed(back))
        self._getters.wake(len(back))
        if len(back) < len(stale):
            self._dirty = True  # room for new leases

    # -- handing out -----------------------------------------------------------------

    def get_nowait(self) -> Delivery | None:
        if self._closing:
            return None
        while self._buffer:
            delivery = self._buffer.popleft()
            lease = delivery.token
            if lease is None:
                del self._taken[delivery]  # auto_ack: settled now, by being handed out
                if not self._buffer:
                    self.poke()  # nothing is held, so room is back at once
                return delivery
            if lease.expires - leases.now() < self._margin:
                # The lease ran low while the delivery waited here (the process was
                # stalled): another consumer may have it. Renew it before running it.
                self._stale.append(delivery)
                self._wake.set()
                continue
            self._handed[lease.seq] = delivery
            return delivery
        return None

    async def get(self) -> Delivery | None:
        # Cancellation-safe: a cancelled wait has taken nothing out of the buffer.
        while not self._closing:
            delivery = self.get_nowait()
            if delivery is not None:
                return delivery
            await self._getters.wait()
        return None

    # -- settlement ------------------------------------------------------------------

    def _held(self, delivery: Delivery) -> Lease:
        """The lease of ``delivery``, if this subscription holds that very delivery.

        Identity, not the row alone: after a nack and a redelivery the old delivery
        must not settle the new one.
        """
        lease = delivery.token
        if not isinstance(lease, Lease) or self._handed.get(lease.seq) is not delivery:
            raise errors.invalid(f"delivery {delivery.id} is not held by this subscription")
        return lease

    def _done(self, seq: int) -> None:
        self._handed.pop(seq, None)
        self._wake.set()  # room for the leasing task

    async def _settle(self, delivery: Delivery, sql: str, params: tuple[Any, ...]) -> None:
        lease = self._held(delivery)
        owner = self.driver.owner

        def run(conn: sqlite3.Connection) -> None:
            cursor = conn.execute(sql, (*params, lease.seq, owner, lease.token))
            if cursor.rowcount != 1:
                raise lease_lost(delivery, self.queue)

        await self._settling(lease.seq, run)

    async def ack(self, delivery: Delivery) -> None:
        await self._settle(
            delivery, "DELETE FROM messages WHERE seq = ? AND lease_owner = ? AND lease_token = ?", ()
        )

    async def nack(self, delivery: Delivery, delay: float) -> None:
        self._held(delivery)
        due = leases.now() + check_delay(delay)
        await self._settle(
            delivery,
            "UPDATE messages SET lease_owner = NULL, lease_token = NULL, lease_expires = NULL, "
            "ready_at = ? WHERE seq = ? AND lease_owner = ? AND lease_token = ?",
            (due,),
        )
        self._note_due(due)

    async def release(self, delivery: Delivery) -> None:
        await self._settle(
            delivery,
            "UPDATE messages SET lease_owner = NULL, lease_token = NULL, lease_expires = NULL, "
            "attempts = attempts - 1 WHERE seq = ? AND lease_owner = ? AND lease_token = ?",
            (),
        )
        self.poke()

    async def dead_letter(self, delivery: Delivery, target: QueueSpec, copy: Outgoing) -> None:
        lease = self._held(delivery)
        owner = self.driver.owner
        copy_id, copy_body, copy_headers = encode(copy)

        def move(conn: sqlite3.Connection) -> None:
            check_room(conn, target, 1)
            cursor = conn.execute(
                "DELETE FROM messages WHERE seq = ? AND lease_owner = ? AND lease_token = ?",
                (lease.seq, owner, lease.token),
            )
            if cursor.rowcount != 1:
                raise lease_lost(delivery, self.queue)
            now = leases.now()
            conn.execute(INSERT, (target.queue_name, copy_id, copy_body, copy_headers, now, time.time()))

        await self._settling(lease.seq, move)
        self.driver.notify(target.queue_name)

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
        if due <= leases.now():
            self.poke()
            return
        if self._next_due is None or due < self._next_due:
            self._next_due = due
            self._wake.set()

    def _release_rows(self, rows: list[tuple[int, int]], *, count_attempt: bool = False) -> Any:
        """A job that gives back the leased ``rows`` (row, token) that are still this holder's."""
        owner = self.driver.owner
        attempts = "attempts" if count_attempt else "attempts - 1"

        def run(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE messages SET lease_owner = NULL, lease_token = NULL, lease_expires = NULL, "
                f"attempts = {attempts} WHERE seq = ? AND lease_owner = ? AND lease_token = ?",
                [(seq, owner, token) for seq, token in rows],
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
        unstarted = [_key(d) for d in (*self._buffer, *self._stale) if isinstance(d.token, Lease)]
        started = [_key(d) for d in self._handed.values()]
        taken = list(self._taken.values())
        self._buffer.clear()
        self._stale.clear()
        self._handed.clear()
        self._taken.clear()
        sub_id = self.id

        def give_back(conn: sqlite3.Connection) -> None:
            self._release_rows(unstarted)(conn)  # never handed to a handler: no attempt
            self._release_rows(started, count_attempt=True)(conn)
            conn.executemany(PUT_BACK, taken)  # auto_ack rows taken but never handed out
            conn.execute("DELETE FROM consumers WHERE id = ?", (sub_id,))

        try:
            await self.driver.db.submit(give_back)
        except errors.Error as exc:
            log.error(
                "could not return leased messages of %s: %s (they come back when their lease expires)",
                self.queue.id,
                exc,
            )
        self.driver.forget(self)
        self.driver.notify(self.queue.queue_name)  # what it returned is for the others now


def _key(delivery: Delivery) -> tuple[int, int]:
    lease = delivery.token
    assert isinstance(lease, Lease)
    return lease.seq, lease.token
