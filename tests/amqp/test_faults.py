"""Fault tests: broker restarts, cut and half-open connections, killed consumers, poison, blocking.

Broker restarts and blocking use a RabbitMQ node owned by this module (see
tests/support/rabbit_node.py); connection faults go through tests/support/tcp_proxy.py.
The shared broker on 5672 is never restarted or reconfigured: the SIGKILL tests only
kill our own consumer processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor import errors, queue
from conveyor.drivers.amqp import AmqpDriver
from tests.amqp.helpers import NODE_START_TIMEOUT, Sink, broker, count, on, on_loop
from tests.support.harness import Harness
from tests.support.rabbit_node import RabbitNode
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]

FAST_RECONNECT = {"reconnect_delay": "200ms", "reconnect_max_delay": "1s", "connection_timeout": "5s"}


# Time bounds allow this much for a loaded machine (a starved event loop, a slow broker).
SLACK = 4.0
CTL_TIMEOUT = 120.0  # each rabbitmqctl call boots an Erlang VM: slow on a loaded machine


def restart(node: RabbitNode) -> None:
    try:
        node.stop()
    except subprocess.SubprocessError:  # rabbitmqctl too slow: kill it (durable data survives)
        node.kill()
    node.start(timeout=NODE_START_TIMEOUT)


def driver_of(app: Any, qid: str) -> AmqpDriver:
    driver = app.runtime.queue(qid).driver
    assert isinstance(driver, AmqpDriver)
    return driver


# -- broker restarts (private node) -----------------------------------------------------------


@pytest.mark.timeout(300)
def test_broker_restart_during_a_publish_loop_loses_no_confirmed_message(
    node: RabbitNode, amqp: Harness
) -> None:
    """Ledger: every publish returned (confirmed) or raised; every confirmed one is consumed."""
    on(amqp, node.url, **FAST_RECONNECT)
    q = amqp.queue("ledger")
    confirmed: list[int] = []
    failed: list[tuple[int, errors.Error]] = []
    stop = threading.Event()
    restarted = threading.Event()
    with amqp.load() as app:

        def publisher() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    queue.publish(q, {"n": n})
                    confirmed.append(n)
                except errors.Error as exc:
                    failed.append((n, exc))

        thread = threading.Thread(target=publisher)
        thread.start()
        try:
            wait_until(lambda: len(confirmed) >= 200, timeout=30)
            restart(node)
            restarted.set()
            after = len(confirmed)
            wait_until(lambda: len(confirmed) >= after + 200, timeout=60)
        finally:
            stop.set()
            thread.join(30)
        assert not thread.is_alive(), "a publish hung"
        consumed = drain(app, q, expect_at_least=len(confirmed))
    assert failed, "the restart should have made some publishes fail"
    for _n, exc in failed:
        assert exc.kind == errors.INTERNAL and exc.retryable, exc
    missing = set(confirmed) - consumed
    assert not missing, f"{len(missing)} confirmed messages lost, e.g. {sorted(missing)[:5]}"


def drain(app: Any, qid: str, expect_at_least: int) -> set[int]:
    """Consume everything on ``qid`` through the driver; the payload numbers seen."""
    import asyncio
    import json

    bound = app.runtime.queue(qid)
    seen: set[int] = set()

    async def run() -> None:
        sub = await bound.driver.subscribe(bound.spec, prefetch=200, auto_ack=False, options={})
        try:
            while True:
                try:
                    delivery = await asyncio.wait_for(sub.get(), 3 if len(seen) >= expect_at_least else 15)
                except TimeoutError:
                    return
                assert delivery is not None
                seen.add(json.loads(delivery.body)["n"])
                await sub.ack(delivery)
        finally:
            await sub.close()

    on_loop(app, run(), timeout=120)
    return seen


@pytest.mark.timeout(180)
def test_broker_restart_during_consumption_consumers_resume(node: RabbitNode, amqp: Harness) -> None:
    on(amqp, node.url, **FAST_RECONNECT)
    sink = Sink()
    q = amqp.queue("resume")
    amqp.consumer("worker", "resume", sink.record, concurrency=2, prefetch=20)
    app = amqp.load()
    app.start(consumers=True)
    try:
        queue.publish_many(q, [{"n": i} for i in range(100)])
        wait_until(lambda: len(sink) >= 100, timeout=30)
        restart(node)
        publish_with_retries(q, [{"n": i} for i in range(100, 200)], within=60)
        wait_until(lambda: {item["n"] for item in sink.items} >= set(range(200)), timeout=60)
        driver = driver_of(app, q)
        sub = next(iter(driver._subs))
        assert sub.attached.is_set(), "the consumer re-attached"
        assert queue.info(q)["consumer_count"] == 1, "and the broker sees it"
        assert app.wait_idle(timeout=10)
    finally:
        app.stop(timeout=5)


def publish_with_retries(qid: str, items: list[Any], within: float) -> None:
    deadline = time.monotonic() + within
    for item in items:
        while True:
            try:
                queue.publish(qid, item)
                break
            except errors.Error as exc:
                assert exc.retryable and time.monotonic() < deadline, exc
                time.sleep(0.2)


@pytest.mark.timeout(600)
def test_blocked_broker_makes_publish_fail_in_bounded_time(node: RabbitNode, amqp: Harness) -> None:
    on(amqp, node.url, connection_timeout="3s", reconnect_delay="200ms", reconnect_max_delay="1s")
    q = amqp.queue("blocked")
    with amqp.load():
        queue.publish(q, "before")
        try:  # the alarm is lifted even when rabbitmqctl gave up on setting it (it may be set)
            node.ctl("set_vm_memory_high_watermark", "0.0000001", timeout=CTL_TIMEOUT)
            t0 = time.monotonic()
            with pytest.raises(errors.Error) as info:
                queue.publish(q, "while blocked")
            took = time.monotonic() - t0
            assert info.value.kind == errors.INTERNAL and info.value.retryable
            assert info.value.details["reason"] == "timeout"
            assert "may or may not be stored" in info.value.message
            assert 2.5 <= took <= 3 + SLACK, took
        finally:
            unblock(node)
        publish_with_retries(q, ["after"], within=60)


def unblock(node: RabbitNode) -> None:
    """Lift the memory alarm; when rabbitmqctl cannot, restart the node (a watermark set at
    run time does not survive a restart), so that the tests after this one do not find
    the node still blocked (seen on a loaded machine, where one rabbitmqctl call can take
    minutes)."""
    try:
        node.ctl("set_vm_memory_high_watermark", "0.4", timeout=CTL_TIMEOUT)
    except subprocess.SubprocessError:
        restart(node)


# -- connection faults through the proxy ---------------------------------------------------------


@pytest.mark.timeout(90)
def test_connection_cut_mid_handler_settling_later_is_harmless(node: RabbitNode, amqp: Harness) -> None:
    with TcpProxy(node.port) as proxy:
        on(amqp, f"amqp://guest:guest@127.0.0.1:{proxy.port}/", **FAST_RECONNECT)
        gate = threading.Event()
        sink = Sink()

        def handle(payload: Any) -> None:
            sink.record(payload)
            if payload == "a" and queue.message().attempts == 1:
                gate.wait(20)

        q = amqp.queue("cut")
        amqp.consumer("worker", "cut", handle)
        app = amqp.load()
        app.start(consumers=True)
        try:
            queue.publish(q, "a")
            wait_until(lambda: len(sink) == 1)
            proxy.reset()  # the broker requeues "a"; our handler still holds it
            driver = driver_of(app, q)
            wait_until(lambda: driver.link.generation >= 2, timeout=20)
            gate.set()  # the handler returns: its ack is for a delivery of the old connection
            wait_until(lambda: sink.items.count("a") == 2, timeout=20)
            publish_with_retries(q, ["b"], within=20)
            wait_until(lambda: "b" in sink.items, timeout=20)
            assert app.wait_idle(timeout=10)
        finally:
            gate.set()
            app.stop(timeout=5)
    a_attempts = [att for item, att in zip(sink.items, sink.attempts, strict=True) if item == "a"]
    assert a_attempts == [1, 2]


@pytest.mark.timeout(90)
def test_half_open_connection_is_detected_within_about_two_heartbeats(
    node: RabbitNode, amqp: Harness
) -> None:
    with TcpProxy(node.port) as proxy:
        on(amqp, f"amqp://guest:guest@127.0.0.1:{proxy.port}/", heartbeat="1s", **FAST_RECONNECT)
        q = amqp.queue("halfopen")
        with amqp.load() as app:
            queue.publish(q, "before")
            driver = driver_of(app, q)
            proxy.blackhole()  # sockets stay open, nothing gets through: a vanished peer
            t0 = time.monotonic()
            wait_until(lambda: not driver.link.is_up, timeout=15, interval=0.05)
            detected = time.monotonic() - t0
            proxy.forward()
            publish_with_retries(q, ["after"], within=20)
            assert queue.info(q)["message_count"] == 2
    # heartbeat 1 s: frames every 0.5 s; declared dead after 2 * (1 + 1) s of silence
    assert detected <= 4 + SLACK, detected


# -- consumer processes that die -------------------------------------------------------------------

CONSUMER = textwrap.dedent(
    """
    import os, sys, time
    import conveyor

    def hang(payload):
        open(os.environ["MARKER"], "a").write("started\\n")
        time.sleep(60)

    def crash(payload):
        open(os.environ["MARKER"], "a").write("crashed\\n")
        os._exit(17)   # like a segfault in the handler: no cleanup at all

    conveyor.load(sys.argv[1]).run(grace=0)
    """
)


def consumer_process(tmp_path: Path, harness: Harness, handler: str, **queue_fields: Any) -> Any:
    """Write an app whose consumer runs ``handler`` from a module of its own; return a starter."""
    (tmp_path / "procmod.py").write_text(CONSUMER.replace("conveyor.load(sys.argv[1]).run(grace=0)", ""))
    (tmp_path / "runner.py").write_text(CONSUMER)
    harness.entries.append(
        {"name": "worker", "kind": "queue.consumer", "queue": "jobs", "handler": f"procmod:{handler}"}
    )
    path = harness.write()
    marker = tmp_path / "marker"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "MARKER": str(marker), "PYTHONPATH": f"{tmp_path}{os.pathsep}{root}"}

    def start() -> subprocess.Popen[bytes]:
        with open(tmp_path / "stderr.txt", "ab") as stderr:
            return subprocess.Popen(
                [sys.executable, str(tmp_path / "runner.py"), str(path)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    return start, marker


@pytest.mark.timeout(90)
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_consumer_killed_mid_handler_message_is_redelivered_with_attempts_raised(
    amqp: Harness, tmp_path: Path, queue_type: str
) -> None:
    q = amqp.queue("jobs", driver_options={"amqp": {"queue_type": queue_type}})
    start, marker = consumer_process(tmp_path, amqp, "hang")
    proc = start()
    try:
        with amqp.load() as app:
            queue.publish(q, "job-1")
            wait_until(lambda: marker.exists() and "started" in marker.read_text(), timeout=30)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            bound = app.runtime.queue(q)

            async def take() -> int:
                sub = await bound.driver.subscribe(bound.spec, prefetch=1, auto_ack=False, options={})
                import asyncio

                delivery = await asyncio.wait_for(sub.get(), 15)
                assert delivery is not None and delivery.body == b'"job-1"'
                await sub.ack(delivery)
                await sub.close()
                return delivery.attempts

            assert on_loop(app, take()) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.timeout(120)
def test_poison_message_that_kills_every_consumer_is_dead_lettered(amqp: Harness, tmp_path: Path) -> None:
    q = amqp.queue("jobs", dead_letter={"queue": "jobs_dlq", "max_attempts": 3})
    dlq = amqp.queue("jobs_dlq")
    start, marker = consumer_process(tmp_path, amqp, "crash")
    crashes = 0
    with amqp.load():
        queue.publish(q, "poison", {"tenant": "t-1"})
        for _ in range(6):  # bounded: three crashes are expected, then a dead letter
            proc = start()
            try:
                deadline = time.monotonic() + 30
                while proc.poll() is None and queue.info(dlq)["message_count"] == 0:
                    assert time.monotonic() < deadline, "neither a crash nor a dead letter"
                    time.sleep(0.05)
            finally:
                survived = proc.poll() is None
                if survived:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(20)
            if survived:
                break  # the message was dead-lettered without reaching the handler
            assert proc.returncode == 17
            crashes += 1
        wait_until(lambda: queue.info(dlq)["message_count"] == 1, timeout=20)
        assert queue.info(q)["message_count"] == 0
    assert crashes == 3, marker.read_text()
    assert marker.read_text().count("crashed") == 3


# -- lost connections count as attempts ----------------------------------------------------------

# Seconds an async handler blocks the loop: the broker gives up on a heartbeat of 2 s after
# about 4 s of silence, and aiormq after 2 * (2 + 1) s.
BLOCKED = 8.0


@pytest.mark.timeout(120)
def test_a_sync_handler_that_runs_long_keeps_the_connection_and_runs_once(
    node: RabbitNode, amqp: Harness
) -> None:
    """A sync handler runs in a thread: the loop keeps answering heartbeats, so a handler
    that takes five heartbeat timeouts loses neither the connection nor its delivery.
    Faults F07."""
    on(amqp, node.url, heartbeat="2s", **FAST_RECONNECT)
    sink = Sink()

    def slow(payload: Any) -> None:
        sink.record(payload)
        time.sleep(10)

    q = amqp.queue("slow_sync")
    amqp.consumer("worker", "slow_sync", slow)
    app = amqp.load()
    app.start()
    try:
        queue.publish(q, "long")
        driver = driver_of(app, q)
        app.start_consumers()
        wait_until(lambda: len(sink) == 1, timeout=20)
        wait_until(lambda: app.stats()[amqp.qid("worker")]["acked"] == 1, timeout=40)
        assert queue.info(q)["message_count"] == 0
        assert driver.link.generation == 1, "the connection was never lost"
    finally:
        app.stop(timeout=5)
    assert sink.attempts == [1]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("queue_type", ["classic", pytest.param("quorum", marks=pytest.mark.long)])
def test_heartbeats_missed_by_a_blocked_loop_cost_an_attempt_each_until_dead_lettered(
    node: RabbitNode, amqp: Harness, queue_type: str
) -> None:
    """An async handler blocks the event loop (CPU work, time.sleep): nothing answers the
    broker's heartbeats, the broker drops the connection and redelivers. Each such
    redelivery is an attempt, so the message reaches max_attempts and is dead-lettered
    instead of being redelivered for ever. Classic queues count it by recording the
    redelivery in the message, quorum queues by their x-delivery-count. Faults F07, C3."""
    on(amqp, node.url, heartbeat="2s", **FAST_RECONNECT)
    sink = Sink()

    async def blocks_the_loop(payload: Any) -> None:
        sink.record(payload)
        time.sleep(BLOCKED)  # noqa: ASYNC251 - blocking the loop is the fault under test

    q = amqp.queue(
        "blocker",
        dead_letter={"queue": "blocker_dlq", "max_attempts": 2},
        driver_options={"amqp": {"queue_type": queue_type}},
    )
    dlq = amqp.queue("blocker_dlq")
    amqp.consumer("worker", "blocker", blocks_the_loop)
    app = amqp.load()
    app.start()
    try:
        queue.publish(q, "heavy")  # before the handler can block the loop this publish waits on
        app.start_consumers()
        wait_until(lambda: count(dlq) == 1, timeout=120)
        wait_until(lambda: count(q) == 0, timeout=30)
        dead = broker(lambda ch: ch.basic_get(f"{amqp.namespace}.blocker_dlq", no_ack=True), node.url)
    finally:
        app.stop(timeout=5)
    assert sink.items == ["heavy", "heavy"]
    assert sink.attempts == [1, 2]
    headers = dead.header.properties.headers
    assert headers["x_dead_letter_reason"].startswith("attempts exhausted: delivered 3 times")
    assert headers["attempts"] == 3


@pytest.mark.long
@pytest.mark.timeout(180)
def test_without_a_dead_letter_queue_each_lost_connection_still_raises_attempts(
    node: RabbitNode, amqp: Harness
) -> None:
    """No max_attempts applies without a dead-letter queue, but the count keeps growing
    with every connection the blocked loop loses (it is not stuck at 2). Faults C3, F07."""
    on(amqp, node.url, heartbeat="2s", **FAST_RECONNECT)
    sink = Sink()

    async def blocks_the_loop(payload: Any) -> None:
        sink.record(payload)
        if len(sink) < 3:
            time.sleep(BLOCKED)  # noqa: ASYNC251 - blocking the loop is the fault under test

    q = amqp.queue("blocker_nodlq")
    amqp.consumer("worker", "blocker_nodlq", blocks_the_loop)
    app = amqp.load()
    app.start()
    try:
        queue.publish(q, "heavy")
        app.start_consumers()
        wait_until(lambda: len(sink) >= 3, timeout=120)
        wait_until(lambda: count(q) == 0, timeout=30)
    finally:
        app.stop(timeout=5)
    assert sink.attempts == [1, 2, 3]
