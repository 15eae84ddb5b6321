"""Log records that say which message they are about, and one JSON object per line.

- :class:`ContextFilter` adds the delivery context to every record it sees:
  ``consumer`` and ``queue`` (inside a consumer's workers and its handlers),
  ``message_id`` and ``attempt`` (while a handler runs), ``trace_id`` and ``span_id``
  (while an OpenTelemetry span is current: the consumer span of a traced delivery,
  or any span of the caller's). Fields a record already has are kept; fields with
  no value are left out. It works for the lines a handler writes itself (async, sync
  in a thread, Lua), because each of those runs in a copy of its worker's context.
- :class:`JsonFormatter` writes one JSON object per line: ``time`` (UTC, ISO 8601),
  ``level``, ``logger``, ``message``, then every extra field of the record (the same
  ones the console format shows as ``[key=value ...]``), and ``traceback`` when the
  record carries an exception.

``conveyor run --log-format json`` uses both (docs/operations.md#logs); in your own
logging setup, add the filter to the handler that writes the records (a handler's
filters run in the thread that logs, where the context is).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from conveyor import errors
from conveyor.queue.context import message_var

__all__ = ["RECORD_FIELDS", "ContextFilter", "JsonFormatter", "consumer_fields"]

#: The fields of the consumer whose worker is running: ``{"consumer": ID, "queue": ID}``.
#: Set once in each worker's context by the app that builds the consumer.
consumer_fields: ContextVar[Mapping[str, Any] | None] = ContextVar("conveyor_log_fields", default=None)

#: Attributes every ``LogRecord`` has: anything else on a record is an extra field.
RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


class ContextFilter(logging.Filter):
    """Adds ``consumer``, ``queue``, ``message_id``, ``attempt``, ``trace_id``, ``span_id``."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        consumer = consumer_fields.get()
        if consumer is not None:
            for key, value in consumer.items():
                fields.setdefault(key, value)
        msg = message_var.get()
        if msg is not None:
            try:
                fields.setdefault("message_id", msg.id)
                fields.setdefault("attempt", msg.attempts)
            except errors.Error:  # released: the handler outlived its delivery (a timeout)
                pass
        # No span can be current unless OpenTelemetry's trace API was imported.
        otel_trace: Any = sys.modules.get("opentelemetry.trace")
        if otel_trace is not None:
            span = otel_trace.get_current_span().get_span_context()
            if span.is_valid:
                fields.setdefault("trace_id", format(span.trace_id, "032x"))
                fields.setdefault("span_id", format(span.span_id, "016x"))
        return True


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring for the fields)."""

    #: Keys of the formatter's own; an extra field with one of these names is ``extra_<name>``.
    OWN = frozenset({"time", "level", "logger", "message", "traceback", "stack"})

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, Any] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key in RECORD_FIELDS or key.startswith("_"):
                continue
            entry[f"extra_{key}" if key in self.OWN else key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["traceback"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=_json_default)
