"""Behaviour every driver must share, through the app (docs/semantics.md). Destructive and slow
cases come last."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from conveyor import App, errors, queue
from tests.support.harness import Harness, capabilities
from tests.support.waiting import wait_until


@contextlib.contextmanager
def running(harness: Harness, stop_timeout: float | None = None) -> Iterator[App]:
    """The harness's app, started with its consumers, stopped on the way out."""
    app = harness.load()
    app.start(consumers=True)
    try:
        yield app
    finally:
        app.stop(stop_timeout)


class Sink:
    """Thread-safe record of what handlers saw."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[Any] = []
        self.ids: list[str] = []
        self.attempts: list[int] = []
        self.headers: list[dict[str, Any]] = []
        self.times: list[float] = []

    def record(self, payload: Any) -> None:
        msg = queue.message()
        with self.lock:
            self.items.append(payload)
            self.ids.append(msg.id)
            self.attempts.append(msg.attempts)
            self.headers.append(msg.headers)
            self.times.append(time.monotonic())

    def __len__(self) -> int:
        with self.lock:
            return len(self.items)


# -- publish and consume ------------------------------------------------------------


def test_publish_then_consume_sync_handler(harness: Harness) -> None:
    sink = Sink()
    q = harness.queue("tasks")
    harness.consumer("worker", "tasks", sink.record)
    with harness.load() as app:
        assert queue.publish(q, {"action": "send_email", "user_id": 456})
        app.start_consumers()
        wait_until(lambda: len(sink) == 1)
        assert sink.items == [{"action": "send_email", "user_id": 456}]
        assert sink.attempts == [1]
        wait_until(lambda: queue.info(q)["message_count"] == 0)


def test_publish_then_consume_async_handler(harness: Harness) -> None:
    sink = Sink()

    async def handle(payload: Any) -> None:
        await asyncio.sleep(0)
        sink.record(payload)

    q = harness.queue("tasks")
    harness.consumer("worker", "tasks", handle)
    with running(harness):
        queue.publish(q, ["a", 1, 2.5, True])
        wait_until(lambda: len(sink) == 1)
        assert sink.items == [["a", 1, 2.5, True]]


def test_many_messages_unique_ids_no_loss_no_duplicates(harness: Harness) -> None:
    sink = Sink()
    q = harness.queue("bulk")
    harness.consumer("worker", "bulk", sink.record, concurrency=4, prefetch=20)
    with running(harness) as app:
        total = 1000
        for i in range(total):
            queue.publish(q, {"n": i})
        wait_until(lambda: len(sink) >= total, timeout=30)
        assert app.wait_idle(timeout=10)
    assert sorted(item["n"] for item in sink.items) == list(range(total))
    assert len(set(sink.ids)) == total
    assert set(sink.attempts) == {1}


def test_queues_are_isolated(harness: Harness) -> None:
    a_sink, b_sink = Sink(), Sink()
    qa = harness.queue("a")
    qb = harness.queue("b")
    harness.consumer("wa", "a", a_sink.record)
    harness.consumer("wb", "b", b_sink.record)
    with running(harness) as app:
        for i in range(5):
            queue.publish(qa, {"q": "a", "i": i})
        queue.publish(qb, {"q": "b"})
        wait_until(lambda: len(a_sink) == 5 and len(b_sink) == 1)
        assert app.wait_idle(timeout=5)
    assert {item["q"] for item in a_sink.items} == {"a"}
    assert b_sink.items == [{"q": "b"}]


def test_messages_published_before_consumers_start_are_delivered(harness: Harness) -> None:
    sink = Sink()
    q = harness.queue("early")
    harness.consumer("worker", "early", sink.record)
    with harness.load() as app:
        for i in range(10):
            queue.publish(q, i + 1)
        assert queue.info(q)["message_count"] == 10
        assert queue.info(q)["ready"] == 10
        app.start_consumers()
        wait_until(lambda: len(sink) == 10)
    assert sorted(sink.items) == list(range(1, 11))


def test_info_reports_counts(harness: Harness) -> None:
    q = harness.queue("counted")
    with harness.load():
        info = queue.info(q)
        assert info["message_count"] == 0
        assert info["consumer_count"] == 0
        queue.publish(q, "x")
        queue.publish(q, "y")
        info = queue.info(q)
        assert (info["message_count"], info["ready"], info["in_flight"]) == (2, 2, 0)


def test_info_counts_in_flight_and_consumers(harness: Harness) -> None:
    gate = threading.Event()
    q = harness.queue("inflight")
    # prefetch == concurrency: prefetched messages count as in flight on every driver
    harness.consumer("worker", "inflight", lambda _p: gate.wait(10), concurrency=2, prefetch=2)
    app = harness.load()
    app.start(consumers=True)
    try:
        for i in range(3):
            queue.publish(q, i + 1)
        wait_until(lambda: queue.info(q)["in_flight"] == 2)
        info = queue.info(q)
        assert info["consumer_count"] == 1
        assert info["message_count"] == 3
        assert info["ready"] == 1
        gate.set()
        assert app.wait_idle(timeout=5)
    finally:
        gate.set()
        app.stop()


# -- settlement -----------------------------------------------------------------------


def test_nack_redelivers_with_attempts_incremented(harness: Harness) -> None:
    sink = Sink()

    def handle(payload: Any) -> None:
        sink.record(payload)
        if queue.message().attempts < 3:
            raise RuntimeError("not yet")

    q = harness.queue("flaky")
    harness.consumer("worker", "flaky", handle)
    with running(harness) as app:
        queue.publish(q, {"job": 1})
        wait_until(lambda: len(sink) == 3)
        assert app.wait_idle(timeout=5)
    assert sink.attempts == [1, 2, 3]
    assert len(set(sink.ids)) == 1


def test_explicit_nack_redelivers(harness: Harness) -> None:
    sink = Sink()

    def handle(payload: Any) -> None:
        sink.record(payload)
        msg = queue.message()
        if msg.attempts == 1:
            msg.nack()

    q = harness.queue("nacked")
    harness.consumer("worker", "nacked", handle)
    with running(harness) as app:
        queue.publish(q, "again")
        wait_until(lambda: len(sink) == 2)
        assert app.wait_idle(timeout=5)
    assert sink.attempts == [1, 2]


def test_retry_backoff_timing(harness: Harness) -> None:
    sink = Sink()

    def handle(payload: Any) -> None:
        sink.record(payload)
        raise RuntimeError("fail")

    q = harness.queue("backoff", retry={"delay": "100ms", "backoff": 2.0, "max_delay": "250ms"})
    harness.consumer("worker", "backoff", handle)
    with running(harness, stop_timeout=1):
        queue.publish(q, "x")
        wait_until(lambda: len(sink) >= 4, timeout=10)
    gaps = [b - a for a, b in zip(sink.times, sink.times[1:], strict=False)][:3]
    # delays: 0.1 (attempt 1), 0.2 (attempt 2), capped 0.25 (attempt 3)
    for gap, expected in zip(gaps, [0.1, 0.2, 0.25], strict=True):
        assert expected - 0.02 <= gap <= expected + 0.5, (gaps, expected)


def test_dead_letter_after_max_attempts_with_headers(harness: Harness) -> None:
    dlq_sink = Sink()

    def fail(payload: Any) -> None:
        raise ValueError("smtp refused")

    q = harness.queue("emails", dead_letter={"queue": "emails_dlq", "max_attempts": 3})
    harness.queue("emails_dlq")
    harness.consumer("worker", "emails", fail)
    harness.consumer("dlq_worker", "emails_dlq", dlq_sink.record)
    with running(harness) as app:
        before = time.time()
        queue.publish(q, {"to": "x@example.com"}, {"correlation_id": "req-9", "tries": 7, "vip": True})
        wait_until(lambda: len(dlq_sink) == 1)
        assert app.wait_idle(timeout=5)
        assert queue.info(q)["message_count"] == 0
    headers = dlq_sink.headers[0]
    assert dlq_sink.items == [{"to": "x@example.com"}]
    assert headers["x_original_queue"] == q
    assert "ValueError: smtp refused" in headers["x_dead_letter_reason"]
    assert headers["attempts"] == 3
    assert headers["correlation_id"] == "req-9"
    assert headers["tries"] == 7
    assert headers["vip"] is True
    stamp = headers["x_dead_letter_time"]
    assert isinstance(stamp, str) and stamp.endswith("Z")
    from datetime import datetime

    assert datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() >= before - 1
    assert dlq_sink.attempts == [1], "attempts restart on the dead-letter queue"


class NotWorthRetrying(Exception):
    """Named by a consumer's ``retry.never_on`` below."""


