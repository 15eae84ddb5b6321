"""End-to-end throughput: publish -> consume -> ack on conveyor's SQLite driver, on disk.

Every figure is messages per second for N messages (default 20,000), best of ``--repeat``
runs, timed from the first publish to the last ack. Each run uses a fresh database file
in a temporary directory on a real disk (never tmpfs), with the consumer already
attached and idle. Every run is checked afterwards: each message was handled exactly
once (the handlers record the payload numbers), nothing is left in the queue, and
``PRAGMA integrity_check`` says ok. Contenders, in this one process, one after the other:

- conveyor, ``queue.driver.sqlite`` with ``synchronous: full``: 8 publisher coroutines
  doing ``await queue.apublish(...)``, a consumer with ``concurrency: 8`` and a no-op
  async handler (prefetch swept); also 1 publisher, ``apublish_many`` in batches, and a
  no-op sync handler,
- raw ``sqlite3`` (WAL, ``synchronous=FULL``): 8 publisher threads doing one transaction
  per put, 8 consumer threads doing one transaction per message that takes the oldest
  row, runs the no-op handler and deletes the row (the ack),
- persist-queue ``SQLiteAckQueue`` (``multithreading=True``, ``auto_commit=True``):
  8 threads ``put``, 8 threads ``get`` + ``ack``,
- huey ``SqliteHuey`` (``fsync=True``): 8 threads enqueue a no-op task, an in-process
  huey ``Consumer`` with 8 worker threads runs them.

A peer that cannot be imported is reported as "not installed". Every wait is bounded
by ``--timeout``; a stuck run makes the script exit with status 2, and a failed
correctness check with status 1.

    .venv/bin/python benchmarks/sqlite_throughput.py [--n 20000] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
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

MODULE = "sqlite_throughput"  # the handlers below are imported from YAML by this name
NAMESPACE = "bench"
QUEUE_ID = f"{NAMESPACE}:q"
CONSUMER_ID = f"{NAMESPACE}:worker"
BENCHMARKS = ("conveyor", "raw", "persistqueue", "huey")
MEMORY_FILESYSTEMS = {"tmpfs", "ramfs"}
IDLE_BEFORE_START = 0.1  # seconds the consumers sit idle before the first publish


class BenchFailure(Exception):
    """A run finished but its correctness check failed."""


@dataclass
class Options:
    n: int
    repeat: int
    timeout: float
    publishers: int
    concurrency: int
    prefetch: list[int]
    batch: int
    synchronous: str
    directory: str


def shares(n: int, parts: int) -> list[range]:
    """``range(n)`` split into ``parts`` interleaved shares, one per publisher."""
    return [range(k, n, parts) for k in range(parts)]


def rates(n: int, elapsed: Sequence[float]) -> list[float]:
    return [round(n / seconds, 1) for seconds in elapsed]


def result_from(key: str, name: str, n: int, elapsed: Sequence[float], note: str = "") -> Result:
    runs = rates(n, elapsed)
    return Result(key, name, max(runs), runs, note)


# -- disks and correctness ------------------------------------------------------------------


def filesystem_of(path: str) -> str:
    """The type of the filesystem ``path`` lives on (from /proc/self/mounts), or "?"."""
    target, best, kind = os.path.realpath(path), "", "?"
    with contextlib.suppress(OSError), open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, mount_point, fs_type, *_ = line.split()
            inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, kind = mount_point, fs_type
    return kind


def disk_directory(requested: str | None) -> str:
    """A directory on a real disk: ``requested``, else the temp dir, else /var/tmp."""
    if requested is not None:
        if filesystem_of(requested) in MEMORY_FILESYSTEMS:
            raise SystemExit(f"--dir {requested} is on {filesystem_of(requested)}, not on a disk")
        return requested
    for candidate in (tempfile.gettempdir(), "/var/tmp"):
        if filesystem_of(candidate) not in MEMORY_FILESYSTEMS:
            return candidate
    raise SystemExit("no disk-backed temporary directory found: pass --dir")


@contextlib.contextmanager
def run_directory(opts: Options) -> Iterator[Path]:
    """A fresh directory (and so a fresh database file) for one run."""
    with tempfile.TemporaryDirectory(prefix="conveyor-sqlite-bench-", dir=opts.directory) as tmp:
        yield Path(tmp)


def check_exactly_once(name: str, seen: Sequence[int], n: int) -> None:
    counts = Counter(seen)
    missing = sum(1 for i in range(n) if i not in counts)
    repeated = sum(c - 1 for c in counts.values() if c > 1)
    unknown = sum(1 for i in counts if not 0 <= i < n)
    if missing or repeated or unknown:
        raise BenchFailure(
            f"{name}: handled {len(seen)} of {n}: {missing} missing, {repeated} repeated, {unknown} unknown"
        )


def check_database(name: str, path: Path, leftover_sql: str) -> None:
    """``PRAGMA integrity_check`` is ok and ``leftover_sql`` counts no unsettled message."""
    conn = sqlite3.connect(path)
    try:
        (verdict,) = conn.execute("PRAGMA integrity_check").fetchone()
        (left,) = conn.execute(leftover_sql).fetchone()
    finally:
        conn.close()
    if verdict != "ok":
        raise BenchFailure(f"{name}: integrity_check on {path}: {verdict}")
    if left:
        raise BenchFailure(f"{name}: {left} message(s) left unsettled in {path}")


class Tally:
    """Payload numbers handled by thread-based consumers; ``done`` at ``target``."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.seen: list[int] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.finished_at = 0.0

    def record(self, number: int) -> None:
        with self.lock:
            self.seen.append(number)
            if len(self.seen) == self.target:
                self.finished_at = time.perf_counter()
                self.done.set()


