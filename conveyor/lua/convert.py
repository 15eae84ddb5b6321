"""Converting values between Python (JSON-compatible data) and Lua 5.4.

Python → Lua: ``None`` → nil, ``bool`` → boolean, ``int`` → integer (64-bit; larger
is INVALID), ``float`` → float, ``str`` → string (UTF-8), ``bytes`` → string as is,
``dict`` (string keys) → table, ``list``/``tuple`` → table with keys 1..n. An empty
list becomes a table marked as an array, so that it converts back to ``[]``.

Lua → Python: nil → ``None``, boolean → ``bool``, integer → ``int``, float → ``float``
(NaN and infinities are INVALID), string → ``str`` (invalid UTF-8 is INVALID), table →
``list`` when its keys are the integers 1..n (holes allowed up to the cjson rule: the
largest key is at most 10 or at most twice the number of keys; holes become
``None``), otherwise ``dict`` (integer keys become decimal strings). An empty table is
``{}`` unless it came from a Python list. A conveyor error object becomes
``{"kind", "message", "retryable"}``. Functions, coroutines, userdata and Message
objects cannot be converted (INVALID) — unless ``lenient``, where they become their
description (used for log fields, which must never make logging fail).

The runtime is created with ``encoding=None``: every Lua string reaches Python as
``bytes`` and every Python ``str`` must be encoded here, so decoding errors are ours to
report instead of surfacing as stray exceptions inside Lua.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lupa.lua54 as lupa

from conveyor import errors

__all__ = ["MAX_DEPTH", "Converter"]

MAX_DEPTH = 200  # nesting limit both ways; also what stops a self-referencing table
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
_SCALARS = (bool, int, float)


class _Bad(Exception):
    """A conversion failure; ``path`` is filled in while it propagates outwards."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.path: list[str] = []


def _where(path: list[str]) -> str:
    return "".join(reversed(path))


def _key_text(key: Any) -> str:
    return f"[{key}]" if isinstance(key, int) else f".{key}"


def _lua_kind(value: Any) -> str:
    """Lua's name for the type of a value lupa handed over (it wraps coroutines as functions)."""
    name = type(value).__name__
    if "Coroutine" in name or "Thread" in name:
        return "thread"
    return str(lupa.lua_type(value) or "host")


