"""Which app and which delivery the calling code belongs to (contextvars).

The rules (SPEC §2): inside a handler, the app running it; elsewhere the innermost app
entered with ``with``/``async with`` in this thread or task; failing that, the one app
started in this process. The delivery context (the current ``Message``) lives in a
ContextVar too, so it follows the handler into code it calls, in threads and tasks.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar
from typing import TYPE_CHECKING

from conveyor import errors

if TYPE_CHECKING:
    from conveyor.app import App
    from conveyor.queue.message import Message

__all__ = [
    "current_app",
    "current_app_or_none",
    "current_message",
    "deadline_var",
    "entered_app",
    "message_var",
    "register_started",
    "unregister_started",
]

entered_app: ContextVar[App | None] = ContextVar("conveyor_app", default=None)
message_var: ContextVar[Message | None] = ContextVar("conveyor_message", default=None)
# When the running handler must finish, in ``time.monotonic()`` seconds (None: no
# timeout). Handlers that cannot be cancelled from outside (a sync or Lua handler in a
# thread) may poll it to stop cooperatively.
deadline_var: ContextVar[float | None] = ContextVar("conveyor_deadline", default=None)

_started: list[App] = []
_started_lock = threading.Lock()


def register_started(app: App) -> None:
    with _started_lock:
        if app not in _started:
            _started.append(app)


def unregister_started(app: App) -> None:
    with _started_lock:
        if app in _started:
            _started.remove(app)


def current_app_or_none() -> App | None:
    app = entered_app.get()
    if app is not None and app.running:
        return app
    started = _started
    if len(started) == 1:
        return started[0]
    return None


def current_app() -> App:
    app = current_app_or_none()
    if app is None:
        count = len(_started)
        why = "no app is started" if count == 0 else f"{count} apps are started and none is entered"
        raise errors.invalid(
            f"no queue runtime: {why}; start one with `with conveyor.load(...)` or app.start()"
        )
    return app


def current_message() -> Message:
    msg = message_var.get()
    if msg is None:
        raise errors.no_delivery_context()
    return msg