# -- conveyor handlers (imported by the YAML app as sqlite_throughput:async_noop/sync_noop) --


class _Sink:
    """Payload numbers handled by conveyor; sets ``done`` (on the app's loop) at ``target``."""

    def __init__(self) -> None:
        self.target = 0
        self.seen: list[int] = []
        self.done = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    def arm(self, target: int) -> None:
        self.target = target
        self.seen = []  # list.append is atomic in CPython: safe from handler threads
        self.done = asyncio.Event()
        self.loop = asyncio.get_running_loop()


SINK = _Sink()


async def async_noop(data: Any) -> None:
    SINK.seen.append(data["n"])
    if len(SINK.seen) == SINK.target:
        SINK.done.set()


def sync_noop(data: Any) -> None:
    SINK.seen.append(data["n"])
    if len(SINK.seen) == SINK.target and SINK.loop is not None:
        SINK.loop.call_soon_threadsafe(SINK.done.set)


# -- conveyor -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One conveyor configuration."""

    key: str
    name: str
    handler: str = "async_noop"
    publishers: int = 8
    batch: int = 1  # 1: apublish; more: apublish_many with batches of this size
    prefetch: int = 64


def write_app(directory: Path, case: Case, opts: Options) -> Path:
    doc = {
        "version": "1.0",
        "namespace": NAMESPACE,
        "entries": [
            {
                "name": "store",
                "kind": "queue.driver.sqlite",
                "path": str(directory / "conveyor.db"),
                "synchronous": opts.synchronous,
            },
            {"name": "q", "kind": "queue.queue", "driver": "store", "codec": "json/plain"},
            {
                "name": "worker",
                "kind": "queue.consumer",
                "queue": "q",
                "handler": f"{MODULE}:{case.handler}",
                "concurrency": opts.concurrency,
                "prefetch": max(case.prefetch, opts.concurrency),
            },
        ],
    }
    path = directory / "app.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


async def publish_share(numbers: range, batch: int) -> None:
    if batch <= 1:
        for i in numbers:
            await queue.apublish(QUEUE_ID, payload(i))
        return
    for low in range(0, len(numbers), batch):
        await queue.apublish_many(QUEUE_ID, [payload(i) for i in numbers[low : low + batch]])


def _acked(app: conveyor.App) -> int:
    return app.stats()[CONSUMER_ID]["acked"]


async def _until_acked(app: conveyor.App, target: int) -> None:
    """The handler count is reached just before the last ack: wait for that ack's commit.

    The consumer's counters have no event to wait on: poll, with a short sleep rather than
    ``sleep(0)`` so that the database thread gets the GIL."""
    while _acked(app) < target:  # noqa: ASYNC110
        await asyncio.sleep(0.0005)


