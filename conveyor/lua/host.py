"""The Python side of the Lua API: what ``queue``, ``Message``, ``logger`` and ``require`` call.

Each callable is handed to the prelude (``conveyor/lua/prelude.py``), which keeps it in
an upvalue the sandbox cannot reach. Contract: a callable never raises into Lua — a
raised Python exception would hand a Python object to Lua code. It returns
``(True, value)`` or ``(False, kind, message, retryable)``, which the prelude turns into
``value`` or ``nil, err``. Strings cross as ``bytes`` (the runtime has no encoding).

Everything runs in the thread that runs the Lua code, inside the handler's
contextvars: the current app, the delivery, the consumer's security context.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conveyor import errors
from conveyor import queue as api
from conveyor.lua.convert import Converter

__all__ = ["Host", "ModuleFiles"]

Result = tuple[Any, ...]

_LEVELS = {b"debug": logging.DEBUG, b"info": logging.INFO, b"warn": logging.WARNING, b"error": logging.ERROR}
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
# LogRecord attributes: a log field with one of these names is stored as ``lua_<name>``.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _failure(exc: errors.Error) -> Result:
    return (False, exc.kind.encode(), exc.message.encode(), exc.retry_hint)


def _guarded(method: Callable[..., Result]) -> Callable[..., Result]:
    """Turn every exception of ``method`` into a ``(False, kind, message, retryable)`` result."""

    @functools.wraps(method)
    def guarded(*args: Any) -> Result:
        try:
            return method(*args)
        except errors.Error as exc:
            return _failure(exc)
        except Exception as exc:
            return _failure(errors.Error(errors.INTERNAL, f"{type(exc).__name__}: {exc}"))

    return guarded


def _text(value: Any, what: str) -> str:
    """A Lua string argument as ``str``; INVALID for other types and invalid UTF-8."""
    if not isinstance(value, bytes):
        raise errors.invalid(f"{what} must be a string")
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise errors.invalid(f"{what} is not valid UTF-8") from None


class ModuleFiles:
    """Lua modules next to the declaring YAML file, read once and shared by every thread.

    ``require("a.b")`` finds ``<base>/a/b.lua`` or ``<base>/a/b/init.lua``; names are
    identifiers joined by dots, so no path can leave ``base`` (symlinks are resolved
    and checked too).
    """

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir.resolve()
        self._cache: dict[str, tuple[bytes, str]] = {}
        self._lock = threading.Lock()

    def read(self, name: str) -> tuple[bytes, str]:
        """``(source, chunkname)`` of module ``name``; NOT_FOUND / INVALID otherwise."""
        with self._lock:
            found = self._cache.get(name)
            if found is None:
                found = self._cache[name] = self._read(name)
            return found

    def _read(self, name: str) -> tuple[bytes, str]:
        if not _MODULE_NAME.fullmatch(name):
            raise errors.invalid(f"module '{name}' not found: names are identifiers joined by dots")
        relative = Path(*name.split("."))
        tried = [relative.with_suffix(".lua"), relative / "init.lua"]
        for candidate in tried:
            path = (self.base_dir / candidate).resolve()
            if path.is_file() and path.is_relative_to(self.base_dir):
                return path.read_bytes(), f"@{candidate.as_posix()}"
        searched = ", ".join(str(self.base_dir / c) for c in tried)
        raise errors.not_found(f"module '{name}' not found (searched {searched})")


class Host:
    """The callables one Lua state uses; ``converter`` is set once the state exists."""

    def __init__(self, modules: ModuleFiles, log: logging.Logger) -> None:
        self.modules = modules
        self.log = log
        self.converter: Converter | None = None

    @property
    def _convert(self) -> Converter:
        assert self.converter is not None, "Host used before its Lua state was built"
        return self.converter

    def callables(self) -> tuple[Callable[..., Any], ...]:
        """In the order the prelude's chunk arguments expect them."""
        return (self.publish, self.message, self.info, self.msg, self.write_log, self.module)

    @_guarded
    def publish(self, queue_id: Any, data: Any, headers: Any) -> Result:
        qid = _text(queue_id, "queue ID")
        payload = self._convert.from_lua(data, "data")
        head = None if headers is None else self._convert.from_lua(headers, "headers")
        if head is not None and not isinstance(head, dict):
            raise errors.invalid("headers must be a table of key = value pairs")
        api.publish(qid, payload, head)
        return (True, True)  # the seed's publish returns a boolean, not the ID

    @_guarded
    def message(self) -> Result:
        return (True, api.message())

    @_guarded
    def info(self, queue_id: Any) -> Result:
        stats = api.info(_text(queue_id, "queue ID"))
        return (True, self._convert.to_lua(stats, "queue info"))

    @_guarded
    def msg(self, handle: api.Message, op: bytes, key: Any) -> Result:
        if op == b"id":
            return (True, handle.id.encode())
        if op == b"header":
            return (True, self._convert.to_lua(handle.header(_text(key, "header key")), "header"))
        if op == b"headers":
            return (True, self._convert.to_lua(handle.headers, "headers"))
        if op == b"attempts":
            return (True, handle.attempts)
        if op == b"body":
            return (True, self._convert.to_lua(handle.body, "body"))
        if op == b"ack":
            handle.ack()
            return (True, True)
        if op == b"nack":
            handle.nack()
            return (True, True)
        raise errors.invalid(f"unknown Message method {op!r}")

    @_guarded
    def module(self, name: Any) -> Result:
        source, chunkname = self.modules.read(_text(name, "module name"))
        return (True, source, chunkname.encode())

    def write_log(self, level: bytes, text: bytes, fields: Any) -> None:
        """``logger:<level>(msg, fields)``: never fails (bad fields are logged as text)."""
        number = _LEVELS.get(level, logging.INFO)
        if not self.log.isEnabledFor(number):
            return
        try:
            extra = self._extra(fields)
        except Exception as exc:  # logging must not break the handler
            extra = {"lua_fields_error": str(exc)}
        self.log.log(number, text.decode(errors="replace"), extra=extra)

    def _extra(self, fields: Any) -> dict[str, Any]:
        if fields is None:
            return {}
        data = self._convert.from_lua(fields, "log fields", lenient=True)
        if not isinstance(data, dict):
            return {"lua_fields": data}
        return {(f"lua_{k}" if k in _RECORD_FIELDS or k.startswith("_") else k): v for k, v in data.items()}
