"""Which app and which delivery the calling code belongs to (contextvars).

The rules (docs/semantics.md#the-current-app): inside a handler, the app running it;
elsewhere the innermost app entered with ``with``/``async with`` in this thread or
task; failing that, the one app started in this process. What is current is an
app's :class:`~conveyor.queue.runtime.Runtime` — its running queues — so this layer
never needs the ``App`` above it. The delivery context (the current ``Message``)
lives in a ContextVar too, so it follows the handler into code it calls, in threads
and tasks.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar
from typing import TYPE_CHECKING

from conveyor import errors

if TYPE_CHECKING:
    from conveyor.queue.message import Message
    from conveyor.queue.runtime import Runtime

__all__ = [
    "current_message",
    "current_runtime",
    "current_runtime_or_none",
    "deadline_var",
    "entered",
    "message_var",
    "register_started",
    "unregister_started",
]

entered: ContextVar[Runtime | None] = ContextVar("conveyor_app", default=None)
message_var: ContextVar[Message | None] = ContextVar("conveyor_message", default=None)
# When the running handler must finish, in ``time.monotonic()`` seconds (None: no
# timeout). Handlers that cannot be cancelled from outside (a sync or Lua handler in a
# thread) may poll it to stop cooperatively.
deadline_var: ContextVar[float | None] = ContextVar("conveyor_deadline", default=None)

_started: list[Runtime] = []
_started_lock = threading.Lock()


def register_started(runtime: Runtime) -> None:
    with _started_lock:
        if runtime not in _started:
            _started.append(runtime)


def unregister_started(runtime: Runtime) -> None:
    with _started_lock:
        if runtime in _started:
            _started.remove(runtime)


def current_runtime_or_none() -> Runtime | None:
    runtime = entered.get()
    if runtime is not None and runtime.running:
        return runtime
    started = _started
    if len(started) == 1:
        return started[0]
    return None


def current_runtime() -> Runtime:
    runtime = current_runtime_or_none()
    if runtime is None:
        count = len(_started)
        why = "no app is started" if count == 0 else f"{count} apps are started and none is entered"
        raise errors.invalid(
            f"no queue runtime: {why}; start one with `with conveyor.load(...)` or app.start()"
        )
    return runtime


def current_message() -> Message:
    msg = message_var.get()
    if msg is None:
        raise errors.no_delivery_context()
    return msg
