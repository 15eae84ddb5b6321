"""Message header rules shared by every driver.

Keys are non-empty strings; values are str, int, float or bool and keep their type.
``attempts`` and every ``x_*`` key are reserved for the runtime. ``priority`` is an
int 0..255 or one of ``low``/``normal``/``high``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from conveyor import errors
from conveyor.drivers.base import Headers

__all__ = ["PRIORITY_NAMES", "check_headers", "priority_value"]

PRIORITY_NAMES: dict[str, int] = {"low": 1, "normal": 5, "high": 9}
_RESERVED = "attempts"


def check_headers(headers: Any) -> Headers:
    """Validate publisher headers and return a private copy (``{}`` for ``None``)."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise errors.invalid(f"headers must be a mapping, not {type(headers).__name__}")
    out: Headers = {}
    for key, value in headers.items():
        _check_key(key)
        _check_value(key, value)
        if key == "priority":
            priority_value(value)
        out[key] = value
    return out


def _check_key(key: object) -> None:
    if not isinstance(key, str):
        raise errors.invalid(f"header key must be a string, not {type(key).__name__}", key=repr(key))
    if not key or key.strip() != key:
        raise errors.invalid(f"malformed header key {key!r}", key=key)
    if key == _RESERVED or key.startswith("x_"):
        raise errors.invalid(f"header {key!r} is reserved for the runtime", key=key)


def _check_value(key: str, value: object) -> None:
    if value is None:
        raise errors.invalid(f"header {key!r} has no value (None)", key=key)
    if value.__class__ not in (str, int, float, bool):
        raise errors.invalid(
            f"header {key!r} must be str, int, float or bool, not {type(value).__name__}", key=key
        )
    if isinstance(value, float) and math.isnan(value):  # NaN never round-trips equal
        raise errors.invalid(f"header {key!r} is NaN", key=key)


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