@pytest.mark.parametrize(
    ("failure", "retry"),
    [
        (errors.Error(errors.INVALID, "bad address", retryable=False), None),
        (NotWorthRetrying("no such customer"), {"never_on": [f"{__name__}:NotWorthRetrying"]}),
        (errors.Error(errors.NOT_FOUND, "no such customer"), {"never_on": ["NOT_FOUND"]}),
    ],
    ids=["retryable-false", "never-on-class", "never-on-kind"],
)
def test_a_failure_not_worth_retrying_is_dead_lettered_at_once(
    harness: Harness, failure: BaseException, retry: dict[str, Any] | None
) -> None:
    """A non-retryable failure skips the remaining attempts. Fault C3 (attempts counted)."""
    sink, dlq_sink = Sink(), Sink()

    def fail(payload: Any) -> None:
        sink.record(payload)
        raise failure

    q = harness.queue("orders", dead_letter={"queue": "orders_dlq", "max_attempts": 5})
    harness.queue("orders_dlq")
    harness.consumer("worker", "orders", fail, **({"retry": retry} if retry else {}))
    harness.consumer("dlq_worker", "orders_dlq", dlq_sink.record)
    with running(harness) as app:
        queue.publish(q, {"order": 1})
        wait_until(lambda: len(dlq_sink) == 1)
        assert app.wait_idle(timeout=5)
        assert queue.info(q)["message_count"] == 0
        stats = app.stats()[harness.qid("worker")]
    assert sink.attempts == [1], "tried once, not max_attempts times"
    assert dlq_sink.headers[0]["attempts"] == 1
    assert dlq_sink.headers[0]["x_dead_letter_reason"].startswith("not retryable: ")
    assert (stats["failed"], stats["dead_lettered"], stats["dropped"]) == (1, 1, 0)


