"""Logs: handler failures with their tracebacks, the delivery context on every record,
one JSON object per line (``conveyor run --log-format json``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conveyor import errors, queue
from conveyor.logs import ContextFilter, JsonFormatter
from tests.support.harness import Harness
from tests.support.waiting import wait_until

LOG = logging.getLogger("tests.shop")


@pytest.fixture
def context_caplog(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog whose handler adds the delivery context (as ``conveyor run`` does)."""
    context = ContextFilter()
    caplog.handler.addFilter(context)
    caplog.set_level(logging.INFO)
    yield caplog
    caplog.handler.removeFilter(context)


def records(caplog: pytest.LogCaptureFixture, start: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(start)]


# -- tracebacks of handler failures ---------------------------------------------------------


def failing(kind: str, error: Callable[[], BaseException]) -> Callable[[Any], Any]:
    """A handler raising a new ``error()`` on each call (async or sync)."""
    if kind == "async":

        async def fail_async(_payload: Any) -> None:
            await asyncio.sleep(0)
            raise error()

        return fail_async

    def fail(_payload: Any) -> None:
        raise error()

    return fail


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_every_handler_failure_logs_its_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """The failed-attempt and dead-lettered WARNINGs and the dropped ERROR carry the
    handler's exception (``exc_info``), so every log format shows its traceback."""
    h = Harness(tmp_path)
    retried = h.queue("retried", dead_letter={"queue": "retried_dlq", "max_attempts": 2})
    h.queue("retried_dlq")
    dropped = h.queue("dropped")
    h.consumer("retrier", "retried", failing(kind, lambda: RuntimeError("kaboom")))
    h.consumer(
        "dropper", "dropped", failing(kind, lambda: errors.Error(errors.INVALID, "bad", retryable=False))
    )
    app = h.load()
    caplog.set_level(logging.INFO, logger="conveyor")
    app.start(consumers=True)
    try:
        queue.publish(retried, 1)
        queue.publish(dropped, 2)
        wait_until(lambda: len(records(caplog, "message ")) == 2)
    finally:
        app.stop()
    (attempt,) = records(caplog, "attempt 1 of message")
    (dead,) = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
    (drop,) = [r for r in caplog.records if "dropped after" in r.getMessage()]
    assert [r.levelno for r in (attempt, dead, drop)] == [logging.WARNING, logging.WARNING, logging.ERROR]
    for record, message in ((attempt, "kaboom"), (dead, "kaboom"), (drop, "bad")):
        assert record.exc_info is not None, record.getMessage()
        assert message in str(record.exc_info[1])
        text = logging.Formatter().format(record)
        assert "Traceback (most recent call last):" in text
        # the traceback starts at the handler's own frame: conveyor's frames above it are left out
        frames = text.split("Traceback (most recent call last):\n", 1)[1]
        assert frames.startswith(f'  File "{__file__}", line '), text
        assert "in fail" in frames.splitlines()[0], text


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_handler_with_a_timeout_logs_a_traceback_from_its_own_frame(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """With ``timeout`` the handler runs under asyncio's wait machinery (and a sync one in
    a thread): the traceback still starts at the handler, without asyncio's or
    conveyor's frames above it (regression: it started at asyncio's ``wait_for``)."""
    h = Harness(tmp_path)
    q = h.queue("timed")
    h.consumer("timed_worker", "timed", failing(kind, lambda: RuntimeError("kaboom")), timeout="5s")
    app = h.load()
    caplog.set_level(logging.INFO, logger="conveyor")
    app.start(consumers=True)
    try:
        queue.publish(q, 1)
        wait_until(lambda: len(records(caplog, "attempt 1 of message")) == 1)
    finally:
        app.stop()
    (attempt,) = records(caplog, "attempt 1 of message")
    text = logging.Formatter().format(attempt)
    frames = text.split("Traceback (most recent call last):\n", 1)[1]
    assert frames.startswith(f'  File "{__file__}", line '), text
    assert "asyncio" not in frames and "conveyor/" not in frames, text


def test_a_lua_handler_failure_logs_no_python_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Lua handler's error has no Python frame of the user's: the failure is logged
    with its message and no traceback of conveyor's internals (regression: the record
    carried the Lua bridge's Python frames)."""
    pytest.importorskip("lupa")
    h = Harness(tmp_path)
    q = h.queue("lua_jobs", dead_letter={"queue": "lua_dlq", "max_attempts": 1})
    h.queue("lua_dlq")
    (tmp_path / "worker.lua").write_text('function work(p) error("no stock for " .. p.sku) end\n')
    h.add(name="worker", kind="queue.consumer", queue="lua_jobs", method="work", source="file://worker.lua")
    app = h.load()
    caplog.set_level(logging.INFO, logger="conveyor")
    app.start(consumers=True)
    try:
        queue.publish(q, {"sku": "A-1"})
        wait_until(lambda: any("dead-lettered" in r.getMessage() for r in caplog.records))
    finally:
        app.stop()
    (dead,) = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert "no stock for A-1" in dead.getMessage()
    assert dead.exc_info is None
    assert "Traceback" not in logging.Formatter().format(dead)


def test_failures_after_settling_log_their_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that fails under ``auto_ack`` or after it settled its message: WARNING
    with the traceback too."""
    h = Harness(tmp_path)
    auto = h.queue("auto")
    settled = h.queue("settled")

    def ack_then_fail(_payload: Any) -> None:
        queue.message().ack()
        raise RuntimeError("after ack")

    h.consumer("auto_worker", "auto", failing("sync", lambda: RuntimeError("under auto_ack")), auto_ack=True)
    h.consumer("settling_worker", "settled", ack_then_fail)
    app = h.load()
    caplog.set_level(logging.INFO, logger="conveyor")
    app.start(consumers=True)
    try:
        queue.publish(auto, 1)
        queue.publish(settled, 2)
        wait_until(lambda: len(records(caplog, "handler ")) == 2)
    finally:
        app.stop()
    for record in records(caplog, "handler "):
        assert record.levelno == logging.WARNING
        assert record.exc_info is not None
        assert str(record.exc_info[1]) in ("under auto_ack", "after ack")
        assert "Traceback (most recent call last):" in logging.Formatter().format(record)


def test_an_explicit_nack_logs_no_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(tmp_path)
    q = h.queue("q", retry={"delay": "10s"})
    h.consumer("worker", "q", lambda _p: queue.message().nack())
    app = h.load()
    caplog.set_level(logging.INFO, logger="conveyor")
    app.start(consumers=True)
    try:
        queue.publish(q, 1)
        wait_until(lambda: bool(records(caplog, "attempt 1")))
    finally:
        app.stop(timeout=1)
    (attempt,) = records(caplog, "attempt 1")
    assert attempt.exc_info is None
    assert attempt.error == "nacked by the handler"  # type: ignore[attr-defined]


def test_a_failure_is_silenced_by_its_logger_level(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The failed-attempt WARNING (and its traceback) goes away with the level of the
    ``conveyor.consumer`` logger; the dead-letter WARNING is on the same logger."""
    h = Harness(tmp_path)
    q = h.queue("q", retry={"delay": "10s"})
    h.consumer("worker", "q", failing("sync", lambda: RuntimeError("kaboom")))
    app = h.load()
    caplog.set_level(logging.ERROR, logger="conveyor.consumer")
    app.start(consumers=True)
    try:
        queue.publish(q, 1)
        wait_until(lambda: app.stats()[h.qid("worker")]["failed"] == 1)
    finally:
        app.stop(timeout=1)
    assert records(caplog, "attempt") == []


# -- the delivery context on records ----------------------------------------------------------


class Logged:
    """Message IDs the handlers saw and the context of the spans they ran in."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ids: list[str] = []

    def note(self) -> None:
        with self.lock:
            self.ids.append(queue.message().id)


def test_handler_log_lines_carry_the_delivery_context(
    tmp_path: Path, context_caplog: pytest.LogCaptureFixture
) -> None:
    """A line a handler logs (sync in a thread, async, Lua) carries consumer, queue,
    message_id, attempt, and — the delivery being traced — trace_id and span_id of its
    consumer span."""
    pytest.importorskip("lupa")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    h = Harness(tmp_path)
    names = ("sync", "async", "lua")
    for name in names:
        h.queue(name)

    def sync_handler(payload: Any) -> None:
        LOG.info("handling %s", payload)

    async def async_handler(payload: Any) -> None:
        LOG.info("handling %s", payload)

    h.consumer("sync_worker", "sync", sync_handler)
    h.consumer("async_worker", "async", async_handler)
    (tmp_path / "worker.lua").write_text('function work(p) logger.info("handling " .. p) end\n')
    h.add(name="lua_worker", kind="queue.consumer", queue="lua", method="work", source="file://worker.lua")
    app = h.load(tracer_provider=provider)
    app.start(consumers=True)
    try:
        sent = {name: queue.publish(h.qid(name), name) for name in names}
        wait_until(lambda: len(records(context_caplog, "handling ")) == 3)
        wait_until(lambda: len(exporter.get_finished_spans()) == 6)
    finally:
        app.stop()
        provider.shutdown()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    for name in names:
        (record,) = records(context_caplog, f"handling {name}")
        span = spans[f"process {h.qid(name)}"]
        assert span.context is not None
        fields = {k: getattr(record, k, None) for k in ("consumer", "queue", "message_id", "attempt")}
        assert fields == {
            "consumer": h.qid(f"{name}_worker"),
            "queue": h.qid(name),
            "message_id": sent[name],
            "attempt": 1,
        }, name
        assert record.trace_id == f"{span.context.trace_id:032x}"  # type: ignore[attr-defined]
        assert record.span_id == f"{span.context.span_id:016x}"  # type: ignore[attr-defined]


def test_settlement_records_carry_the_trace_id_too(
    tmp_path: Path, context_caplog: pytest.LogCaptureFixture
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    h = Harness(tmp_path)
    q = h.queue("q", retry={"delay": "10s"})
    h.consumer("worker", "q", failing("sync", lambda: RuntimeError("kaboom")))
    app = h.load(tracer_provider=provider)
    app.start(consumers=True)
    try:
        queue.publish(q, 1)
        wait_until(lambda: len(exporter.get_finished_spans()) == 2)
    finally:
        app.stop(timeout=1)
        provider.shutdown()
    (span,) = [s for s in exporter.get_finished_spans() if s.name.startswith("process")]
    (attempt,) = records(context_caplog, "attempt 1")
    assert span.context is not None
    assert attempt.trace_id == f"{span.context.trace_id:032x}"  # type: ignore[attr-defined]


def test_records_outside_a_delivery_get_no_delivery_fields(context_caplog: pytest.LogCaptureFixture) -> None:
    LOG.info("plain")
    (record,) = records(context_caplog, "plain")
    assert not {"consumer", "queue", "message_id", "attempt", "trace_id", "span_id"} & set(vars(record))


def test_a_handler_logging_after_its_timeout_still_logs(
    tmp_path: Path, context_caplog: pytest.LogCaptureFixture
) -> None:
    """Past its ``timeout`` a sync handler's message is released; its log lines keep the
    consumer's fields and logging does not fail."""
    h = Harness(tmp_path)
    q = h.queue("q", retry={"delay": "10s"})
    done = threading.Event()

    def slow(_payload: Any) -> None:
        time.sleep(0.5)
        LOG.info("late line")
        done.set()

    h.consumer("worker", "q", slow, timeout=0.1)
    app = h.load()
    app.start(consumers=True)
    try:
        queue.publish(q, 1)
        assert done.wait(10)
    finally:
        app.stop(timeout=2)
    (record,) = records(context_caplog, "late line")
    assert (record.consumer, record.queue) == (h.qid("worker"), q)  # type: ignore[attr-defined]
    assert not hasattr(record, "message_id")


# -- JSON lines -------------------------------------------------------------------------------


def test_json_formatter_writes_one_object_per_line() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError as exc:
        error = exc
    record = logging.LogRecord("tests.shop", logging.WARNING, __file__, 1, "two\nlines %s", ("x",), None)
    record.exc_info = (ValueError, error, error.__traceback__)
    record.__dict__.update(
        {"queue": "app:q", "attempt": 2, "level": "mine", "blob": b"\xff", "obj": object()}
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["time"].endswith("Z")
    assert (entry["level"], entry["logger"], entry["message"]) == ("WARNING", "tests.shop", "two\nlines x")
    assert (entry["queue"], entry["attempt"], entry["extra_level"]) == ("app:q", 2, "mine")
    assert entry["blob"] == "\ufffd"
    assert entry["obj"].startswith("<object object")
    assert entry["traceback"].startswith("Traceback (most recent call last):")
    assert entry["traceback"].endswith("ValueError: bad\nvalue")


# -- conveyor run ---------------------------------------------------------------------------------

APP = """\
version: "1.0"
namespace: shop
entries:
  - {name: mem, kind: queue.driver.memory}
  - name: orders
    kind: queue.queue
    driver: mem
    retry: {delay: 0}
    dead_letter: {queue: shop:orders_dlq, max_attempts: 2}
  - {name: orders_dlq, kind: queue.queue, driver: mem}
  - {name: worker, kind: queue.consumer, queue: orders, func: handle}
  - {name: handle, kind: function.python, source: "shopmod:handle"}
  - {name: seed, kind: function.python, source: "shopmod:seed", lifecycle: {on_start: true}}
"""

MODULE = """\
import logging

from conveyor import queue

log = logging.getLogger("shop")


def handle(order):
    log.info("handling order %s", order["n"])
    if order["n"] == 2:
        raise RuntimeError(f"order {order['n']} failed")


def seed():
    for n in (1, 2):
        queue.publish("shop:orders", {"n": n})
"""


def run_conveyor(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "shop.yaml").write_text(APP)
    (tmp_path / "shopmod.py").write_text(MODULE)
    return subprocess.run(
        [sys.executable, "-m", "conveyor", "run", "shop.yaml", "--until-idle", "--idle-settle", "0.2", *args],
        cwd=tmp_path,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_conveyor_run_log_format_json(tmp_path: Path) -> None:
    """Every stderr line is a JSON object; the handler's own lines and the failure lines
    carry the delivery context and one trace ID per message (tracing on through the
    environment: ``OTEL_PYTHON_TRACER_PROVIDER=sdk_tracer_provider``); failures carry
    their traceback."""
    result = run_conveyor(
        tmp_path, "--log-format", "json", env={"OTEL_PYTHON_TRACER_PROVIDER": "sdk_tracer_provider"}
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    handled = [line for line in lines if line["logger"] == "shop"]
    assert len(handled) == 3  # order 1 once, order 2 twice
    for line in handled:
        assert (line["consumer"], line["queue"]) == ("shop:worker", "shop:orders")
        assert len(line["trace_id"]) == 32 and len(line["span_id"]) == 16
    second = [line for line in handled if line["message"] == "handling order 2"]
    assert [line["attempt"] for line in second] == [1, 2]
    failures = [line for line in lines if line["logger"] == "conveyor.consumer" and "traceback" in line]
    assert [line["message"].split(" ")[0] for line in failures] == [
        "attempt",
        "message",
    ]  # retried, dead-lettered
    for failure in failures:
        assert failure["message_id"] == second[0]["message_id"]
        assert failure["traceback"].startswith("Traceback (most recent call last):")
        assert "in handle" in failure["traceback"]
        assert failure["traceback"].endswith("RuntimeError: order 2 failed")
    # each attempt is its own consumer span of the message's one trace
    assert len({line["trace_id"] for line in second + failures}) == 1
    assert failures[0]["span_id"] == second[0]["span_id"] != second[1]["span_id"] == failures[1]["span_id"]


def test_conveyor_run_processes_log_json_in_every_worker(tmp_path: Path) -> None:
    """``--processes``: the supervisor and each worker log JSON lines; a worker's carry ``worker``."""
    (tmp_path / "shop.yaml").write_text(
        APP.replace("queue.driver.memory", f"queue.driver.sqlite, path: {tmp_path / 'q.db'}")
    )
    (tmp_path / "shopmod.py").write_text(MODULE)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "conveyor",
            "run",
            "shop.yaml",
            "--processes",
            "2",
            "--until-idle",
            "--log-format",
            "json",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    started = [line for line in lines if line["message"].startswith("consumer shop:worker started")]
    assert sorted(line["worker"] for line in started) == [1, 2]
    handled = [line for line in lines if line["logger"] == "shop"]
    assert handled and all(line["worker"] in (1, 2) and "message_id" in line for line in handled)
    assert any(line["logger"] == "conveyor.prefork" for line in lines)


def test_conveyor_run_log_format_text_shows_the_traceback(tmp_path: Path) -> None:
    result = run_conveyor(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Traceback (most recent call last):") == 2
    assert "RuntimeError: order 2 failed" in result.stderr
    handled = [line for line in result.stderr.splitlines() if " shop: handling order" in line]
    assert len(handled) == 3
    assert all("consumer=shop:worker queue=shop:orders message_id=" in line for line in handled)


def test_conveyor_run_log_level_error_silences_failed_attempts(tmp_path: Path) -> None:
    result = run_conveyor(tmp_path, "--log-level", "error", "--log-format", "json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_log_format_is_checked(tmp_path: Path) -> None:
    result = run_conveyor(tmp_path, "--log-format", "xml")
    assert result.returncode == 2
    assert "--log-format" in result.stderr and "xml" in result.stderr
