"""``Message``: one delivery as a handler sees it.

Settlement invariants live here, in one place: a message is settled at most once
(ack, nack or the runtime's auto-settle, whichever comes first) and, once the
handler has returned, it is released — every further call raises INVALID. All state
changes happen on the app's event loop thread, so no lock is needed: the blocking
``ack()``/``nack()`` used by sync handlers hop to the loop before claiming.

A message settles through a :class:`Settler` (the consumer's settlement rules), not
through the consumer itself: this layer knows nothing of worker pools.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from conveyor import errors
from conveyor._loop import forbid_running_loop, run_blocking
from conveyor.drivers.base import Delivery, Headers, HeaderValue

__all__ = ["Message", "Settler"]


class Settler(Protocol):
    """Where a handler's ``ack()``/``nack()`` go (implemented by the consumer runtime)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop settlements run on."""

    async def ack(self, delivery: Delivery) -> None:
        """The message was processed."""

    async def nack(self, delivery: Delivery, reason: str) -> None:
        """The attempt failed: retry later, or dead-letter once attempts are exhausted."""


_OPEN = 0
_SETTLED = 1
_RELEASED = 2


class Message:
    """The message being handled: ``id``, ``header()``, ``headers``, ``body``, ``attempts``."""

    __slots__ = ("_body", "_delivery", "_settler", "_state")

    def __init__(self, settler: Settler, delivery: Delivery, body: Any, *, settled: bool = False) -> None:
        self._settler = settler
        self._delivery = delivery
        self._body = body
        self._state = _SETTLED if settled else _OPEN

    def __repr__(self) -> str:
        state = ("open", "settled", "released")[self._state]
        return f"<Message {self._delivery.id} attempts={self._delivery.attempts} {state}>"

    @property
    def id(self) -> str:
        self._check_live()
        return self._delivery.id

    @property
    def attempts(self) -> int:
        """Deliveries from the queue being consumed, this one included (1 on the first)."""
        self._check_live()
        return self._delivery.attempts

    @property
    def body(self) -> Any:
        self._check_live()
        return self._body

    @property
    def headers(self) -> Headers:
        """A copy of every header."""
        self._check_live()
        return dict(self._delivery.headers)

    def header(self, key: str) -> HeaderValue | None:
        self._check_live()
        return self._delivery.headers.get(key)

    def ack(self) -> None:
        """Settle as processed (blocking form, for sync handlers and threads)."""
        forbid_running_loop("msg.aack")
        self._check_live()
        run_blocking(self._settler.loop, self.aack())

    def nack(self) -> None:
        """Settle as failed: retried after the backoff, or dead-lettered (blocking form)."""
        forbid_running_loop("msg.anack")
        self._check_live()
        run_blocking(self._settler.loop, self.anack())

    async def aack(self) -> None:
        self._claim()
        await self._settler.ack(self._delivery)

    async def anack(self) -> None:
        self._claim()
        await self._settler.nack(self._delivery, "nacked by the handler")

    # -- runtime side ---------------------------------------------------------------

    def _check_live(self) -> None:
        if self._state == _RELEASED:
            raise errors.message_released(self._delivery.id)

    def _claim(self) -> None:
        """Take the one settlement this message allows (on the loop thread)."""
        state = self._state
        if state == _OPEN:
            self._state = _SETTLED
            return
        if state == _RELEASED:
            raise errors.message_released(self._delivery.id)
        raise errors.already_settled(self._delivery.id)

    def _try_claim(self) -> bool:
        """Claim for auto-settle; False when the handler already settled."""
        if self._state == _OPEN:
            self._state = _SETTLED
            return True
        return False

    def _release(self) -> None:
        self._state = _RELEASED
