"""Queue tooling: browse a queue, replay dead letters, purge messages.

These act on the messages *waiting* in a queue, through the driver's ``browse``,
``move`` and ``purge`` (docs/adding-a-driver.md): nothing here consumes. Each is a
security action checked like publishing: ``queue.browse``, ``queue.replay`` and
``queue.purge``, with the queue ID as the resource; a replay also needs
``queue.publish`` on every queue it puts messages back on.

A replay moves each message back to the queue it was dead-lettered from (its
``x_original_queue`` header) or to ``to``, without the dead-letter headers and with
its attempts starting over. Within one driver a message moves in one step (never on
both queues, never on neither); to a queue of another driver it is copied first and
removed after, so an interruption can leave a duplicate, never a loss.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conveyor import errors
from conveyor.drivers.base import Headers, HeaderValue, Outgoing, Stored
from conveyor.queue.codecs import DecodeError
from conveyor.registry.ids import canonical_id
from conveyor.security.context import current as current_security

if TYPE_CHECKING:
    from conveyor.queue.bound import BoundQueue
    from conveyor.queue.runtime import Runtime

__all__ = [
    "BROWSE",
    "DEAD_LETTER_HEADERS",
    "PURGE",
    "REPLAY",
    "DeadLetter",
    "Progress",
    "QueuedMessage",
    "browse",
    "purge",
    "replay",
]

BROWSE = "queue.browse"
REPLAY = "queue.replay"
PURGE = "queue.purge"

# The headers a dead-letter move adds (docs/semantics.md#retries-and-dead-letters).
DEAD_LETTER_HEADERS = ("x_original_queue", "x_dead_letter_reason", "x_dead_letter_time", "attempts")

PAGE = 500  # messages read or moved per driver call
MAX_LIMIT = 10_000  # the most one browse call returns

# progress(done, total): called after each step of a long replay or purge.
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Why and when a message was dead-lettered, and where from."""

    reason: str | None
    time: str | None
    original_queue: str | None


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A message read from a queue without taking it.

    ``body`` is decoded with the queue's codec; when that fails it is None and
    ``decode_error`` says why (``raw`` always holds the stored bytes). ``headers``
    are the message's own, without the runtime's (``attempts`` and every ``x_*``):
    the dead-letter ones are in ``dead_letter``. ``attempts``: for a dead letter, the
    attempts it had on its original queue; otherwise the deliveries from this queue so
    far.
    """

    id: str
    queue: str
    state: str
    attempts: int
    headers: dict[str, HeaderValue]
    body: Any
    raw: bytes
    decode_error: str | None
    dead_letter: DeadLetter | None

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON output (``raw`` as text, replacement characters for bad bytes)."""
        out: dict[str, Any] = {
            "id": self.id,
            "queue": self.queue,
            "state": self.state,
            "attempts": self.attempts,
            "headers": dict(self.headers),
            "body": self.body,
        }
        if self.decode_error is not None:
            out["decode_error"] = self.decode_error
            out["raw"] = self.raw.decode(errors="replace")
        if self.dead_letter is not None:
            out["dead_letter"] = {
                "reason": self.dead_letter.reason,
                "time": self.dead_letter.time,
                "original_queue": self.dead_letter.original_queue,
            }
        return out


def _text(value: HeaderValue | None) -> str | None:
    return None if value is None else str(value)


def queued_message(bound: BoundQueue, stored: Stored) -> QueuedMessage:
    headers = dict(stored.headers)
    dead = "x_original_queue" in headers or "x_dead_letter_reason" in headers
    letter: DeadLetter | None = None
    attempts = stored.attempts
    if dead:
        letter = DeadLetter(
            reason=_text(headers.get("x_dead_letter_reason")),
            time=_text(headers.get("x_dead_letter_time")),
            original_queue=_text(headers.get("x_original_queue")),
        )
        recorded = headers.get("attempts")
        if isinstance(recorded, int) and not isinstance(recorded, bool):
            attempts = recorded
    headers = _own(headers)
    body: Any = None
    problem: str | None = None
    try:
        body = bound.codec.decode(stored.body)
    except DecodeError as exc:
        problem = f"undecodable with codec {bound.codec.name}: {exc}"
    return QueuedMessage(
        id=stored.id,
        queue=bound.id,
        state=stored.state,
        attempts=attempts,
        headers=headers,
        body=body,
        raw=stored.body,
        decode_error=problem,
        dead_letter=letter,
    )


