"""Queue tooling through the public API (``conveyor.queue``): browse, replay, purge.

Runs once per driver through the ``harness`` fixture. Dead letters are made the way
users get them: a consumer fails a message until its attempts run out. Waits poll
with deadlines; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from conveyor import App, errors, queue, security
from tests.conformance.test_conformance import Sink, running
from tests.support.harness import Harness, capabilities
from tests.support.waiting import wait_until

MAX_ATTEMPTS = 2


class Flaky:
    """A handler that fails while ``broken`` is set and records what it handled after."""

    def __init__(self) -> None:
        self.broken = threading.Event()
        self.broken.set()
        self.sink = Sink()

    def handler(self) -> Callable[[Any], None]:
        def handle(payload: Any) -> None:
            if self.broken.is_set():
                raise ValueError("smtp refused")
            self.sink.record(payload)

        return handle


def dead_letter_app(harness: Harness, **consumer: Any) -> tuple[str, str, Flaky]:
    """Queue ``emails`` (dead letters to ``emails_dlq`` after MAX_ATTEMPTS) and a
    consumer on it that fails until told otherwise. Nothing consumes the DLQ."""
    flaky = Flaky()
    q = harness.queue("emails", dead_letter={"queue": "emails_dlq", "max_attempts": MAX_ATTEMPTS})
    dlq = harness.queue("emails_dlq")
    harness.consumer("worker", "emails", flaky.handler(), **consumer)
    return q, dlq, flaky


def dead_letters(
    app: App, q: str, dlq: str, items: list[Any], headers: dict[str, Any] | None = None
) -> list[str]:
    """Publish ``items`` to ``q`` and wait until each is on ``dlq``; their IDs."""
    ids = queue.publish_many(q, items, headers, return_ids=True)
    wait_until(lambda: queue.info(dlq)["message_count"] == len(items), timeout=30)
    assert app.wait_idle(timeout=10)
    assert queue.info(q)["message_count"] == 0
    return ids


def ids_of(messages: list[queue.QueuedMessage]) -> list[str]:
    return [m.id for m in messages]


def refused(call: Callable[[], Any]) -> errors.Error:
    with pytest.raises(errors.Error) as info:
        call()
    return info.value


def policy(h: Harness, name: str, actions: Any, resources: Any = "*", effect: str = "allow") -> str:
    h.add(
        name=name,
        kind="security.policy",
        policy={"actions": actions, "resources": resources, "effect": effect},
    )
    return h.qid(name)


# -- browse ----------------------------------------------------------------------------


def test_browse_a_dead_letter(harness: Harness) -> None:
    """A dead letter browsed: its ID, decoded body, own headers (no ``x_*``, no
    ``attempts``), why/when/where from it was dead-lettered and the attempts it had;
    browsing takes nothing."""
    q, dlq, _ = dead_letter_app(harness)
    with running(harness) as app:
        before = datetime.now().astimezone()
        (msg_id,) = dead_letters(
            app, q, dlq, [{"to": "x@example.com"}], {"correlation_id": "req-9", "vip": True}
        )
        (seen,) = queue.browse(dlq)
        assert (seen.id, seen.queue, seen.state) == (msg_id, dlq, "ready")
        assert seen.body == {"to": "x@example.com"}
        assert seen.headers == {"correlation_id": "req-9", "vip": True}
        assert seen.decode_error is None
        assert seen.attempts == MAX_ATTEMPTS
        assert seen.dead_letter is not None
        assert seen.dead_letter.original_queue == q
        assert "ValueError: smtp refused" in (seen.dead_letter.reason or "")
        stamp = seen.dead_letter.time or ""
        assert stamp.endswith("Z")
        assert datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() >= before.timestamp() - 1
        out = json.loads(json.dumps(seen.as_dict()))
        assert out["id"] == msg_id and out["dead_letter"]["original_queue"] == q
        assert [m.id for m in queue.browse(dlq)] == [msg_id], "browsing again lists it again"
        assert queue.browse(q) == []
        assert queue.info(dlq)["message_count"] == 1


def test_browse_pages_with_limit_and_after(harness: Harness) -> None:
    """``limit`` bounds a page, ``after`` (the last ID of a page) starts the next; the
    pages are the queue in publish order; a message that left is NOT_FOUND."""
    q = harness.queue("pages")
    with harness.load():
        ids = queue.publish_many(q, [{"n": n} for n in range(5)], return_ids=True)
        pages: list[list[str]] = []
        after = None
        while page := queue.browse(q, limit=2, after=after):
            pages.append(ids_of(page))
            after = page[-1].id
            assert len(pages) <= 3
        assert pages == [ids[0:2], ids[2:4], ids[4:5]]
        assert [m.body for m in queue.browse(q, limit=10)] == [{"n": n} for n in range(5)]
        assert all(m.dead_letter is None for m in queue.browse(q, limit=10))
        assert queue.purge(q, [ids[1]]) == 1
        assert refused(lambda: queue.browse(q, after=ids[1])).kind == errors.NOT_FOUND
        assert queue.info(q)["message_count"] == 4


# -- replay ----------------------------------------------------------------------------


def test_replay_all_back_to_the_original_queue(harness: Harness) -> None:
    """Replayed dead letters are consumed again on their original queue, attempts
    starting at 1, without ``x_*`` or ``attempts`` headers; the DLQ is empty. Faults C3
    (attempts start over), C5 (the runtime's headers do not travel back)."""
    q, dlq, flaky = dead_letter_app(harness)
    with running(harness) as app:
        ids = dead_letters(app, q, dlq, [{"n": n} for n in range(3)], {"correlation_id": "c-1"})
        flaky.broken.clear()
        steps: list[tuple[int, int]] = []
        assert queue.replay(dlq, progress=lambda done, total: steps.append((done, total))) == 3
        wait_until(lambda: len(flaky.sink) == 3)
        assert app.wait_idle(timeout=10)
        assert steps and steps[-1] == (3, 3)
        assert queue.info(dlq)["message_count"] == 0
        assert queue.info(q)["message_count"] == 0
    assert sorted(flaky.sink.ids) == sorted(ids)
    assert flaky.sink.attempts == [1, 1, 1]
    assert sorted(item["n"] for item in flaky.sink.items) == [0, 1, 2]
    for headers in flaky.sink.headers:
        assert headers == {"correlation_id": "c-1"}, headers


def test_replay_by_id_skips_unknown_ids(harness: Harness) -> None:
    q, dlq, flaky = dead_letter_app(harness)
    with running(harness) as app:
        ids = dead_letters(app, q, dlq, [{"n": n} for n in range(3)])
        flaky.broken.clear()
        assert queue.replay(dlq, ids=[ids[1], "no-such-message"]) == 1
        wait_until(lambda: len(flaky.sink) == 1)
        assert flaky.sink.ids == [ids[1]]
        assert ids_of(queue.browse(dlq)) == [ids[0], ids[2]]
        assert queue.replay(dlq, ids=["no-such-message"]) == 0
        assert queue.replay(dlq, ids=[]) == 0
        assert queue.info(dlq)["message_count"] == 2


def test_replay_to_another_queue(harness: Harness) -> None:
    """``to`` sends the dead letters to that queue instead of their original one."""
    q, dlq, flaky = dead_letter_app(harness)
    repaired = harness.queue("repaired")
    other = Sink()
    harness.consumer("repairer", "repaired", other.record)
    with running(harness) as app:
        ids = dead_letters(app, q, dlq, [{"n": 1}, {"n": 2}])
        assert queue.replay(dlq, ids=[ids[0]], to=repaired) == 1
        wait_until(lambda: len(other) == 1)
        assert other.ids == [ids[0]] and other.attempts == [1]
        assert not any(k.startswith("x_") or k == "attempts" for k in other.headers[0])
        assert queue.replay(dlq, to=repaired) == 1
        wait_until(lambda: len(other) == 2)
        assert app.wait_idle(timeout=10)
    assert len(flaky.sink) == 0, "nothing went back to the original queue"
    assert sorted(other.ids) == sorted(ids)


def test_replay_without_an_original_queue_is_invalid_and_lists_them(harness: Harness) -> None:
    """Messages that name no original queue (published straight to the DLQ) stay where
    they are, listed in an INVALID error; the others are replayed; ``to`` moves them."""
    q, dlq, flaky = dead_letter_app(harness)
    with running(harness) as app:
        (dead,) = dead_letters(app, q, dlq, [{"n": "dead"}])
        flaky.broken.clear()
        plain = queue.publish_many(dlq, [{"n": "plain1"}, {"n": "plain2"}], return_ids=True)
        exc = refused(lambda: queue.replay(dlq))
        assert exc.kind == errors.INVALID
        assert exc.details["replayed"] == 1
        assert sorted(exc.details["no_target"]) == sorted(plain)
        assert "to=" in exc.message
        wait_until(lambda: len(flaky.sink) == 1)
        assert flaky.sink.ids == [dead]
        assert sorted(ids_of(queue.browse(dlq))) == sorted(plain)
        exc = refused(lambda: queue.replay(dlq, ids=[plain[0]]))
        assert exc.kind == errors.INVALID and exc.details["no_target"] == [plain[0]]
        assert queue.replay(dlq, to=q) == 2
        wait_until(lambda: len(flaky.sink) == 3)
        assert queue.info(dlq)["message_count"] == 0


def test_replay_to_an_undeclared_queue_is_invalid(harness: Harness) -> None:
    q, dlq, _ = dead_letter_app(harness)
    with running(harness) as app:
        (dead,) = dead_letters(app, q, dlq, [{"n": 1}])
        exc = refused(lambda: queue.replay(dlq, to=harness.qid("nowhere")))
        assert exc.kind == errors.INVALID
        assert exc.details["unknown_target"] == {dead: harness.qid("nowhere")}
        assert refused(lambda: queue.replay(dlq, to=dlq)).kind == errors.INVALID
        assert ids_of(queue.browse(dlq)) == [dead]


# -- purge -----------------------------------------------------------------------------


def test_purge_by_id_and_all(harness: Harness) -> None:
    q, dlq, _ = dead_letter_app(harness)
    with running(harness) as app:
        ids = dead_letters(app, q, dlq, [{"n": n} for n in range(4)])
        assert queue.purge(dlq, [ids[2], "no-such-message"]) == 1
        assert ids_of(queue.browse(dlq)) == [ids[0], ids[1], ids[3]]
        steps: list[tuple[int, int]] = []
        assert queue.purge(dlq, progress=lambda done, total: steps.append((done, total))) == 3
        assert steps[-1] == (3, 3)
        assert queue.browse(dlq) == []
        assert queue.purge(dlq) == 0
        assert queue.info(dlq)["message_count"] == 0


# -- input and permissions -------------------------------------------------------------


BAD_INPUT: list[tuple[str, dict[str, Any]]] = [
    ("browse", {"limit": 0}),
    ("browse", {"limit": -1}),
    ("browse", {"limit": 10_001}),
    ("browse", {"limit": True}),
    ("browse", {"limit": "5"}),
    ("browse", {"after": ""}),
    ("browse", {"after": 5}),
    ("replay", {"ids": "abc"}),
    ("replay", {"ids": [1]}),
    ("replay", {"ids": [""]}),
    ("replay", {"ids": 5}),
    ("replay", {"to": ""}),
    ("replay", {"to": 5}),
    ("replay", {"to": "bad id"}),
    ("purge", {"ids": "abc"}),
    ("purge", {"ids": [None]}),
]


@pytest.mark.parametrize(("tool", "arguments"), BAD_INPUT, ids=[f"{t}-{a}" for t, a in BAD_INPUT])
def test_bad_input_is_invalid(harness: Harness, tool: str, arguments: dict[str, Any]) -> None:
    q = harness.queue("held")
    with harness.load():
        msg_id = queue.publish(q, {"n": 1})
        exc = refused(lambda: getattr(queue, tool)(q, **arguments))
        assert exc.kind == errors.INVALID, exc
        for bad_id in (getattr(queue, name) for name in ("browse", "replay", "purge")):
            assert refused(functools.partial(bad_id, " bad id")).kind == errors.INVALID
        assert ids_of(queue.browse(q)) == [msg_id]


def test_an_undeclared_queue_is_not_found(harness: Harness) -> None:
    harness.queue("held")
    nowhere = harness.qid("nowhere")
    with harness.load():
        for call in (
            lambda: queue.browse(nowhere),
            lambda: queue.replay(nowhere),
            lambda: queue.purge(nowhere),
        ):
            assert refused(call).kind == errors.NOT_FOUND


def test_each_tool_is_a_security_action(harness: Harness) -> None:
    """``queue.browse``, ``queue.replay`` and ``queue.purge`` on the queue are checked
    like publishing; a replay also needs ``queue.publish`` on the queue it fills.
    Fault C6 (deny wins; checked on the queue actually used)."""
    held = harness.queue("held")
    target = harness.queue("target")
    everything = policy(harness, "everything", "*")
    no_browse = policy(harness, "no_browse", "queue.browse", held, "deny")
    no_replay = policy(harness, "no_replay", "queue.replay", held, "deny")
    no_purge = policy(harness, "no_purge", "queue.purge", held, "deny")
    replay_only = policy(harness, "replay_only", "queue.replay", held)
    publish = policy(harness, "publish", "queue.publish")
    publish_target = policy(harness, "publish_target", "queue.publish.queue", target)
    with harness.load():
        ids = queue.publish_many(held, [1, 2, 3], return_ids=True)

        def denied(policies: list[str], call: Callable[[], Any], action: str) -> None:
            with security.context("ops", policies=policies):
                exc = refused(call)
            assert exc.kind == errors.PERMISSION_DENIED, exc
            assert exc.details["action"] == action, exc.details
            assert ids_of(queue.browse(held)) == ids

        denied([everything, no_browse], lambda: queue.browse(held), "queue.browse")
        denied([everything, no_replay], lambda: queue.replay(held, to=target), "queue.replay")
        denied([everything, no_purge], lambda: queue.purge(held), "queue.purge")
        denied([replay_only], lambda: queue.replay(held, to=target), "queue.publish")
        denied([replay_only, publish], lambda: queue.replay(held, to=target), "queue.publish.queue")
        with security.context("ops", policies=[everything, no_browse]):
            assert queue.info(held)["message_count"] == 3
            assert queue.browse(target) == []
        with security.context("ops", policies=[replay_only, publish, publish_target]):
            assert queue.replay(held, ids=[ids[0]], to=target) == 1
        with security.context("ops", policies=[everything, no_browse, no_replay]):
            assert queue.purge(held, [ids[1]]) == 1
        assert ids_of(queue.browse(held)) == [ids[2]]
        assert ids_of(queue.browse(target)) == [ids[0]]


def test_async_forms(harness: Harness) -> None:
    q = harness.queue("held")
    target = harness.queue("target")

    async def main() -> None:
        async with harness.load():
            ids = await queue.apublish_many(q, [1, 2, 3], return_ids=True)
            assert [m.id for m in await queue.abrowse(q, limit=2)] == ids[:2]
            assert await queue.areplay(q, ids=[ids[0]], to=target) == 1
            assert await queue.apurge(q, [ids[1]]) == 1
            assert [m.id for m in await queue.abrowse(q)] == [ids[2]]
            assert [m.id for m in await queue.abrowse(target)] == [ids[0]]

    asyncio.run(main())


# -- replay under a running consumer (slow cases last) ---------------------------------------

REPLAYED = 1100  # more than one replay page (conveyor.queue.tools.PAGE)


def test_replay_under_a_running_consumer_moves_each_message_once(harness: Harness) -> None:
    """Dead letters replayed while a consumer runs on their original queue: the consumer
    handles each exactly once, the DLQ ends empty, and no message is ever seen on both
    queues (the original queue read first, then the DLQ: a message on both would be a
    copy left behind). Fault C2 (a replay neither loses nor duplicates)."""
    q, dlq, flaky = dead_letter_app(harness, concurrency=8, prefetch=50)
    with running(harness) as app:
        ids = dead_letters(app, q, dlq, [{"n": n} for n in range(REPLAYED)])
        assert len(set(ids)) == REPLAYED
        flaky.broken.clear()
        moved, doubles = replay_while_browsing(q, dlq)
        assert moved == REPLAYED
        wait_until(lambda: len(flaky.sink) >= REPLAYED, timeout=40)
        assert app.wait_idle(timeout=10)
        assert queue.info(dlq)["message_count"] == 0
        assert queue.info(q)["message_count"] == 0
        assert queue.browse(dlq) == []
    handled = Counter(flaky.sink.ids)
    assert set(handled) == set(ids), f"{len(set(ids) - set(handled))} never handled"
    assert [i for i, n in handled.items() if n > 1] == []
    if capabilities(harness.driver).browse_counts_delivery:
        # the sampler's reads of the live queue count as deliveries (docs/drivers.md)
        assert min(flaky.sink.attempts) >= 1
    else:
        assert set(flaky.sink.attempts) == {1}
    assert doubles == set(), f"seen on both queues at once: {sorted(doubles)[:10]}"


def replay_while_browsing(q: str, dlq: str) -> tuple[int, set[str]]:
    """``replay(dlq)`` while another thread browses ``q``, then ``dlq``, again and again:
    how many moved, and every ID the browsing saw on both."""
    done = threading.Event()
    doubles: set[str] = set()
    failures: list[BaseException] = []

    def sample() -> None:
        try:
            while not done.is_set():
                on_queue = set(ids_of(queue.browse(q, limit=10_000)))
                on_dlq = set(ids_of(queue.browse(dlq, limit=10_000)))
                doubles.update(on_queue & on_dlq)
        except BaseException as exc:  # raised below, on the test's thread
            failures.append(exc)

    sampler = threading.Thread(target=sample, name="browse-sampler", daemon=True)
    sampler.start()
    try:
        moved = queue.replay(dlq)
    finally:
        done.set()
        sampler.join(30)
    if failures:
        raise failures[0]
    return moved, doubles


def test_replay_across_drivers_copies_then_removes(tmp_path: Path) -> None:
    """A dead-letter queue on another driver (SQLite) than its queue (memory): the replay
    copies each message to the queue's driver, then removes it from the dead-letter
    queue; it is consumed again once, attempts starting at 1, without the dead-letter
    headers. Fault C2 (a replay neither loses nor duplicates)."""
    h = Harness(tmp_path, "memory")
    h.add(name="disk", kind="queue.driver.sqlite", path=str(tmp_path / "dlq.db"))
    flaky = Flaky()
    q = h.queue("jobs", dead_letter={"queue": "jobs_dlq", "max_attempts": 1})
    dlq = h.queue("jobs_dlq", driver="disk")
    h.consumer("worker", "jobs", flaky.handler())
    app = h.load()
    app.start(consumers=True)
    try:
        ids = dead_letters(app, q, dlq, [{"n": n} for n in range(3)])
        assert [m.dead_letter.original_queue for m in queue.browse(dlq) if m.dead_letter] == [q] * 3
        flaky.broken.clear()
        assert queue.replay(dlq) == 3
        wait_until(lambda: len(flaky.sink) == 3)
        assert app.wait_idle(timeout=10)
        assert queue.info(dlq)["message_count"] == 0
        assert queue.browse(dlq) == []
    finally:
        app.stop()
    assert sorted(flaky.sink.ids) == sorted(ids)
    assert flaky.sink.attempts == [1, 1, 1]
    assert all(not any(k.startswith("x_") or k == "attempts" for k in h_) for h_ in flaky.sink.headers)
