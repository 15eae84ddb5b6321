"""Payload codecs: how a queue turns ``data`` into bytes and back.

``json/plain`` (default) carries dict, list, str, int, float and bool;
``msgpack/plain`` carries the same plus bytes; ``raw`` carries str or bytes as-is and
always delivers bytes.

Structured data (``json/plain``, ``msgpack/plain``) may nest at most
:data:`MAX_DEPTH` levels: ``[[1]]`` is two levels. Deeper data is INVALID when it is
published and undecodable (a :class:`DecodeError`) when a stored body holds it, so
that neither side ever depends on how deep the Python stack happens to be.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterable, Iterator
from itertools import chain, compress
from operator import not_
from typing import Any, ClassVar, Final

import msgpack

from conveyor import errors

__all__ = ["CODECS", "MAX_DEPTH", "Codec", "DecodeError", "check_data", "get_codec", "too_deep"]

MAX_DEPTH: Final = 200  # the nesting limit of structured payloads (the Lua conversion's too)

# Types that hold no other values: the depth walk skips them without a Python-level test.
_LEAVES: Final = frozenset({str, int, float, bool, type(None), bytes, bytearray})
_END: Final = object()
_TOO_DEEP: Final = f"nested deeper than {MAX_DEPTH} levels"


class DecodeError(Exception):
    """A stored body the queue's codec cannot read (internal; never leaves the consumer)."""


def check_data(data: Any) -> None:
    """Reject missing or empty data (None, "", b"", {}, [])."""
    if data is None:
        raise errors.invalid("message data is missing (None)")
    if data.__class__ in (str, bytes, dict, list, bytearray, tuple) and not data:
        raise errors.invalid(f"message data is empty ({data!r})")


def _nested(items: Iterable[Any]) -> Iterator[Any]:
    """The members of ``items`` that are not leaves (filtered without a Python loop)."""
    return compress(items, map(not_, map(_LEAVES.__contains__, map(type, items))))


def _inner(node: Any) -> Iterator[Any] | None:
    """The members of ``node`` that may be containers; None when there are none."""
    if isinstance(node, dict):
        if _LEAVES.issuperset(map(type, node.values())) and _LEAVES.issuperset(map(type, node)):
            return None
        return chain(_nested(node.keys()), _nested(node.values()))
    if isinstance(node, (list, tuple)):
        return None if _LEAVES.issuperset(map(type, node)) else _nested(node)
    return None


def too_deep(data: Any) -> bool:
    """Whether ``data`` nests more than :data:`MAX_DEPTH` dicts, lists or tuples.

    ``[[1]]`` is two levels. A container that holds itself is too deep. The walk uses
    no recursion and stops at the first container past the limit.
    """
    if not isinstance(data, (dict, list, tuple)):
        return False
    top = _inner(data)
    stack = [] if top is None else [top]  # stack[i] walks the members of a level-(i+1) container
    while stack:
        node = next(stack[-1], _END)
        if node is _END:
            stack.pop()
        elif isinstance(node, (dict, list, tuple)):
            if len(stack) >= MAX_DEPTH:
                return True  # node is at level len(stack) + 1
            inner = _inner(node)
            if inner is not None:
                stack.append(inner)
    return False


class Codec(abc.ABC):
    """Turns ``data`` into bytes and back; ``encode`` raises INVALID, ``decode`` DecodeError."""

    name: ClassVar[str]

    @abc.abstractmethod
    def encode(self, data: Any) -> bytes: ...

    @abc.abstractmethod
    def decode(self, body: bytes) -> Any: ...


def _containers_at_most(body: bytes, table: bytes) -> int:
    """An upper bound on the containers of an encoded body: the bytes that may open one."""
    return len(body.translate(None, table))


def _all_but(*opening: int) -> bytes:
    """The ``delete`` argument of ``bytes.translate`` that keeps only ``opening`` bytes."""
    return bytes(b for b in range(256) if b not in opening)


