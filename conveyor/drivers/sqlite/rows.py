"""The table's statements and the helpers the driver and its subscriptions share."""

from __future__ import annotations

import sqlite3

import msgpack

from conveyor import errors
from conveyor.drivers.base import Delivery, Headers, queue_full
from conveyor.drivers.options.sqlite import SCHEMA
from conveyor.registry.model import QueueSpec

__all__ = ["INSERT", "LEASE", "PUT_BACK", "TAKE", "check_room", "lease_lost", "pack", "unpack"]

INSERT = (
    "INSERT INTO messages (queue, id, body, headers, attempts, available_at, created_at) "
    "VALUES (?, ?, ?, ?, 0, ?, ?)"
)
LEASE = (
    "UPDATE messages SET lease_owner = ?, lease_until = ?, attempts = attempts + 1 "
    "WHERE seq IN (SELECT seq FROM messages WHERE queue = ? AND lease_owner IS NULL "
    "AND available_at <= ? ORDER BY available_at, seq LIMIT ?) "
    "RETURNING seq, id, body, headers, attempts"
)
TAKE = (  # auto_ack: hand out and delete in one step (at most once)
    "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages WHERE queue = ? "
    "AND lease_owner IS NULL AND available_at <= ? ORDER BY available_at, seq LIMIT ?) "
    "RETURNING seq, id, body, headers, attempts + 1, available_at, created_at"
)
PUT_BACK = (  # auto_ack: a taken row that was never handed out, as it was
    "INSERT INTO messages (seq, queue, id, body, headers, attempts, available_at, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def pack(headers: Headers) -> bytes:
    packed: bytes = msgpack.packb(headers, use_bin_type=True)
    return packed


def unpack(blob: bytes) -> Headers:
    headers: Headers = msgpack.unpackb(blob, raw=False)
    return headers


def check_room(conn: sqlite3.Connection, queue: QueueSpec, adding: int) -> None:
    limit = SCHEMA.queue_options(queue.driver_options).max_length
    if limit is None:
        return
    (count,) = conn.execute("SELECT COUNT(*) FROM messages WHERE queue = ?", (queue.queue_name,)).fetchone()
    if count + adding > limit:
        raise queue_full(queue, limit)


def lease_lost(delivery: Delivery, queue: QueueSpec) -> errors.Error:
    return errors.internal(
        f"message {delivery.id} on {queue.id}: its lease expired and it was handed out again; "
        "this settlement was ignored",
        retryable=False,
        queue=queue.id,
        message_id=delivery.id,
        reason="lease_lost",
    )