def test_always_on_retries_what_says_it_is_not_retryable(harness: Harness) -> None:
    sink, dlq_sink = Sink(), Sink()

    def fail(payload: Any) -> None:
        sink.record(payload)
        raise errors.Error(errors.UNAVAILABLE, "smtp down", retryable=False)

    q = harness.queue("mails", dead_letter={"queue": "mails_dlq", "max_attempts": 3})
    harness.queue("mails_dlq")
    harness.consumer("worker", "mails", fail, retry={"always_on": ["UNAVAILABLE"]})
    harness.consumer("dlq_worker", "mails_dlq", dlq_sink.record)
    with running(harness) as app:
        queue.publish(q, "x")
        wait_until(lambda: len(dlq_sink) == 1)
        assert app.wait_idle(timeout=5)
    assert sink.attempts == [1, 2, 3]
    assert "UNAVAILABLE: smtp down" in dlq_sink.headers[0]["x_dead_letter_reason"]


def test_a_failure_not_worth_retrying_without_dead_letter_queue_is_dropped_and_logged(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    sink = Sink()

    def fail(payload: Any) -> None:
        sink.record(payload)
        if payload == "bad":
            raise errors.invalid("malformed order")

    q = harness.queue("plain")
    harness.consumer("worker", "plain", fail)
    with running(harness) as app:
        queue.publish(q, "bad")
        queue.publish(q, "good")
        wait_until(lambda: len(sink) == 2)
        assert app.wait_idle(timeout=5)
        assert queue.info(q)["message_count"] == 0
        stats = app.stats()[harness.qid("worker")]
    assert sink.items == ["bad", "good"]
    assert (stats["failed"], stats["dropped"], stats["acked"]) == (1, 1, 1)
    dropped = [r for r in caplog.records if "dropped after attempt 1" in r.getMessage()]
    assert len(dropped) == 1 and dropped[0].levelname == "ERROR"
    assert "not retryable: INVALID: malformed order" in dropped[0].getMessage()


def test_early_ack_then_raise_is_not_redelivered(harness: Harness) -> None:
    sink = Sink()

    def handle(payload: Any) -> None:
        sink.record(payload)
        queue.message().ack()
        raise RuntimeError("after ack")

    q = harness.queue("early_ack")
    harness.consumer("worker", "early_ack", handle)
    with running(harness) as app:
        queue.publish(q, "once")
        wait_until(lambda: len(sink) == 1)
        assert app.wait_idle(timeout=5)
        time.sleep(0.1)
        assert len(sink) == 1
        assert queue.info(q)["message_count"] == 0


def test_double_ack_is_invalid(harness: Harness) -> None:
    outcomes: list[Any] = []

    def handle(payload: Any) -> None:
        msg = queue.message()
        msg.ack()
        try:
            msg.ack()
        except errors.Error as exc:
            outcomes.append(exc)
        try:
            msg.nack()
        except errors.Error as exc:
            outcomes.append(exc)

    q = harness.queue("double")
    harness.consumer("worker", "double", handle)
    with running(harness):
        queue.publish(q, "x")
        wait_until(lambda: len(outcomes) == 2)
    for exc in outcomes:
        assert exc.kind == errors.INVALID
        assert "already settled" in exc.message
        assert exc.retryable is False


def test_async_double_ack_is_invalid(harness: Harness) -> None:
    outcomes: list[Any] = []

    async def handle(payload: Any) -> None:
        msg = queue.message()
        await msg.aack()
        try:
            await msg.anack()
        except errors.Error as exc:
            outcomes.append(exc)

    q = harness.queue("adouble")
    harness.consumer("worker", "adouble", handle)
    with running(harness):
        queue.publish(q, "x")
        wait_until(lambda: len(outcomes) == 1)
    assert outcomes[0].kind == errors.INVALID and "already settled" in outcomes[0].message


def test_message_use_after_release_is_invalid(harness: Harness) -> None:
    kept: list[Any] = []
    q = harness.queue("released")
    harness.consumer("worker", "released", lambda _p: kept.append(queue.message()))
    with running(harness) as app:
        queue.publish(q, "x")
        wait_until(lambda: len(kept) == 1)
        assert app.wait_idle(timeout=5)
        msg = kept[0]
        for use in (msg.ack, msg.nack, lambda: msg.id, lambda: msg.header("a"), lambda: msg.headers):
            with pytest.raises(errors.Error) as info:
                use()
            assert info.value.kind == errors.INVALID
            assert "released" in info.value.message


def test_no_delivery_context_outside_handler(harness: Harness) -> None:
    with pytest.raises(errors.Error) as info:
        queue.message()
    assert info.value.kind == errors.INVALID
    assert "no delivery context" in info.value.message


def test_delivery_context_reaches_called_code_and_threads(harness: Harness) -> None:
    seen: list[str] = []

    def helper() -> str:
        return queue.message().id

    async def handle(payload: Any) -> None:
        own = queue.message().id
        nested = helper()
        in_task = await asyncio.create_task(asyncio.sleep(0, result=helper()))
        in_thread = await asyncio.to_thread(helper)
        seen.extend([own, nested, in_task, in_thread])

    q = harness.queue("ctx")
    harness.consumer("worker", "ctx", handle)
    with running(harness):
        queue.publish(q, "x")
        wait_until(lambda: len(seen) == 4)
    assert len(set(seen)) == 1


# -- headers ---------------------------------------------------------------------------


def test_typed_headers_round_trip(harness: Harness) -> None:
    sink = Sink()
    q = harness.queue("typed")
    harness.consumer("worker", "typed", sink.record)
    sent = {
        "s": "text",
        "empty": "",
        "i": 42,
        "neg": -7,
        "big": 2**53,
        "f": 1.5,
        "b_true": True,
        "b_false": False,
        "priority": "high",
        "correlation_id": "req-1",
        "reply_to": "app:replies",
        "amqp.mandatory": True,
        "unicode": "héllo ✓",
    }
    with running(harness):
        queue.publish(q, "x", sent)
        wait_until(lambda: len(sink) == 1)
    got = sink.headers[0]
    for key, value in sent.items():
        if key.startswith("amqp.") and harness.driver == "amqp":
            continue  # consumed by the AMQP driver
        assert got[key] == value, key
        assert type(got[key]) is type(value), key


def test_numeric_priority_round_trips(harness: Harness) -> None:
    sink = Sink()
    q = harness.queue("prio")
    harness.consumer("worker", "prio", sink.record)
    with running(harness):
        queue.publish(q, "x", {"priority": 7})
        wait_until(lambda: len(sink) == 1)
    assert sink.headers[0]["priority"] == 7


@pytest.mark.parametrize(
    "headers",
    [{"attempts": 1}, {"x_custom": "v"}, {"": "v"}, {1: "v"}, {"k": None}, {"k": {"nested": 1}}, {"k": [1]}],
)
def test_bad_headers_are_invalid_and_store_nothing(harness: Harness, headers: dict[Any, Any]) -> None:
    q = harness.queue("badh")
    with harness.load():
        with pytest.raises(errors.Error) as info:
            queue.publish(q, "x", headers)
        assert info.value.kind == errors.INVALID
        assert queue.info(q)["message_count"] == 0


@pytest.mark.parametrize("priority", ["urgent", 256, -1, 1.5, True])
def test_bad_priority_is_invalid(harness: Harness, priority: Any) -> None:
    q = harness.queue("badp")
    with harness.load():
        with pytest.raises(errors.Error) as info:
            queue.publish(q, "x", {"priority": priority})
        assert info.value.kind == errors.INVALID


# -- publishing rules --------------------------------------------------------------------


@pytest.mark.parametrize("data", [None, "", b"", {}, []])
def test_empty_data_is_invalid(harness: Harness, data: Any) -> None:
    q = harness.queue("empty")
    with harness.load():
        with pytest.raises(errors.Error) as info:
            queue.publish(q, data)
        assert info.value.kind == errors.INVALID
        assert not info.value.retryable


@pytest.mark.parametrize(
    "queue_id", ["", "tasks", ":tasks", "app:", " app:tasks", "app:tasks ", "app::tasks"]
)
def test_malformed_queue_id_is_invalid(harness: Harness, queue_id: str) -> None:
    harness.queue("tasks")
    with harness.load():
        with pytest.raises(errors.Error) as info:
            queue.publish(queue_id, "x")
        assert info.value.kind == errors.INVALID


def test_undeclared_queue_is_not_found(harness: Harness) -> None:
    harness.queue("tasks")
    with harness.load():
        with pytest.raises(errors.Error) as info:
            queue.publish(harness.qid("missing"), "x")
        assert info.value.kind == errors.NOT_FOUND
        with pytest.raises(errors.Error) as info:
            queue.info(harness.qid("missing"))
        assert info.value.kind == errors.NOT_FOUND


def test_concurrent_publishers_from_8_threads(harness: Harness) -> None:
    sink = Sink()
    q = harness.queue("threads")
    harness.consumer("worker", "threads", sink.record, concurrency=4, prefetch=50)
    app = harness.load()
    app.start(consumers=True)
    per_thread = 200
    failures: list[BaseException] = []

    def publisher(t: int) -> None:
        try:
            for i in range(per_thread):
                queue.publish(q, {"t": t, "i": i})
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    try:
        threads = [threading.Thread(target=publisher, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not failures
        wait_until(lambda: len(sink) >= 8 * per_thread, timeout=30)
        assert app.wait_idle(timeout=10)
    finally:
        app.stop()
    seen = Counter((item["t"], item["i"]) for item in sink.items)
    assert len(seen) == 8 * per_thread
    assert max(seen.values()) == 1
    for t in range(8):  # per-publisher order is kept on a FIFO queue with one consumer stream
        assert {i for (tt, i) in seen if tt == t} == set(range(per_thread))


def test_publish_many_stores_a_batch(harness: Harness) -> None:
    sink = Sink()
    q = harness.queue("batch")
    harness.consumer("worker", "batch", sink.record)
    with harness.load() as app:
        count = queue.publish_many(q, [{"n": 1}, ({"n": 2}, {"k": "v"}), {"n": 3}], {"common": 1})
        assert count == 3
        assert queue.info(q)["message_count"] == 3
        app.start_consumers()
        wait_until(lambda: len(sink) == 3)
    assert [h.get("common") for h in sink.headers] == [1, 1, 1]
    assert sink.headers[1]["k"] == "v"


def test_publish_returns_the_id_the_handler_sees(harness: Harness) -> None:
    """Python learns the ID of what it published: one, or a batch's in order."""
    sink = Sink()
    q = harness.queue("ids")
    harness.consumer("worker", "ids", sink.record)
    with harness.load() as app:
        first = queue.publish(q, {"n": 0})
        batch = queue.publish_many(q, [{"n": 1}, {"n": 2}, {"n": 3}], return_ids=True)
        assert isinstance(first, str) and first
        assert isinstance(batch, list) and len(batch) == 3
        assert len({first, *batch}) == 4
        app.start_consumers()
        wait_until(lambda: len(sink) == 4)
    by_n = {item["n"]: sink.ids[i] for i, item in enumerate(sink.items)}
    assert [by_n[n] for n in range(4)] == [first, *batch]


def test_publish_many_validates_whole_batch_first(harness: Harness) -> None:
    q = harness.queue("batch_bad")
    with harness.load():
        with pytest.raises(errors.Error) as info:
            queue.publish_many(q, [{"n": 1}, None, {"n": 3}])
        assert info.value.kind == errors.INVALID
        assert info.value.details["index"] == 1
        assert queue.info(q)["message_count"] == 0


def test_async_publish_and_info(harness: Harness) -> None:
    q = harness.queue("async_api")

    async def main() -> None:
        async with harness.load():
            assert await queue.apublish(q, {"a": 1})
            assert await queue.apublish_many(q, [1, 2]) == 2
            ids = await queue.apublish_many(q, [3], return_ids=True)
            assert isinstance(ids, list) and len(ids) == 1 and isinstance(ids[0], str)
            info = await queue.ainfo(q)
            assert info["message_count"] == 4

    asyncio.run(main())


def test_blocking_call_inside_event_loop_names_async_form(harness: Harness) -> None:
    q = harness.queue("blocking")

    async def main() -> None:
        async with harness.load():
            with pytest.raises(errors.Error) as info:
                queue.publish(q, "x")
            assert info.value.kind == errors.INVALID
            assert "queue.apublish" in info.value.message
            with pytest.raises(errors.Error) as info:
                queue.info(q)
            assert "queue.ainfo" in info.value.message

    asyncio.run(main())


# -- handler misbehaviour -------------------------------------------------------------------


def test_handler_raising_base_exception_is_nacked(harness: Harness) -> None:
    sink = Sink()

    def handle(payload: Any) -> None:
        sink.record(payload)
        if queue.message().attempts == 1:
            raise SystemExit("handler tried to exit")

    q = harness.queue("baseexc")
    harness.consumer("worker", "baseexc", handle)
    with running(harness) as app:
        queue.publish(q, "x")
        wait_until(lambda: len(sink) == 2)
        assert app.wait_idle(timeout=5)
    assert sink.attempts == [1, 2]


def test_async_handler_raising_keyboard_interrupt_is_nacked(harness: Harness) -> None:
    sink = Sink()

    async def handle(payload: Any) -> None:
        sink.record(payload)
        if queue.message().attempts == 1:
            raise KeyboardInterrupt

    q = harness.queue("kbint")
    harness.consumer("worker", "kbint", handle)
    with running(harness):
        queue.publish(q, "x")
        wait_until(lambda: len(sink) == 2)
    assert sink.attempts == [1, 2]


def test_handler_returning_garbage_is_acked(harness: Harness) -> None:
    sink = Sink()

    def handle(payload: Any) -> object:
        sink.record(payload)
        return object()

    q = harness.queue("garbage")
    harness.consumer("worker", "garbage", handle)
    with running(harness) as app:
        queue.publish(q, "x")
        wait_until(lambda: len(sink) == 1)
        assert app.wait_idle(timeout=5)


def test_sync_handler_returning_coroutine_is_a_failure(harness: Harness) -> None:
    calls: list[int] = []

    async def real(payload: Any) -> None:  # pragma: no cover - never awaited
        return None

    def handle(payload: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            return real(payload)
        return None

    q = harness.queue("coro")
    harness.consumer("worker", "coro", handle)
    with running(harness) as app:
        queue.publish(q, "x")
        wait_until(lambda: len(calls) == 2)
        assert app.wait_idle(timeout=5)


def test_handler_timeout_nacks_async(harness: Harness) -> None:
    sink = Sink()

    async def handle(payload: Any) -> None:
        sink.record(payload)
        if queue.message().attempts == 1:
            await asyncio.sleep(10)

    q = harness.queue("slow_async")
    harness.consumer("worker", "slow_async", handle, timeout="100ms")
    with running(harness) as app:
        queue.publish(q, "x")
        wait_until(lambda: len(sink) == 2, timeout=5)
        assert app.wait_idle(timeout=5)


def test_handler_timeout_nacks_sync_and_late_ack_is_rejected(harness: Harness) -> None:
    sink = Sink()
    late: list[BaseException] = []
    release = threading.Event()

    def handle(payload: Any) -> None:
        sink.record(payload)
        msg = queue.message()
        if msg.attempts == 1:
            release.wait(5)
            try:
                msg.ack()
            except errors.Error as exc:
                late.append(exc)

    q = harness.queue("slow_sync")
    harness.consumer("worker", "slow_sync", handle, timeout="100ms", concurrency=2)
    app = harness.load()
    app.start(consumers=True)
    try:
        queue.publish(q, "x")
        wait_until(lambda: len(sink) == 2, timeout=5)
        release.set()
        wait_until(lambda: len(late) == 1, timeout=5)
        assert app.wait_idle(timeout=5)
    finally:
        release.set()
        app.stop()
    assert sink.attempts == [1, 2]
    assert late[0].kind == errors.INVALID


def test_undecodable_message_goes_to_dead_letter_queue(harness: Harness) -> None:
    calls: list[Any] = []
    dlq_sink = Sink()
    q = harness.queue("jsonq", dead_letter={"queue": "jsonq_dlq", "max_attempts": 5})
    harness.queue("jsonq_dlq", codec="raw")
    harness.consumer("worker", "jsonq", calls.append)
    harness.consumer("dlq_worker", "jsonq_dlq", dlq_sink.record)
    with running(harness) as app:
        bound = app.runtime.queue(q)
        from conveyor.drivers.base import Outgoing

        app_loop = app.loop
        asyncio.run_coroutine_threadsafe(
            bound.driver.publish(bound.spec, [Outgoing("garbage-1", b"\xff{not json", {"k": "v"})]),
            app_loop,
        ).result()
        wait_until(lambda: len(dlq_sink) == 1)
    assert calls == []
    assert dlq_sink.items == [b"\xff{not json"]
    assert "undecodable" in str(dlq_sink.headers[0]["x_dead_letter_reason"])
    assert dlq_sink.headers[0]["k"] == "v"


def test_auto_ack_settles_at_delivery(harness: Harness) -> None:
    sink = Sink()

    def handle(payload: Any) -> None:
        sink.record(payload)
        raise RuntimeError("ignored with auto_ack")

    q = harness.queue("autoack")
    harness.consumer("worker", "autoack", handle, auto_ack=True)
    with running(harness) as app:
        queue.publish(q, "x")
        wait_until(lambda: len(sink) == 1)
        assert app.wait_idle(timeout=5)
        time.sleep(0.1)
    assert len(sink) == 1


def test_prefetch_bounds_unsettled_deliveries(harness: Harness) -> None:
    gate = threading.Event()
    q = harness.queue("prefetch")
    harness.consumer("worker", "prefetch", lambda _p: gate.wait(10), concurrency=5, prefetch=2)
    app = harness.load()
    app.start(consumers=True)
    try:
        for i in range(10):
            queue.publish(q, i + 1)
        wait_until(lambda: queue.info(q)["in_flight"] == 2)
        time.sleep(0.1)
        assert queue.info(q)["in_flight"] == 2
        assert queue.info(q)["ready"] == 8
        gate.set()
        assert app.wait_idle(timeout=5)
    finally:
        gate.set()
        app.stop()


def test_max_length_rejects_publish_and_stores_nothing(harness: Harness) -> None:
    if not capabilities(harness.driver).max_length:
        pytest.skip(f"{harness.driver} does not enforce max_length")
    key = harness.driver
    q = harness.queue("bounded", driver_options={key: {"max_length": 3}})
    with harness.load():
        for i in range(3):
            queue.publish(q, i + 1)
        with pytest.raises(errors.Error) as info:
            queue.publish(q, 4)
        assert info.value.kind == errors.INTERNAL
        assert info.value.retryable is True
        with pytest.raises(errors.Error):
            queue.publish_many(q, [5, 6])
        assert queue.info(q)["message_count"] == 3


def test_nack_into_full_queue_keeps_the_message(harness: Harness) -> None:
    if not capabilities(harness.driver).max_length:
        pytest.skip(f"{harness.driver} does not enforce max_length")
    sink = Sink()

    def handle(payload: Any) -> None:
        sink.record(payload)
        if queue.message().attempts == 1:
            raise RuntimeError("retry me")

    q = harness.queue("full_nack", driver_options={harness.driver: {"max_length": 2}})
    harness.consumer("worker", "full_nack", handle, concurrency=2, prefetch=2)
    with harness.load() as app:
        queue.publish(q, "a")
        queue.publish(q, "b")
        app.start_consumers()
        wait_until(lambda: len(sink) == 4)
        assert app.wait_idle(timeout=5)
    assert sorted(sink.items) == ["a", "a", "b", "b"]


# -- stopping (last: they stop apps mid-work) --------------------------------------------------


def test_graceful_stop_lets_in_flight_handlers_finish(harness: Harness) -> None:
    started = threading.Event()
    finished: list[Any] = []
    q = harness.queue("graceful")

    def handle(payload: Any) -> None:
        started.set()
        time.sleep(0.3)
        finished.append(payload)

    harness.consumer("worker", "graceful", handle, concurrency=2, prefetch=2)
    app = harness.load()
    app.start(consumers=True)
    for i in range(6):
        queue.publish(q, i + 1)
    assert started.wait(5)
    app.stop_consumers(timeout=5)
    # the in-flight ones completed and were acked; the rest are still queued
    assert len(finished) >= 1
    info = queue.info(q)
    assert info["in_flight"] == 0
    assert info["message_count"] == 6 - len(finished)
    app.stop()


def test_stop_after_grace_returns_unfinished_messages(harness: Harness) -> None:
    started = threading.Event()

    async def handle(payload: Any) -> None:
        started.set()
        await asyncio.sleep(30)

    q = harness.queue("hung")
    harness.consumer("worker", "hung", handle)
    app = harness.load()
    app.start(consumers=True)
    queue.publish(q, "stuck")
    assert started.wait(5)
    t0 = time.monotonic()
    app.stop_consumers(timeout=0.2)
    assert time.monotonic() - t0 < 3
    info = queue.info(q)
    assert info["message_count"] == 1
    assert info["in_flight"] == 0
    assert info["ready"] == 1
    app.stop()


def test_message_whose_attempts_never_settled_is_dead_lettered_without_running(harness: Harness) -> None:
    """A delivery beyond max_attempts means earlier consumers died mid-handler: dead-letter it."""
    calls: list[Any] = []
    dlq_sink = Sink()
    q = harness.queue("poison", dead_letter={"queue": "poison_dlq", "max_attempts": 2})
    harness.queue("poison_dlq")
    harness.consumer("worker", "poison", calls.append)
    harness.consumer("dlq_worker", "poison_dlq", dlq_sink.record)
    with harness.load() as app:
        queue.publish(q, "kills its worker")
        bound = app.runtime.queue(q)

        async def lease_and_vanish() -> int:
            # What a consumer that dies mid-handler leaves behind: a delivery that was
            # handed out (an attempt) and never settled.
            sub = await bound.driver.subscribe(bound.spec, prefetch=1, auto_ack=False, options={})
            delivery = await asyncio.wait_for(sub.get(), 10)
            assert delivery is not None
            await sub.close()
            return delivery.attempts

        seen = [asyncio.run_coroutine_threadsafe(lease_and_vanish(), app.loop).result(15) for _ in range(2)]
        assert seen == [1, 2]
        app.start_consumers()
        wait_until(lambda: len(dlq_sink) == 1)
    assert calls == []
    assert dlq_sink.headers[0]["attempts"] == 3
    assert "attempts exhausted" in str(dlq_sink.headers[0]["x_dead_letter_reason"])
