"""The table's statements and the helpers the driver and its subscriptions share."""

from __future__ import annotations

import contextlib
import math
import sqlite3

import msgpack

from conveyor import errors
from conveyor.drivers.base import Delivery, Headers, Outgoing, queue_full
from conveyor.drivers.options.sqlite import SCHEMA
from conveyor.registry.model import QueueSpec

__all__ = [
    "INSERT",
    "LEASE",
    "PUT_BACK",
    "TAKE",
    "Lease",
    "check_delay",
    "check_room",
    "encode",
    "lease_lost",
    "pack",
    "unpack",
]

INSERT = (
    "INSERT INTO messages (queue, id, body, headers, attempts, ready_at, created_at) "
    "VALUES (?, ?, ?, ?, 0, ?, ?)"
)
LEASE = (
    "UPDATE messages SET lease_owner = ?, lease_token = ?, lease_expires = ?, attempts = attempts + 1 "
    "WHERE seq IN (SELECT seq FROM messages WHERE queue = ? AND lease_owner IS NULL "
    "AND ready_at <= ? ORDER BY ready_at, seq LIMIT ?) "
    "RETURNING seq, id, body, headers, attempts, ready_at"
)
TAKE = (  # auto_ack: hand out and delete in one step (at most once)
    "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages WHERE queue = ? "
    "AND lease_owner IS NULL AND ready_at <= ? ORDER BY ready_at, seq LIMIT ?) "
    "RETURNING seq, id, body, headers, attempts + 1, ready_at, created_at"
)
PUT_BACK = (  # auto_ack: a taken row that was never handed out, as it was
    "INSERT INTO messages (seq, queue, id, body, headers, attempts, ready_at, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)

_INT64 = (-(2**63), 2**63 - 1)


def pack(headers: Headers) -> bytes:
    packed: bytes = msgpack.packb(headers, use_bin_type=True)
    return packed


def unpack(blob: bytes) -> Headers:
    headers: Headers = msgpack.unpackb(blob, raw=False)
    return headers


def encode(message: Outgoing) -> tuple[str, bytes, bytes]:
    """``(id, body, packed headers)`` of ``message``, checked: what SQLite and msgpack take.

    The edge of the driver: a value they would refuse (an integer beyond 64 bits, a
    string that is not valid Unicode, a type headers cannot have) is INVALID here, on
    the caller's side, before anything reaches the database.
    """
    # Typed as the contract says; checked as whatever a caller may have put there.
    msg_id: object = message.id
    body: object = message.body
    headers: object = message.headers
    if not isinstance(msg_id, str) or not _is_text(msg_id):
        raise errors.invalid(f"message id {msg_id!r} is not a valid Unicode string")
    if isinstance(body, bytearray | memoryview):
        body = bytes(body)
    elif not isinstance(body, bytes):
        raise errors.invalid(f"message {msg_id}: the body must be bytes, not {type(body).__name__}")
    if not isinstance(headers, dict):
        raise errors.invalid(f"message {msg_id}: headers must be a dict, not {type(headers).__name__}")
    for key, value in headers.items():
        _check_header(msg_id, key, value)
    return msg_id, body, pack(headers)


def _check_header(msg_id: str, key: object, value: object) -> None:
    if not isinstance(key, str) or not _is_text(key):
        raise errors.invalid(
            f"message {msg_id}: header key {key!r} is not a valid Unicode string", key=repr(key)
        )
    kind = value.__class__
    if kind not in (str, int, float, bool):
        raise errors.invalid(
            f"message {msg_id}: header {key!r} must be str, int, float or bool, not {kind.__name__}", key=key
        )
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
        raise errors.invalid(
            f"message {msg_id}: header {key!r} is {value}, beyond the 64-bit integers "
            f"({_INT64[0]} .. {_INT64[1]}) a header can hold; nothing was stored",
            key=key,
        )
    if isinstance(value, str) and not _is_text(value):
        raise errors.invalid(f"message {msg_id}: header {key!r} is not a valid Unicode string", key=key)


def _is_text(text: str) -> bool:
    """True when ``text`` has no lone surrogates (it can be written as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_delay(delay: object) -> float:
    """A retry delay the database can schedule: a finite number of seconds, 0 or more."""
    seconds = math.nan
    if isinstance(delay, int | float) and not isinstance(delay, bool):
        with contextlib.suppress(OverflowError):
            seconds = float(delay)
    if not math.isfinite(seconds) or seconds < 0:
        raise errors.invalid(f"retry delay must be a finite number of seconds, 0 or more; got {delay!r}")
    return seconds


def check_room(conn: sqlite3.Connection, queue: QueueSpec, adding: int) -> None:
    limit = SCHEMA.queue_options(queue.driver_options).max_length
    if limit is None:
        return
    (count,) = conn.execute("SELECT COUNT(*) FROM messages WHERE queue = ?", (queue.queue_name,)).fetchone()
    if count + adding > limit:
        raise queue_full(queue, limit)


class Lease:
    """The token of a delivery that is not ``auto_ack``: its row, its lease, when that ends.

    ``token`` is unique to the lease (per holder): after the lease is lost and the row
    leased again (by another process, or by another subscription of this one), a
    settlement with the old token matches nothing. ``expires`` is on the boot clock.
    """

    __slots__ = ("expires", "seq", "token")

    def __init__(self, seq: int, token: int, expires: float) -> None:
        self.seq = seq
        self.token = token
        self.expires = expires


def lease_lost(delivery: Delivery, queue: QueueSpec) -> errors.Error:
    return errors.internal(
        f"message {delivery.id} on {queue.id}: this consumer's lease on it ran out (its process "
        "stalled for longer than lease_duration) and the message went back to the queue or to "
        "another consumer; this settlement was refused and changed nothing",
        retryable=False,
        queue=queue.id,
        message_id=delivery.id,
        reason="lease_lost",
    )
