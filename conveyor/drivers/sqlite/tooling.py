"""Browse, purge and move on the SQLite file: the jobs the driver hands its database thread.

Listing order is the order the driver hands messages out: the rows no consumer
holds by ``(ready_at, seq)`` (what is ready now comes before what waits out a retry
delay, as ``LEASE`` takes them), then the leased rows (``in_flight``). A page after
a message starts past that message's place in this order; the message is looked up
by ID in the same read transaction (NOT_FOUND when it has left the queue).

Purge and move touch rows without a lease only, so a consumer's settlement never
finds its row gone or changed. Each is one job, so one savepoint of one ``BEGIN
IMMEDIATE`` transaction (``store.Database``): a move inserts the rewritten copies on
the target (attempts 0, ready now, at the end of its order) and deletes the
originals together, and a process killed at any point leaves each message on
exactly one of the two queues. The rewrite runs on the database thread, inside the
transaction: it must be a plain function of the message it is given.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Collection
from typing import Any

from conveyor import errors
from conveyor.drivers.base import Rewrite, Stored, browse_gone
from conveyor.drivers.sqlite import leases
from conveyor.drivers.sqlite.rows import INSERT, encode, unpack
from conveyor.registry.model import QueueSpec

__all__ = ["browse_job", "check_ids", "move_job", "purge_job"]

# The listing order: waiting rows first, by (ready_at, seq), then the leased ones.
_ORDER = "lease_owner IS NOT NULL, ready_at, seq"
_KEY = f"({_ORDER})"  # the same, as a row value to compare
_COLUMNS = "seq, id, body, headers, attempts, ready_at, lease_owner IS NOT NULL"
# ``ids`` go in as one JSON array: any number of them, one bound parameter.
_IN_IDS = "id IN (SELECT value FROM json_each(?))"

Job = Callable[[sqlite3.Connection], Any]


def check_ids(ids: Collection[str] | None) -> str | None:
    """``ids`` as the JSON array ``_IN_IDS`` reads (None: every message); INVALID if not IDs."""
    if ids is None:
        return None
    found = list(ids)
    if any(not isinstance(one, str) for one in found):
        raise errors.invalid("message IDs are strings")
    # An ID that is not valid Unicode was never stored (``rows.encode`` refuses it).
    return json.dumps([one for one in found if _is_text(one)])


def _is_text(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _state(now: float, ready_at: float, leased: int) -> str:
    if leased:
        return "in_flight"
    return "delayed" if ready_at > now else "ready"


def _stored(row: tuple[Any, ...], now: float, position: int) -> Stored:
    _seq, msg_id, body, headers, attempts, ready_at, leased = row
    return Stored(msg_id, bytes(body), unpack(headers), attempts, _state(now, ready_at, leased), position)


def browse_job(queue: QueueSpec, limit: int, after: str | None) -> Job:
    """A read job: up to ``limit`` messages of ``queue`` after ``after``, in one read transaction."""

    def browse(conn: sqlite3.Connection) -> list[Stored]:
        conn.execute("BEGIN")  # one snapshot for the lookup of `after` and the page
        try:
            page = _page(conn, queue, limit, after)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return page

    return browse


def _page(conn: sqlite3.Connection, queue: QueueSpec, limit: int, after: str | None) -> list[Stored]:
    name, now = queue.queue_name, leases.now()
    select = f"SELECT {_COLUMNS} FROM messages WHERE queue = ?"
    if after is None:
        rows = conn.execute(f"{select} ORDER BY {_ORDER} LIMIT ?", (name, limit)).fetchall()
        return [_stored(row, now, n + 1) for n, row in enumerate(rows)]
    key = None
    if _is_text(after):  # else it was never stored
        key = conn.execute(
            f"SELECT {_ORDER} FROM messages WHERE queue = ? AND id = ? ORDER BY seq LIMIT 1", (name, after)
        ).fetchone()
    if key is None:
        raise browse_gone(queue, after)
    (before,) = conn.execute(
        f"SELECT COUNT(*) FROM messages WHERE queue = ? AND {_KEY} <= (?, ?, ?)", (name, *key)
    ).fetchone()
    rows = conn.execute(
        f"{select} AND {_KEY} > (?, ?, ?) ORDER BY {_ORDER} LIMIT ?", (name, *key, limit)
    ).fetchall()
    return [_stored(row, now, before + n + 1) for n, row in enumerate(rows)]


def purge_job(queue: QueueSpec, ids: str | None) -> Job:
    """A write job: delete the rows of ``queue`` without a lease (those of ``ids``); how many."""
    name = queue.queue_name

    def purge(conn: sqlite3.Connection) -> int:
        sql = "DELETE FROM messages WHERE queue = ? AND lease_owner IS NULL"
        if ids is None:
            return conn.execute(sql, (name,)).rowcount
        return conn.execute(f"{sql} AND {_IN_IDS}", (name, ids)).rowcount

    return purge


def move_job(source: QueueSpec, target: QueueSpec, rewrite: Rewrite, ids: str | None, limit: int) -> Job:
    """A write job: move up to ``limit`` unleased rows of ``source`` (those of ``ids``) to
    ``target`` as ``rewrite`` makes them, in queue order; how many moved."""
    src, dst = source.queue_name, target.queue_name

    def move(conn: sqlite3.Connection) -> int:
        now, wall = leases.now(), time.time()
        where = "queue = ? AND lease_owner IS NULL" + ("" if ids is None else f" AND {_IN_IDS}")
        params: tuple[Any, ...] = (src,) if ids is None else (src, ids)
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE {where} ORDER BY ready_at, seq LIMIT ?", (*params, limit)
        ).fetchall()
        # Built and checked before anything is written: one that cannot be stored moves nothing.
        copies = [encode(rewrite(_stored(row, now, n + 1))) for n, row in enumerate(rows)]
        conn.executemany(INSERT, [(dst, *copy, now, wall) for copy in copies])
        conn.executemany("DELETE FROM messages WHERE seq = ?", [(row[0],) for row in rows])
        return len(rows)

    return move
