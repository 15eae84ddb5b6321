"""``Runtime``: the queues of one app while it runs, and publishing to them.

An ``App`` owns one runtime. Once the app has opened its drivers and declared its
queues it :meth:`~Runtime.attach`\\ es them here, and from then on everything the
queue API does goes through this object: ``conveyor.queue.publish`` finds the
current runtime (:mod:`conveyor.queue.context`) and calls :meth:`Runtime.apublish`.
The runtime checks the ID, the data, the headers and the permission (with the
policy engine it was given), encodes, checks the message's size against the
driver's ``max_message_size``, and hands the batch to the driver.

Everything runs on the app's event loop. Called from another loop (another
thread's), a coroutine is handed over to the app's loop and awaited there.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import os
from collections.abc import Collection, Coroutine, Iterable, Mapping
from typing import Any, Protocol, TypeVar

from conveyor import errors
from conveyor._loop import forbid_running_loop, run_blocking
from conveyor.drivers.base import Headers, Outgoing
from conveyor.drivers.options import show_size
from conveyor.queue import context as qctx
from conveyor.queue import tools
from conveyor.queue.bound import BoundQueue
from conveyor.queue.codecs import check_data
from conveyor.queue.headers import check_headers, headers_size
from conveyor.registry.ids import canonical_id
from conveyor.security.context import SecurityContext, activate
from conveyor.security.context import current as current_security
from conveyor.security.policy import PolicyEngine

__all__ = ["PublishTracer", "Runtime", "as_batch"]

T = TypeVar("T")


class _Ids:
    """Message IDs: a random per-process prefix and a counter (cheap, unique, fork-safe)."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}-{next(self.counter)}"


_ids = _Ids()


class PublishTracer(Protocol):
    """What traces publishing (a producer span per call), when tracing is on.

    ``start`` runs before the messages are encoded: it may add headers (the trace
    context) to each of ``headers`` in place, and returns a handle. ``end`` gets the
    handle, the IDs of the messages (stored or not) and the error, if any.
    """

    def start(self, queue: BoundQueue, headers: list[Headers]) -> Any: ...

    def end(self, handle: Any, ids: list[str], failure: BaseException | None) -> None: ...


