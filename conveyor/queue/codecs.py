"""Payload codecs: how a queue turns ``data`` into bytes and back.

``json/plain`` (default) carries dict, list, str, int, float and bool;
``msgpack/plain`` carries the same plus bytes; ``raw`` carries str or bytes as-is and
always delivers bytes.
"""

from __future__ import annotations

import abc
import json
from typing import Any, ClassVar

import msgpack

from conveyor import errors

__all__ = ["CODECS", "Codec", "DecodeError", "check_data", "get_codec"]


class DecodeError(Exception):
    """A stored body the queue's codec cannot read (internal; never leaves the consumer)."""


def check_data(data: Any) -> None:
    """Reject missing or empty data (None, "", b"", {}, [])."""
    if data is None:
        raise errors.invalid("message data is missing (None)")
    if data.__class__ in (str, bytes, dict, list, bytearray, tuple) and not data:
        raise errors.invalid(f"message data is empty ({data!r})")


class Codec(abc.ABC):
    """Turns ``data`` into bytes and back; ``encode`` raises INVALID, ``decode`` DecodeError."""

    name: ClassVar[str]

    @abc.abstractmethod
    def encode(self, data: Any) -> bytes: ...

    @abc.abstractmethod
    def decode(self, body: bytes) -> Any: ...


class JsonCodec(Codec):
    name = "json/plain"

    def __init__(self) -> None:
        self._encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        self._decoder = json.JSONDecoder()

    def encode(self, data: Any) -> bytes:
        if isinstance(data, (bytes, bytearray)):
            raise errors.invalid("codec json/plain cannot carry bytes; use codec msgpack/plain or raw")
        try:
            return self._encoder.encode(data).encode()
        except (TypeError, ValueError) as exc:
            raise errors.invalid(f"codec json/plain cannot encode the data: {exc}") from None

    def decode(self, body: bytes) -> Any:
        try:
            return self._decoder.decode(body.decode())
        except (UnicodeDecodeError, ValueError) as exc:
            raise DecodeError(f"body is not valid JSON: {exc}") from None


class MsgpackCodec(Codec):
    name = "msgpack/plain"

    def encode(self, data: Any) -> bytes:
        try:
            packed: bytes = msgpack.packb(data, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise errors.invalid(f"codec msgpack/plain cannot encode the data: {exc}") from None
        return packed

    def decode(self, body: bytes) -> Any:
        try:
            return msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types
            raise DecodeError(f"body is not valid msgpack: {exc}") from None


class RawCodec(Codec):
    name = "raw"

    def encode(self, data: Any) -> bytes:
        if isinstance(data, str):
            return data.encode()
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
