"""Health probes: ``/healthz`` (the process and its loop answer) and ``/readyz`` (drivers
connected, consumers attached), served next to ``/metrics`` (see test_metrics.py).

Readiness is checked through the parts that make an app not ready: an optional driver
that has not started (N04), a consumer whose start keeps failing, consumers stopped, a
RabbitMQ connection lost (B07/N01, through a TCP proxy), an app still starting, and an
event loop blocked by a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor import App, queue
from tests.support.harness import Harness
from tests.support.profiles import AMQP_URL
from tests.support.stub_drivers import FlakyStartDriver
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import wait_until
from tests.test_metrics import get, serving


def probe(app: App, path: str) -> tuple[int, dict[str, Any]]:
    status, content_type, body = get(app.metrics_address, path)
    assert content_type == "application/json", content_type
    return status, json.loads(body)


def test_a_running_app_is_alive_and_ready(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.queue("jobs")
    cid = h.consumer("worker", "jobs", lambda payload: None)
    with serving(h.load()) as app:
        assert probe(app, "/healthz") == (200, {"status": "alive", "phase": "running"})
        status, answer = probe(app, "/readyz")
        assert status == 200
        assert answer == {
            "status": "ready",
            "phase": "running",
            "drivers": {h.qid("drv"): {"ready": True}},
            "consumers": {cid: {"ready": True}},
        }


def test_an_app_started_without_consumers_is_ready_without_them(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.queue("jobs")
    h.consumer("worker", "jobs", lambda payload: None)
    with serving(h.load(), consumers=False) as app:
        status, answer = probe(app, "/readyz")
        assert status == 200 and answer["consumers"] == {}


def test_stopped_consumers_make_the_app_not_ready(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.queue("jobs")
    cid = h.consumer("worker", "jobs", lambda payload: None)
    with serving(h.load()) as app:
        app.stop_consumers()
        status, answer = probe(app, "/readyz")
        assert status == 503
        assert answer["reasons"] == [f"consumer {cid}: not attached (stopped)"]
        assert answer["consumers"][cid] == {"ready": False, "reason": "not attached (stopped)"}
        app.start_consumers()
        assert probe(app, "/readyz")[0] == 200


def test_an_optional_driver_that_is_down_makes_the_app_not_ready_until_it_is_up(
    tmp_path: Path, flaky: type[FlakyStartDriver]
) -> None:
    """N04: the broker is down at startup; the optional driver lets the app start, and
    /readyz says what is missing until the background retries bring it up."""
    flaky.open_failures = -1
    h = Harness(tmp_path)
    h.entries[0]["lifecycle"] = {"startup": "optional", "startup_timeout": "300ms"}
    h.queue("jobs")
    cid = h.consumer("worker", "jobs", lambda payload: None)
    did = h.qid("drv")
    with serving(h.load()) as app:
        assert probe(app, "/healthz")[0] == 200
        status, answer = probe(app, "/readyz")
        assert status == 503
        driver = answer["drivers"][did]
        assert (driver["ready"], driver["optional"]) == (False, True)
        assert driver["reason"].startswith("not started (optional; retrying in the background): ")
        assert driver["reason"].endswith("connection refused")
        assert answer["consumers"][cid] == {
            "ready": False,
            "reason": f"not attached: its driver {did} has not started",
        }
        assert answer["reasons"] == [
            f"driver {did}: {answer['drivers'][did]['reason']}",
            f"consumer {cid}: {answer['consumers'][cid]['reason']}",
        ]
        flaky.open_failures = 0
        wait_until(lambda: probe(app, "/readyz")[0] == 200, timeout=20)
        assert probe(app, "/readyz")[1]["consumers"] == {cid: {"ready": True}}


def test_an_optional_consumer_that_cannot_attach_makes_the_app_not_ready(
    tmp_path: Path, flaky: type[FlakyStartDriver]
) -> None:
    flaky.subscribe_failures = -1
    h = Harness(tmp_path)
    h.queue("jobs")
    cid = h.consumer(
        "worker", "jobs", lambda payload: None, lifecycle={"startup": "optional", "startup_timeout": "300ms"}
    )
    with serving(h.load()) as app:
        status, answer = probe(app, "/readyz")
        assert status == 503
        assert answer["reasons"] == [
            f"consumer {cid}: not attached: its start failed (optional; retrying in the background)"
        ]
        assert answer["drivers"] == {h.qid("drv"): {"ready": True}}
        flaky.subscribe_failures = 0
        wait_until(lambda: probe(app, "/readyz")[0] == 200, timeout=20)


def test_an_app_that_is_starting_is_alive_but_not_ready(
    tmp_path: Path, flaky: type[FlakyStartDriver]
) -> None:
    """The endpoint is up first thing: a start that waits for its broker answers the probes."""
    flaky.open_failures = -1
    h = Harness(tmp_path)
    h.entries[0]["lifecycle"] = {"startup_timeout": "30s"}
    h.queue("jobs")
    app = h.load()
    app.serve_metrics(0)
    started = threading.Thread(target=app.start, kwargs={"consumers": True})
    started.start()
    try:
        wait_until(lambda: app.metrics_address is not None)
        assert probe(app, "/healthz") == (200, {"status": "alive", "phase": "starting"})
        assert probe(app, "/readyz") == (
            503,
            {"status": "not ready", "phase": "starting", "reasons": ["the app is starting"]},
        )
        flaky.open_failures = 0
        started.join(30)
        assert probe(app, "/readyz")[0] == 200
    finally:
        flaky.open_failures = 0
        started.join(30)
        app.stop()


def test_a_blocked_event_loop_fails_the_liveness_probe(tmp_path: Path) -> None:
    """An async handler that blocks the loop (time.sleep): /healthz says so, then recovers."""
    blocking = threading.Event()

    async def handle(payload: Any) -> None:
        blocking.set()
        time.sleep(4)  # noqa: ASYNC251 - the fault under test
        await asyncio.sleep(0)

    h = Harness(tmp_path)
    q = h.queue("jobs")
    h.consumer("worker", "jobs", handle)
    with serving(h.load()) as app:
        # publish from another thread: the loop may block before publish() has returned
        publisher = threading.Thread(target=queue.publish, args=(q, 1))
        publisher.start()
        assert blocking.wait(10)
        status, answer = probe(app, "/healthz")
        assert status == 503
        assert answer["status"] == "not responding"
        assert "did not answer within 1s" in answer["reason"]
        assert probe(app, "/readyz")[0] == 503
        wait_until(lambda: probe(app, "/healthz")[0] == 200, timeout=15)
        publisher.join(10)


@pytest.mark.broker
def test_a_lost_rabbitmq_connection_makes_the_app_not_ready_until_it_is_back(tmp_path: Path) -> None:
    """B07/N01: the connection is reset and refused for a while (through a proxy); /readyz
    names the driver until the link is up again."""
    from tests.conftest import require_service

    require_service("RabbitMQ", 5672)
    port = int(AMQP_URL.rsplit(":", 1)[1].split("/")[0])
    with TcpProxy(port) as proxy:
        h = Harness(tmp_path, driver="amqp")
        h.entries[0]["url"] = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        h.queue("jobs")
        h.consumer("worker", "jobs", lambda payload: None)
        did = h.qid("drv")
        with serving(h.load()) as app:
            assert probe(app, "/readyz")[0] == 200
            proxy.refuse()
            proxy.reset()

            def down() -> bool:
                status, answer = probe(app, "/readyz")
                return status == 503 and answer["drivers"][did]["ready"] is False

            wait_until(down, timeout=20)
            answer = probe(app, "/readyz")[1]
            assert answer["drivers"][did]["reason"] == "not connected (the connection is down; reconnecting)"
            assert probe(app, "/healthz")[0] == 200  # alive all along
            proxy.forward()
            wait_until(lambda: probe(app, "/readyz")[0] == 200, timeout=30)
            with contextlib.suppress(Exception):
                queue.publish(h.qid("jobs"), "after")