class Runtime:
    """The running queues of one app: what ``conveyor.queue`` acts on."""

    def __init__(self, engine: PolicyEngine) -> None:
        self.engine = engine
        self.running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, BoundQueue] = {}
        self._unavailable: dict[str, str] = {}
        self.published: dict[str, int] = {}  # queue ID -> messages stored (for metrics)
        self.tracer: PublishTracer | None = None

    # -- lifecycle (driven by the App) -------------------------------------------------

    def attach(
        self,
        loop: asyncio.AbstractEventLoop,
        queues: Mapping[str, BoundQueue],
        unavailable: Mapping[str, str] | None = None,
    ) -> None:
        """The app is up: its queues are declared on open drivers, on ``loop``.

        ``unavailable`` maps the queues of optional drivers that have not started to
        why; using one raises UNAVAILABLE (retryable) until :meth:`add` brings it.
        """
        self._loop = loop
        self._queues = dict(queues)
        self._unavailable = dict(unavailable or {})
        self.running = True
        qctx.register_started(self)

    def add(self, queues: Mapping[str, BoundQueue]) -> None:
        """Queues of a driver that started late (see ``attach``)."""
        self._queues.update(queues)
        for queue_id in queues:
            self._unavailable.pop(queue_id, None)

    def detach(self) -> None:
        """The app is stopping: no queue operation may start any more."""
        self.running = False
        qctx.unregister_started(self)
        self._queues = {}
        self._unavailable = {}
        self._loop = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise errors.invalid("app is not started")
        return self._loop

    def queue(self, queue_id: str) -> BoundQueue:
        """The bound queue ``queue_id`` (already canonical); NOT_FOUND if not declared."""
        bound = self._queues.get(queue_id)
        if bound is None:
            if not self.running:
                raise errors.invalid("app is not started")
            why = self._unavailable.get(queue_id)
            if why is not None:
                raise errors.Error(
                    errors.UNAVAILABLE, f"queue {queue_id} is unavailable: {why}", retryable=True
                )
            raise errors.not_found(f"queue {queue_id} is not declared", queue=queue_id)
        return bound

    def context(self, security: SecurityContext | None) -> contextvars.Context:
        """A fresh context in which this runtime is current and ``security`` is active.

        Consumers run each worker in one of these; ``security`` is set even when None,
        so a handler never inherits the security context of whoever started it.
        """
        ctx = contextvars.copy_context()
        ctx.run(self._enter, security)
        return ctx

    def _enter(self, security: SecurityContext | None) -> None:
        qctx.entered.set(self)
        activate(security)

    # -- publishing --------------------------------------------------------------------

    async def apublish(self, queue_id: str, data: Any, headers: Mapping[str, Any] | None = None) -> str:
        """Publish one message; its ID once the driver has stored it."""
        if asyncio.get_running_loop() is not self._loop:
            return await self._on_own_loop(self.apublish(queue_id, data, headers))
        qid = canonical_id(queue_id)
        check_data(data)
        checked = check_headers(headers) if headers is not None else {}
        self.engine.check_publish(current_security(), qid)
        bound = self.queue(qid)
        if self.tracer is not None:
            return (await self._publish_traced(bound, [(data, checked)], batch=False))[0]
        body = _encode(bound, data, checked)
        message_id = _ids.next()
        await bound.driver.publish(bound.spec, [Outgoing(message_id, body, checked)])
        self.published[qid] = self.published.get(qid, 0) + 1
        return message_id

    async def apublish_many(
        self, queue_id: str, items: Iterable[Any], headers: Mapping[str, Any] | None = None
    ) -> list[str]:
        """Publish a batch; the IDs of its messages, in order, once all are stored."""
        if asyncio.get_running_loop() is not self._loop:
            return await self._on_own_loop(self.apublish_many(queue_id, items, headers))
        items = as_batch(items)
        qid = canonical_id(queue_id)
        common = check_headers(headers) if headers is not None else {}
        self.engine.check_publish(current_security(), qid)
        bound = self.queue(qid)
        if not items:
            raise errors.invalid("publish_many needs at least one item")
        if self.tracer is not None:
            pairs = [_split(index, item, common) for index, item in enumerate(items)]
            return await self._publish_traced(bound, pairs, batch=True)
        batch = [_outgoing(bound, index, item, common) for index, item in enumerate(items)]
        await bound.driver.publish(bound.spec, batch)
        self.published[qid] = self.published.get(qid, 0) + len(batch)
        return [one.id for one in batch]

    async def _publish_traced(
        self, bound: BoundQueue, pairs: list[tuple[Any, Headers]], *, batch: bool
    ) -> list[str]:
        """Publishing with a producer span: the trace context goes into each message's headers."""
        tracer = self.tracer
        assert tracer is not None
        ids = [_ids.next() for _ in pairs]
        handle = tracer.start(bound, [headers for _, headers in pairs])
        try:
            if batch:
                out = [_encoded(bound, i, data, headers, ids[i]) for i, (data, headers) in enumerate(pairs)]
            else:
                data, headers = pairs[0]
                out = [Outgoing(ids[0], _encode(bound, data, headers), headers)]
            await bound.driver.publish(bound.spec, out)
        except BaseException as exc:
            tracer.end(handle, ids, exc)
            raise
        tracer.end(handle, ids, None)
        self.published[bound.id] = self.published.get(bound.id, 0) + len(out)
        return ids

    async def ainfo(self, queue_id: str) -> dict[str, Any]:
        """The driver's counts for ``queue_id``; its errors pass through unchanged."""
        if asyncio.get_running_loop() is not self._loop:
            return await self._on_own_loop(self.ainfo(queue_id))
        bound = self.queue(canonical_id(queue_id))
        return await bound.driver.info(bound.spec)

    # -- tooling (conveyor.queue.tools) ------------------------------------------------

    async def abrowse(
        self, queue_id: str, limit: int = 100, after: str | None = None
    ) -> list[tools.QueuedMessage]:
        if asyncio.get_running_loop() is not self._loop:
            return await self._on_own_loop(self.abrowse(queue_id, limit, after))
        return await tools.browse(self, queue_id, limit, after)

    async def areplay(
        self,
        dlq_id: str,
        ids: Collection[str] | None = None,
        to: str | None = None,
        progress: tools.Progress | None = None,
    ) -> int:
        if asyncio.get_running_loop() is not self._loop:
            return await self._on_own_loop(self.areplay(dlq_id, ids, to, progress))
        return await tools.replay(self, dlq_id, ids, to, progress)

    async def apurge(
        self, queue_id: str, ids: Collection[str] | None = None, progress: tools.Progress | None = None
    ) -> int:
        if asyncio.get_running_loop() is not self._loop:
            return await self._on_own_loop(self.apurge(queue_id, ids, progress))
        return await tools.purge(self, queue_id, ids, progress)

    # -- loops -------------------------------------------------------------------------

    async def _on_own_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the app's loop when called from another loop (thread)."""
        loop = self._loop
        if loop is None:
            coro.close()
            raise errors.invalid("app is not started")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    def blocking(self, coro: Coroutine[Any, Any, T], async_name: str) -> T:
        """Run ``coro`` on the app's loop and wait; INVALID naming ``async_name`` on a loop."""
        try:
            forbid_running_loop(async_name)
        except errors.Error:
            coro.close()
            raise
        loop = self._loop
        if loop is None:
            coro.close()
            raise errors.invalid("app is not started")
        return run_blocking(loop, coro)


