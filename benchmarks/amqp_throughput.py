"""RabbitMQ throughput and latency: conveyor's AMQP driver against raw clients and peers.

Every benchmark runs against the broker at ``--url`` (default the local one), on its
own fresh durable queue that is deleted afterwards, with the same small JSON payload.
All messages are persistent (delivery_mode 2) and every publish is confirmed by the
broker before it counts.

- ``publish-1``: confirmed publish, one at a time (wait for each confirm).
- ``publish-N``: confirmed publish with ``--inflight`` publishes outstanding at once
  (raw clients: that many concurrent publishes; conveyor: that many concurrent
  ``queue.apublish`` calls, and ``queue.apublish_many`` batches of that size).
- ``consume``: a queue pre-filled with ``--n`` messages is drained by one consumer,
  manual ack, prefetch 100, no-op handler; timed from attaching to the last ack.
- ``latency``: one message at a time, from the start of the publish to the handler
  (the consumer is already attached); p50 and p99 over ``--rounds`` messages.

Peers run where installed (``pip install pika kombu dramatiq faststream celery``);
a missing one is reported, not fatal. Each figure is the best of ``--repeat`` runs,
with every run listed. The machine has 2 cores: run it a few times.

    .venv/bin/python benchmarks/amqp_throughput.py [--n 20000] [--repeat 3] [--only consume]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

URL = os.environ.get("CONVEYOR_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
MODULE = "amqp_throughput"  # conveyor imports the handler below by this name
PREFETCH = 100


def payload(i: int) -> bytes:
    return json.dumps({"n": i, "action": "send_email", "user_id": 456, "template": "welcome"}).encode()


class PeerMissing(Exception):
    """A peer library could not be imported."""


@dataclass
class Result:
    bench: str
    name: str
    runs: list[float] = field(default_factory=list)  # msg/s, or ms for latency
    best: float | None = None
    p50: float | None = None
    p99: float | None = None
    status: str = "ok"


# -- helpers -------------------------------------------------------------------------------


def new_queue() -> str:
    return f"bench.{uuid.uuid4().hex[:12]}"


async def declare(name: str) -> None:
    import aiormq

    conn = await aiormq.connect(URL)
    channel = await conn.channel()
    await channel.queue_declare(name, durable=True)
    await conn.close()


async def delete(name: str) -> None:
    import aiormq

    conn = await aiormq.connect(URL)
    channel = await conn.channel()
    for suffix in ("", ".DQ", ".XQ"):  # dramatiq adds a delay and a dead-letter queue
        await channel.queue_delete(name + suffix)
    await conn.close()


async def prefill(name: str, n: int) -> None:
    """Fill ``name`` with ``n`` persistent messages (pipelined confirms, 1000 in flight)."""
    import aiormq
    from pamqp.commands import Basic

    conn = await aiormq.connect(URL)
    channel = await conn.channel()
    await channel.queue_declare(name, durable=True)
    props = Basic.Properties(delivery_mode=2, content_type="application/json")
    for start in range(0, n, 1000):
        await asyncio.gather(
            *(
                channel.basic_publish(payload(i), routing_key=name, properties=props)
                for i in range(start, min(start + 1000, n))
            )
        )
    await conn.close()


async def queue_depth(name: str) -> int:
    import aiormq

    conn = await aiormq.connect(URL)
    channel = await conn.channel()
    ok = await channel.queue_declare(name, passive=True)
    await conn.close()
    return int(ok.message_count or 0)


# -- conveyor ------------------------------------------------------------------------------


class _Counter:
    """Counts handler calls; ``done`` is set (on the app's loop) when ``target`` is reached."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.done: asyncio.Event | None = None
        self.stamps: dict[int, float] = {}

    def arm(self, target: int) -> None:
        self.count = 0
        self.target = target
        self.done = asyncio.Event()


COUNTER = _Counter()


async def async_noop(data: Any) -> None:
    COUNTER.count += 1
    if COUNTER.count == COUNTER.target and COUNTER.done is not None:
        COUNTER.done.set()


async def async_stamp(data: Any) -> None:
    COUNTER.stamps[data["n"]] = time.perf_counter()
    if COUNTER.done is not None:
        COUNTER.done.set()


def conveyor_app(queue_name: str, handler: str, tmp: Path) -> Any:
    import conveyor

    doc = {
        "version": "1.0",
        "namespace": "bench",
        "entries": [
            {"name": "broker", "kind": "queue.driver.amqp", "url": URL},
            {"name": "q", "kind": "queue.queue", "driver": "broker", "queue_name": queue_name},
            {
                "name": "worker",
                "kind": "queue.consumer",
                "queue": "bench:q",
                "handler": f"{MODULE}:{handler}",
                "prefetch": PREFETCH,
                "concurrency": 1,
                "lifecycle": {"auto_start": False},
            },
        ],
    }
    path = tmp / f"{queue_name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return conveyor.load(path)


async def conveyor_publish_seq(name: str, n: int, tmp: Path) -> float:
    from conveyor import queue

    async with conveyor_app(name, "async_noop", tmp):
        t0 = time.perf_counter()
        for i in range(n):
            await queue.apublish(
                "bench:q", {"n": i, "action": "send_email", "user_id": 456, "template": "welcome"}
            )
        return time.perf_counter() - t0


async def conveyor_publish_concurrent(name: str, n: int, tmp: Path, inflight: int) -> float:
    from conveyor import queue

    async with conveyor_app(name, "async_noop", tmp):
        t0 = time.perf_counter()
        for start in range(0, n, inflight):
            await asyncio.gather(
                *(
                    queue.apublish(
                        "bench:q", {"n": i, "action": "send_email", "user_id": 456, "template": "welcome"}
                    )
                    for i in range(start, min(start + inflight, n))
                )
            )
        return time.perf_counter() - t0


async def conveyor_publish_many(name: str, n: int, tmp: Path, inflight: int) -> float:
    from conveyor import queue

    async with conveyor_app(name, "async_noop", tmp):
        t0 = time.perf_counter()
        for start in range(0, n, inflight):
            items = [
                {"n": i, "action": "send_email", "user_id": 456, "template": "welcome"}
                for i in range(start, min(start + inflight, n))
            ]
            await queue.apublish_many("bench:q", items)
        return time.perf_counter() - t0


async def conveyor_consume(name: str, n: int, tmp: Path) -> float:
    await prefill(name, n)
    app = conveyor_app(name, "async_noop", tmp)
    async with app:
        COUNTER.arm(n)
        t0 = time.perf_counter()
        await app.astart_consumers(["bench:worker"])
        assert COUNTER.done is not None
        await asyncio.wait_for(COUNTER.done.wait(), 300)
        elapsed = time.perf_counter() - t0
        await app.astop_consumers()
    return elapsed


async def conveyor_latency(name: str, rounds: int, tmp: Path) -> list[float]:
    from conveyor import queue

    app = conveyor_app(name, "async_stamp", tmp)
    samples: list[float] = []
    async with app:
        COUNTER.arm(1)
        await app.astart_consumers(["bench:worker"])
        for i in range(rounds):
            COUNTER.done = asyncio.Event()
            t0 = time.perf_counter()
            await queue.apublish(
                "bench:q", {"n": i, "action": "send_email", "user_id": 456, "template": "welcome"}
            )
            await asyncio.wait_for(COUNTER.done.wait(), 10)
            samples.append((COUNTER.stamps.pop(i) - t0) * 1000)
        await app.astop_consumers()
    return samples


# -- raw aio-pika ----------------------------------------------------------------------------


async def aiopika_publish(name: str, n: int, inflight: int) -> float:
    import aio_pika

    conn = await aio_pika.connect(URL)
    try:
        channel = await conn.channel(publisher_confirms=True)
        await channel.declare_queue(name, durable=True)
        exchange = channel.default_exchange
        t0 = time.perf_counter()
        for start in range(0, n, inflight):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(payload(i), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=name,
                    )
                    for i in range(start, min(start + inflight, n))
                )
            )
        return time.perf_counter() - t0
    finally:
        await conn.close()


