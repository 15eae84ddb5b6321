"""What the command prints and returns: exit codes, tables, JSON, errors, log lines."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from conveyor import errors
from conveyor.logs import ContextFilter, JsonFormatter
from conveyor.registry.problems import Problem

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "USAGE_KINDS",
    "CommandFailed",
    "ConsoleFormatter",
    "UsageError",
    "cell",
    "configure_logging",
    "err",
    "error_lines",
    "format_problem",
    "format_table",
    "json_text",
    "out",
    "plural",
    "print_json",
]

EXIT_OK = 0

EXIT_FAILURE = 1

EXIT_USAGE = 2

EXIT_INTERRUPTED = 130

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: whoever read stdout closed it early (`| head`)

USAGE_KINDS = frozenset({errors.INVALID, errors.NOT_FOUND})


class UsageError(Exception):
    """A bad command line or a missing configuration file: one line, exit 2."""


class CommandFailed(Exception):
    """A runtime failure that is not an ``errors.Error``: one line, exit 1."""


def out(text: str = "") -> None:
    print(text, file=sys.stdout)


def err(text: str) -> None:
    print(text, file=sys.stderr)


def _json_default(value: Any) -> Any:
    """Make function results JSON-printable: bytes as text, sets and tuples as lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, errors.Error):
        return value.to_dict()
    return str(value)


def json_text(value: Any, indent: int | None = 2) -> str:
    """``value`` as JSON text (bytes as text, sets and tuples as lists, errors as dicts)."""
    return json.dumps(value, indent=indent, ensure_ascii=False, default=_json_default)


def print_json(value: Any) -> None:
    out(json_text(value))


def cell(value: Any) -> str:
    return "-" if value is None else str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An aligned text table with a header row; ``None`` cells show as ``-``."""
    cells = [list(headers), *([cell(v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)
    return "\n".join(lines)


def plural(count: int, noun: str) -> str:
    if count == 1:
        return f"1 {noun}"
    return f"{count} {noun[:-1]}ies" if noun.endswith("y") else f"{count} {noun}s"


def format_problem(problem: Any) -> str:
    """One configuration problem as ``file: entry E: field F: message (line N)``."""
    return str(Problem.from_dict(problem)) if isinstance(problem, Mapping) else str(problem)


def error_lines(exc: errors.Error) -> list[str]:
    """The summary line of an error, then one indented line per problem (if any)."""
    lines = exc.message.splitlines() or [""]
    problems = exc.details.get("problems")
    if isinstance(problems, list) and problems:
        rest = [format_problem(p) for p in problems]
    else:
        rest = [line.strip() for line in lines[1:] if line.strip()]
    return [f"conveyor: {exc.kind}: {lines[0]}", *(f"  {line}" for line in rest)]


_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


def _field_text(value: Any) -> str:
    text = str(value)
    if not text or any(ch.isspace() or ch in "\"'=" for ch in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class ConsoleFormatter(logging.Formatter):
    """``time level logger: message [key=value ...]`` with the record's extra fields."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S"
        )

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        extra = {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS and not k.startswith("_")}
        if not extra:
            return text
        return text + " [" + " ".join(f"{k}={_field_text(v)}" for k, v in extra.items()) + "]"


class _CliHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler installed by :func:`configure_logging` (replaced on each call)."""


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr at ``level``: through :class:`ConsoleFormatter` (``text``) or one JSON
    object per line (``json``), each record with its delivery context (conveyor.logs)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _CliHandler)]:
        root.removeHandler(handler)
    handler = _CliHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else ConsoleFormatter())
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(level)
