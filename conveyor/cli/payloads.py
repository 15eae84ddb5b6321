"""What ``conveyor publish`` sends: its PAYLOAD argument, stdin or a file, as JSON or text.

PAYLOAD is JSON (strict: no ``NaN``, no ``Infinity``, no number too large for a
float); ``-`` reads one document from stdin, ``@FILE`` one from a file. ``--text``
sends the text itself as a string. ``--lines`` reads NDJSON (one document per line,
blank lines skipped) from stdin or ``@FILE``. Bad input is a :class:`UsageError`
naming where (line and column) and nothing is sent for it.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from conveyor.cli.output import UsageError

__all__ = [
    "BadLine",
    "Line",
    "Source",
    "count_lines",
    "decode_json",
    "open_lines",
    "read_payload",
    "source_of",
]

STDIN = "-"


@dataclass(frozen=True, slots=True)
class Source:
    """Where a payload comes from: the argument itself, stdin, or a file."""

    kind: str  # "argument", "stdin", "file"
    text: str  # the argument, or the file's path

    def describe(self) -> str:
        return {"argument": "PAYLOAD", "stdin": "stdin"}.get(self.kind, f"file {self.text}")


def source_of(payload: str) -> Source:
    if payload == STDIN:
        return Source("stdin", STDIN)
    if payload.startswith("@"):
        path = payload[1:]
        if not path:
            raise UsageError("@ must be followed by a file name (PAYLOAD @FILE)")
        return Source("file", path)
    return Source("argument", payload)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is too large for a float")
    return value


def decode_json(text: str, where: str, *, one_line: bool = False) -> Any:
    """``text`` as one strict JSON document; a :class:`UsageError` naming ``where`` otherwise.

    ``one_line``: ``text`` is one line of NDJSON, whose number ``where`` names already
    (the message then gives the column only).
    """
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite)
    except json.JSONDecodeError as exc:
        at = f"column {exc.colno}" if one_line else f"line {exc.lineno}, column {exc.colno}"
        raise UsageError(f"{where} is not valid JSON: {exc.msg} at {at}") from None
    except ValueError as exc:  # NaN, Infinity, 1e999
        raise UsageError(f"{where} is not valid JSON: {exc}") from None


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where} is not UTF-8 text (byte {exc.start + 1})") from None


def _read_all(source: Source) -> str:
    if source.kind == "stdin":
        return _utf8(sys.stdin.buffer.read(), "stdin")
    try:
        with open(source.text, "rb") as file:
            return _utf8(file.read(), source.describe())
    except OSError as exc:
        raise UsageError(f"cannot read {source.describe()}: {exc.strerror or exc}") from None


def _chomp(text: str) -> str:
    """Without one trailing line break (what ``echo`` and editors add)."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def read_payload(payload: str, *, text: bool) -> Any:
    """The one message of ``conveyor publish``: decoded JSON, or with ``text`` a string."""
    source = source_of(payload)
    raw = payload if source.kind == "argument" else _read_all(source)
    if text:
        return raw if source.kind == "argument" else _chomp(raw)
    if source.kind != "argument" and not raw.strip():
        raise UsageError(f"{source.describe()} is empty: nothing to publish")
    if source.kind == "argument":
        try:
            return decode_json(raw, "PAYLOAD")
        except UsageError as exc:
            raise UsageError(f"{exc} (--text sends it as a string)") from None
    return decode_json(raw, source.describe())


class BadLine(UsageError):
    """A line of ``--lines`` input that cannot be sent (``number``: its line number)."""

    def __init__(self, message: str, number: int) -> None:
        super().__init__(message)
        self.number = number


@dataclass(frozen=True, slots=True)
class Line:
    """One message of ``--lines``: its line number in the input, and its payload."""

    number: int
    data: Any


def _open_binary(source: Source) -> BinaryIO:
    if source.kind == "stdin":
        return sys.stdin.buffer
    try:
        return open(source.text, "rb")  # closed by open_lines
    except OSError as exc:
        raise UsageError(f"cannot read {source.describe()}: {exc.strerror or exc}") from None


def open_lines(source: Source, *, text: bool) -> Iterator[Line]:
    """The messages of an NDJSON input, one per non-blank line, decoded as they are read.

    A line that is not JSON (or not UTF-8) raises :class:`BadLine` when it is reached:
    what came before it has been yielded (and possibly sent) already.
    """
    if source.kind == "argument":
        raise UsageError("--lines reads stdin (-) or a file (@FILE), not a PAYLOAD argument")
    stream = _open_binary(source)
    where = source.describe()
    try:
        for number, raw in enumerate(stream, start=1):
            try:
                line = _utf8(raw, f"line {number} of {where}")
                if not line.strip():
                    continue
                data = _chomp(line) if text else decode_json(line, f"line {number} of {where}", one_line=True)
            except UsageError as exc:
                raise BadLine(str(exc), number) from None
            yield Line(number, data)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def count_lines(source: Source) -> int | None:
    """How many lines a file holds (for a progress bar); None for stdin or an unreadable file."""
    if source.kind != "file":
        return None
    try:
        with open(source.text, "rb") as file:
            return sum(1 for _ in file)
    except OSError:
        return None