async def aiopika_consume(name: str, n: int) -> float:
    import aio_pika

    await prefill(name, n)
    conn = await aio_pika.connect(URL)
    done = asyncio.Event()
    count = 0

    async def on_message(message: Any) -> None:
        nonlocal count
        json.loads(message.body)
        await message.ack()
        count += 1
        if count == n:
            done.set()

    try:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        q = await channel.declare_queue(name, durable=True)
        t0 = time.perf_counter()
        await q.consume(on_message)
        await asyncio.wait_for(done.wait(), 300)
        return time.perf_counter() - t0
    finally:
        await conn.close()


async def aiopika_latency(name: str, rounds: int) -> list[float]:
    import aio_pika

    conn = await aio_pika.connect(URL)
    samples: list[float] = []
    got: asyncio.Event = asyncio.Event()
    stamp = [0.0]

    async def on_message(message: Any) -> None:
        json.loads(message.body)
        stamp[0] = time.perf_counter()
        await message.ack()
        got.set()

    try:
        channel = await conn.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=PREFETCH)
        q = await channel.declare_queue(name, durable=True)
        await q.consume(on_message)
        for i in range(rounds):
            got.clear()
            t0 = time.perf_counter()
            await channel.default_exchange.publish(
                aio_pika.Message(payload(i), delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=name
            )
            await asyncio.wait_for(got.wait(), 10)
            samples.append((stamp[0] - t0) * 1000)
        return samples
    finally:
        await conn.close()


# -- raw aiormq ------------------------------------------------------------------------------


async def aiormq_publish(name: str, n: int, inflight: int) -> float:
    import aiormq
    from pamqp.commands import Basic

    conn = await aiormq.connect(URL)
    try:
        channel = await conn.channel()
        await channel.queue_declare(name, durable=True)
        props = Basic.Properties(delivery_mode=2)
        t0 = time.perf_counter()
        for start in range(0, n, inflight):
            await asyncio.gather(
                *(
                    channel.basic_publish(payload(i), routing_key=name, properties=props)
                    for i in range(start, min(start + inflight, n))
                )
            )
        return time.perf_counter() - t0
    finally:
        await conn.close()


async def aiormq_consume(name: str, n: int) -> float:
    import aiormq

    await prefill(name, n)
    conn = await aiormq.connect(URL)
    done = asyncio.Event()
    count = 0

    try:
        channel = await conn.channel()

        async def on_message(message: Any) -> None:
            nonlocal count
            json.loads(message.body)
            await channel.basic_ack(message.delivery.delivery_tag)
            count += 1
            if count == n:
                done.set()

        await channel.basic_qos(prefetch_count=PREFETCH)
        t0 = time.perf_counter()
        await channel.basic_consume(name, on_message)
        await asyncio.wait_for(done.wait(), 300)
        return time.perf_counter() - t0
    finally:
        await conn.close()


# -- peers (synchronous clients run in a thread so the event loop stays free) -------------------


def pika_consume(name: str, n: int) -> float:
    try:
        import pika
    except ImportError as exc:
        raise PeerMissing("pika") from exc
    asyncio.run(prefill(name, n))
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    channel = conn.channel()
    channel.basic_qos(prefetch_count=PREFETCH)
    count = 0

    def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
        nonlocal count
        json.loads(body)
        ch.basic_ack(method.delivery_tag)
        count += 1
        if count == n:
            ch.stop_consuming()

    t0 = time.perf_counter()
    channel.basic_consume(name, on_message)
    channel.start_consuming()
    elapsed = time.perf_counter() - t0
    conn.close()
    return elapsed


def pika_publish_seq(name: str, n: int) -> float:
    try:
        import pika
    except ImportError as exc:
        raise PeerMissing("pika") from exc
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    channel = conn.channel()
    channel.queue_declare(name, durable=True)
    channel.confirm_delivery()
    props = pika.BasicProperties(delivery_mode=2)
    t0 = time.perf_counter()
    for i in range(n):
        channel.basic_publish("", name, payload(i), props, mandatory=True)
    elapsed = time.perf_counter() - t0
    conn.close()
    return elapsed


def kombu_publish_seq(name: str, n: int) -> float:
    try:
        import kombu
    except ImportError as exc:
        raise PeerMissing("kombu") from exc
    with kombu.Connection(URL, transport_options={"confirm_publish": True}) as conn:
        q = kombu.Queue(name, durable=True)
        producer = conn.Producer(serializer="json")
        q(conn).declare()
        t0 = time.perf_counter()
        for i in range(n):
            producer.publish(
                {"n": i, "action": "send_email", "user_id": 456, "template": "welcome"},
                routing_key=name,
                delivery_mode=2,
                retry=False,
            )
        return time.perf_counter() - t0


def kombu_consume(name: str, n: int) -> float:
    try:
        import kombu
    except ImportError as exc:
        raise PeerMissing("kombu") from exc
    # kombu's own json envelope: fill through kombu so its consumer decodes it
    with kombu.Connection(URL) as conn:
        q = kombu.Queue(name, durable=True)
        producer = conn.Producer(serializer="json")
        q(conn).declare()
        for i in range(n):
            producer.publish({"n": i, "action": "send_email"}, routing_key=name, delivery_mode=2)
    count = 0

    def on_message(body: Any, message: Any) -> None:
        nonlocal count
        message.ack()
        count += 1

    with (
        kombu.Connection(URL) as conn,
        conn.Consumer(kombu.Queue(name, durable=True), callbacks=[on_message], prefetch_count=PREFETCH),
    ):
        t0 = time.perf_counter()
        while count < n:
            conn.drain_events(timeout=10)
        return time.perf_counter() - t0


def dramatiq_bench(name: str, n: int, consume: bool) -> float:
    try:
        import dramatiq
        from dramatiq.brokers.rabbitmq import RabbitmqBroker
    except ImportError as exc:
        raise PeerMissing("dramatiq") from exc
    broker = RabbitmqBroker(url=URL, confirm_delivery=True)
    broker.middleware = [m for m in broker.middleware if type(m).__name__ in ("AgeLimit", "Retries")]
    dramatiq.set_broker(broker)
    done = threading.Event()
    count = [0]
    lock = threading.Lock()

    @dramatiq.actor(queue_name=name, broker=broker, max_retries=0)
    def noop(i: int) -> None:
        with lock:
            count[0] += 1
            if count[0] == n:
                done.set()

    try:
        t0 = time.perf_counter()
        for i in range(n):
            noop.send(i)
        published = time.perf_counter() - t0
        if not consume:
            return published
        # dramatiq prefetches worker_threads * 2 by default; 50 threads -> prefetch 100.
        worker = dramatiq.Worker(broker, worker_threads=50, queues={name})
        t0 = time.perf_counter()
        worker.start()
        done.wait(300)
        elapsed = time.perf_counter() - t0
        worker.stop()
        return elapsed
    finally:
        broker.close()


async def faststream_bench(name: str, n: int, consume: bool) -> float:
    try:
        from faststream.rabbit import RabbitBroker, RabbitQueue
        from faststream.rabbit.schemas import Channel
    except ImportError as exc:
        raise PeerMissing("faststream") from exc
    # publisher confirms are on by default; its per-message log lines go to DEBUG (not shown)
    broker = RabbitBroker(URL, default_channel=Channel(prefetch_count=PREFETCH), log_level=logging.DEBUG)
    done = asyncio.Event()
    count = 0
    rq = RabbitQueue(name, durable=True)

    @broker.subscriber(rq)
    async def handle(body: dict[str, Any]) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    if not consume:
        async with broker:
            await broker.declare_queue(rq)
            t0 = time.perf_counter()
            for i in range(n):
                await broker.publish(
                    {"n": i, "action": "send_email", "user_id": 456, "template": "welcome"},
                    queue=name,
                    persist=True,
                )
            return time.perf_counter() - t0
    await prefill(name, n)
    await broker.connect()
    t0 = time.perf_counter()
    await broker.start()
    await asyncio.wait_for(done.wait(), 300)
    elapsed = time.perf_counter() - t0
    await broker.stop()
    return elapsed


def celery_publish_seq(name: str, n: int) -> float:
    try:
        import celery
    except ImportError as exc:
        raise PeerMissing("celery") from exc
    app = celery.Celery("bench", broker=URL)
    app.conf.broker_transport_options = {"confirm_publish": True}
    app.conf.task_default_queue = name

    @app.task(name="bench.noop")
    def noop(i: int) -> None:
        return None

    t0 = time.perf_counter()
    for i in range(n):
        noop.delay(i)
    return time.perf_counter() - t0


def celery_consume(name: str, n: int) -> float:
    """A solo-pool worker (prefetch 100) in a subprocess; timed from its first ack to an empty queue."""
    try:
        import celery  # noqa: F401
    except ImportError as exc:
        raise PeerMissing("celery") from exc
    import subprocess

    celery_publish_seq(name, n)
    module = Path(__file__).with_name("_celery_bench_app.py")
    module.write_text(
        "import celery\n"
        f"app = celery.Celery('bench', broker={URL!r})\n"
        f"app.conf.task_default_queue = {name!r}\n"
        f"app.conf.worker_prefetch_multiplier = {PREFETCH}\n"
        "@app.task(name='bench.noop')\n"
        "def noop(i):\n    return None\n"
    )
    env = {**os.environ, "PYTHONPATH": str(module.parent)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "_celery_bench_app",
            "worker",
            "--pool=solo",
            "-Q",
            name,
            "-l",
            "WARNING",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        t0 = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            depth = asyncio.run(queue_depth(name))
            if t0 is None and depth < n:
                t0 = time.perf_counter()
            if depth == 0 and t0 is not None:
                return time.perf_counter() - t0
            time.sleep(0.02)
        raise TimeoutError("celery did not drain the queue")
    finally:
        proc.terminate()
        proc.wait(30)
        module.unlink(missing_ok=True)


# -- running -----------------------------------------------------------------------------------


def run_bench(
    *,
    bench: str,
    label: str,
    fn: Callable[[str], Awaitable[Any] | Any],
    n: int,
    repeat: int,
    latency: bool = False,
) -> Result:
    result = Result(bench, label)
    samples_all: list[float] = []
    for _ in range(repeat):
        name = new_queue()
        try:
            out = fn(name)
            if asyncio.iscoroutine(out):
                out = asyncio.run(out)
        except PeerMissing as exc:
            result.status = f"not installed ({exc})"
            return result
        except Exception as exc:
            result.status = f"error: {type(exc).__name__}: {exc}"
            return result
        finally:
            with contextlib.suppress(Exception):
                asyncio.run(delete(name))
        if latency:
            samples_all.extend(out)
            result.runs.append(round(statistics.median(out), 3))
        else:
            result.runs.append(round(n / out, 1))
    if latency:
        samples_all.sort()
        result.p50 = round(statistics.median(samples_all), 3)
        result.p99 = round(samples_all[min(len(samples_all) - 1, int(len(samples_all) * 0.99))], 3)
        result.best = result.p50
    else:
        result.best = max(result.runs)
    return result


def benches(opts: argparse.Namespace, tmp: Path) -> list[tuple[str, str, Callable[[str], Any], int, bool]]:
    n, k, rounds = opts.n, opts.inflight, opts.rounds
    seq_n = opts.seq_n
    return [
        ("publish-1", "raw aio-pika", lambda q: aiopika_publish(q, seq_n, 1), seq_n, False),
        ("publish-1", "raw aiormq", lambda q: aiormq_publish(q, seq_n, 1), seq_n, False),
        ("publish-1", "conveyor apublish", lambda q: conveyor_publish_seq(q, seq_n, tmp), seq_n, False),
        ("publish-1", "raw pika", lambda q: pika_publish_seq(q, seq_n), seq_n, False),
        ("publish-1", "kombu", lambda q: kombu_publish_seq(q, seq_n), seq_n, False),
        ("publish-1", "dramatiq", lambda q: dramatiq_bench(q, seq_n, consume=False), seq_n, False),
        ("publish-1", "faststream", lambda q: faststream_bench(q, seq_n, consume=False), seq_n, False),
        ("publish-1", "celery", lambda q: celery_publish_seq(q, seq_n), seq_n, False),
        (f"publish-{k}", "raw aio-pika", lambda q: aiopika_publish(q, n, k), n, False),
        (f"publish-{k}", "raw aiormq", lambda q: aiormq_publish(q, n, k), n, False),
        (
            f"publish-{k}",
            "conveyor apublish x concurrent",
            lambda q: conveyor_publish_concurrent(q, n, tmp, k),
            n,
            False,
        ),
        (f"publish-{k}", "conveyor apublish_many", lambda q: conveyor_publish_many(q, n, tmp, k), n, False),
        ("consume", "raw pika", lambda q: pika_consume(q, n), n, False),
        ("consume", "kombu", lambda q: kombu_consume(q, n), n, False),
        ("consume", "raw aio-pika", lambda q: aiopika_consume(q, n), n, False),
        ("consume", "raw aiormq", lambda q: aiormq_consume(q, n), n, False),
        ("consume", "faststream", lambda q: faststream_bench(q, n, consume=True), n, False),
        ("consume", "dramatiq", lambda q: dramatiq_bench(q, n, consume=True), n, False),
        ("consume", "celery", lambda q: celery_consume(q, n), n, False),
        ("consume", "conveyor", lambda q: conveyor_consume(q, n, tmp), n, False),
        ("latency", "raw aio-pika", lambda q: aiopika_latency(q, rounds), rounds, True),
        ("latency", "conveyor", lambda q: conveyor_latency(q, rounds, tmp), rounds, True),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20000, help="messages for publish-N and consume")
    parser.add_argument("--seq-n", type=int, default=3000, help="messages for publish-1")
    parser.add_argument("--inflight", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2000, help="messages for latency")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="bench names or client labels to run")
    parser.add_argument("--json", type=Path, default=None)
    opts = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.modules.setdefault(MODULE, sys.modules[__name__])
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        for bench, label, fn, n, latency in benches(opts, Path(tmp)):
            if opts.only and not any(o in (bench, label) or o in label for o in opts.only):
                continue
            result = run_bench(bench=bench, label=label, fn=fn, n=n, repeat=opts.repeat, latency=latency)
            results.append(result)
            show(result)
    if opts.json:
        opts.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


def show(r: Result) -> None:
    if r.status != "ok":
        print(f"{r.bench:<12} {r.name:<32} {r.status}", flush=True)
    elif r.p50 is not None:
        print(
            f"{r.bench:<12} {r.name:<32} p50 {r.p50:.3f} ms  p99 {r.p99:.3f} ms  (run medians {r.runs})",
            flush=True,
        )
    else:
        print(f"{r.bench:<12} {r.name:<32} {r.best:>9.0f} msg/s  (runs {r.runs})", flush=True)


if __name__ == "__main__":
    print(f"python {platform.python_version()}, {os.cpu_count()} cores, broker {URL}", flush=True)
    sys.exit(main())