async def _timed_publish_consume(app: conveyor.App, case: Case, opts: Options) -> float:
    SINK.arm(opts.n)
    start = time.perf_counter()
    try:
        async with asyncio.timeout(opts.timeout):
            await asyncio.gather(*(publish_share(s, case.batch) for s in shares(opts.n, case.publishers)))
            await SINK.done.wait()
            await _until_acked(app, opts.n)
    except TimeoutError:
        raise BenchTimeout(
            f"{case.name}: handled {len(SINK.seen)}, acked {_acked(app)} of {opts.n} within {opts.timeout:g}s"
        ) from None
    return time.perf_counter() - start


async def _conveyor_once(path: Path, case: Case, opts: Options) -> float:
    app = conveyor.load(path)
    await app.astart(consumers=True)
    try:
        await asyncio.sleep(IDLE_BEFORE_START)
        return await _timed_publish_consume(app, case, opts)
    finally:
        await _stop(app)


async def _stop(app: conveyor.App) -> None:
    try:
        async with asyncio.timeout(30.0):
            await app.astop(5.0)
    except TimeoutError:
        raise BenchTimeout("app.astop() did not return within 30s") from None


def conveyor_run(case: Case, opts: Options) -> float:
    """Seconds for one run of ``case`` on a fresh database, checked afterwards."""
    with run_directory(opts) as directory:
        elapsed = asyncio.run(_conveyor_once(write_app(directory, case, opts), case, opts))
        check_exactly_once(case.name, SINK.seen, opts.n)
        check_database(case.name, directory / "conveyor.db", "SELECT COUNT(*) FROM messages")
    return elapsed


def conveyor_case(case: Case, opts: Options) -> Result:
    elapsed = [conveyor_run(case, opts) for _ in range(opts.repeat)]
    return result_from(case.key, case.name, opts.n, elapsed, _settings(case, opts))


def _settings(case: Case, opts: Options) -> str:
    publishing = "apublish" if case.batch <= 1 else f"apublish_many x{case.batch}"
    prefetch = max(case.prefetch, opts.concurrency)
    return f"{case.publishers} pub, {publishing}, c={opts.concurrency}, prefetch={prefetch}"


def bench_conveyor(opts: Options) -> list[Result]:
    p = opts.publishers
    main = Case("conveyor", f"conveyor async, {p} publishers")
    sweep = [conveyor_case(replace(main, prefetch=prefetch), opts) for prefetch in opts.prefetch]
    best_row = max(sweep, key=lambda r: r.rate or 0.0)
    best = opts.prefetch[sweep.index(best_row)]
    if len(sweep) > 1:
        best_row.note += "; best of prefetch " + ", ".join(
            f"{pf}: {r.rate:,.0f}" for pf, r in zip(opts.prefetch, sweep, strict=True)
        )
    others = [
        Case("conveyor_1pub", "conveyor async, 1 publisher", publishers=1, prefetch=best),
        Case("conveyor_many", f"conveyor async, {p} pub, publish_many", batch=opts.batch, prefetch=best),
        Case("conveyor_sync", f"conveyor sync handler, {p} publishers", handler="sync_noop", prefetch=best),
    ]
    return [best_row, *(conveyor_case(case, opts) for case in others)]


# -- thread-based peers: a common harness ---------------------------------------------------


Publish = Callable[[range, threading.Event], None]  # runs in a publisher thread
Consume = Callable[[threading.Event], None]  # runs in a consumer thread until the event is set


