"""``SqliteDriver``: the file, publishing, counts, and the leases of this process.

See the package docstring for the model. The driver owns the database thread
(``store.Database``) and the lease-maintenance task; each consumer's window on a
queue is a :class:`~conveyor.drivers.sqlite.subscription.SqliteSubscription`; browse,
purge and move are jobs of ``tooling``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sqlite3
import time
from collections.abc import Collection, Mapping
from typing import Any

from conveyor import errors
from conveyor.drivers.base import (
    Capabilities,
    Driver,
    Outgoing,
    Rewrite,
    Stored,
    Subscription,
    check_limit,
    same_queue,
)
from conveyor.drivers.options.sqlite import SCHEMA
from conveyor.drivers.sqlite import leases, tooling
from conveyor.drivers.sqlite.rows import INSERT, check_room, encode
from conveyor.drivers.sqlite.store import Database
from conveyor.drivers.sqlite.subscription import SqliteSubscription
from conveyor.registry.model import DriverSpec, QueueSpec
from conveyor.registry.options import Options

__all__ = ["SqliteDriver"]

log = logging.getLogger("conveyor.sqlite")


class SqliteDriver(Driver):
    kind = "queue.driver.sqlite"
    capabilities = Capabilities(
        durable=True,
        atomic_batches=True,
        atomic_dead_letter=True,
        max_length=True,
        cross_process=True,
        native_delay=True,
        browse_in_flight=True,
    )

    def __init__(self, spec: DriverSpec) -> None:
        super().__init__(spec)
        options = SCHEMA.driver_options(spec.options)
        self.path = options.path
        self.poll_interval = options.poll_interval
        self.lease_duration = options.lease_duration
        self.owner = leases.owner_id()
        self._tokens = itertools.count(1)  # lease tokens: unique per lease of this holder
        self.db = Database(self.path, synchronous=options.synchronous, busy_timeout=options.busy_timeout)
        self._subscriptions: dict[str, set[SqliteSubscription]] = {}
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
        name = queue.queue_name
        encoded = [encode(m) for m in batch]  # INVALID here, before anything is written

        def insert(conn: sqlite3.Connection) -> None:
            check_room(conn, queue, len(encoded))
            now, wall = leases.now(), time.time()
            conn.executemany(INSERT, [(name, *message, now, wall) for message in encoded])

        await self.db.submit(insert)
        self.notify(queue.queue_name)

    def notify(self, queue_name: str) -> None:
        """Something may have become available on ``queue_name``: wake its subscriptions."""
        for sub in self._subscriptions.get(queue_name, ()):
            sub.poke()

    # -- consuming -------------------------------------------------------------------

    async def subscribe(
        self, queue: QueueSpec, *, prefetch: int, auto_ack: bool, options: Mapping[str, Options]
    ) -> Subscription:
        sub = SqliteSubscription(self, queue, prefetch, auto_ack)
        await self.db.submit(sub.register)
        self._subscriptions.setdefault(queue.queue_name, set()).add(sub)
        sub.start()
        return sub

    def next_token(self) -> int:
        return next(self._tokens)

    def forget(self, sub: SqliteSubscription) -> None:
        """``sub`` closed: it gets no more wake-ups."""
        self._subscriptions.get(sub.queue.queue_name, set()).discard(sub)

    async def info(self, queue: QueueSpec) -> dict[str, Any]:
        name = queue.queue_name
        heartbeat_window = self.lease_duration

        def counts(conn: sqlite3.Connection) -> dict[str, Any]:
            now = leases.now()
            row = conn.execute(
                "SELECT COUNT(*), "
                "COALESCE(SUM(lease_owner IS NULL AND ready_at <= ?), 0), "
                "COALESCE(SUM(lease_owner IS NULL AND ready_at > ?), 0), "
                "COALESCE(SUM(lease_owner IS NOT NULL AND lease_expires >= ?), 0), "
                "COALESCE(SUM(lease_owner IS NOT NULL AND lease_expires < ?), 0) "
                "FROM messages WHERE queue = ?",
                (now, now, now, now, name),
            ).fetchone()
            (consumers,) = conn.execute(
                "SELECT COUNT(*) FROM consumers WHERE queue = ? AND seen_at >= ?",
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

    # -- queue tooling ---------------------------------------------------------------

    async def browse(self, queue: QueueSpec, *, limit: int, after: str | None = None) -> list[Stored]:
        job = tooling.browse_job(queue, check_limit(limit), after)
        page: list[Stored] = await self.db.submit(job, write=False)
        return page

    async def purge(self, queue: QueueSpec, ids: Collection[str] | None = None) -> int:
        removed: int = await self.db.submit(tooling.purge_job(queue, tooling.check_ids(ids)))
        return removed

    async def move(
        self,
        source: QueueSpec,
        target: QueueSpec,
        rewrite: Rewrite,
        *,
        ids: Collection[str] | None = None,
        limit: int,
    ) -> int:
        if source.queue_name == target.queue_name:
            raise same_queue(source)
        job = tooling.move_job(source, target, rewrite, tooling.check_ids(ids), check_limit(limit))
        moved: int = await self.db.submit(job)
        if moved:
            self.notify(target.queue_name)
        return moved

    # -- leases: extension, expiry, dead holders ---------------------------------------

    async def _maintain(self) -> None:
        """Extend this process's leases and heartbeats; reclaim what dead holders left."""
        interval = max(min(self.lease_duration / 3, 5.0), 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                if any(self._subscriptions.values()):
                    expires, held = await self.db.submit(self._extend)
                    for subs in self._subscriptions.values():
                        for sub in subs:
                            sub.renewed(expires, held)
                await self.db.submit(self._reclaim)
            except errors.Error as exc:
                log.error("SQLite lease maintenance on %s failed: %s", self.path, exc)

    def _extend(self, conn: sqlite3.Connection) -> tuple[float, set[tuple[int, int]]]:
        """Extend every lease this holder still has; answer which ones (row, token)."""
        now = leases.now()
        expires = now + self.lease_duration
        held = conn.execute(
            "UPDATE messages SET lease_expires = ? WHERE lease_owner = ? RETURNING seq, lease_token",
            (expires, self.owner),
        ).fetchall()
        conn.execute("UPDATE consumers SET seen_at = ? WHERE owner = ?", (now, self.owner))
        return expires, {(seq, token) for seq, token in held}

    def _reclaim(self, conn: sqlite3.Connection) -> int:
        """Free leases of dead processes and expired leases; drop dead consumers' rows.

        A live holder's leases are never expired by the holder itself: its own
        ``_extend`` renews them first.
        """
        now = leases.now()
        owners = [
            row[0]
            for row in conn.execute(
                "SELECT DISTINCT lease_owner FROM messages WHERE lease_owner IS NOT NULL "
                "UNION SELECT DISTINCT owner FROM consumers"
            )
        ]
        dead = [o for o in owners if o != self.owner and not leases.owner_alive(o)]
        freed = 0
        for owner in dead:
            cursor = conn.execute(
                "UPDATE messages SET lease_owner = NULL, lease_token = NULL, lease_expires = NULL "
                "WHERE lease_owner = ?",
                (owner,),
            )
            freed += cursor.rowcount
            conn.execute("DELETE FROM consumers WHERE owner = ?", (owner,))
        cursor = conn.execute(
            "UPDATE messages SET lease_owner = NULL, lease_token = NULL, lease_expires = NULL "
            "WHERE lease_owner IS NOT NULL AND lease_owner != ? AND lease_expires < ?",
            (self.owner, now),
        )
        freed += cursor.rowcount
        conn.execute("DELETE FROM consumers WHERE seen_at < ?", (now - 10 * self.lease_duration,))
        if freed:
            log.warning("reclaimed %d message lease(s) of dead or stalled consumers in %s", freed, self.path)
            for subs in self._subscriptions.values():
                for sub in subs:
                    sub.poke()
        return freed