def _check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise errors.invalid(f"limit must be an integer from 1 to {MAX_LIMIT}, not {limit!r}")
    return limit


def _check_ids(ids: object) -> list[str] | None:
    if ids is None:
        return None
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Collection):
        raise errors.invalid(f"ids must be a list of message IDs or None, not {type(ids).__name__}")
    found = list(dict.fromkeys(ids))
    bad = [i for i in found if not isinstance(i, str) or not i]
    if bad:
        raise errors.invalid(f"message IDs are non-empty strings, not {bad[0]!r}")
    return found


async def browse(
    runtime: Runtime, queue_id: str, limit: int = 100, after: str | None = None
) -> list[QueuedMessage]:
    qid = canonical_id(queue_id)
    limit = _check_limit(limit)
    if after is not None and (not isinstance(after, str) or not after):
        raise errors.invalid(f"after must be a message ID or None, not {after!r}")
    runtime.engine.check(current_security(), BROWSE, qid)
    bound = runtime.queue(qid)
    stored = await bound.driver.browse(bound.spec, limit=limit, after=after)
    return [queued_message(bound, one) for one in stored]


async def purge(
    runtime: Runtime, queue_id: str, ids: Collection[str] | None = None, progress: Progress | None = None
) -> int:
    qid = canonical_id(queue_id)
    wanted = _check_ids(ids)
    runtime.engine.check(current_security(), PURGE, qid)
    bound = runtime.queue(qid)
    if wanted is None:
        removed = await bound.driver.purge(bound.spec, None)
        if progress is not None:
            progress(removed, removed)
        return removed
    removed = 0
    for start in range(0, len(wanted), PAGE):
        removed += await bound.driver.purge(bound.spec, wanted[start : start + PAGE])
        if progress is not None:
            progress(min(start + PAGE, len(wanted)), len(wanted))
    return removed


def _own(headers: Headers) -> Headers:
    """The message's own headers: without the runtime's (``attempts`` and every ``x_*``)."""
    return {k: v for k, v in headers.items() if k not in DEAD_LETTER_HEADERS and not k.startswith("x_")}


def replayed(stored: Stored) -> Outgoing:
    """The copy a replay stores: the runtime's headers gone (the dead-letter ones and any
    other ``x_*``, which a publisher cannot have set), attempts starting over."""
    return Outgoing(stored.id, stored.body, _own(stored.headers))