class _Threads:
    """Threads that record their exception instead of dying silently."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.failures: list[BaseException] = []

    def start(self, name: str, target: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            try:
                target(*args)
            except BaseException as exc:
                self.failures.append(exc)

        thread = threading.Thread(target=run, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self.threads)


def run_threads(publish: Publish, consume: Consume | None, tally: Tally, opts: Options) -> float:
    """Start consumers (if any) and publishers; seconds from the first put to the last ack."""
    go, stop, threads = threading.Event(), threading.Event(), _Threads()
    if consume is not None:  # None: the peer runs its own consumer (huey)
        for k in range(opts.concurrency):
            threads.start(f"consumer-{k}", consume, stop)
    for k, share in enumerate(shares(opts.n, opts.publishers)):
        threads.start(f"publisher-{k}", publish, share, go)
    time.sleep(IDLE_BEFORE_START)
    start = time.perf_counter()
    go.set()
    try:
        _wait_tally(tally, threads, opts.timeout)
    finally:
        stop.set()
        joined = threads.join(30.0)
    if not joined:
        raise BenchTimeout("threads did not stop within 30s")
    return tally.finished_at - start


def _wait_tally(tally: Tally, threads: _Threads, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not tally.done.wait(0.05):
        if threads.failures:
            failure = threads.failures[0]
            raise RuntimeError(f"{type(failure).__name__}: {failure}") from failure
        if time.monotonic() > deadline:
            raise BenchTimeout(f"handled {len(tally.seen)} of {tally.target} within {timeout:g}s")


# -- raw sqlite3: one transaction per put, one per ack ---------------------------------------


class RawQueue:
    """A table queue. A process-wide lock serialises write transactions (as persist-queue
    and huey do): without it, SQLite's busy handler sleeps and the figure is lower."""

    def __init__(self, path: Path, tally: Tally) -> None:
        self.path = path
        self.tally = tally
        self.write_lock = threading.Lock()
        self.available = threading.Event()
        with contextlib.closing(self.connect()) as conn:
            conn.execute("CREATE TABLE q (id INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL)")

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=60.0)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def publish(self, numbers: range, go: threading.Event) -> None:
        with contextlib.closing(self.connect()) as conn:
            go.wait()
            for i in numbers:
                body = json.dumps(payload(i)).encode()
                with self.write_lock:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute("INSERT INTO q (body) VALUES (?)", (body,))
                    conn.execute("COMMIT")
                self.available.set()

    def consume(self, stop: threading.Event) -> None:
        with contextlib.closing(self.connect()) as conn:
            while not stop.is_set():
                number = self.take(conn)
                if number is not None:
                    self.tally.record(number)  # after the commit: the ack is durable
                else:
                    self.available.clear()
                    self.available.wait(0.002)

    def take(self, conn: sqlite3.Connection) -> int | None:
        """One transaction: take the oldest row, run the handler, delete the row (the ack)."""
        with self.write_lock:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT id, body FROM q ORDER BY id LIMIT 1").fetchone()
            if row is None:
                conn.execute("COMMIT")
                return None
            data = json.loads(row[1])  # the no-op handler: decode only
            conn.execute("DELETE FROM q WHERE id = ?", (row[0],))
            conn.execute("COMMIT")
        return int(data["n"])


def bench_raw(opts: Options) -> Result:
    elapsed = []
    for _ in range(opts.repeat):
        with run_directory(opts) as directory:
            tally = Tally(opts.n)
            raw = RawQueue(directory / "raw.db", tally)
            elapsed.append(run_threads(raw.publish, raw.consume, tally, opts))
            check_exactly_once("raw sqlite3", tally.seen, opts.n)
            check_database("raw sqlite3", raw.path, "SELECT COUNT(*) FROM q")
    note = f"{opts.publishers} put threads, {opts.concurrency} take+ack threads; JSON"
    return result_from("raw", "raw sqlite3, 1 txn per put / per ack", opts.n, elapsed, note)


# -- persist-queue SQLiteAckQueue ------------------------------------------------------------


class PersistQueuePeer:
    """``multithreading=True`` (one connection for puts and status updates, one for reads;
    required for use from several threads) and ``auto_commit=True`` (the ack queue
    forces it): put, get and ack each commit one transaction."""

    def __init__(self, directory: Path, tally: Tally) -> None:
        from persistqueue import SQLiteAckQueue

        self.directory = directory
        self.tally = tally
        self.q = SQLiteAckQueue(str(directory), multithreading=True, auto_commit=True)

    def publish(self, numbers: range, go: threading.Event) -> None:
        go.wait()
        for i in numbers:
            self.q.put(payload(i))

    def consume(self, stop: threading.Event) -> None:
        from persistqueue.exceptions import Empty

        while not stop.is_set():
            try:
                item = self.q.get(block=True, timeout=0.05, raw=True)
            except Empty:
                continue
            number = int(item["data"]["n"])  # the no-op handler
            self.q.ack(id=item["pqid"])
            self.tally.record(number)

    def database(self) -> Path:
        return self.directory / "data.db"


