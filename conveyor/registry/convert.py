"""Converters: a YAML value in, the typed and checked value out.

A converter is a plain callable that returns the value typed, or raises
``ValueError`` with a message meant for a person ("expected an integer, got string
'x'"); the loader turns that into a problem on the field it was reading. Driver
option records (:mod:`conveyor.registry.options`) name their fields' converters from
here, so every driver's options are checked with the same words.

Values produced by ``${VAR}`` substitution arrive as :class:`EnvStr`: environment
values are always text, so fields typed int, float or bool accept such a string when
it spells a value of their type (``concurrency: ${WORKERS:-4}``). A literal YAML
string gets no such leniency: ``concurrency: "4"`` is a type error.
"""

from __future__ import annotations

import contextlib
import enum
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from conveyor.registry import ids
from conveyor.registry.durations import parse_duration
from conveyor.registry.problems import suggest

__all__ = [
    "Converter",
    "EnvStr",
    "Marker",
    "boolean",
    "choice",
    "describe",
    "duration",
    "import_path",
    "integer",
    "mapping",
    "name",
    "number",
    "plain",
    "string",
    "strings",
]

T = TypeVar("T")
Converter = Callable[[Any], T]


class Marker(enum.Enum):
    ABSENT = "absent"  # the key is not in the mapping (or is null)
    UNRESOLVED = "unresolved"  # a ${VAR} failed; its problem is already reported


class EnvStr(str):
    """A string produced by ``${VAR}`` substitution (see the module docstring)."""

    __slots__ = ()


def describe(value: Any) -> str:
    """A value as a message shows it: ``string 'x'``, ``number 3``, ``a mapping``..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"string {str(value)!r}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {describe(value)}")
    if not value:
        raise ValueError("must not be empty")
    return str(value)  # drops the EnvStr subclass: specs hold plain str


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, EnvStr) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"expected true or false, got {describe(value)}")


def _check_range(value: float, low: float | None, high: float | None, shown: str) -> None:
    if low is not None and high is not None and not low <= value <= high:
        raise ValueError(f"must be between {low} and {high}, got {shown}")
    if low is not None and value < low:
        raise ValueError(f"must be >= {low}, got {shown}")
    if high is not None and value > high:
        raise ValueError(f"must be <= {high}, got {shown}")


def integer(low: int | None = None, high: int | None = None) -> Converter[int]:
    def convert(value: Any) -> int:
        if isinstance(value, EnvStr) and re.fullmatch(r"[+-]?\d+", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {describe(value)}")
        _check_range(value, low, high, str(value))
        return value

    return convert


def number(low: float | None = None) -> Converter[float]:
    def convert(value: Any) -> float:
        if isinstance(value, EnvStr):
            with contextlib.suppress(ValueError):  # if not a number, reported below as text
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"expected a number, got {describe(value)}")
        _check_range(float(value), low, None, repr(value))
        return float(value)

    return convert


def duration(*, positive: bool = False, maximum: float | None = None) -> Converter[float]:
    """Seconds, from a number or a string like ``500ms``, ``30s``, ``5m`` (see durations)."""

    def convert(value: Any) -> float:
        seconds = parse_duration(value)
        if positive and seconds <= 0:
            raise ValueError(f"must be greater than 0, got {value!r}")
        if maximum is not None and seconds > maximum:
            raise ValueError(f"must be at most {maximum:g}s, got {value!r}")
        return seconds

    return convert


def choice(*options: str) -> Converter[str]:
    def convert(value: Any) -> str:
        text = string(value)
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}; got {text!r}{suggest(text, options)}")
        return text

    return convert


def strings(*, single: bool = False, non_empty: bool = False) -> Converter[tuple[str, ...]]:
    """A list of non-empty strings; with ``single``, one bare string is a list of one;
    with ``non_empty``, an empty list is an error."""

    def convert(value: Any) -> tuple[str, ...]:
        if single and isinstance(value, str):
            return (string(value),)
        if not isinstance(value, list):
            raise ValueError(f"expected a list of strings, got {describe(value)}")
        if non_empty and not value:
            raise ValueError("must not be an empty list")
        result: list[str] = []
        for index, item in enumerate(value):
            if item is Marker.UNRESOLVED:
                continue
            try:
                result.append(string(item))
            except ValueError as exc:
                raise ValueError(f"item [{index}]: {exc}") from None
        return tuple(result)

    return convert


def mapping(value: Any) -> dict[str, Any]:
    """Free-form mapping data (``meta``), with plain ``str`` keys and values."""
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping, got {describe(value)}")
    return {str(k): plain(v) for k, v in value.items()}


def plain(value: Any) -> Any:
    """Free-form data (``meta``, condition values) with plain ``str`` and no markers."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    return None if isinstance(value, Marker) else value


def _is_dotted_identifier(text: str) -> bool:
    return all(part.isidentifier() for part in text.split("."))


def import_path(value: Any) -> str:
    """``package.module:callable`` (the attribute may be dotted: ``mod:Class.method``)."""
    text = string(value)
    module, colon, attribute = text.partition(":")
    if not colon or not _is_dotted_identifier(module) or not _is_dotted_identifier(attribute):
        raise ValueError(f"expected a Python import path 'package.module:callable', got {text!r}")
    return text


def name(value: Any) -> str:
    """An entry name: the part of an ID after the colon."""
    text = string(value)
    if not ids.is_valid_name(text):
        raise ValueError(f"malformed name {text!r}: letters, digits, '_', '-', '.' only")
    return text
