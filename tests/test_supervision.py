"""Starting what is not ready yet: startup retries, startup_timeout, required / optional."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor import App, errors, queue
from tests.support.harness import Harness
from tests.support.profiles import AMQP_URL
from tests.support.stub_drivers import FlakyStartDriver
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import wait_until


def _harness(tmp_path: Path, **lifecycle: Any) -> Harness:
    h = Harness(tmp_path)
    if lifecycle:
        h.entries[0]["lifecycle"] = lifecycle
    return h


def test_a_driver_that_fails_to_open_retryably_is_tried_again(
    tmp_path: Path, flaky: type[FlakyStartDriver]
) -> None:
    flaky.open_failures = 3
    h = _harness(tmp_path, startup_timeout="20s")
    q = h.queue("jobs")
    with h.load():
        assert queue.publish(q, "x")
    assert flaky.opens == 4


def test_a_required_driver_gives_up_after_its_startup_timeout(
    tmp_path: Path, flaky: type[FlakyStartDriver]
) -> None:
    flaky.open_failures = -1
    h = _harness(tmp_path, startup_timeout="700ms")
    h.queue("jobs")
    app = h.load()
    began = time.monotonic()
    with pytest.raises(errors.Error) as caught:
        app.start()
    assert time.monotonic() - began < 5
    assert caught.value.kind == errors.UNAVAILABLE and caught.value.retryable
    assert "did not start within its 0.7s startup_timeout" in caught.value.message
    assert flaky.opens >= 2 and caught.value.details["tries"] == flaky.opens
    assert not app.running


def test_a_non_retryable_open_failure_is_not_tried_again(
    tmp_path: Path, flaky: type[FlakyStartDriver]
) -> None:
    flaky.open_failures = -1
    flaky.failure = errors.Error(errors.PERMISSION_DENIED, "bad credentials", retryable=False)
    h = _harness(tmp_path, startup_timeout="30s")
    h.queue("jobs")
    with pytest.raises(errors.Error) as caught:
        h.load().start()
    assert caught.value.kind == errors.PERMISSION_DENIED
    assert flaky.opens == 1


def test_an_optional_driver_that_is_down_lets_the_app_start_and_joins_later(
    tmp_path: Path, flaky: type[FlakyStartDriver]
) -> None:
    flaky.open_failures = 4  # 2 during the start (startup_timeout), then in the background
    seen: list[Any] = []
    h = _harness(tmp_path, startup="optional", startup_timeout="300ms")
    q = h.queue("jobs")
    h.consumer("worker", "jobs", seen.append)
    app = h.load()
    app.start(consumers=True)
    try:
        if flaky.open_failures:  # still down: its queues say so
            with pytest.raises(errors.Error) as caught:
                queue.publish(q, "early")
            assert (caught.value.kind, caught.value.retryable) == (errors.UNAVAILABLE, True)
            assert "has not started" in caught.value.message
        wait_until(lambda: flaky.open_failures == 0 and h.qid("worker") in app.consumers, timeout=20)
        queue.publish(q, "late")
        wait_until(lambda: seen == ["late"])
    finally:
        app.stop(2)


def test_a_required_consumer_that_fails_to_subscribe_is_tried_again(
    tmp_path: Path, flaky: type[FlakyStartDriver]
) -> None:
    flaky.subscribe_failures = 2
    seen: list[Any] = []
    h = _harness(tmp_path)
    q = h.queue("jobs")
    h.consumer("worker", "jobs", seen.append, lifecycle={"startup_timeout": "20s"})
    app = h.load()
    app.start(consumers=True)
    try:
        queue.publish(q, 1)
        wait_until(lambda: seen == [1])
        assert flaky.subscribes == 3
    finally:
        app.stop(2)


def test_an_optional_consumer_that_fails_is_restarted_in_the_background(
    tmp_path: Path, flaky: type[FlakyStartDriver]
) -> None:
    flaky.subscribe_failures = 5
    seen: list[Any] = []
    h = _harness(tmp_path)
    q = h.queue("jobs")
    h.consumer("worker", "jobs", seen.append, lifecycle={"startup": "optional", "startup_timeout": "200ms"})
    h.consumer("other_worker", h.queue("other"), lambda p: None)
    app = h.load()
    app.start(consumers=True)  # does not fail
    try:
        queue.publish(q, 1)
        wait_until(lambda: seen == [1], timeout=30)
        assert flaky.subscribes == 6 + 1  # the six tries of worker, one of other
    finally:
        app.stop(2)


def test_a_required_consumer_that_keeps_failing_fails_the_start(
    tmp_path: Path, flaky: type[FlakyStartDriver]
) -> None:
    flaky.subscribe_failures = -1
    h = _harness(tmp_path)
    h.queue("jobs")
    h.consumer("worker", "jobs", lambda p: None, lifecycle={"startup_timeout": "300ms"})
    app = h.load()
    with pytest.raises(errors.Error) as caught:
        app.start(consumers=True)
    assert "consumer " in caught.value.message and "startup_timeout" in caught.value.message
    assert not app.running


@pytest.mark.parametrize(
    ("lifecycle", "message"),
    [
        ({"startup": "sometimes"}, "startup"),
        ({"startup_timeout": "-1s"}, "startup_timeout"),
    ],
)
def test_lifecycle_fields_are_checked(tmp_path: Path, lifecycle: dict[str, Any], message: str) -> None:
    h = _harness(tmp_path, **lifecycle)
    h.queue("jobs")
    with pytest.raises(errors.Error) as caught:
        h.load()
    assert caught.value.kind == errors.INVALID
    assert message in str(caught.value.details["problems"])


@pytest.mark.broker
def test_a_worker_started_before_rabbitmq_comes_up_by_itself(tmp_path: Path) -> None:
    """The broker is down when the app starts (the proxy refuses connections), comes
    up 1.5 s later: the start waits for it instead of failing. Faults F09-style restart."""
    port = int(AMQP_URL.rsplit(":", 1)[1].split("/")[0])
    with TcpProxy(port) as proxy:
        proxy.refuse()
        h = Harness(tmp_path, driver="amqp")
        h.entries[0]["url"] = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        h.entries[0]["lifecycle"] = {"startup_timeout": "30s"}
        seen: list[Any] = []
        q = h.queue("jobs")
        h.consumer("worker", "jobs", seen.append)
        app: App = h.load()
        failure: list[BaseException] = []

        def start() -> None:
            try:
                app.start(consumers=True)
            except BaseException as exc:
                failure.append(exc)

        starter = threading.Thread(target=start)
        starter.start()
        time.sleep(1.5)
        assert starter.is_alive() and not failure  # still waiting for the broker
        proxy.forward()
        starter.join(30)
        assert not failure, failure
        try:
            queue.publish(q, "hello")
            wait_until(lambda: seen == ["hello"])
        finally:
            app.stop(2)
