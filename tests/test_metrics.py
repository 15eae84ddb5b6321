"""Prometheus metrics (``App.serve_metrics``, ``conveyor run --metrics-port``), scraped over HTTP.

Apps serve on an ephemeral loopback port (``serve_metrics(0)``) and are scraped with
urllib, the way Prometheus would; the exposition is read back with
prometheus_client's own parser. Counting tests run on every driver (memory, SQLite,
RabbitMQ); the command-line tests run the console script in a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import conveyor
from conveyor import App, errors, queue
from conveyor.drivers import kinds
from conveyor.drivers.base import Outgoing
from conveyor.drivers.memory import MemoryDriver
from conveyor.registry.model import QueueSpec
from tests.conftest import require_service
from tests.support.harness import Harness
from tests.support.profiles import PROFILES
from tests.support.waiting import wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

STARTUP = 30.0  # seconds for something that starts interpreters (a busy machine)


# -- scraping -----------------------------------------------------------------------------------------


def url_of(address: Any, path: str) -> str:
    assert isinstance(address, tuple), f"not serving on TCP: {address!r}"
    host, port = address
    return f"http://{host}:{port}{path}"


def get(address: Any, path: str, accept: str | None = None) -> tuple[int, str, bytes]:
    """GET ``path``: status, content type and body (error statuses included)."""
    request = urllib.request.Request(url_of(address, path), headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read()


def scrape(address: Any) -> Samples:
    status, content_type, body = get(address, "/metrics")
    assert status == 200, body
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    found: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def processed(found: Samples, consumer: str, queue_id: str, outcome: str) -> float | None:
    return value(
        found, "conveyor_messages_processed_total", consumer=consumer, queue=queue_id, outcome=outcome
    )


@pytest.fixture(params=list(PROFILES))
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    kind = request.param
    service = PROFILES[kind].service
    if service is not None:
        require_service(*service)
    return Harness(tmp_path, kind)


@contextlib.contextmanager
def serving(app: App, consumers: bool = True) -> Iterator[App]:
    app.serve_metrics(0)
    app.start(consumers=consumers)
    try:
        yield app
    finally:
        app.stop(2)


def put_raw(app: App, queue_id: str, body: bytes) -> None:
    """Store ``body`` as it is (no codec) through the queue's driver: an undecodable message."""
    bound = app.runtime.queue(queue_id)
    outgoing = Outgoing(f"raw-{time.monotonic_ns()}", body, {})
    asyncio.run_coroutine_threadsafe(bound.driver.publish(bound.spec, [outgoing]), app.loop).result(10)


# -- what is counted, on every driver -----------------------------------------------------------------


def test_counts_match_what_was_published_and_processed(harness: Harness) -> None:
    """Acks, failed attempts, dead letters (P01: the poison message after max_attempts) and
    an undecodable message, each counted once; one duration per handler run."""
    q = harness.queue("jobs", dead_letter={"queue": "dead", "max_attempts": 2})
    dead = harness.queue("dead", codec="raw")

    def handle(payload: Any) -> None:
        if payload == "bad":
            raise ValueError("a bad payload")

    cid = harness.consumer("worker", "jobs", handle)
    with serving(harness.load()) as app:
        queue.publish_many(q, ["ok1", "ok2", "bad"])
        queue.publish(q, "ok3")
        put_raw(app, q, b"\xff{not json")
        wait_until(
            lambda: (app.stats()[cid]["acked"], app.stats()[cid]["dead_lettered"]) == (3, 2), timeout=30
        )
        found = scrape(app.metrics_address)
        assert value(found, "conveyor_messages_published_total", queue=q) == 4
        assert value(found, "conveyor_messages_published_total", queue=dead) == 0
        outcomes = {o: processed(found, cid, q, o) for o in ("acked", "failed", "dead_lettered")}
        assert outcomes == {"acked": 3, "failed": 2, "dead_lettered": 2}
        assert processed(found, cid, q, "undecodable") == 1
        assert processed(found, cid, q, "dropped") == 0
        assert value(found, "conveyor_messages_delivered_total", consumer=cid, queue=q) == 6
        # the handler ran 5 times: 3 successes, 2 failed attempts (the undecodable one never ran)
        assert value(found, "conveyor_handler_duration_seconds_count", consumer=cid) == 5
        assert value(found, "conveyor_handler_duration_seconds_bucket", consumer=cid, le="+Inf") == 5
        assert value(found, "conveyor_handler_duration_seconds_bucket", consumer=cid, le="60.0") == 5
        assert (value(found, "conveyor_handler_duration_seconds_sum", consumer=cid) or 0) > 0
        assert value(found, "conveyor_consumer_worker_restarts_total", consumer=cid) == 0

        def dead_ready() -> float | None:
            return value(scrape(app.metrics_address), "conveyor_queue_messages", queue=dead, state="ready")

        wait_until(lambda: dead_ready() == 2, timeout=15)


