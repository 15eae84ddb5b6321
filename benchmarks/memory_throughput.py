"""End-to-end throughput: publish -> consume -> ack on conveyor's memory driver.

Every figure is messages per second for N messages, best of ``--repeat`` runs, timed
from the first publish to the last ack, with the consumer already attached and idle.
Everything runs in this one process, one benchmark after the other:

- raw ``asyncio.Queue`` with a JSON encode/decode per message (the practical limit),
- conveyor, memory driver, ``json/plain`` codec, no-op async and sync handlers,
  publishing with ``queue.apublish`` (one at a time) and ``queue.apublish_many``,
- Kombu ``memory://`` (Producer, Consumer + ``drain_events``, ack each message),
- Taskiq ``InMemoryBroker`` (kick N tasks, wait until they ran),
- Dramatiq ``StubBroker`` with a ``Worker`` (send N messages, ``broker.join``).

A peer that cannot be imported is reported as "not installed". Every wait is bounded
by ``--timeout``; a run that gets stuck makes the script exit with status 2.

    .venv/bin/python benchmarks/memory_throughput.py [--n 50000] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from _common import (
    BenchTimeout,
    Check,
    PeerMissing,
    Result,
    check_target,
    executable,
    payload,
    progress,
)

import conveyor
from conveyor import queue

MODULE = "memory_throughput"  # the handlers below are imported from YAML by this name
NAMESPACE = "bench"
QUEUE_ID = f"{NAMESPACE}:q"
CONSUMER_ID = f"{NAMESPACE}:worker"
BENCHMARKS = ("raw", "conveyor", "kombu", "taskiq", "dramatiq")


@dataclass
class Options:
    n: int
    repeat: int
    timeout: float
    concurrency: list[int]
    prefetch: int
    batch: int
    dramatiq_threads: int


def rates(n: int, elapsed: Sequence[float]) -> list[float]:
    return [n / seconds for seconds in elapsed]


def result_from(key: str, name: str, n: int, elapsed: Sequence[float], note: str = "") -> Result:
    runs = rates(n, elapsed)
    return Result(key, name, max(runs), [round(r, 1) for r in runs], note)


# -- conveyor handlers (imported by the YAML app as memory_throughput:async_noop/sync_noop) --


class _Sink:
    """Counts handled messages and sets ``done`` (on the app's loop) at ``target``."""

    def __init__(self) -> None:
        self.target = 0
        self.counter = itertools.count(1)
        self.done = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    def arm(self, target: int) -> None:
        self.target = target
        self.counter = itertools.count(1)  # next() on it is atomic in CPython: safe from threads
        self.done = asyncio.Event()
        self.loop = asyncio.get_running_loop()


SINK = _Sink()


async def async_noop(data: Any) -> None:
    if next(SINK.counter) == SINK.target:
        SINK.done.set()


def sync_noop(data: Any) -> None:
    if next(SINK.counter) == SINK.target and SINK.loop is not None:
        SINK.loop.call_soon_threadsafe(SINK.done.set)


# -- raw asyncio.Queue + JSON -------------------------------------------------------------


async def _raw_consume(q: asyncio.Queue[bytes], n: int, done: asyncio.Event) -> None:
    loads = json.loads
    for _ in range(n):
        loads((await q.get()).decode())  # str decode + loads: faster than loads(bytes)
        q.task_done()
    done.set()


async def _raw_once(n: int, timeout: float) -> float:
    q: asyncio.Queue[bytes] = asyncio.Queue()
    done = asyncio.Event()
    consumer = asyncio.create_task(_raw_consume(q, n, done))
    await asyncio.sleep(0)  # the consumer is attached and idle
    dumps = json.dumps
    start = time.perf_counter()
    for i in range(n):
        await q.put(dumps(payload(i)).encode())
    await _wait_event(done, timeout)
    elapsed = time.perf_counter() - start
    consumer.cancel()
    return elapsed


def bench_raw(opts: Options) -> Result:
    elapsed = [asyncio.run(_raw_once(opts.n, opts.timeout)) for _ in range(opts.repeat)]
    return result_from("raw", "raw asyncio.Queue + JSON", opts.n, elapsed, "1 consumer task")


async def _wait_event(event: asyncio.Event, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        raise BenchTimeout(f"no completion within {timeout:g}s") from None


# -- conveyor -----------------------------------------------------------------------------


def write_app(directory: Path, handler: str, concurrency: int, prefetch: int) -> Path:
    doc = {
        "version": "1.0",
        "namespace": NAMESPACE,
        "entries": [
            {"name": "mem", "kind": "queue.driver.memory"},
            {"name": "q", "kind": "queue.queue", "driver": "mem", "codec": "json/plain"},
            {
                "name": "worker",
                "kind": "queue.consumer",
                "queue": "q",
                "handler": f"{MODULE}:{handler}",
                "concurrency": concurrency,
                "prefetch": max(prefetch, concurrency),
            },
        ],
    }
    path = directory / f"{handler}-c{concurrency}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


async def publish_each(n: int, batch: int) -> None:
    for i in range(n):
        await queue.apublish(QUEUE_ID, payload(i))


async def publish_batches(n: int, batch: int) -> None:
    for low in range(0, n, batch):
        await queue.apublish_many(QUEUE_ID, [payload(i) for i in range(low, min(n, low + batch))])


Publisher = Callable[[int, int], Awaitable[None]]


def _acked(app: conveyor.App) -> int:
    return app.stats()[CONSUMER_ID]["acked"]


async def _until_acked(app: conveyor.App, target: int, deadline: float) -> None:
    """The handler count is reached just before the last ack: wait for that ack too."""
    while _acked(app) < target:
        if time.monotonic() > deadline:
            raise BenchTimeout(f"conveyor acked {_acked(app)} of {target} messages")
        await asyncio.sleep(0)


async def _conveyor_once(app: conveyor.App, opts: Options, publish: Publisher) -> float:
    SINK.arm(opts.n)
    acked_before = _acked(app)
    deadline = time.monotonic() + opts.timeout
    start = time.perf_counter()
    await publish(opts.n, opts.batch)
    await _wait_event(SINK.done, opts.timeout)
    await _until_acked(app, acked_before + opts.n, deadline)
    return time.perf_counter() - start


async def _conveyor_runs(path: Path, opts: Options, publish: Publisher) -> list[float]:
    app = conveyor.load(path)
    await app.astart(consumers=True)
    await asyncio.sleep(0.05)  # let the workers reach their idle wait before publishing
    try:
        return [await _conveyor_once(app, opts, publish) for _ in range(opts.repeat)]
    finally:
        await app.astop(5.0)


def conveyor_case(
    directory: Path, opts: Options, handler: str, concurrency: int, publish: Publisher
) -> list[float]:
    """msgs/s of every run of one configuration (a fresh app, started once)."""
    path = write_app(directory, handler, concurrency, opts.prefetch)
    return rates(opts.n, asyncio.run(_conveyor_runs(path, opts, publish)))


def _conveyor_row(key: str, name: str, runs: list[float], note: str) -> Result:
    return Result(key, name, max(runs), [round(r, 1) for r in runs], note)


def conveyor_sweep(directory: Path, opts: Options, handler: str, label: str) -> tuple[list[Result], int]:
    """One row at concurrency=1 and one for the best concurrency; returns the best setting."""
    by_c = {c: conveyor_case(directory, opts, handler, c, publish_each) for c in opts.concurrency}
    best = max(by_c, key=lambda c: max(by_c[c]))
    tried = ", ".join(f"c={c}: {max(runs):,.0f}" for c, runs in by_c.items())
    name = f"conveyor {label} handler, apublish"
    return [
        _conveyor_row(f"conveyor_{label}_c1", f"{name}, c=1", by_c[1], _settings(opts, 1)),
        _conveyor_row(
            f"conveyor_{label}_best", f"{name}, best c", by_c[best], f"{_settings(opts, best)}; {tried}"
        ),
    ], best


def _settings(opts: Options, concurrency: int) -> str:
    return f"c={concurrency}, prefetch={max(opts.prefetch, concurrency)}"


def bench_conveyor(opts: Options) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp:
        directory = Path(tmp)
        async_rows, best = conveyor_sweep(directory, opts, "async_noop", "async")
        many = conveyor_case(directory, opts, "async_noop", best, publish_batches)
        many_row = _conveyor_row(
            "conveyor_async_publish_many",
            "conveyor async handler, apublish_many",
            many,
            f"batch={opts.batch}, {_settings(opts, best)}",
        )
        sync_rows, _ = conveyor_sweep(directory, opts, "sync_noop", "sync")
    return [*async_rows, many_row, *sync_rows]


# -- Kombu memory:// ------------------------------------------------------------------------


class _Count:
    """A consumed-message counter for the single-threaded peers."""

    def __init__(self) -> None:
        self.value = 0
        self.done = asyncio.Event()

    def reset(self) -> None:
        self.value = 0
        self.done = asyncio.Event()


def _kombu_once(conn: Any, producer: Any, target: Any, count: _Count, opts: Options) -> float:
    count.reset()
    deadline = time.monotonic() + opts.timeout
    start = time.perf_counter()
    for i in range(opts.n):
        producer.publish(payload(i), exchange=target.exchange, routing_key=target.routing_key)
    while count.value < opts.n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchTimeout(f"kombu consumed {count.value} of {opts.n} messages")
        try:
            conn.drain_events(timeout=remaining)
        except TimeoutError:
            raise BenchTimeout(f"kombu consumed {count.value} of {opts.n} messages") from None
    return time.perf_counter() - start


def bench_kombu(opts: Options) -> Result:
    try:
        from kombu import Connection, Exchange
        from kombu import Queue as KombuQueue
    except ImportError as exc:
        raise PeerMissing(str(exc)) from None
    count = _Count()

    def on_message(body: Any, message: Any) -> None:
        message.ack()
        count.value += 1

    with Connection("memory://") as conn:
        target = KombuQueue("bench-kombu", Exchange("bench-kombu", type="direct"), routing_key="bench")
        target.declare(channel=conn.default_channel)
        with conn.Consumer(target, callbacks=[on_message], accept=["json"]):
            producer = conn.Producer(serializer="json")
            elapsed = [_kombu_once(conn, producer, target, count, opts) for _ in range(opts.repeat)]
    return result_from("kombu", "kombu memory://", opts.n, elapsed, "Producer + Consumer/drain_events, ack")


# -- Taskiq InMemoryBroker ------------------------------------------------------------------


async def _taskiq_once(task: Any, broker: Any, count: _Count, opts: Options) -> float:
    count.reset()
    start = time.perf_counter()
    for i in range(opts.n):
        await task.kiq(payload(i))
    await _wait_event(count.done, opts.timeout)
    async with asyncio.timeout(opts.timeout):
        await broker.wait_all()  # every task has finished, result stored
    return time.perf_counter() - start


async def _taskiq_runs(opts: Options) -> list[float]:
    from taskiq import InMemoryBroker

    broker = InMemoryBroker()
    count = _Count()

    async def noop(data: Any) -> None:
        count.value += 1
        if count.value == opts.n:
            count.done.set()

    task = broker.task(task_name="bench.noop")(noop)
    await broker.startup()
    try:
        return [await _taskiq_once(task, broker, count, opts) for _ in range(opts.repeat)]
    finally:
        await broker.shutdown()


def bench_taskiq(opts: Options) -> Result:
    try:
        import taskiq  # noqa: F401
    except ImportError as exc:
        raise PeerMissing(str(exc)) from None
    elapsed = asyncio.run(_taskiq_runs(opts))
    return result_from("taskiq", "taskiq InMemoryBroker", opts.n, elapsed, "kiq + async task, defaults")


# -- Dramatiq StubBroker + Worker -----------------------------------------------------------


def _dramatiq_once(broker: Any, actor: Any, opts: Options) -> float:
    from dramatiq.errors import QueueJoinTimeout

    start = time.perf_counter()
    for i in range(opts.n):
        actor.send(payload(i))
    try:
        broker.join(actor.queue_name, timeout=int(opts.timeout * 1000))
    except QueueJoinTimeout:
        raise BenchTimeout(f"dramatiq did not finish {opts.n} messages") from None
    return time.perf_counter() - start


def bench_dramatiq(opts: Options) -> Result:
    try:
        import dramatiq
        from dramatiq.brokers.stub import StubBroker
    except ImportError as exc:
        raise PeerMissing(str(exc)) from None
    broker = StubBroker()
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)

    @dramatiq.actor(broker=broker, queue_name="bench_dramatiq", max_retries=0)
    def noop(data: Any) -> None:
        return None

    worker = dramatiq.Worker(broker, worker_threads=opts.dramatiq_threads)
    worker.start()
    try:
        elapsed = [_dramatiq_once(broker, noop, opts) for _ in range(opts.repeat)]
    finally:
        worker.stop()
        broker.close()
    note = f"worker_threads={opts.dramatiq_threads}"
    return result_from("dramatiq", "dramatiq StubBroker + Worker", opts.n, elapsed, note)


# -- running and reporting ------------------------------------------------------------------

PEERS: dict[str, tuple[str, Callable[[Options], Result]]] = {
    "kombu": ("kombu memory://", bench_kombu),
    "taskiq": ("taskiq InMemoryBroker", bench_taskiq),
    "dramatiq": ("dramatiq StubBroker + Worker", bench_dramatiq),
}


def run_peer(key: str, opts: Options) -> Result:
    name, bench = PEERS[key]
    try:
        return bench(opts)
    except PeerMissing as exc:
        return Result(key, name, status="not installed", note=str(exc))
    except BenchTimeout:
        raise
    except Exception as exc:  # a peer's own failure must not hide the other figures
        return Result(key, name, status="error", note=f"{type(exc).__name__}: {exc}")


def run_all(opts: Options, only: Sequence[str]) -> list[Result]:
    results: list[Result] = []
    for key in only:
        progress(f"running {key} ...")
        if key == "raw":
            results.append(bench_raw(opts))
        elif key == "conveyor":
            results.extend(bench_conveyor(opts))
        else:
            results.append(run_peer(key, opts))
    return results


def checks(results: Sequence[Result]) -> list[Check]:
    by_key = {r.key: r for r in results}
    ours = by_key.get("conveyor_async_best")
    return [
        check_target("conveyor async handler >= 0.5x raw asyncio.Queue+JSON", ours, 0.5, by_key.get("raw")),
        check_target("conveyor async handler >= 3x kombu memory://", ours, 3.0, by_key.get("kombu")),
        check_target("conveyor async handler >= 7x dramatiq StubBroker", ours, 7.0, by_key.get("dramatiq")),
    ]


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


def table(results: Sequence[Result], raw: float | None) -> list[str]:
    lines = [f"{'benchmark':<42} {'msgs/s':>13} {'x raw':>6}  notes", "-" * 100]
    for r in results:
        rate = f"{r.rate:,.0f}" if r.rate is not None else r.status
        ratio = f"{r.rate / raw:.2f}" if r.rate is not None and raw else "-"
        lines.append(f"{r.name:<42} {rate:>13} {ratio:>6}  {r.note}")
    return lines


def report(opts: Options, results: Sequence[Result], found: Sequence[Check], command: str) -> str:
    info = machine()
    raw = next((r.rate for r in results if r.key == "raw"), None)
    head = (
        f"conveyor memory-driver throughput, {dt.date.today().isoformat()}: N={opts.n:,} messages, "
        f"best of {opts.repeat}; Python {info['python']}, {info['nproc']} CPUs"
    )
    lines = [head, f"command: {command}", "", *table(results, raw), ""]
    lines += [f"{c.status}  {c.name}: {c.detail}" for c in found]
    return "\n".join(lines)


def write_json(
    path: Path, opts: Options, results: Sequence[Result], found: Sequence[Check], cmd: str
) -> None:
    doc = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": cmd,
        "machine": machine(),
        "options": asdict(opts),
        "results": [asdict(r) for r in results],
        "checks": [asdict(c) for c in found],
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _int_list(text: str) -> list[int]:
    values = sorted({int(part) for part in text.split(",") if part.strip()} | {1})
    if values[0] < 1:
        raise argparse.ArgumentTypeError("concurrency values must be >= 1")
    return values


def _only(text: str) -> list[str]:
    keys = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(keys) - set(BENCHMARKS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown benchmark(s) {unknown}; known: {BENCHMARKS}")
    return [key for key in BENCHMARKS if key in keys]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=50_000, help="messages per run (default 50000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the best counts (3)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a run may take (120)")
    parser.add_argument(
        "--concurrency",
        type=_int_list,
        default=[1, 4, 16, 64],
        help="conveyor consumer concurrencies to try (1,4,16,64; 1 is always included)",
    )
    parser.add_argument("--prefetch", type=int, default=1000, help="conveyor consumer prefetch (1000)")
    parser.add_argument("--batch", type=int, default=1000, help="apublish_many batch size (1000)")
    parser.add_argument("--dramatiq-threads", type=int, default=8, help="dramatiq worker_threads (8)")
    parser.add_argument("--only", type=_only, default=list(BENCHMARKS), help="e.g. raw,conveyor")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target check fails")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    # The YAML app imports the handlers as `memory_throughput:...`: make that name this module
    # (run as a script it is `__main__`, and a second import would get separate counters).
    sys.modules.setdefault(MODULE, sys.modules[__name__])
    args = parse_args(argv)
    opts = Options(
        args.n, args.repeat, args.timeout, args.concurrency, args.prefetch, args.batch, args.dramatiq_threads
    )
    command = " ".join([executable(), *(sys.argv if argv is None else [sys.argv[0], *argv])])
    try:
        results = run_all(opts, args.only)
    except BenchTimeout as exc:
        print(f"benchmark stuck: {exc}", file=sys.stderr)
        return 2
    found = checks(results)
    print(report(opts, results, found, command))
    if args.json is not None:
        write_json(args.json, opts, results, found, command)
    if any(r.status.startswith("error") for r in results):
        return 1
    return 1 if args.strict and any(c.status == "FAIL" for c in found) else 0


if __name__ == "__main__":
    sys.exit(main())
