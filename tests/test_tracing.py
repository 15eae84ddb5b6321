"""OpenTelemetry tracing: producer and consumer spans, W3C context in message headers.

Spans go to the SDK's in-memory exporter of a tracer provider made per test and given
to the app (``tracer_provider=``): the process-wide provider can be set only once, so
the tests that rely on it (``tracing=None`` picking up a configured provider) run in
a child process.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import conveyor
from conveyor import errors, queue
from tests.conftest import require_service
from tests.support.harness import Harness
from tests.support.waiting import wait_until


class Spans:
    """A tracer provider of its own and what it exported."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def all(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.all() if s.name == name]

    def wait(self, name: str, count: int = 1) -> list[ReadableSpan]:
        wait_until(lambda: len(self.named(name)) >= count)
        return self.named(name)


@pytest.fixture
def spans() -> Iterator[Spans]:
    found = Spans()
    yield found
    found.provider.shutdown()


@pytest.fixture(params=["memory", "sqlite", "amqp"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    """A harness on each driver (RabbitMQ on 127.0.0.1:5672 for amqp)."""
    if request.param == "amqp":
        require_service("RabbitMQ", 5672)
    return Harness(tmp_path, request.param)


class Seen:
    """What handlers saw: payload, headers, the current span's context (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[Any, dict[str, Any], trace.SpanContext]] = []

    def add(self, payload: Any) -> None:
        headers = queue.message().headers
        with self.lock:
            self.items.append((payload, headers, trace.get_current_span().get_span_context()))

    def __len__(self) -> int:
        with self.lock:
            return len(self.items)


def attr(span: ReadableSpan, key: str) -> Any:
    return (span.attributes or {})[key]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def ids(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


SYSTEMS = {"memory": "memory", "sqlite": "sqlite", "amqp": "rabbitmq"}


# -- one message: publish, deliver ----------------------------------------------------------


def test_one_message_gets_a_producer_and_a_consumer_span(harness: Harness, spans: Spans) -> None:
    """On every driver: the consumer span's parent is the producer span, through the
    ``traceparent`` header; messaging attributes on both; the handler runs in the span."""
    q = harness.queue("orders")
    seen = Seen()
    harness.consumer("worker", "orders", seen.add)
    app = harness.load(tracer_provider=spans.provider)
    app.start(consumers=True)
    try:
        with spans.provider.get_tracer("test").start_as_current_span("request") as request:
            message_id = queue.publish(q, {"n": 1})
        wait_until(lambda: len(seen) == 1)
        (consumer,) = spans.wait(f"process {q}")
    finally:
        app.stop()
    (producer,) = spans.named(f"publish {q}")
    system = SYSTEMS[harness.driver]

    assert producer.kind is SpanKind.PRODUCER
    assert parent_of(producer) == request.get_span_context().span_id
    assert dict(producer.attributes or {}) == {
        "messaging.system": system,
        "messaging.destination.name": q,
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.message.id": message_id,
    }
    assert consumer.kind is SpanKind.CONSUMER
    assert ids(consumer)[0] == ids(producer)[0] == request.get_span_context().trace_id
    assert parent_of(consumer) == ids(producer)[1]
    attributes = dict(consumer.attributes or {})
    assert isinstance(attributes.pop("messaging.message.body.size"), int)
    assert attributes == {
        "messaging.system": system,
        "messaging.destination.name": q,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.message.id": message_id,
        "messaging.consumer.group.name": harness.qid("worker"),
        "messaging.conveyor.attempt": 1,
        "messaging.conveyor.outcome": "acked",
    }
    assert consumer.status.status_code is StatusCode.UNSET
    # The header crossed the driver; the handler ran with the consumer span current.
    _, headers, current = seen.items[0]
    assert headers["traceparent"].startswith(f"00-{ids(producer)[0]:032x}-{ids(producer)[1]:016x}-")
    assert (current.trace_id, current.span_id) == ids(consumer)


def test_a_failing_handler_records_its_error_on_each_attempt(tmp_path: Path, spans: Spans) -> None:
    """Each attempt is its own consumer span, child of the one producer span: the
    exception is recorded, the status is ERROR, the outcome says retried, then dead_lettered."""
    h = Harness(tmp_path)
    q = h.queue("jobs", dead_letter={"queue": "jobs_dlq", "max_attempts": 2})
    h.queue("jobs_dlq")

    def fail(_payload: Any) -> None:
        raise ValueError("no such customer")

    h.consumer("worker", "jobs", fail)
    app = h.load(tracer_provider=spans.provider)
    app.start(consumers=True)
    try:
        queue.publish(q, {"customer": 7})
        attempts = spans.wait(f"process {q}", 2)
    finally:
        app.stop()
    (producer,) = spans.named(f"publish {q}")
    attempts.sort(key=lambda s: attr(s, "messaging.conveyor.attempt"))
    assert [attr(s, "messaging.conveyor.outcome") for s in attempts] == [
        "retried",
        "dead_lettered",
    ]
    for span in attempts:
        assert parent_of(span) == ids(producer)[1]
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "ValueError: no such customer"
        assert attr(span, "error.type") == "ValueError"
        (event,) = span.events
        assert event.name == "exception"
        recorded = dict(event.attributes or {})
        assert recorded["exception.message"] == "no such customer"
        assert "in fail" in str(recorded["exception.stacktrace"])


def test_an_explicit_nack_and_a_dropped_message(tmp_path: Path, spans: Spans) -> None:
    """``msg.nack()`` (no exception): ERROR with the reason, no exception event. A
    failure that is not retryable, without a dead-letter queue: outcome dropped."""
    h = Harness(tmp_path)
    nacked = h.queue("nacked", retry={"delay": "10s"})
    dropped = h.queue("dropped")

    def nack(_payload: Any) -> None:
        queue.message().nack()

    def refuse(_payload: Any) -> None:
        raise errors.Error(errors.INVALID, "bad order", retryable=False)

    h.consumer("nacker", "nacked", nack)
    h.consumer("refuser", "dropped", refuse)
    app = h.load(tracer_provider=spans.provider)
    app.start(consumers=True)
    try:
        queue.publish(nacked, 1)
        queue.publish(dropped, 2)
        (nack_span,) = spans.wait(f"process {nacked}")
        (drop_span,) = spans.wait(f"process {dropped}")
    finally:
        app.stop(timeout=1)
    assert attr(nack_span, "messaging.conveyor.outcome") == "retried"
    assert (nack_span.status.status_code, nack_span.status.description) == (
        StatusCode.ERROR,
        "nacked by the handler",
    )
    assert not nack_span.events
    assert attr(drop_span, "messaging.conveyor.outcome") == "dropped"
    assert attr(drop_span, "error.type") == errors.INVALID
    assert drop_span.status.status_code is StatusCode.ERROR


def test_a_delivery_cut_short_by_a_stop_is_released(tmp_path: Path, spans: Spans) -> None:
    h = Harness(tmp_path)
    q = h.queue("slow")
    running = threading.Event()

    async def hang(_payload: Any) -> None:
        running.set()
        await asyncio.sleep(60)

    h.consumer("worker", "slow", hang)
    app = h.load(tracer_provider=spans.provider)
    app.start(consumers=True)
    try:
        queue.publish(q, 1)
        assert running.wait(10)
    finally:
        app.stop(timeout=0.1)
    (span,) = spans.named(f"process {q}")
    assert attr(span, "messaging.conveyor.outcome") == "released"
    assert span.status.status_code is StatusCode.UNSET


def test_publish_many_is_one_producer_span_for_the_batch(tmp_path: Path, spans: Spans) -> None:
    h = Harness(tmp_path)
    q = h.queue("batch")
    seen = Seen()
    h.consumer("worker", "batch", seen.add)
    app = h.load(tracer_provider=spans.provider)
    app.start(consumers=True)
    try:
        queue.publish_many(q, [1, 2, 3])
        consumers = spans.wait(f"process {q}", 3)
    finally:
        app.stop()
    (producer,) = spans.named(f"publish {q}")
    assert attr(producer, "messaging.batch.message_count") == 3
    assert "messaging.message.id" not in (producer.attributes or {})
    assert {parent_of(s) for s in consumers} == {ids(producer)[1]}
    assert len({attr(s, "messaging.message.id") for s in consumers}) == 3


def test_a_failed_publish_is_recorded_on_its_span(tmp_path: Path, spans: Spans) -> None:
    h = Harness(tmp_path)
    h.add(name="drv", kind="queue.driver.memory", max_message_size=64)
    h.entries.pop(0)  # the harness's default driver entry: replaced by the one above
    q = h.queue("small")
    with h.load(tracer_provider=spans.provider), pytest.raises(errors.Error):
        queue.publish(q, "x" * 1000)
    (producer,) = spans.named(f"publish {q}")
    assert producer.status.status_code is StatusCode.ERROR
    assert attr(producer, "error.type") == errors.INVALID


# -- a trace across consumers, handler kinds and processes -------------------------------------


def chain(spans: Spans, first: str, second: str) -> list[ReadableSpan]:
    """The four spans producer -> consumer -> producer -> consumer of a two-hop trip."""
    hops = [
        spans.wait(f"publish {first}")[0],
        spans.wait(f"process {first}")[0],
        spans.wait(f"publish {second}")[0],
        spans.wait(f"process {second}")[0],
    ]
    assert len({ids(s)[0] for s in hops}) == 1, "one trace"
    for parent, child in itertools.pairwise(hops):
        assert parent_of(child) == ids(parent)[1], (parent.name, child.name)
    return hops


def forwarder(target: str, kind: str) -> Callable[[Any], Any]:
    if kind == "async":

        async def forward_async(payload: Any) -> None:
            await queue.apublish(target, {"forwarded": payload})

        return forward_async

    def forward(payload: Any) -> None:
        queue.publish(target, {"forwarded": payload})

    return forward


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_trace_of_one_message_across_two_consumers(tmp_path: Path, spans: Spans, kind: str) -> None:
    """Consumer A handles a message from X and publishes to Y; consumer B handles that:
    one trace, producer -> consumer A -> producer -> consumer B (A sync in a thread, or async)."""
    h = Harness(tmp_path)
    x = h.queue("x")
    y = h.queue("y")
    seen = Seen()
    h.consumer("a", "x", forwarder(y, kind))
    h.consumer("b", "y", seen.add)
    app = h.load(tracer_provider=spans.provider)
    app.start(consumers=True)
    try:
        queue.publish(x, {"order": 1})
        wait_until(lambda: len(seen) == 1)
        hops = chain(spans, x, y)
    finally:
        app.stop()
    assert [attr(s, "messaging.consumer.group.name") for s in (hops[1], hops[3])] == [
        h.qid("a"),
        h.qid("b"),
    ]


def test_a_lua_handler_that_publishes_continues_the_trace(tmp_path: Path, spans: Spans) -> None:
    pytest.importorskip("lupa")
    h = Harness(tmp_path)
    jobs = h.queue("jobs")
    done = h.queue("done")
    seen = Seen()
    (tmp_path / "worker.lua").write_text(f'function work(p) queue.publish("{done}", {{n = p.n + 1}}) end\n')
    h.add(name="worker", kind="queue.consumer", queue="jobs", method="work", source="file://worker.lua")
    h.consumer("reader", "done", seen.add)
    app = h.load(tracer_provider=spans.provider)
    app.start(consumers=True)
    try:
        queue.publish(jobs, {"n": 1})
        wait_until(lambda: len(seen) == 1)
        chain(spans, jobs, done)
    finally:
        app.stop()
    assert seen.items[0][0] == {"n": 2}


def test_baggage_travels_with_the_message(tmp_path: Path, spans: Spans) -> None:
    h = Harness(tmp_path)
    q = h.queue("q")
    found: list[object] = []
    h.consumer("worker", "q", lambda _p: found.append(baggage.get_baggage("tenant")))
    app = h.load(tracer_provider=spans.provider)
    app.start(consumers=True)
    token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        queue.publish(q, 1)
        wait_until(lambda: len(found) == 1)
    finally:
        otel_context.detach(token)
        app.stop()
    assert found == ["acme"]


@pytest.mark.parametrize(
    ("traceparent", "continued"),
    [("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", True), ("not a traceparent", False)],
)
def test_a_traceparent_from_elsewhere_is_continued_or_ignored(
    tmp_path: Path, spans: Spans, traceparent: str, continued: bool
) -> None:
    """A message published without tracing but with a ``traceparent`` header (set by
    hand, or by another system) continues that trace; a malformed one starts a new one."""
    h = Harness(tmp_path, "sqlite")
    q = h.queue("q")
    seen = Seen()
    h.consumer("worker", "q", seen.add)
    path = h.write()
    with conveyor.load(path, tracing=False):
        queue.publish(q, 1, {"traceparent": traceparent})
    app = conveyor.load(path, tracer_provider=spans.provider)
    app.start(consumers=True)
    try:
        (span,) = spans.wait(f"process {q}")
    finally:
        app.stop()
    if continued:
        assert ids(span)[0] == 0x0AF7651916CD43DD8448EB211C80319C
        assert parent_of(span) == 0xB7AD6B7169203331
    else:
        assert span.parent is None
    assert attr(span, "messaging.conveyor.outcome") == "acked"


CHILD = textwrap.dedent(
    """
    import json, sys
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    import conveyor
    from conveyor import queue

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # the process-wide provider: tracing=None turns on
    path, queue_id = sys.argv[1:]
    with conveyor.load(path) as app:
        with trace.get_tracer("child").start_as_current_span("child request"):
            message_id = queue.publish(queue_id, {"from": "child"})
    (span,) = [s for s in exporter.get_finished_spans() if s.name == f"publish {queue_id}"]
    print(json.dumps({
        "message_id": message_id,
        "trace_id": span.context.trace_id,
        "span_id": span.context.span_id,
        "kind": span.kind.name,
    }))
    """
)


def test_a_trace_crosses_processes(tmp_path: Path, spans: Spans) -> None:
    """A child process publishes to a SQLite file with its own SDK (the process-wide
    provider, picked up by ``tracing=None``); this process consumes: its consumer span
    belongs to the child's trace, with the child's producer span as parent."""
    h = Harness(tmp_path, "sqlite")
    q = h.queue("shared")
    seen = Seen()
    h.consumer("worker", "shared", seen.add)
    path = h.write()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    app = conveyor.load(path, tracer_provider=spans.provider)
    app.start(consumers=True)
    try:
        child = subprocess.run(
            [sys.executable, str(script), str(path), q],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert child.returncode == 0, child.stderr
        sent = json.loads(child.stdout)
        (span,) = spans.wait(f"process {q}")
    finally:
        app.stop()
    assert sent["kind"] == "PRODUCER"
    assert ids(span)[0] == sent["trace_id"]
    assert parent_of(span) == sent["span_id"]
    assert attr(span, "messaging.message.id") == sent["message_id"]


# -- on and off -------------------------------------------------------------------------------


def test_tracing_is_off_without_a_configured_provider(tmp_path: Path) -> None:
    """The default (``tracing=None``) with no tracer provider set: no tracer, no header."""
    h = Harness(tmp_path)
    q = h.queue("q")
    seen = Seen()
    h.consumer("worker", "q", seen.add)
    app = h.load()
    app.start(consumers=True)
    try:
        assert app.runtime.tracer is None
        assert all(c.tracer is None for c in app.consumers.values())
        queue.publish(q, 1)
        wait_until(lambda: len(seen) == 1)
    finally:
        app.stop()
    assert seen.items[0][1] == {}


def test_tracing_false_wins_over_a_provider(tmp_path: Path, spans: Spans) -> None:
    h = Harness(tmp_path)
    q = h.queue("q")
    with h.load(tracing=False, tracer_provider=spans.provider) as app:
        queue.publish(q, 1)
        assert app.runtime.tracer is None
    assert spans.all() == []


CONFIGURED = textwrap.dedent(
    """
    import sys
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    import conveyor

    path = sys.argv[1]
    before = conveyor.load(path)
    with before as app:
        print("before:", app.runtime.tracer is not None)
    with conveyor.load(path, tracing=True) as app:
        print("forced on:", app.runtime.tracer is not None)
    trace.set_tracer_provider(TracerProvider())
    with conveyor.load(path) as app:
        print("after:", app.runtime.tracer is not None)
    with before as app:
        print("restarted:", app.runtime.tracer is not None)
    with conveyor.load(path, tracing=False) as app:
        print("forced off:", app.runtime.tracer is not None)
    """
)


def test_tracing_none_follows_the_process_wide_provider_at_each_start(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.queue("q")
    path = h.write()
    script = tmp_path / "configured.py"
    script.write_text(CONFIGURED)
    run = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "before: False",
        "forced on: True",
        "after: True",
        "restarted: True",
        "forced off: False",
    ]