def test_queue_gauges_count_ready_in_flight_and_delayed(harness: Harness) -> None:
    """One message held by a blocked handler, one waiting out a long retry delay, two ready."""
    release = threading.Event()
    q = harness.queue("jobs", retry={"delay": "30s"})

    def handle(payload: Any) -> None:
        if payload == "fail":
            raise ValueError("try again in 30 s")
        release.wait(20)

    harness.consumer("worker", "jobs", handle, prefetch=1)
    try:
        with serving(harness.load()) as app:
            queue.publish(q, "fail")
            queue.publish(q, "block")

            def states() -> dict[str, float | None]:
                found = scrape(app.metrics_address)
                return {
                    s: value(found, "conveyor_queue_messages", queue=q, state=s)
                    for s in ("ready", "in_flight", "delayed")
                }

            wait_until(lambda: states() == {"ready": 0, "in_flight": 1, "delayed": 1}, timeout=20)
            queue.publish_many(q, ["later1", "later2"])
            wait_until(lambda: states() == {"ready": 2, "in_flight": 1, "delayed": 1}, timeout=20)
            release.set()
    finally:
        release.set()


def test_workers_are_busy_while_handlers_block(harness: Harness) -> None:
    release = threading.Event()
    q = harness.queue("jobs")
    cid = harness.consumer("worker", "jobs", lambda payload: release.wait(20), concurrency=3)
    try:
        with serving(harness.load()) as app:

            def workers() -> tuple[float | None, float | None]:
                found = scrape(app.metrics_address)
                return (
                    value(found, "conveyor_consumer_workers", consumer=cid, state="busy"),
                    value(found, "conveyor_consumer_workers", consumer=cid, state="idle"),
                )

            assert workers() == (0, 3)
            queue.publish_many(q, ["a", "b"])
            wait_until(lambda: workers() == (2, 1), timeout=15)
            release.set()
            wait_until(lambda: workers() == (0, 3), timeout=15)
    finally:
        release.set()


# -- counters across restarts, formats, the endpoint ----------------------------------------------


def test_counters_survive_a_consumer_restart(tmp_path: Path) -> None:
    """Stopping and starting consumers within the app never takes a counter back."""
    h = Harness(tmp_path)
    q = h.queue("jobs")
    cid = h.consumer("worker", "jobs", lambda payload: None, lifecycle={"auto_start": False})
    with serving(h.load(), consumers=False) as app:
        for round_ in range(3):
            app.start_consumers([cid])
            queue.publish_many(q, [round_, round_])
            wait_until(app.is_idle)
            app.stop_consumers()
        found = scrape(app.metrics_address)
        assert processed(found, cid, q, "acked") == 6
        assert value(found, "conveyor_handler_duration_seconds_count", consumer=cid) == 6
        assert value(found, "conveyor_consumer_workers", consumer=cid, state="idle") == 0


