"""The queue API: publish, consume context, info.

Every function acts on the *current app*'s queues (see :mod:`conveyor.queue.context`
and :mod:`conveyor.queue.runtime`). The blocking forms may be called from any thread
that is not running an event loop; from async code use the ``a``-prefixed forms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from conveyor._loop import forbid_running_loop, run_blocking
from conveyor.queue.context import current_message, current_runtime
from conveyor.queue.message import Message
from conveyor.queue.runtime import as_batch

__all__ = [
    "Message",
    "ainfo",
    "apublish",
    "apublish_many",
    "info",
    "message",
    "publish",
    "publish_many",
]


def publish(queue_id: str, data: Any, headers: Mapping[str, Any] | None = None) -> bool:
    """Publish one message; returns ``True`` once the driver has stored it."""
    forbid_running_loop("queue.apublish")
    runtime = current_runtime()
    return run_blocking(runtime.loop, runtime.apublish(queue_id, data, headers))


async def apublish(queue_id: str, data: Any, headers: Mapping[str, Any] | None = None) -> bool:
    """Async form of :func:`publish`."""
    return await current_runtime().apublish(queue_id, data, headers)


def publish_many(queue_id: str, items: Iterable[Any], headers: Mapping[str, Any] | None = None) -> int:
    """Publish a batch (items are ``data`` or ``(data, headers)``); returns how many were stored."""
    forbid_running_loop("queue.apublish_many")
    runtime = current_runtime()
    return run_blocking(runtime.loop, runtime.apublish_many(queue_id, as_batch(items), headers))


async def apublish_many(queue_id: str, items: Iterable[Any], headers: Mapping[str, Any] | None = None) -> int:
    """Async form of :func:`publish_many`."""
    return await current_runtime().apublish_many(queue_id, as_batch(items), headers)


def info(queue_id: str) -> dict[str, Any]:
    """Queue statistics: ``message_count``, ``consumer_count``, ``ready``, ``in_flight``, ..."""
    forbid_running_loop("queue.ainfo")
    runtime = current_runtime()
    return run_blocking(runtime.loop, runtime.ainfo(queue_id))


async def ainfo(queue_id: str) -> dict[str, Any]:
    """Async form of :func:`info`."""
    return await current_runtime().ainfo(queue_id)


def message() -> Message:
    """The message being handled; INVALID "no delivery context" outside a handler."""
    return current_message()
