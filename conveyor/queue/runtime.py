"""``Runtime``: the queues of one app while it runs, and publishing to them.

An ``App`` owns one runtime. Once the app has opened its drivers and declared its
queues it :meth:`~Runtime.attach`\\ es them here, and from then on everything the
queue API does goes through this object: ``conveyor.queue.publish`` finds the
current runtime (:mod:`conveyor.queue.context`) and calls :meth:`Runtime.apublish`.
The runtime checks the ID, the data, the headers and the permission (with the
policy engine it was given), encodes, and hands the batch to the driver.

Everything runs on the app's event loop. Called from another loop (another
thread's), a coroutine is handed over to the app's loop and awaited there.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import os
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from conveyor import errors
from conveyor._loop import forbid_running_loop, run_blocking
from conveyor.drivers.base import Outgoing
from conveyor.queue import context as qctx
from conveyor.queue.bound import BoundQueue
from conveyor.queue.codecs import check_data
from conveyor.queue.headers import check_headers
from conveyor.registry.ids import canonical_id
from conveyor.security.context import SecurityContext, activate
from conveyor.security.context import current as current_security
from conveyor.security.policy import PolicyEngine

__all__ = ["Runtime"]

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


class Runtime:
    """The running queues of one app: what ``conveyor.queue`` acts on."""

    def __init__(self, engine: PolicyEngine) -> None:
        self.engine = engine
        self.running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, BoundQueue] = {}

    # -- lifecycle (driven by the App) -------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop, queues: Mapping[str, BoundQueue]) -> None:
        """The app is up: its queues are declared on open drivers, on ``loop``."""
        self._loop = loop
        self._queues = dict(queues)
        self.running = True
        qctx.register_started(self)

    def detach(self) -> None:
        """The app is stopping: no queue operation may start any more."""
        self.running = False
        qctx.unregister_started(self)
        self._queues = {}
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

    async def apublish(self, queue_id: str, data: Any, headers: Mapping[str, Any] | None = None) -> bool:
        if asyncio.get_running_loop() is not self._loop:
            return await self._on_own_loop(self.apublish(queue_id, data, headers))
        qid = canonical_id(queue_id)
        check_data(data)
        checked = check_headers(headers) if headers is not None else {}
        self.engine.check_publish(current_security(), qid)
        bound = self.queue(qid)
        body = bound.codec.encode(data)
        await bound.driver.publish(bound.spec, [Outgoing(_ids.next(), body, checked)])
        return True

    async def apublish_many(
        self, queue_id: str, items: Iterable[Any], headers: Mapping[str, Any] | None = None
    ) -> int:
        if asyncio.get_running_loop() is not self._loop:
            return await self._on_own_loop(self.apublish_many(queue_id, items, headers))
        qid = canonical_id(queue_id)
        common = check_headers(headers) if headers is not None else {}
        self.engine.check_publish(current_security(), qid)
        bound = self.queue(qid)
        batch = [_outgoing(bound, index, item, common) for index, item in enumerate(items)]
        if not batch:
            raise errors.invalid("publish_many needs at least one item")
        await bound.driver.publish(bound.spec, batch)
        return len(batch)

    async def ainfo(self, queue_id: str) -> dict[str, Any]:
        """The driver's counts for ``queue_id``; its errors pass through unchanged."""
        if asyncio.get_running_loop() is not self._loop:
            return await self._on_own_loop(self.ainfo(queue_id))
        bound = self.queue(canonical_id(queue_id))
        return await bound.driver.info(bound.spec)

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


def _outgoing(bound: BoundQueue, index: int, item: Any, common: dict[str, Any]) -> Outgoing:
    data, extra = item if isinstance(item, tuple) and len(item) == 2 else (item, None)
    try:
        check_data(data)
        headers = {**common, **check_headers(extra)} if extra is not None else dict(common)
        body = bound.codec.encode(data)
    except errors.Error as exc:
        raise errors.Error(
            exc.kind,
            f"item {index}: {exc.message}",
            retryable=exc.retryable,
            details={**exc.details, "index": index},
        ) from None
    return Outgoing(_ids.next(), body, headers)
