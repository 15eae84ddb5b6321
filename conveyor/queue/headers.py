"""Message header rules shared by every driver.

The contract (docs/semantics.md#headers-and-types), checked before any driver sees a header:

- ``headers`` is a mapping (or None: no headers).
- Keys are strings: not empty, no surrounding whitespace, valid Unicode (no lone
  surrogates), at most :data:`MAX_KEY_BYTES` bytes in UTF-8. ``attempts`` and every
  ``x_*`` key are reserved for the runtime.
- Values are str, int, float or bool, exactly (no subclasses but bool), and keep their
  type. Strings are valid Unicode; ints fit in a signed 64-bit integer; floats may be
  anything but NaN (which never equals itself); ``inf`` and ``-inf`` round-trip.
- ``priority`` is an int 0..255 or one of ``low``/``normal``/``high``.

Headers count towards a message's size (:func:`headers_size`), so there is no
separate limit on how many there are or how long a string value is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

from conveyor import errors
from conveyor.drivers.base import Headers

__all__ = [
    "INT_RANGE",
    "MAX_KEY_BYTES",
    "PRIORITY_NAMES",
    "check_headers",
    "headers_size",
    "priority_value",
]

PRIORITY_NAMES: dict[str, int] = {"low": 1, "normal": 5, "high": 9}
MAX_KEY_BYTES: Final = 128  # AMQP's limit on a field name; the same on every driver
INT_RANGE: Final = (-(2**63), 2**63 - 1)  # what every driver stores as an integer
_NUMBER_BYTES: Final = 8  # what an int, float or bool counts towards the message size
_RESERVED = "attempts"


def check_headers(headers: Any) -> Headers:
    """Validate publisher headers and return a private copy (``{}`` for ``None``)."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise errors.invalid(f"headers must be a mapping, not {type(headers).__name__}")
    out: Headers = {}
    for key, value in headers.items():
        name = _check_key(key)
        _check_value(name, value)
        if name == "priority":
            priority_value(value)
        out[name] = value
    return out


def headers_size(headers: Headers) -> int:
    """What checked ``headers`` count towards a message's size: each key and string value
    in UTF-8 bytes, each other value 8 bytes."""
    size = 0
    for key, value in headers.items():
        size += len(key.encode()) + (len(value.encode()) if isinstance(value, str) else _NUMBER_BYTES)
    return size


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise errors.invalid(f"header key must be a string, not {type(key).__name__}", key=repr(key))
    name = str.__str__(key)  # a plain str, whatever subclass was given
    if not name or name.strip() != name:
        raise errors.invalid(f"malformed header key {name!r}", key=name)
    size = _utf8_size(name, f"header key {name!r}", name)
    if size > MAX_KEY_BYTES:
        raise errors.invalid(
            f"header key {name[:40]!r}... is {size} bytes long; at most {MAX_KEY_BYTES} bytes (UTF-8)",
            key=name,
        )
    if name == _RESERVED or name.startswith("x_"):
        raise errors.invalid(f"header {name!r} is reserved for the runtime", key=name)
    return name


def _check_value(key: str, value: object) -> None:
    if value is None:
        raise errors.invalid(f"header {key!r} has no value (None)", key=key)
    if value.__class__ not in (str, int, float, bool):
        raise errors.invalid(
            f"header {key!r} must be str, int, float or bool, not {type(value).__name__}", key=key
        )
    if isinstance(value, bool):
        return
    if isinstance(value, int) and not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise errors.invalid(
            f"header {key!r} is outside the signed 64-bit integer range (-2**63 .. 2**63-1): {value}",
            key=key,
        )
    if isinstance(value, float) and math.isnan(value):  # NaN never round-trips equal
        raise errors.invalid(f"header {key!r} is NaN", key=key)
    if isinstance(value, str):
        _utf8_size(value, f"header {key!r}", key)


def _utf8_size(text: str, what: str, key: str) -> int:
    try:
        return len(text.encode())
    except UnicodeEncodeError as exc:
        raise errors.invalid(
            f"{what} is not valid Unicode text: {exc.reason} at index {exc.start}", key=key
        ) from None


def priority_value(value: object) -> int:
    """The numeric priority (0..255) of a ``priority`` header value, or INVALID."""
    if isinstance(value, str):
        if value in PRIORITY_NAMES:
            return PRIORITY_NAMES[value]
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255:
        return value
    raise errors.invalid(
        f"header 'priority' must be an integer 0..255 or one of low, normal, high; got {value!r}",
        key="priority",
    )
