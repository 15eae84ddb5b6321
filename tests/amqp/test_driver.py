"""The AMQP driver against the shared broker: confirms, declarations, headers, attempts, retries.

Every test here runs on its own uniquely named queues, deleted afterwards; none of
them restarts or reconfigures the shared broker (fault tests use a private node).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from conveyor import errors, queue
from conveyor.drivers.amqp import AmqpDriver
from tests.amqp.helpers import Sink, broker, on, on_loop
from tests.support.harness import Harness
from tests.support.waiting import wait_until

pytestmark = pytest.mark.broker


def test_publish_returns_after_a_confirm_of_a_persistent_message(amqp: Harness) -> None:
    q = amqp.queue("persist")
    with amqp.load():
        assert queue.publish(q, {"a": 1}, {"correlation_id": "c-1"})
        name = f"{amqp.namespace}.persist"

        async def peek(ch: Any) -> Any:
            return await ch.basic_get(name, no_ack=True)

        got = broker(peek)
    props = got.header.properties
    assert props.delivery_mode == 2
    assert props.correlation_id == "c-1"
    assert props.message_id
    assert got.body == b'{"a":1}' or got.body.replace(b" ", b"") == b'{"a":1}'


def test_full_queue_rejects_publishes_and_batches_report_what_was_stored(amqp: Harness) -> None:
    q = amqp.queue("bounded", driver_options={"amqp": {"max_length": 3}})
    with amqp.load():
        queue.publish(q, 1)
        with pytest.raises(errors.Error) as info:
            queue.publish_many(q, [2, 3, 4, 5])
        exc = info.value
        assert exc.kind == errors.INTERNAL and exc.retryable
        assert exc.details["reason"] == "queue_full"
        assert exc.details["stored"] == [0, 1]
        assert exc.details["not_stored"] == [2, 3], "a nack is a definite refusal"
        assert "full" in exc.message and "nothing was stored" in exc.message
        assert queue.info(q)["message_count"] == 3


def test_unroutable_publish_is_an_error_not_a_silent_loss(amqp: Harness) -> None:
    q = amqp.queue("vanishing")
    with amqp.load():
        name = f"{amqp.namespace}.vanishing"

        async def drop(ch: Any) -> None:
            await ch.queue_delete(name)

        broker(drop)
        with pytest.raises(errors.Error) as info:
            queue.publish(q, "lost?")
        assert info.value.kind == errors.INTERNAL and info.value.retryable
        assert info.value.details["reason"] == "unroutable"
        assert info.value.details["not_stored"] == [0]


def test_declaration_mismatch_names_every_differing_argument(amqp: Harness) -> None:
    name = f"{amqp.namespace}.clash"

    async def make(ch: Any) -> None:
        await ch.queue_declare(name, durable=True, arguments={"x-max-length": 5, "x-message-ttl": 1000})
        await ch.basic_publish(b"keep me", routing_key=name)

    broker(make)
    amqp.queue("clash", driver_options={"amqp": {"max_length": 3, "message_ttl": "2s", "max_priority": 4}})
    app = amqp.load()
    with pytest.raises(errors.Error) as info:
        app.start()
    exc = info.value
    assert exc.kind == errors.INVALID
    found = {d["argument"] for d in exc.details["differences"]}
    assert found == {"x-max-length", "x-overflow", "x-message-ttl", "x-max-priority"}
    assert "max_length" in exc.message and "message_ttl" in exc.message
    assert f"rabbitmqctl delete_queue {name}" in exc.message

    async def count(ch: Any) -> int:
        return int((await ch.queue_declare(name, passive=True)).message_count)

    assert broker(count) == 1, "diagnosing never changes or empties the existing queue"


def test_priorities_are_honoured_and_come_back_by_name(amqp: Harness) -> None:
    sink = Sink()
    q = amqp.queue("prio", driver_options={"amqp": {"max_priority": 9}})
    amqp.consumer("worker", "prio", sink.record, prefetch=1)
    with amqp.load() as app:
        for prio in ("low", "normal", 7, "high"):
            queue.publish(q, str(prio), {"priority": prio})
        app.start_consumers()
        wait_until(lambda: len(sink) == 4)
    assert sink.items == ["high", "7", "normal", "low"]
    assert [h["priority"] for h in sink.headers] == ["high", 7, "normal", "low"]


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_attempts_count_every_unsettled_delivery(amqp: Harness, queue_type: str) -> None:
    """A consumer that vanishes mid-handler costs an attempt each time, on both queue types."""
    q = amqp.queue("crashy", driver_options={"amqp": {"queue_type": queue_type}})
    with amqp.load() as app:
        queue.publish(q, "x")
        bound = app.runtime.queue(q)

        async def lease_and_vanish() -> int:
            sub = await bound.driver.subscribe(bound.spec, prefetch=1, auto_ack=False, options={})
            delivery = await asyncio.wait_for(sub.get(), 10)
            assert delivery is not None
            await sub.close()  # unsettled: back to the broker, flagged as redelivered
            return delivery.attempts

        assert [on_loop(app, lease_and_vanish()) for _ in range(4)] == [1, 2, 3, 4]


def test_a_redelivery_whose_connection_is_lost_while_its_attempt_is_recorded_is_not_handed_out(
    amqp: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A classic queue's redelivery is recorded (republished with its attempt) before it is
    handed out. If the connection is lost during that republish, the delivery is void (the
    broker has it back): it must not reach a handler, whose settlement would be stale; the
    redelivery on the new connection is recorded and handed out. Faults C3, B03."""
    on(amqp, "amqp://guest:guest@127.0.0.1:5672/", reconnect_delay="100ms", reconnect_max_delay="500ms")
    q = amqp.queue("lost_record")
    with amqp.load() as app:
        queue.publish(q, "x")
        bound = app.runtime.queue(q)
        driver = bound.driver
        assert isinstance(driver, AmqpDriver)
        real_publish_raw = driver.publish_raw
        injected: list[str] = []

        async def connection_lost_during(spec: Any, body: bytes, properties: Any) -> None:
            if injected:
                return await real_publish_raw(spec, body, properties)
            injected.append(properties.message_id)
            conn = await driver.link.connection()
            await conn.close()  # the link reconnects, the consumer re-attaches
            raise errors.internal("publish failed: connection closed", retryable=True)

        async def scenario() -> list[int]:
            first = await bound.driver.subscribe(bound.spec, prefetch=1, auto_ack=False, options={})
            leased = await asyncio.wait_for(first.get(), 10)
            assert leased is not None
            await first.close()  # unsettled: back on the queue, flagged as redelivered
            monkeypatch.setattr(driver, "publish_raw", connection_lost_during)
            second = await bound.driver.subscribe(bound.spec, prefetch=1, auto_ack=False, options={})
            try:
                again = await asyncio.wait_for(second.get(), 30)
                assert again is not None
                await second.ack(again)  # a delivery of the lost connection would be stale here
            finally:
                await second.close()
            return [leased.attempts, again.attempts]

        assert on_loop(app, scenario(), timeout=60) == [1, 2]
        assert injected, "the redelivery was recorded through publish_raw"
        wait_until(lambda: queue.info(q)["message_count"] == 0, timeout=10)