class Converter:
    """Converts for one Lua state (tables are created in, and read from, that state)."""

    def __init__(
        self,
        table_from: Callable[..., Any],
        new_array: Callable[[], Any],
        meta_kind: Callable[[Any], Any],
    ) -> None:
        self._table_from = table_from
        self._new_array = new_array
        self._meta_kind = meta_kind

    # -- Python → Lua ----------------------------------------------------------------------

    def to_lua(self, value: Any, what: str = "value") -> Any:
        """``value`` as a Lua value; INVALID naming ``what`` and the path when impossible."""
        try:
            return self._to_lua(value, 0)
        except _Bad as bad:
            raise errors.invalid(f"{what}{_where(bad.path)}: {bad.problem}") from None

    def _to_lua(self, value: Any, depth: int) -> Any:
        if value is None or isinstance(value, bool | float):
            return value
        if isinstance(value, int):
            if not _INT_MIN <= value <= _INT_MAX:
                raise _Bad(f"integer {value} does not fit Lua's 64-bit integers")
            return value
        if isinstance(value, str):
            return value.encode()
        if isinstance(value, bytes | bytearray):
            return bytes(value)
        if depth >= MAX_DEPTH:
            raise _Bad(f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            return self._table_from(self._items_to_lua(value, depth + 1))
        if isinstance(value, list | tuple):
            if not value:
                return self._new_array()
            return self._table_from([self._child(i + 1, v, depth + 1) for i, v in enumerate(value)])
        raise _Bad(f"a Python {type(value).__name__} has no Lua form")

    def _items_to_lua(self, value: dict[Any, Any], depth: int) -> dict[bytes, Any]:
        out: dict[bytes, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _Bad(f"map keys must be strings, got {type(key).__name__} {key!r}")
            out[key.encode()] = self._child(key, item, depth)
        return out

    def _child(self, key: Any, value: Any, depth: int) -> Any:
        try:
            return self._to_lua(value, depth)
        except _Bad as bad:
            bad.path.append(_key_text(key))
            raise

    # -- Lua → Python ----------------------------------------------------------------------

    def from_lua(self, value: Any, what: str = "value", *, lenient: bool = False) -> Any:
        """``value`` as JSON-compatible Python data; INVALID naming ``what`` and the path."""
        try:
            return self._from_lua(value, 0, lenient)
        except _Bad as bad:
            raise errors.invalid(f"{what}{_where(bad.path)}: {bad.problem}") from None

    def _from_lua(self, value: Any, depth: int, lenient: bool) -> Any:
        if value is None or isinstance(value, bool | int):
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                return self._unconvertible(f"{value} is not a finite number", value, lenient)
            return value
        if isinstance(value, bytes):
            try:
                return value.decode()
            except UnicodeDecodeError:
                return self._unconvertible("string is not valid UTF-8", value, lenient)
        kind = _lua_kind(value)
        if kind == "table":
            if depth >= MAX_DEPTH:
                raise _Bad(f"nested deeper than {MAX_DEPTH} levels (a table that contains itself?)")
            return self._table(value, depth + 1, lenient)
        return self._unconvertible(f"a Lua {kind} value cannot be converted", value, lenient)

    @staticmethod
    def _unconvertible(problem: str, value: Any, lenient: bool) -> Any:
        if not lenient:
            raise _Bad(problem)
        if isinstance(value, bytes):
            return value.decode(errors="replace")
        return str(value)

    def _table(self, table: Any, depth: int, lenient: bool) -> Any:
        items = list(table.items())
        if not items:
            return self._empty_table(table, lenient)
        keys = [key for key, _ in items]
        if all(type(key) is int and key >= 1 for key in keys):
            largest = max(keys)
            if largest <= 10 or largest <= 2 * len(keys):
                return self._array(items, largest, depth, lenient)
        return self._map(items, depth, lenient)

    def _empty_table(self, table: Any, lenient: bool) -> Any:
        kind, *fields = self._meta_kind(table)
        if kind == b"array":
            return []
        if kind == b"error":
            error_kind, message, retryable = fields
            return {"kind": error_kind.decode(), "message": message.decode(), "retryable": retryable}
        if kind == b"message":
            return self._unconvertible(
                "a Message cannot be converted (use msg:id(), msg:headers())", "Message", lenient
            )
        return {}

    def _array(self, items: list[tuple[Any, Any]], length: int, depth: int, lenient: bool) -> list[Any]:
        out: list[Any] = [None] * length
        for key, item in items:
            out[key - 1] = self._from_child(key, item, depth, lenient)
        return out

    def _map(self, items: list[tuple[Any, Any]], depth: int, lenient: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, item in items:
            name = self._map_key(key, lenient)
            if name in out:
                raise _Bad(f"keys {name!r} and {name} collide (a string and an integer key)")
            out[name] = self._from_child(name, item, depth, lenient)
        return out

    def _map_key(self, key: Any, lenient: bool) -> str:
        if isinstance(key, bytes):
            try:
                return key.decode()
            except UnicodeDecodeError:
                if lenient:
                    return key.decode(errors="replace")
                raise _Bad(f"key {key!r} is not valid UTF-8") from None
        if type(key) is int:
            return str(key)
        if lenient:
            return str(key)
        kind = "float" if isinstance(key, float) else "boolean" if isinstance(key, bool) else _lua_kind(key)
        raise _Bad(f"table keys must be strings or integers, not a {kind} ({key!r})")

    def _from_child(self, key: Any, value: Any, depth: int, lenient: bool) -> Any:
        try:
            return self._from_lua(value, depth, lenient)
        except _Bad as bad:
            bad.path.append(_key_text(key))
            raise
