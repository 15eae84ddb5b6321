"""Neutral headers <-> AMQP basic properties and headers table, types preserved.

Encoding rules (the consumer must see exactly what was published):

- ``priority``, ``correlation_id``, ``reply_to``, ``content_type``, ``message_type``
  and ``expiration`` travel as the matching AMQP properties, so other AMQP clients
  see them where they expect them. A property holds one type (an octet for
  priority, a short string for the rest), so a value of another type is written in
  the property's type and its neutral type is recorded in the ``x-conveyor-types``
  table (``priority: "high"`` travels as priority 9 plus the marker ``"n"``).
- Every other header goes into the AMQP headers table. bool, str and 64-bit ints
  are native table types and need nothing more. A float would be narrowed to 32
  bits by the client library (0.1 would come back as 0.10000000149011612), and an
  int outside 64 bits cannot be encoded at all, so both travel as their exact
  ``repr`` text with a type marker.
- ``amqp.*`` keys steer this driver (``amqp.mandatory``, ``amqp.expiration``,
  ``amqp.app_id``, ``amqp.user_id``) and are not delivered.
- ``x-conveyor-*`` keys and the broker's own ``x-delivery-count`` / ``x-death`` /
  ``x-first-death-*`` / ``x-last-death-*`` are bookkeeping: publishers may not set
  them and consumers never see them.
"""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pamqp.commands import Basic

from conveyor import errors
from conveyor.drivers.base import Headers, HeaderValue
from conveyor.queue.headers import PRIORITY_NAMES, priority_value

__all__ = [
    "ATTEMPTS_KEY",
    "TYPES_KEY",
    "Encoded",
    "attempts_of",
    "decode_headers",
    "encode_headers",
    "has_delivery_count",
    "republished",
]

ATTEMPTS_KEY = "x-conveyor-attempts"  # failed attempts recorded by retry republishes
TYPES_KEY = "x-conveyor-types"  # {neutral key: type marker} for values not carried natively
_CONVEYOR_PREFIX = "x-conveyor-"
_BROKER_KEYS = frozenset({"x-delivery-count", "x-death"})
_BROKER_PREFIXES = ("x-first-death-", "x-last-death-")

_STRING_PROPERTIES = ("correlation_id", "reply_to", "content_type", "message_type")
_AMQP_KEYS = ("amqp.mandatory", "amqp.expiration", "amqp.app_id", "amqp.user_id")
_PRIORITY_BY_VALUE = {value: name for name, value in PRIORITY_NAMES.items()}
_INT64 = (-(2**63), 2**63 - 1)
_SHORTSTR_MAX = 255
_FIELD_NAME_MAX = 128  # AMQP field names; pamqp would silently truncate longer keys

# type markers
_FLOAT, _INT, _BOOL, _NAME = "f", "i", "b", "n"


@dataclass(slots=True)
class Encoded:
    """What :func:`encode_headers` produces for one message."""

    properties: Basic.Properties
    mandatory: bool


def is_bookkeeping(key: str) -> bool:
    """Keys the driver or the broker owns: never delivered, never accepted from publishers."""
    return key.startswith(_CONVEYOR_PREFIX) or key in _BROKER_KEYS or key.startswith(_BROKER_PREFIXES)


# -- encoding -----------------------------------------------------------------------------


def encode_headers(headers: Headers, message_id: str) -> Encoded:
    """Build the AMQP properties of a persistent message from neutral ``headers``.

    Raises INVALID for an ``amqp.*`` key this driver does not know, a bookkeeping key,
    or a value AMQP cannot carry (a property longer than 255 bytes, a bad expiration).
    """
    props = Basic.Properties(delivery_mode=2, message_id=message_id)
    table: dict[str, Any] = {}
    types: dict[str, str] = {}
    mandatory = True
    for key, value in headers.items():
        if key.startswith("amqp."):
            mandatory = _driver_key(props, key, value, mandatory)
        elif key == "priority":
            props.priority = priority_value(value)
            if isinstance(value, str):
                types[key] = _NAME
        elif key in _STRING_PROPERTIES:
            setattr(props, key, _property_text(key, value, types))
        elif key == "expiration":
            if props.expiration is None:  # amqp.expiration wins when both are given
                props.expiration = _expiration_text(key, value)
            if not isinstance(value, str):
                types[key] = _INT
        else:
            table[_table_key(key)] = _table_value(key, value, types)
    if types:
        table[TYPES_KEY] = types
    props.headers = table or None
    return Encoded(props, mandatory)


def _driver_key(props: Basic.Properties, key: str, value: HeaderValue, mandatory: bool) -> bool:
    if key == "amqp.mandatory":
        if not isinstance(value, bool):
            raise errors.invalid(f"header {key!r} must be a bool, not {type(value).__name__}", key=key)
        return value
    if key == "amqp.expiration":
        props.expiration = _expiration_text(key, value)
    elif key in ("amqp.app_id", "amqp.user_id"):
        setattr(props, key.removeprefix("amqp."), _shortstr(key, value))
    else:
        raise errors.invalid(
            f"unknown AMQP header {key!r}; the AMQP driver understands {', '.join(_AMQP_KEYS)}", key=key
        )
    return mandatory