def as_batch(items: object) -> list[Any]:
    """The items of a ``publish_many`` call, as a new list; INVALID for what is no batch.

    Any iterable is a batch (a list, a tuple, a generator, ...) except text, bytes and
    mappings: ``"abc"`` is one piece of data, not three, and a dict is one message.
    """
    if isinstance(items, (str, bytes, bytearray, memoryview, Mapping)):
        raise errors.invalid(
            f"publish_many takes an iterable of items (a list, a tuple, a generator), "
            f"not {type(items).__name__}: to publish one message, use publish"
        )
    try:
        iterator = iter(items)  # type: ignore[call-overload]
    except TypeError:
        raise errors.invalid(
            f"publish_many takes an iterable of items (a list, a tuple, a generator), "
            f"not {type(items).__name__}"
        ) from None
    return list(iterator)


def _encode(bound: BoundQueue, data: Any, headers: Headers) -> bytes:
    """``data`` encoded by the queue's codec, if the message fits its driver's limit."""
    limit = bound.driver.max_message_size
    if data.__class__ in (str, bytes, bytearray) and len(data) > limit:
        raise _too_large(bound, f"at least {len(data)} bytes of data", len(data), limit)  # not encoded
    body = bound.codec.encode(data)
    size = len(body)
    if size > limit:
        raise _too_large(bound, f"{size} bytes of encoded body", size, limit)
    if headers:
        size += headers_size(headers)
        if size > limit:
            raise _too_large(
                bound, f"{size} bytes (body {len(body)} + headers {size - len(body)})", size, limit
            )
    return body


def _too_large(bound: BoundQueue, what: str, size: int, limit: int) -> errors.Error:
    unit = show_size(limit)
    shown = f"{limit} bytes" + ("" if unit.endswith(("byte", "bytes")) else f" ({unit})")
    return errors.invalid(
        f"message too large for queue {bound.id}: {what}, over the max_message_size of "
        f"driver {bound.spec.driver}, {shown}; nothing was stored",
        queue=bound.id,
        size=size,
        max_message_size=limit,
    )


def _item_error(index: int, exc: errors.Error) -> errors.Error:
    return errors.Error(
        exc.kind,
        f"item {index}: {exc.message}",
        retryable=exc.retryable,
        details={**exc.details, "index": index},
    )


def _split(index: int, item: Any, common: dict[str, Any]) -> tuple[Any, Headers]:
    """One ``publish_many`` item as checked data and its headers (the common ones first)."""
    data, extra = item if isinstance(item, tuple) and len(item) == 2 else (item, None)
    try:
        check_data(data)
        headers = {**common, **check_headers(extra)} if extra is not None else dict(common)
    except errors.Error as exc:
        raise _item_error(index, exc) from None
    return data, headers


def _encoded(bound: BoundQueue, index: int, data: Any, headers: Headers, message_id: str) -> Outgoing:
    try:
        body = _encode(bound, data, headers)
    except errors.Error as exc:
        raise _item_error(index, exc) from None
    return Outgoing(message_id, body, headers)


def _outgoing(bound: BoundQueue, index: int, item: Any, common: dict[str, Any]) -> Outgoing:
    """``_split`` and ``_encoded`` in one frame: the untraced batch path, per item."""
    data, extra = item if isinstance(item, tuple) and len(item) == 2 else (item, None)
    try:
        check_data(data)
        headers = {**common, **check_headers(extra)} if extra is not None else dict(common)
        body = _encode(bound, data, headers)
    except errors.Error as exc:
        raise _item_error(index, exc) from None
    return Outgoing(_ids.next(), body, headers)