def test_openmetrics_is_served_to_who_asks_for_it(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    q = h.queue("jobs")
    with serving(h.load(), consumers=False) as app:
        queue.publish(q, 1)
        status, content_type, body = get(
            app.metrics_address, "/metrics", accept="application/openmetrics-text; version=1.0.0"
        )
        assert status == 200
        assert content_type.startswith("application/openmetrics-text"), content_type
        text = body.decode()
        assert text.endswith("# EOF\n")
        assert f'conveyor_messages_published_total{{queue="{q}"}} 1.0' in text
        status, content_type, body = get(app.metrics_address, "/metrics", accept="text/plain")
        assert content_type.startswith("text/plain; version=0.0.4")
        assert not body.decode().endswith("# EOF\n")


def test_unknown_pages_are_404_and_the_worker_link_is_not_on_tcp(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.queue("jobs")
    with serving(h.load(), consumers=False) as app:
        assert get(app.metrics_address, "/nope")[0] == 404
        assert get(app.metrics_address, "/snapshot")[0] == 404
        assert get(app.metrics_address, "/")[0] == 200


def test_the_endpoint_lives_while_the_app_runs(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.queue("jobs")
    app = h.load()
    assert app.metrics_address is None  # not asked to serve
    app.serve_metrics(0)
    assert app.metrics_address is None  # not started
    with app:
        address = app.metrics_address
        assert isinstance(address, tuple) and address[0] == "127.0.0.1" and address[1] > 0
        with pytest.raises(errors.Error) as caught:
            app.serve_metrics(0)
        assert caught.value.kind == errors.INVALID
    assert app.metrics_address is None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url_of(address, "/healthz"), timeout=5)
    with app:  # a second start serves again
        assert get(app.metrics_address, "/healthz")[0] == 200


@pytest.mark.parametrize("port", [-1, 65536, "9100", True])
def test_a_bad_port_is_refused(tmp_path: Path, port: Any) -> None:
    h = Harness(tmp_path)
    with pytest.raises(errors.Error) as caught:
        h.load().serve_metrics(port)
    assert caught.value.kind == errors.INVALID
    assert "metrics port" in caught.value.message


def test_a_port_in_use_fails_the_start_with_a_clear_error(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    q = h.queue("jobs")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = h.load()
        app.serve_metrics(port)
        with pytest.raises(errors.Error) as caught:
            app.start()
        assert caught.value.kind == errors.INVALID
        assert caught.value.message == (
            f"cannot serve metrics on 127.0.0.1:{port}: the address is already in use "
            "(another process listens there); choose another port"
        )
        assert not app.running and app.metrics_address is None
    with app:  # the port is free again: the same app starts
        queue.publish(q, 1)
        assert value(scrape(app.metrics_address), "conveyor_messages_published_total", queue=q) == 1


# -- queues that cannot be read -----------------------------------------------------------------------


class SlowInfoDriver(MemoryDriver):
    """``info`` never answers (a broker that hangs); everything else works."""

    async def info(self, queue: QueueSpec) -> dict[str, Any]:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


@pytest.mark.parametrize(
    ("stub", "why"),
    [
        ("tests.support.stub_drivers:InfoFailingDriver", "the broker is unreachable"),
        ("tests.test_metrics:SlowInfoDriver", "did not answer within"),
    ],
)
def test_a_queue_that_cannot_be_read_is_left_out_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, stub: str, why: str
) -> None:
    """A failing or hanging Driver.info never fails or hangs the scrape (urllib's timeout
    would end the test): the queue is left out of conveyor_queue_messages and counted."""
    row = kinds.DriverKind("queue.driver.memory", "conveyor.drivers.options.memory", stub)
    monkeypatch.setattr(kinds, "KINDS", (row, *kinds.KINDS[1:]))
    h = Harness(tmp_path)
    q = h.queue("jobs")
    cid = h.consumer("worker", "jobs", lambda payload: None)
    with serving(h.load()) as app:
        queue.publish(q, 1)
        wait_until(lambda: app.stats()[cid]["acked"] == 1)
        found = scrape(app.metrics_address)
        assert value(found, "conveyor_queue_messages", queue=q, state="ready") is None
        assert value(found, "conveyor_queue_sample_errors_total", queue=q) == 1
        assert processed(found, cid, q, "acked") == 1  # the rest is there
        assert why in caplog.text and f"cannot sample queue {q}" in caplog.text
        found = scrape(app.metrics_address)  # within the cache's second: the same sample
        assert value(found, "conveyor_queue_sample_errors_total", queue=q) == 1
        wait_until(
            lambda: (
                (value(scrape(app.metrics_address), "conveyor_queue_sample_errors_total", queue=q) or 0) >= 2
            ),
            timeout=15,
        )


# -- the command line ---------------------------------------------------------------------------------

SERVING = re.compile(r"serving /metrics, /healthz and /readyz on http://127\.0\.0\.1:(\d+)")


def console_script() -> str:
    script = Path(sys.executable).with_name("conveyor")
    assert script.exists(), f"the console script is not installed next to {sys.executable}"
    return str(script)


def serving_port(log: Path, proc: subprocess.Popen[bytes]) -> int:
    def found() -> bool:
        assert proc.poll() is None, f"exited {proc.returncode}: {log.read_text()}"
        return SERVING.search(log.read_text()) is not None

    wait_until(found, timeout=STARTUP, interval=0.05)
    match = SERVING.search(log.read_text())
    assert match is not None
    return int(match.group(1))


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STARTUP)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"did not stop: {log.read_text()}") from None


SQLITE_APP = """\
version: "1.0"
namespace: t
entries:
  - {name: store, kind: queue.driver.sqlite, path: queue.db, poll_interval: 20ms}
  - {name: jobs, kind: queue.queue, driver: store, retry: {delay: 0}}
  - {name: parked, kind: queue.queue, driver: store}
  - {name: worker, kind: queue.consumer, queue: t:jobs, handler: "metrics_handlers:handle"}
"""