def test_retry_parks_the_message_in_a_delay_queue(amqp: Harness) -> None:
    sink = Sink()
    times: list[float] = []

    def handle(payload: Any) -> None:
        sink.record(payload)
        times.append(time.monotonic())
        if queue.message().attempts == 1:
            raise RuntimeError("later")

    q = amqp.queue("later", retry={"delay": "1500ms"})
    amqp.consumer("worker", "later", handle)
    app = amqp.load()
    app.start(consumers=True)
    try:
        queue.publish(q, "x", {"f": 0.25})
        wait_until(lambda: len(sink) == 1)
        parked = (1, 0, 0, 1)  # delayed, ready, in_flight, message_count
        wait_until(
            lambda: (
                tuple(queue.info(q)[k] for k in ("delayed", "ready", "in_flight", "message_count")) == parked
            ),
            timeout=1,
        )
        wait_until(lambda: len(sink) == 2, timeout=10)
        assert app.wait_idle(timeout=5)
    finally:
        app.stop()
    assert sink.attempts == [1, 2]
    assert sink.headers[1] == {"f": 0.25}
    assert 1.4 <= times[1] - times[0] <= 4.0


def test_stop_returns_prefetched_messages_without_costing_an_attempt(amqp: Harness) -> None:
    started = threading.Event()
    done: list[Any] = []

    def slow(payload: Any) -> None:
        started.set()
        time.sleep(0.3)
        done.append(payload)

    q = amqp.queue("prefetched")
    amqp.consumer("worker", "prefetched", slow, prefetch=10)
    sink = Sink()
    app = amqp.load()
    app.start(consumers=True)
    try:
        queue.publish_many(q, list(range(1, 7)))
        assert started.wait(5)
        app.stop_consumers(timeout=5)
        left = queue.info(q)
        assert left["in_flight"] == 0
        assert left["message_count"] == 6 - len(done) > 0
        bound = app.runtime.queue(q)

        async def drain() -> None:
            sub = await bound.driver.subscribe(bound.spec, prefetch=10, auto_ack=False, options={})
            for _ in range(6 - len(done)):
                delivery = await asyncio.wait_for(sub.get(), 10)
                assert delivery is not None
                sink.attempts.append(delivery.attempts)
                await sub.ack(delivery)
            await sub.close()

        on_loop(app, drain())
    finally:
        app.stop()
    assert sink.attempts and set(sink.attempts) == {1}


