"""Handlers for tests/test_handler_processes.py, importable by the spawned children.

``build`` is the factory a child calls once; the handler it returns does what its
payload says: ``(op, *args)``. The other factories fail or hang on purpose.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from conveyor import errors

# Set by the test in the parent; a child never sees the parent's value.
marker: ContextVar[str] = ContextVar("marker", default="unset")


class Unpicklable(Exception):
    """Carries a lock: pickling it fails."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.lock = threading.Lock()


class TwoArguments(Exception):
    """Pickles, but unpickling calls ``TwoArguments(text)`` and fails."""

    def __init__(self, text: str, code: int) -> None:
        super().__init__(text)
        self.code = code


def handle(payload: Any) -> Any:
    op, *args = payload
    if op == "echo":
        return args[0]
    if op == "pid":
        return os.getpid()
    if op == "error":
        kind, message, retryable, details = args
        raise errors.Error(kind, message, retryable=retryable, details=details)
    if op == "value_error":
        raise ValueError(args[0])
    if op == "unpicklable_result":
        return threading.Lock()
    if op == "unpicklable_exception":
        raise Unpicklable("has a lock")
    if op == "two_arguments":
        raise TwoArguments("needs two", 2)
    if op == "system_exit":
        raise SystemExit(3)
    if op == "spin":
        while True:
            pass
    if op == "sleep":
        time.sleep(args[0])
        return os.getpid()
    if op == "hold":  # (pid, start, end) on the system-wide monotonic clock
        start = time.monotonic()
        time.sleep(args[0])
        return os.getpid(), start, time.monotonic()
    if op == "exit":
        os._exit(args[0])
    if op == "segfault":
        ctypes.string_at(0)
    if op == "marker":
        return marker.get()
    if op == "current_message":
        from conveyor import queue

        return queue.message()
    raise AssertionError(f"unknown op {op!r}")


def build() -> Callable[[Any], Any]:
    return handle


def failing_until(log: str, ready_file: str) -> Callable[[Any], Any]:
    """Fails like an app that cannot be imported until ``ready_file`` exists; logs each try."""
    with open(log, "a") as f:
        f.write(f"{time.monotonic()}\n")
    if not Path(ready_file).exists():
        raise ImportError("No module named 'missing_app'")
    return handle


def hanging() -> Callable[[Any], Any]:
    time.sleep(1000)
    return handle