class _Replay:
    """One replay call: where each message goes, and what could not go anywhere."""

    def __init__(self, runtime: Runtime, source: BoundQueue, to: str | None) -> None:
        self.runtime = runtime
        self.source = source
        self.to = to
        self.moved = 0
        self.no_target: list[str] = []
        self.unknown: dict[str, str] = {}  # message ID -> target queue not declared
        self._checked: dict[str, BoundQueue] = {}

    def target_of(self, stored: Stored) -> BoundQueue | None:
        name = self.to if self.to is not None else stored.headers.get("x_original_queue")
        if not isinstance(name, str) or not name:
            self.no_target.append(stored.id)
            return None
        bound = self._checked.get(name)
        if bound is None:
            try:
                qid = canonical_id(name)
                self.runtime.engine.check_publish(current_security(), qid)
                bound = self.runtime.queue(qid)
            except errors.Error as exc:
                if exc.kind != errors.NOT_FOUND:
                    raise
                self.unknown[stored.id] = name
                return None
            if bound.id == self.source.id:
                raise errors.invalid(f"cannot replay {self.source.id} onto itself")
            self._checked[name] = bound
        return bound

    async def page(self, page: list[Stored]) -> set[str]:
        """Move what can be moved of ``page``; the IDs it was moving (the rest stays)."""
        groups: dict[str, tuple[BoundQueue, list[Stored]]] = {}
        for stored in page:
            if stored.state == "in_flight":
                continue  # a consumer of the dead-letter queue holds it
            target = self.target_of(stored)
            if target is not None:
                groups.setdefault(target.id, (target, []))[1].append(stored)
        for target, messages in groups.values():
            self.moved += await self._move(target, messages)
        return {m.id for _, messages in groups.values() for m in messages}

    async def _move(self, target: BoundQueue, messages: list[Stored]) -> int:
        source = self.source
        ids = [m.id for m in messages]
        if target.driver is source.driver:
            return await source.driver.move(source.spec, target.spec, replayed, ids=ids, limit=len(ids))
        # Another driver: copy first, then remove; an interruption leaves a duplicate.
        await target.driver.publish(target.spec, [replayed(m) for m in messages])
        await source.driver.purge(source.spec, ids)
        return len(ids)

    def result(self) -> int:
        self.no_target = list(dict.fromkeys(self.no_target))  # a page read twice lists one twice
        if not self.no_target and not self.unknown:
            return self.moved
        parts = []
        if self.no_target:
            parts.append(
                f"{len(self.no_target)} message(s) name no original queue (no x_original_queue header): "
                f"replay them with to=QUEUE"
            )
        if self.unknown:
            names = sorted(set(self.unknown.values()))
            parts.append(
                f"{len(self.unknown)} message(s) name a queue that is not declared: {', '.join(names)}"
            )
        raise errors.invalid(
            f"replayed {self.moved} message(s) from {self.source.id}; left there: " + "; ".join(parts),
            queue=self.source.id,
            replayed=self.moved,
            no_target=self.no_target[:100],
            unknown_target=dict(list(self.unknown.items())[:100]),
        )


async def replay(
    runtime: Runtime,
    dlq_id: str,
    ids: Collection[str] | None = None,
    to: str | None = None,
    progress: Progress | None = None,
) -> int:
    qid = canonical_id(dlq_id)
    wanted = _check_ids(ids)
    if to is not None and (not isinstance(to, str) or not to):
        raise errors.invalid(f"to must be a queue ID or None, not {to!r}")
    runtime.engine.check(current_security(), REPLAY, qid)
    source = runtime.queue(qid)
    work = _Replay(runtime, source, canonical_id(to) if to is not None else None)
    driver = source.driver
    if wanted is not None:
        left = set(wanted)
        total = len(wanted)
        after: str | None = None
        while left:
            page = await _browse(source, PAGE, after)
            if not page:
                break
            mine = [m for m in page if m.id in left]
            left.difference_update(m.id for m in mine)
            after = _last_kept(page, await work.page(mine))
            if progress is not None:
                progress(total - len(left), total)
        return work.result()
    total = int((await driver.info(source.spec)).get("message_count", 0))
    seen = 0
    after = None
    while seen < total:
        page = await _browse(source, min(PAGE, total - seen), after)
        if not page:
            break
        seen += len(page)
        after = _last_kept(page, await work.page(page))
        if progress is not None:
            progress(min(seen, total), total)
    return work.result()


async def _browse(source: BoundQueue, limit: int, after: str | None) -> list[Stored]:
    """A page from ``after``; from the front if that message has left meanwhile."""
    try:
        return await source.driver.browse(source.spec, limit=limit, after=after)
    except errors.Error as exc:
        if exc.kind != errors.NOT_FOUND or after is None:
            raise
        return await source.driver.browse(source.spec, limit=limit, after=None)


def _last_kept(page: list[Stored], moved: set[str]) -> str | None:
    """Where the next page starts: after the last message of this page still on the
    queue (skipped or not asked for), or at the front when every one of them moved."""
    for stored in reversed(page):
        if stored.id not in moved:
            return stored.id
    return None