def bench_persistqueue(opts: Options) -> Result:
    try:
        import persistqueue  # noqa: F401
    except ImportError as exc:
        raise PeerMissing(str(exc)) from None
    elapsed = []
    for _ in range(opts.repeat):
        with run_directory(opts) as directory:
            tally = Tally(opts.n)
            peer = PersistQueuePeer(directory / "pq", tally)
            elapsed.append(run_threads(peer.publish, peer.consume, tally, opts))
            peer.q.close()
            check_exactly_once("persist-queue", tally.seen, opts.n)
            unsettled = "SELECT COUNT(*) FROM ack_queue_default WHERE status != 5"  # 5 = acked
            check_database("persist-queue", peer.database(), unsettled)
    note = f"{opts.publishers} put threads, {opts.concurrency} get+ack threads; pickle"
    return result_from("persistqueue", "persist-queue SQLiteAckQueue", opts.n, elapsed, note)


# -- huey SqliteHuey -----------------------------------------------------------------------

HUEY_POLL = {"initial_delay": 0.01, "backoff": 1.15, "max_delay": 0.1}  # huey defaults: 0.1, 1.15, 10


@contextlib.contextmanager
def huey_consumer(huey: Any, workers: int) -> Iterator[None]:
    """An in-process huey ``Consumer`` (worker threads); its signal handlers are undone after."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    consumer = huey.create_consumer(
        workers=workers, worker_type="thread", periodic=False, check_worker_health=False, **HUEY_POLL
    )
    consumer.start()
    try:
        yield
    finally:
        consumer.stop(graceful=True)
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _huey_run(directory: Path, opts: Options) -> tuple[float, Tally]:
    from huey import SqliteHuey

    tally = Tally(opts.n)
    huey = SqliteHuey("bench", filename=str(directory / "huey.db"), fsync=True)
    noop = huey.task(name="noop")(lambda data: tally.record(int(data["n"])))

    def publish(numbers: range, go: threading.Event) -> None:
        go.wait()
        for i in numbers:
            noop(payload(i))

    with huey_consumer(huey, opts.concurrency):
        elapsed = run_threads(publish, None, tally, opts)
    huey.storage.close()
    return elapsed, tally


def bench_huey(opts: Options) -> Result:
    try:
        import huey  # noqa: F401
    except ImportError as exc:
        raise PeerMissing(str(exc)) from None
    elapsed = []
    for _ in range(opts.repeat):
        with run_directory(opts) as directory:
            seconds, tally = _huey_run(directory, opts)
            elapsed.append(seconds)
            check_exactly_once("huey", tally.seen, opts.n)
            check_database("huey", directory / "huey.db", "SELECT COUNT(*) FROM task")
    note = f"{opts.publishers} enqueue threads, Consumer with {opts.concurrency} worker threads; pickle"
    return result_from("huey", "huey SqliteHuey + Consumer", opts.n, elapsed, note)


# -- running and reporting ------------------------------------------------------------------

PEERS: dict[str, tuple[str, Callable[[Options], Result]]] = {
    "raw": ("raw sqlite3, 1 txn per put / per ack", bench_raw),
    "persistqueue": ("persist-queue SQLiteAckQueue", bench_persistqueue),
    "huey": ("huey SqliteHuey + Consumer", bench_huey),
}


def run_peer(key: str, opts: Options) -> Result:
    name, bench = PEERS[key]
    try:
        return bench(opts)
    except PeerMissing as exc:
        return Result(key, name, status="not installed", note=str(exc))
    except (BenchTimeout, BenchFailure):
        raise
    except Exception as exc:  # a peer's own failure must not hide the other figures
        return Result(key, name, status="error", note=f"{type(exc).__name__}: {exc}")


def run_all(opts: Options, only: Sequence[str]) -> list[Result]:
    results: list[Result] = []
    for key in only:
        progress(f"running {key} ...")
        if key == "conveyor":
            results.extend(bench_conveyor(opts))
        else:
            results.append(run_peer(key, opts))
    return results


def checks(results: Sequence[Result], opts: Options) -> list[Check]:
    by_key = {r.key: r for r in results}
    ours = by_key.get("conveyor")
    sync = opts.synchronous
    return [
        check_target(f"conveyor (synchronous={sync}) >= 3x raw sqlite3", ours, 3.0, by_key.get("raw")),
        check_target(
            f"conveyor (synchronous={sync}) >= 5x persist-queue", ours, 5.0, by_key.get("persistqueue")
        ),
        check_target(f"conveyor (synchronous={sync}) >= 5x huey", ours, 5.0, by_key.get("huey")),
    ]


def machine(opts: Options) -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "directory": opts.directory,
        "filesystem": filesystem_of(opts.directory),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }


def table(results: Sequence[Result], raw: float | None) -> list[str]:
    lines = [f"{'benchmark':<40} {'msgs/s':>8} {'x raw':>6}  {'runs':<26} notes", "-" * 120]
    for r in results:
        rate = f"{r.rate:,.0f}" if r.rate is not None else r.status
        ratio = f"{r.rate / raw:.2f}" if r.rate is not None and raw else "-"
        runs = " ".join(f"{x:,.0f}" for x in r.runs)
        lines.append(f"{r.name:<40} {rate:>8} {ratio:>6}  {runs:<26} {r.note}")
    return lines


def report(opts: Options, info: dict[str, Any], results: Sequence[Result], found: Sequence[Check]) -> str:
    raw = next((r.rate for r in results if r.key == "raw"), None)
    head = (
        f"conveyor SQLite-driver throughput, {dt.date.today().isoformat()}: N={opts.n:,} messages, "
        f"best of {opts.repeat}; Python {info['python']}, SQLite {info['sqlite']}, {info['nproc']} CPUs; "
        f"files in {info['directory']} ({info['filesystem']}); conveyor synchronous={opts.synchronous}; "
        f"load average before: {' '.join(map(str, info['loadavg_before']))}"
    )
    lines = [head, f"command: {info['command']}", "", *table(results, raw), ""]
    lines += [f"{c.status}  {c.name}: {c.detail}" for c in found]
    return "\n".join(lines)


def write_json(
    path: Path, opts: Options, info: dict[str, Any], results: Sequence[Result], found: Sequence[Check]
) -> None:
    doc = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "options": asdict(opts),
        "results": [asdict(r) for r in results],
        "checks": [asdict(c) for c in found],
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("give positive integers, e.g. 64,256")
    return list(dict.fromkeys(values))


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
    parser.add_argument("--n", type=int, default=20_000, help="messages per run (default 20000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the best counts (3)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a run may take (120)")
    parser.add_argument("--publishers", type=int, default=8, help="concurrent publishers (8)")
    parser.add_argument("--concurrency", type=int, default=8, help="consumer concurrency / threads (8)")
    parser.add_argument(
        "--prefetch", type=_int_list, default=[64, 256], help="conveyor prefetch values to try (64,256)"
    )
    parser.add_argument("--batch", type=int, default=100, help="apublish_many batch size (100)")
    parser.add_argument(
        "--synchronous", choices=("full", "normal", "off"), default="full", help="conveyor's (full)"
    )
    parser.add_argument("--dir", help="where the database files go (default: a temp dir on a disk)")
    parser.add_argument("--only", type=_only, default=list(BENCHMARKS), help="e.g. conveyor,raw")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target check fails")
    return parser.parse_args(argv)


def options(args: argparse.Namespace) -> Options:
    return Options(
        n=args.n,
        repeat=args.repeat,
        timeout=args.timeout,
        publishers=args.publishers,
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        batch=args.batch,
        synchronous=args.synchronous,
        directory=disk_directory(args.dir),
    )


def _stuck(text: str) -> int:
    """A stuck run: report and leave at once (stuck threads must not delay the exit)."""
    print(f"benchmark stuck: {text}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)


def main(argv: Sequence[str] | None = None) -> int:
    # The YAML app imports the handlers as `sqlite_throughput:...`: make that name this module
    # (run as a script it is `__main__`, and a second import would get a separate SINK).
    sys.modules.setdefault(MODULE, sys.modules[__name__])
    args = parse_args(argv)
    opts = options(args)
    info = machine(opts)
    info["command"] = " ".join([executable(), *(sys.argv if argv is None else [sys.argv[0], *argv])])
    try:
        results = run_all(opts, args.only)
    except BenchTimeout as exc:
        return _stuck(str(exc))
    except BenchFailure as exc:
        print(f"correctness check failed: {exc}", file=sys.stderr)
        return 1
    found = checks(results, opts)
    print(report(opts, info, results, found))
    if args.json is not None:
        write_json(args.json, opts, info, results, found)
    if any(r.status.startswith("error") for r in results):
        return 1
    return 1 if args.strict and any(c.status == "FAIL" for c in found) else 0


if __name__ == "__main__":
    sys.exit(main())
