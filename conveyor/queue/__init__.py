"""The queue API: publish, consume context, info, and tooling (browse, replay, purge).

Every function acts on the *current app*'s queues (see :mod:`conveyor.queue.context`
and :mod:`conveyor.queue.runtime`). The blocking forms may be called from any thread
that is not running an event loop; from async code use the ``a``-prefixed forms.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any, Literal, overload

from conveyor._loop import forbid_running_loop, run_blocking
from conveyor.queue.context import current_message, current_runtime
from conveyor.queue.message import Message
from conveyor.queue.runtime import as_batch
from conveyor.queue.tools import DeadLetter, Progress, QueuedMessage

__all__ = [
    "DeadLetter",
    "Message",
    "QueuedMessage",
    "abrowse",
    "ainfo",
    "apublish",
    "apublish_many",
    "apurge",
    "areplay",
    "browse",
    "info",
    "message",
    "publish",
    "publish_many",
    "purge",
    "replay",
]


def publish(queue_id: str, data: Any, headers: Mapping[str, Any] | None = None) -> str:
    """Publish one message; returns its ID (a non-empty string) once the driver has stored it."""
    forbid_running_loop("queue.apublish")
    runtime = current_runtime()
    return run_blocking(runtime.loop, runtime.apublish(queue_id, data, headers))


async def apublish(queue_id: str, data: Any, headers: Mapping[str, Any] | None = None) -> str:
    """Async form of :func:`publish`."""
    return await current_runtime().apublish(queue_id, data, headers)


@overload
def publish_many(
    queue_id: str,
    items: Iterable[Any],
    headers: Mapping[str, Any] | None = None,
    *,
    return_ids: Literal[False] = False,
) -> int: ...
@overload
def publish_many(
    queue_id: str,
    items: Iterable[Any],
    headers: Mapping[str, Any] | None = None,
    *,
    return_ids: Literal[True],
) -> list[str]: ...
def publish_many(
    queue_id: str, items: Iterable[Any], headers: Mapping[str, Any] | None = None, *, return_ids: bool = False
) -> int | list[str]:
    """Publish a batch (items are ``data`` or ``(data, headers)``); returns how many were
    stored, or with ``return_ids=True`` the IDs of the messages, in order."""
    forbid_running_loop("queue.apublish_many")
    runtime = current_runtime()
    ids = run_blocking(runtime.loop, runtime.apublish_many(queue_id, as_batch(items), headers))
    return ids if return_ids else len(ids)


@overload
async def apublish_many(
    queue_id: str,
    items: Iterable[Any],
    headers: Mapping[str, Any] | None = None,
    *,
    return_ids: Literal[False] = False,
) -> int: ...
@overload
async def apublish_many(
    queue_id: str,
    items: Iterable[Any],
    headers: Mapping[str, Any] | None = None,
    *,
    return_ids: Literal[True],
) -> list[str]: ...
async def apublish_many(
    queue_id: str, items: Iterable[Any], headers: Mapping[str, Any] | None = None, *, return_ids: bool = False
) -> int | list[str]:
    """Async form of :func:`publish_many`."""
    ids = await current_runtime().apublish_many(queue_id, as_batch(items), headers)
    return ids if return_ids else len(ids)


def browse(queue_id: str, limit: int = 100, after: str | None = None) -> list[QueuedMessage]:
    """Up to ``limit`` messages of a queue, in delivery order, without taking them.

    ``after``: the ID of the last message of the previous page. Security action
    ``queue.browse`` on the queue. See :class:`QueuedMessage` for what each holds.
    """
    forbid_running_loop("queue.abrowse")
    runtime = current_runtime()
    return run_blocking(runtime.loop, runtime.abrowse(queue_id, limit, after))


async def abrowse(queue_id: str, limit: int = 100, after: str | None = None) -> list[QueuedMessage]:
    """Async form of :func:`browse`."""
    return await current_runtime().abrowse(queue_id, limit, after)


def replay(
    dlq_id: str, ids: Collection[str] | None = None, to: str | None = None, progress: Progress | None = None
) -> int:
    """Move dead letters back: to their original queue (``x_original_queue``) or ``to``.

    All waiting messages (``ids=None``) or those of ``ids``; the dead-letter headers
    are removed and attempts start over. Returns how many moved. Security actions
    ``queue.replay`` on ``dlq_id`` and ``queue.publish`` on each target queue.
    """
    forbid_running_loop("queue.areplay")
    runtime = current_runtime()
    return run_blocking(runtime.loop, runtime.areplay(dlq_id, ids, to, progress))


async def areplay(
    dlq_id: str, ids: Collection[str] | None = None, to: str | None = None, progress: Progress | None = None
) -> int:
    """Async form of :func:`replay`."""
    return await current_runtime().areplay(dlq_id, ids, to, progress)


def purge(queue_id: str, ids: Collection[str] | None = None, progress: Progress | None = None) -> int:
    """Remove a queue's waiting messages (all, or those of ``ids``); returns how many.

    Messages a consumer holds are left alone. Security action ``queue.purge``.
    """
    forbid_running_loop("queue.apurge")
    runtime = current_runtime()
    return run_blocking(runtime.loop, runtime.apurge(queue_id, ids, progress))


async def apurge(queue_id: str, ids: Collection[str] | None = None, progress: Progress | None = None) -> int:
    """Async form of :func:`purge`."""
    return await current_runtime().apurge(queue_id, ids, progress)


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