def _table_key(key: str) -> str:
    if is_bookkeeping(key):
        raise errors.invalid(f"header {key!r} is reserved by the AMQP driver and the broker", key=key)
    if len(key.encode()) > _FIELD_NAME_MAX:
        raise errors.invalid(f"header key {key[:40]!r}... is longer than AMQP's 128 bytes", key=key)
    return key


def _table_value(key: str, value: HeaderValue, types: dict[str, str]) -> HeaderValue:
    if isinstance(value, float):
        types[key] = _FLOAT
        return repr(value)  # repr round-trips a float exactly
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
        types[key] = _INT
        return str(value)
    return value


def _property_text(key: str, value: HeaderValue, types: dict[str, str]) -> str:
    if isinstance(value, bool):
        types[key] = _BOOL
        text = "true" if value else "false"
    elif isinstance(value, float):
        types[key] = _FLOAT
        text = repr(value)
    elif isinstance(value, int):
        types[key] = _INT
        text = str(value)
    else:
        text = value
    return _shortstr(key, text)


def _shortstr(key: str, value: HeaderValue) -> str:
    if not isinstance(value, str):
        raise errors.invalid(f"header {key!r} must be a string, not {type(value).__name__}", key=key)
    if len(value.encode()) > _SHORTSTR_MAX:
        raise errors.invalid(f"header {key!r} is longer than the 255 bytes an AMQP property holds", key=key)
    return value


def _expiration_text(key: str, value: HeaderValue) -> str:
    """AMQP expiration: a per-message TTL in whole milliseconds, as a decimal string."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return value
    raise errors.invalid(
        f"header {key!r} must be a whole number of milliseconds (int >= 0 or digits), got {value!r}",
        key=key,
    )


# -- decoding -----------------------------------------------------------------------------


def decode_headers(props: Basic.Properties) -> Headers:
    """The neutral headers of a delivered message (the inverse of :func:`encode_headers`).

    Messages from other AMQP publishers decode too: their properties map to the
    neutral keys and table values of types conveyor does not have are converted
    (decimal -> float, timestamp -> ISO text, bytes -> text, nested values -> text).
    """
    table: Mapping[str, Any] = props.headers or {}
    types = table.get(TYPES_KEY)
    markers: Mapping[str, Any] = types if isinstance(types, Mapping) else {}
    out: Headers = {}
    for key, value in table.items():
        if is_bookkeeping(key) or value is None:
            continue
        out[key] = _typed(_neutral_value(value), markers.get(key))
    if props.priority is not None:
        priority: HeaderValue = props.priority
        if markers.get("priority") == _NAME:
            priority = _PRIORITY_BY_VALUE.get(props.priority, props.priority)
        out["priority"] = priority
    for key in _STRING_PROPERTIES:
        text = getattr(props, key)
        if text is not None:
            out[key] = _typed(text, markers.get(key))
    if props.expiration is not None:
        out["expiration"] = _typed(props.expiration, markers.get("expiration"))
    return out


def _typed(value: HeaderValue, marker: object) -> HeaderValue:
    if not isinstance(value, str) or marker is None:
        return value
    try:
        if marker == _FLOAT:
            return float(value)
        if marker == _INT:
            return int(value)
    except ValueError:
        return value  # a foreign or damaged marker: deliver the text rather than fail
    if marker == _BOOL:
        return value == "true"
    return value


def _neutral_value(value: object) -> HeaderValue:
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode(errors="replace")
    return str(value)


def attempts_of(props: Basic.Properties, redelivered: bool) -> int:
    """Deliveries of this message from its queue, this one included.

    ``x-conveyor-attempts`` counts the failed attempts recorded when the message was
    republished for a retry. On top of that, a quorum queue's ``x-delivery-count``
    counts exactly how often the broker handed this copy out before (a crash, a
    closed channel). A classic queue only has the ``redelivered`` flag, which says
    "at least once before": several crashes in a row count as one.
    """
    table: Mapping[str, Any] = props.headers or {}
    recorded = table.get(ATTEMPTS_KEY, 0)
    base = recorded if isinstance(recorded, int) and recorded > 0 else 0
    count = table.get("x-delivery-count")
    if isinstance(count, int) and not isinstance(count, bool):
        return base + max(count, 0) + 1
    return base + int(redelivered) + 1


def has_delivery_count(props: Basic.Properties) -> bool:
    """True for deliveries from a quorum queue (the broker counts redeliveries itself)."""
    return "x-delivery-count" in (props.headers or {})


def republished(props: Basic.Properties, failed_attempts: int, *, keep_expiration: bool) -> Basic.Properties:
    """A copy of ``props`` for republishing: the attempt count recorded, broker bookkeeping dropped.

    ``keep_expiration`` is False for copies parked in a delay queue, whose own TTL
    decides when they return (RabbitMQ strips the expiration when it dead-letters
    them back anyway).
    """
    table = {k: v for k, v in (props.headers or {}).items() if not is_bookkeeping(k) or k == TYPES_KEY}
    if failed_attempts > 0:
        table[ATTEMPTS_KEY] = failed_attempts
    return Basic.Properties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        headers=table or None,
        delivery_mode=2,
        priority=props.priority,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        expiration=props.expiration if keep_expiration else None,
        message_id=props.message_id,
        timestamp=props.timestamp,
        message_type=props.message_type,
        user_id=props.user_id,
        app_id=props.app_id,
    )