def test_dead_letter_failure_keeps_the_original(amqp: Harness) -> None:
    """The dead-letter queue is full: the copy is refused, so the original must stay.

    ``failed`` is counted before the message is parked, and the parked copy is in the
    delay queue (``delayed``) a confirm round trip before the original is acked (until
    then it is still ``in_flight``): the counts are read once the consumer has let go
    of the message, not while it is being moved.
    """
    q = amqp.queue("poison", dead_letter={"queue": "dlq", "max_attempts": 1}, retry={"delay": "200ms"})
    dlq = amqp.queue("dlq", driver_options={"amqp": {"max_length": 1}})
    calls: list[int] = []

    def fail(payload: Any) -> None:
        calls.append(queue.message().attempts)
        raise ValueError("poison")

    amqp.consumer("worker", "poison", fail)
    app = amqp.load()
    app.start()
    try:
        queue.publish(dlq, "occupies the only slot")
        queue.publish(q, "p")
        app.start_consumers()

        # attempt 1 fails, the copy is refused, the message is retried; attempt 2 is beyond
        # max_attempts, the copy is refused again, so it is parked for retry.max_delay
        def parked() -> bool:
            info = queue.info(q)
            return bool(info["in_flight"] == 0 and info["delayed"] >= 1)

        try:
            wait_until(lambda: app.stats()[amqp.qid("worker")]["failed"] >= 2, timeout=20)
            wait_until(parked, timeout=10)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: stats {app.stats()}, info {queue.info(q)}, calls {calls}") from None
        counts = queue.info(q)
        assert [counts[k] for k in ("ready", "in_flight", "delayed", "message_count")] == [0, 0, 1, 1]
        assert queue.info(dlq)["message_count"] == 1
        assert calls == [1]
    finally:
        app.stop(timeout=1)


def test_connection_options_reach_the_broker(amqp: Harness) -> None:
    on(
        amqp,
        "amqp://guest:guest@127.0.0.1:5672/",
        connection_name="conveyor-test-conn",
        frame_size=8192,
        channel_max=64,
        heartbeat="2s",
        auth_mechanism="AMQPLAIN",
    )
    q = amqp.queue("opts")
    sink = Sink()
    amqp.consumer("worker", "opts", sink.record)
    with amqp.load() as app:
        bound = app.runtime.queue(q)
        driver = bound.driver
        assert isinstance(driver, AmqpDriver)
        conn = on_loop(app, driver.link.connection())
        assert conn.connection_tune.frame_max == 8192
        assert conn.connection_tune.channel_max == 64
        assert conn.connection_tune.heartbeat == 2
        queue.publish(q, "x" * 20000)  # larger than one frame: split and reassembled
        app.start_consumers()
        wait_until(lambda: len(sink) == 1)
    assert sink.items == ["x" * 20000]


def test_wrong_password_fails_at_start_with_a_clear_error(amqp: Harness) -> None:
    """A refused login is not retryable: the app's start does not keep trying it for
    its ``startup_timeout`` (30 s here), it fails at once."""
    on(amqp, "amqp://guest:wrong@127.0.0.1:5672/", connection_timeout="5s")
    amqp.queue("nope")
    app = amqp.load()
    t0 = time.monotonic()
    with pytest.raises(errors.Error) as info:
        app.start()
    assert time.monotonic() - t0 < 10
    assert info.value.kind == errors.PERMISSION_DENIED and not info.value.retryable, info.value
    assert info.value.details["reason"] == "auth"
    assert "cannot connect" in info.value.message and "ACCESS_REFUSED" in info.value.message
    assert "wrong" not in info.value.message


def test_inline_pem_in_yaml_is_kept_as_pem(tmp_path: Any) -> None:
    from conveyor.drivers.options.amqp import AmqpOptions
    from conveyor.registry.loader import load_registry

    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    (tmp_path / "app.yaml").write_text(
        "version: '1.0'\nnamespace: app\nentries:\n"
        "  - {name: b, kind: queue.driver.amqp, tls: {enabled: true, ca: "
        + repr(pem).replace("'", '"')
        + ", cert: c.pem}}\n"
    )
    options = load_registry(tmp_path / "app.yaml").drivers["app:b"].options
    assert isinstance(options, AmqpOptions) and options.tls is not None
    assert options.tls.ca == pem
    assert options.tls.cert == str(tmp_path / "c.pem")


def test_queue_deleted_under_a_consumer_is_redeclared_and_consumed_again(amqp: Harness) -> None:
    sink = Sink()
    q = amqp.queue("deleted", retry={"delay": 0})
    amqp.consumer("worker", "deleted", sink.record)
    app = amqp.load()
    app.start(consumers=True)
    try:
        queue.publish(q, "before")
        wait_until(lambda: len(sink) == 1)
        name = f"{amqp.namespace}.deleted"
        driver = app.runtime.queue(q).driver
        assert isinstance(driver, AmqpDriver)
        sub = next(iter(driver._subs))
        first_tag = sub._consumer_tag

        async def drop(ch: Any) -> None:
            await ch.queue_delete(name)

        broker(drop)
        wait_until(lambda: sub.attached.is_set() and sub._consumer_tag not in (None, first_tag), timeout=15)
        queue.publish(q, "after")
        wait_until(lambda: len(sink) == 2, timeout=10)
    finally:
        app.stop()
    assert sink.items == ["before", "after"]
