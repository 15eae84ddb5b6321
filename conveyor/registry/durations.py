"""Durations in configuration: numbers of seconds or strings like ``500ms``, ``5m``, ``2h30m``.

The loader converts every duration field with :func:`parse_duration` and turns its
``ValueError`` into a configuration problem; the runtime only ever sees float seconds.
"""

from __future__ import annotations

import math
import re

__all__ = ["parse_duration"]

_UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

# One "<number><unit>" part; "ms" is listed before "m" so that "500ms" is not read as
# "500m" followed by a stray "s".
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
# A bare decimal string ("30", "1.5"): environment values are always strings, so
# `timeout: ${TIMEOUT:-30}` must mean 30 seconds just like `timeout: 30`.
_PLAIN = re.compile(r"\d+(?:\.\d*)?|\.\d+")

_HINT = "expected a number of seconds or a string like 500ms, 30s, 5m, 1h or 2h30m"


def parse_duration(value: object) -> float:
    """Return ``value`` as non-negative float seconds.

    Accepted: an ``int`` or ``float`` (not ``bool``) of seconds; a string of one or
    more ``<number><unit>`` parts with units ``ms``, ``s``, ``m``, ``h`` (``"1.5s"``,
    ``"2h30m"``); a bare decimal string of seconds. Raises ``ValueError`` with a
    message meant for a person for anything else, including negative, infinite and
    NaN values.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got boolean {str(value).lower()}; {_HINT}")
    if isinstance(value, (int, float)):
        return _checked(float(value), repr(value))
    if isinstance(value, str):
        return _checked(_parse_text(value), repr(value))
    raise ValueError(f"expected a duration, got {type(value).__name__}; {_HINT}")


def _parse_text(text: str) -> float:
    if text.startswith("-"):
        raise ValueError(f"duration {text!r} is negative")
    if _PLAIN.fullmatch(text):
        return float(text)
    total = 0.0
    position = 0
    previous = math.inf  # units must go from larger to smaller, each at most once
    for match in _PART.finditer(text):
        if match.start() != position:
            break  # a gap means something that is not a part sits in between
        unit = _UNITS[match.group(2)]
        if unit >= previous:
            raise ValueError(f"invalid duration {text!r}: units must run from h to ms, each once")
        previous = unit
        total += float(match.group(1)) * unit
        position = match.end()
    if position == 0 or position != len(text):
        raise ValueError(f"invalid duration {text!r}: {_HINT}")
    return total


def _checked(seconds: float, shown: str) -> float:
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"invalid duration {shown}: must be a finite number of seconds")
    if seconds < 0:
        raise ValueError(f"duration {shown} is negative")
    return seconds