class _Structured(Codec):
    """A codec of nested data: the nesting limit on both ways.

    The depth walk is needed only when the encoded body may hold more than
    :data:`MAX_DEPTH` containers; counting the bytes that can open one (C speed) spares
    it to every smaller message.
    """

    _opening: ClassVar[bytes]  # translate table deleting every byte that cannot open a container

    def _check_encoded(self, data: Any, body: bytes) -> bytes:
        if _containers_at_most(body, self._opening) > MAX_DEPTH and too_deep(data):
            raise errors.invalid(f"codec {self.name} cannot encode the data: it is {_TOO_DEEP}")
        return body

    def _check_decoded(self, body: bytes, value: Any) -> Any:
        if _containers_at_most(body, self._opening) > MAX_DEPTH and too_deep(value):
            raise DecodeError(f"body is {_TOO_DEEP}")
        return value


class JsonCodec(_Structured):
    name = "json/plain"
    _opening = _all_but(ord("["), ord("{"))

    def __init__(self) -> None:
        self._encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        self._decoder = json.JSONDecoder()

    def encode(self, data: Any) -> bytes:
        if isinstance(data, (bytes, bytearray)):
            raise errors.invalid("codec json/plain cannot carry bytes; use codec msgpack/plain or raw")
        try:
            body = self._encoder.encode(data).encode()
        except (TypeError, ValueError) as exc:
            raise errors.invalid(f"codec json/plain cannot encode the data: {exc}") from None
        except RecursionError:
            raise errors.invalid(f"codec json/plain cannot encode the data: it is {_TOO_DEEP}") from None
        # A body of at most MAX_DEPTH bytes cannot open more containers: skip the count.
        return body if len(body) <= MAX_DEPTH else self._check_encoded(data, body)

    def decode(self, body: bytes) -> Any:
        try:
            value = self._decoder.decode(body.decode())
        except (UnicodeDecodeError, ValueError) as exc:
            raise DecodeError(f"body is not valid JSON: {exc}") from None
        except RecursionError:
            raise DecodeError(f"body is {_TOO_DEEP}") from None
        return value if len(body) <= MAX_DEPTH else self._check_decoded(body, value)


class MsgpackCodec(_Structured):
    name = "msgpack/plain"
    # fixmap, fixarray, array 16/32, map 16/32
    _opening = _all_but(*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF)

    def encode(self, data: Any) -> bytes:
        try:
            packed: bytes = msgpack.packb(data, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            # msgpack's own nesting limit (deeper than MAX_DEPTH) says "recursion limit exceeded"
            reason = f"it is {_TOO_DEEP}" if "recursion limit" in str(exc) else str(exc)
            raise errors.invalid(f"codec msgpack/plain cannot encode the data: {reason}") from None
        return packed if len(packed) <= MAX_DEPTH else self._check_encoded(data, packed)

    def decode(self, body: bytes) -> Any:
        try:
            try:
                value = msgpack.unpackb(body, raw=False, strict_map_key=False)
            except TypeError:  # an array as a map key (a tuple key when published): unhashable
                value = msgpack.unpackb(body, raw=False, strict_map_key=False, object_pairs_hook=_map)
        except msgpack.StackError:  # msgpack's own nesting limit, deeper than MAX_DEPTH
            raise DecodeError(f"body is {_TOO_DEEP}") from None
        except Exception as exc:  # msgpack raises several unrelated types
            raise DecodeError(f"body is not valid msgpack: {exc}") from None
        return value if len(body) <= MAX_DEPTH else self._check_decoded(body, value)


def _map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A msgpack map whose keys may be arrays: each array key becomes the tuple it was."""
    return {_key(key): value for key, value in pairs}


def _key(key: Any) -> Any:
    return tuple(_key(item) for item in key) if isinstance(key, list) else key


class RawCodec(Codec):
    name = "raw"

    def encode(self, data: Any) -> bytes:
        if isinstance(data, str):
            try:
                return data.encode()
            except UnicodeEncodeError as exc:
                raise errors.invalid(f"codec raw cannot encode the text: {exc}") from None
        if isinstance(data, (bytes, bytearray)):
            return bytes(data)
        raise errors.invalid(f"codec raw carries str or bytes, not {type(data).__name__}")

    def decode(self, body: bytes) -> Any:
        return body


CODECS: dict[str, Codec] = {c.name: c for c in (JsonCodec(), MsgpackCodec(), RawCodec())}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise errors.invalid(f"unknown codec {name!r} (known: {', '.join(sorted(CODECS))})") from None