HANDLERS = """\
import os


def handle(payload):
    with open("handled.txt", "a") as out:  # which process handled it
        out.write(f"{os.getpid()}\\n")
"""


def write_app(tmp_path: Path) -> Path:
    (tmp_path / "metrics_handlers.py").write_text(HANDLERS)
    path = tmp_path / "app.yaml"
    path.write_text(SQLITE_APP)
    return path


@contextlib.contextmanager
def running_cli(tmp_path: Path, *args: str) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """``conveyor run app.yaml ARGS`` (the console script) until the end of the block."""
    path = write_app(tmp_path)
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [console_script(), "run", str(path), *args],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield serving_port(log, proc), proc
    finally:
        stop(proc, log)
    assert proc.returncode == 0, log.read_text()


def parked(address: Any) -> float | None:
    return value(scrape(address), "conveyor_queue_messages", queue="t:parked", state="ready")


def test_conveyor_run_serves_metrics_on_the_port_it_is_given(tmp_path: Path) -> None:
    with running_cli(tmp_path, "--metrics-port", "0") as (port, _):
        address = ("127.0.0.1", port)
        app = conveyor.load(tmp_path / "app.yaml")
        with app:
            queue.publish_many("t:jobs", list(range(5)))
            queue.publish("t:parked", "stays")
        wait_until(lambda: processed(scrape(address), "t:worker", "t:jobs", "acked") == 5, timeout=STARTUP)
        wait_until(lambda: parked(address) == 1, timeout=10)  # samples are reused for 1 s
        found = scrape(address)
        # published by another process (the test's app): this one published nothing
        assert value(found, "conveyor_messages_published_total", queue="t:jobs") == 0
        assert get(address, "/healthz")[0] == 200
        assert get(address, "/readyz")[0] == 200


def test_processes_sum_their_metrics_on_the_supervisors_port(tmp_path: Path) -> None:
    """--processes 2: every processed message counted once, the shared queues once, and a
    worker killed and restarted (F01/S03) takes nothing back from the counters."""
    with running_cli(tmp_path, "--processes", "2", "--metrics-port", "0") as (port, proc):
        address = ("127.0.0.1", port)

        def workers_up() -> bool:
            return value(scrape(address), "conveyor_prefork_workers", state="up") == 2

        wait_until(workers_up, timeout=STARTUP)
        wait_until(lambda: get(address, "/readyz")[0] == 200, timeout=STARTUP)
        app = conveyor.load(tmp_path / "app.yaml")
        with app:
            queue.publish_many("t:jobs", list(range(40)))
            queue.publish_many("t:parked", ["a", "b", "c"])
        wait_until(lambda: processed(scrape(address), "t:worker", "t:jobs", "acked") == 40, timeout=STARTUP)
        found = scrape(address)
        assert value(found, "conveyor_handler_duration_seconds_count", consumer="t:worker") == 40
        wait_until(lambda: parked(address) == 3, timeout=10)  # one sample, not one per worker
        assert value(found, "conveyor_consumer_workers", consumer="t:worker", state="idle") == 2
        status, _, body = get(address, "/readyz")
        assert status == 200 and b'"1"' in body and b'"2"' in body

        handled_by = set((tmp_path / "handled.txt").read_text().split())
        workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        busy = sorted(set(workers) & handled_by)
        assert busy, (workers, handled_by)
        os.kill(int(busy[0]), signal.SIGKILL)  # its acks must stay in the sum
        with app:
            queue.publish_many("t:jobs", list(range(10)))
        wait_until(workers_up, timeout=STARTUP)
        wait_until(lambda: processed(scrape(address), "t:worker", "t:jobs", "acked") == 50, timeout=STARTUP)


@pytest.mark.parametrize("processes", ["1", "2"])
def test_conveyor_run_with_a_port_in_use_exits_2_before_starting_anything(
    tmp_path: Path, processes: str
) -> None:
    path = write_app(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [console_script(), "run", str(path), "--processes", processes, "--metrics-port", str(port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=STARTUP,
            check=False,
        )
    assert done.returncode == 2, done.stderr
    assert (
        f"conveyor: INVALID: cannot serve metrics on 127.0.0.1:{port}: the address is already in use"
        in done.stderr
    )
    assert "worker 1 started" not in done.stderr


def test_metrics_host_needs_metrics_port(tmp_path: Path) -> None:
    path = write_app(tmp_path)
    done = subprocess.run(
        [console_script(), "run", str(path), "--metrics-host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=STARTUP,
        check=False,
    )
    assert done.returncode == 2
    assert "--metrics-host only applies with --metrics-port" in done.stderr
