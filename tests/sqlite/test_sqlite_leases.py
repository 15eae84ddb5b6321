"""SQLite leases: the boot clock, stalled and dead holders, reboots, the file's schema.

Leases and retry delays are kept on the machine's boot clock, so no wall clock (wrong
in one process, or set while the app runs) moves them; a holder frozen past its lease
runs none of the messages it had fetched ahead; a holder that exited is found dead at
once, zombie or not; a file from before a reboot or from the previous schema keeps
working. Child processes are real (``python -m tests.sqlite.procs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

import conveyor
from conveyor import errors, queue
from conveyor.drivers.base import Delivery, Outgoing, Subscription
from conveyor.drivers.sqlite import SqliteDriver, leases
from conveyor.drivers.sqlite.store import SCHEMA_VERSION
from tests.sqlite.helpers import child, integrity, lines, proc_state, records, stored_payloads, write_app
from tests.support.drivers import DriverKit, run
from tests.support.handlers import install
from tests.support.waiting import wait_until

HOUR = 3600.0


def leased(db: Path) -> int:
    """How many messages of the file are leased right now (by anyone)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (count,) = conn.execute("SELECT COUNT(*) FROM messages WHERE lease_owner IS NOT NULL").fetchone()
    return int(count)


def publish(path: Path, *payloads: Any) -> None:
    with conveyor.load(path):
        queue.publish_many("t:jobs", list(payloads))


def numbers(out: Path, name: str = "handled.txt") -> list[int]:
    return [record[1]["n"] for record in records(out / name)]


async def next_delivery(sub: Subscription, timeout: float = 10.0) -> Delivery:
    delivery = await asyncio.wait_for(sub.get(), timeout)
    assert delivery is not None
    return delivery


async def refused(call: Awaitable[Any]) -> errors.Error:
    try:
        await call
    except errors.Error as exc:
        return exc
    raise AssertionError("the driver took it")


# -- the wall clock moves nothing ------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("holder_skew", "taker_skew"),
    [(0.0, 2 * HOUR), (-2 * HOUR, 0.0)],
    ids=["taker-clock-2h-ahead", "holder-clock-2h-behind"],
)
def test_a_wrong_wall_clock_never_lets_a_process_take_a_live_consumers_message(
    tmp_path: Path, procs: list[subprocess.Popen[str]], holder_skew: float, taker_skew: float
) -> None:
    """Faults S07 (clock jump during leases), S03 (never delivered to two live consumers).

    One consumer holds message 1 (its handler runs for an hour); a second consumer
    starts. One of the two processes has a wall clock two hours off. The second
    consumer handles message 2, published after it started, and never message 1.
    """
    holder_out, taker_out = tmp_path / "holder", tmp_path / "taker"
    holder_out.mkdir()
    taker_out.mkdir()
    path = write_app(tmp_path, prefetch=1, lease="30s")
    publish(path, {"n": 1})
    holder = child("consume", str(path), out=holder_out, mode="hang", wall_skew=holder_skew)
    procs.append(holder)
    wait_until(lambda: numbers(holder_out, "started.txt") == [1], timeout=30)

    taker = child("consume", str(path), out=taker_out, mode="record", wall_skew=taker_skew)
    procs.append(taker)
    wait_until(lambda: len(lines(taker_out / "ready.txt")) == 1, timeout=30)
    publish(path, {"n": 2})
    wait_until(lambda: 2 in numbers(taker_out), timeout=30)

    assert numbers(taker_out) == [2], "the second consumer took the message the first one holds"
    db = tmp_path / "queues.db"
    wait_until(lambda: stored_payloads(db) == [{"n": 1}], timeout=10)  # message 2 acked
    assert leased(db) == 1, "message 1 is no longer held"
    assert holder.poll() is None


def test_wall_clock_jumps_move_no_retry_delay_and_no_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault S07 (clock jump of hours while messages are leased or wait out a retry delay).

    The wall clock of the whole process jumps two hours ahead, then two hours back.
    A retry an hour away stays an hour away, a held lease stays held, and a retry
    half a second away comes back in about half a second, not in two hours.
    """
    kit = DriverKit("sqlite", tmp_path)
    jobs = kit.queue("jobs")
    real_time = time.time

    def jump(seconds: float) -> None:
        monkeypatch.setattr(time, "time", lambda: real_time() + seconds)

    async def main() -> None:
        async with kit.opened() as drv, kit.opened() as other:
            await drv.publish(jobs, [Outgoing(name, b"1", {}) for name in ("later", "soon", "held")])
            sub = await drv.subscribe(jobs, prefetch=3, auto_ack=False, options={})
            later, soon, held = [await next_delivery(sub) for _ in range(3)]
            assert [later.id, soon.id, held.id] == ["later", "soon", "held"]
            await sub.nack(later, HOUR)

            jump(2 * HOUR)  # the retry is not due, the leases of soon and held not expired
            info = await other.info(jobs)
            assert (info["ready"], info["delayed"], info["in_flight"]) == (0, 1, 2)

            jump(-2 * HOUR)
            await sub.nack(soon, 0.5)
            back = await next_delivery(sub, timeout=10)
            assert (back.id, back.attempts) == ("soon", 2)
            info = await other.info(jobs)
            assert (info["ready"], info["delayed"], info["in_flight"]) == (0, 1, 2)
            await sub.ack(back)
            await sub.ack(held)
            await sub.close()

    run(main())


# -- a holder frozen past its lease ------------------------------------------------------------


@pytest.mark.timeout(150)
def test_a_consumer_resumed_after_losing_its_leases_runs_none_of_its_prefetched_messages(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """Faults F02 (prefetch > 1), D04 (settling after the lease expired), S03.

    A consumer (prefetch 4, one worker) leases messages 1-4 and runs message 1; it is
    frozen with SIGSTOP. Its leases run out, a second consumer takes and handles all
    four. The first is resumed with SIGCONT: its handler of message 1 finishes, and
    that late ack is refused; messages 2-4, fetched before the freeze, are never run
    by it. It then handles message 5, published after the resume.
    """
    frozen_out, taker_out = tmp_path / "frozen", tmp_path / "taker"
    frozen_out.mkdir()
    taker_out.mkdir()
    db = tmp_path / "queues.db"
    path = write_app(tmp_path, lease="1s", concurrency=1, prefetch=4)
    publish(path, *({"n": n} for n in range(1, 5)))

    frozen = child("consume", str(path), out=frozen_out, mode="gate")
    procs.append(frozen)
    wait_until(lambda: numbers(frozen_out, "started.txt") == [1], timeout=30)
    wait_until(lambda: leased(db) == 4, timeout=10)  # 1 running, 2-4 fetched ahead
    os.kill(frozen.pid, signal.SIGSTOP)
    wait_until(lambda: proc_state(frozen.pid) == "T")

    taker = child("consume", str(path), out=taker_out, mode="record")
    procs.append(taker)
    wait_until(lambda: sorted(numbers(taker_out)) == [1, 2, 3, 4], timeout=60)
    taker.send_signal(signal.SIGTERM)
    assert taker.wait(30) == 0

    (frozen_out / "go").touch()  # message 1's handler may finish once resumed
    os.kill(frozen.pid, signal.SIGCONT)
    publish(path, {"n": 5})
    wait_until(lambda: 5 in numbers(frozen_out), timeout=30)

    assert numbers(frozen_out) == [1, 5], "the resumed consumer ran messages another consumer had"
    assert sorted(numbers(taker_out)) == [1, 2, 3, 4]
    frozen.send_signal(signal.SIGTERM)
    assert frozen.wait(30) == 0
    assert frozen.stderr is not None
    log = frozen.stderr.read()
    assert "this settlement was refused" in log, log  # message 1's late ack
    assert "it is not run here" in log, log  # 2-4 dropped before any handler got them
    with conveyor.load(path):
        assert queue.info("t:jobs")["message_count"] == 0
    assert integrity(db) == "ok"


@pytest.mark.parametrize("how", ["ack", "nack", "release", "dead_letter"])
def test_a_settlement_from_a_lost_lease_never_touches_the_new_lease(tmp_path: Path, how: str) -> None:
    """Fault D04 (late settle after the lease expired and the message was handed out again).

    The new holder is another subscription of the same process (the same holder id),
    so only the lease token tells the two leases apart.
    """
    kit = DriverKit("sqlite", tmp_path)
    jobs, dead = kit.queue("jobs"), kit.queue("dead")

    async def main() -> None:
        async with kit.opened() as drv:
            await drv.publish(jobs, [Outgoing("m", b"1", {})])
            first = await drv.subscribe(jobs, prefetch=1, auto_ack=False, options={})
            old = await next_delivery(first)
            # This process stalled past the lease; another process reclaimed the message.
            with contextlib.closing(sqlite3.connect(tmp_path / "queues.db")) as conn, conn:
                conn.execute("UPDATE messages SET lease_owner = NULL")
            second = await drv.subscribe(jobs, prefetch=1, auto_ack=False, options={})
            new = await next_delivery(second)
            assert (new.id, new.attempts) == ("m", 2)

            settle: dict[str, Callable[[], Awaitable[None]]] = {
                "ack": lambda: first.ack(old),
                "nack": lambda: first.nack(old, 0.0),
                "release": lambda: first.release(old),
                "dead_letter": lambda: first.dead_letter(old, dead, Outgoing(old.id, old.body, {})),
            }
            exc = await refused(settle[how]())
            assert (exc.kind, exc.retryable, exc.details["reason"]) == (errors.INTERNAL, False, "lease_lost")
            assert (await drv.info(jobs))["in_flight"] == 1, "the new lease was touched"
            assert (await drv.info(dead))["message_count"] == 0
            await second.ack(new)
            assert (await drv.info(jobs))["message_count"] == 0
            await first.close()
            await second.close()

    run(main())


# -- dead holders -------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_zombie_lease_holder_is_found_dead_at_once(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """Faults S03 (lease holder killed), F01 (consumer SIGKILL mid-handler).

    The holder dies in its handler and is not reaped (this test, its parent, does not
    wait for it): a zombie, which ``kill(pid, 0)`` still finds. Its message is taken
    by the next consumer at once, not after the 60 s lease.
    """
    path = write_app(tmp_path, lease="60s")
    publish(path, {"n": 1})
    holder = child("consume", str(path), out=tmp_path, mode="crash")
    procs.append(holder)
    wait_until(lambda: proc_state(holder.pid) == "Z", timeout=30)
    assert leased(tmp_path / "queues.db") == 1

    handled: list[int] = []
    text = path.read_text().replace(
        "tests.sqlite.procs:handler", install(lambda p: handled.append(queue.message().attempts))
    )
    path.write_text(text)
    started = time.monotonic()
    app = conveyor.load(path)
    app.start(consumers=True)
    try:
        wait_until(lambda: handled == [2], timeout=30)
        took = time.monotonic() - started
    finally:
        app.stop()
    assert took < 30, f"took {took:.1f}s: the zombie was taken for alive until its lease ran out"
    assert proc_state(holder.pid) == "Z", "the holder was reaped during the test"


def test_holder_liveness_zombie_reused_pid_other_host(tmp_path: Path) -> None:
    """Faults S03, F01: who counts as provably dead (same host only)."""
    me = leases.owner_id()
    assert leases.owner_alive(me)
    host, pid, start, _ = me.rsplit(":", 3)
    assert not leases.owner_alive(f"{host}:{pid}:{int(start) + 1}:0"), "a reused PID is not the holder"
    assert leases.owner_alive(f"elsewhere:{pid}:{int(start) + 1}:0"), "another host: not ours to judge"
    other_namespace = f"{socket.gethostname()}/1:{pid}:{int(start) + 1}:0"
    assert leases.owner_alive(other_namespace), "another PID namespace: not ours to judge"
    assert leases.owner_alive("not an owner")

    zombie = subprocess.Popen(["true"])
    try:
        wait_until(lambda: proc_state(zombie.pid) == "Z")
        owner = f"{host}:{zombie.pid}:{proc_start(zombie.pid)}:0"
        assert not leases.owner_alive(owner)
    finally:
        zombie.wait()
    assert not leases.owner_alive(owner), "reaped: gone"


def proc_start(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[19].decode()


# -- reboots ------------------------------------------------------------------------------------


def test_leases_and_retry_delays_from_before_a_reboot_end_when_the_file_is_opened(tmp_path: Path) -> None:
    """Faults S03, S07: the boot clock starts again at zero on every boot.

    The file says its times belong to another boot: its lease (held for another hour
    by a holder on another host) is over, since every holder died with that boot, and
    so is its retry delay; the order of the messages is kept.
    """
    path = write_app(tmp_path, consumer=False, lease="1h")
    db = tmp_path / "queues.db"
    publish(path, {"n": 1}, {"n": 2}, {"n": 3})
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        seqs = [seq for (seq,) in conn.execute("SELECT seq FROM messages ORDER BY seq")]
        conn.execute(
            "UPDATE messages SET lease_owner = 'elsewhere:1:1:1', lease_token = 1, "
            "lease_expires = ready_at + 3600, attempts = 1 WHERE seq = ?",
            (seqs[0],),
        )
        conn.execute("UPDATE messages SET ready_at = ready_at + 3600, attempts = 1 WHERE seq = ?", (seqs[1],))
        conn.execute("UPDATE conveyor_meta SET value = 'another boot' WHERE key = 'clock_boot'")

    with conveyor.load(path) as app:
        info = queue.info("t:jobs")
        assert (info["ready"], info["in_flight"], info["delayed"]) == (3, 0, 0)
        bound = app.runtime.queue("t:jobs")

        async def take_all() -> list[tuple[bytes, int]]:
            sub = await bound.driver.subscribe(bound.spec, prefetch=3, auto_ack=False, options={})
            got = [await next_delivery(sub) for _ in range(3)]
            await sub.nack(got[2], HOUR)  # on this boot's clock now: kept across a reopen
            for d in got[:2]:
                await sub.ack(d)
            await sub.close()
            return [(d.body, d.attempts) for d in got]

        got = asyncio.run_coroutine_threadsafe(take_all(), app.loop).result(20)
    assert got == [(b'{"n":1}', 2), (b'{"n":3}', 1), (b'{"n":2}', 2)]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (boot,) = conn.execute("SELECT value FROM conveyor_meta WHERE key = 'clock_boot'").fetchone()
    assert boot == leases.boot_id()
    with conveyor.load(path):
        assert queue.info("t:jobs")["delayed"] == 1, "reopened on the same boot: the delay stands"


# -- the file's schema --------------------------------------------------------------------------

# The statements that created a file of schema 1 (conveyor 0.x, before leases moved onto
# the boot clock), as that version ran them.
SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS conveyor_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    queue        TEXT    NOT NULL,
    id           TEXT    NOT NULL,
    body         BLOB    NOT NULL,
    headers      BLOB    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    available_at REAL    NOT NULL,
    lease_owner  TEXT,
    lease_until  REAL,
    created_at   REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_ready
    ON messages (queue, available_at, seq) WHERE lease_owner IS NULL;
CREATE INDEX IF NOT EXISTS messages_leased
    ON messages (lease_owner, lease_until) WHERE lease_owner IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_queue ON messages (queue);
CREATE TABLE IF NOT EXISTS consumers (
    id        TEXT PRIMARY KEY,
    queue     TEXT NOT NULL,
    owner     TEXT NOT NULL,
    heartbeat REAL NOT NULL
);
INSERT OR IGNORE INTO conveyor_meta (key, value) VALUES ('schema_version', '1');
"""
INSERT_1 = (
    "INSERT INTO messages (queue, id, body, headers, attempts, available_at, lease_owner, lease_until, "
    "created_at) VALUES ('jobs', ?, ?, ?, ?, ?, ?, ?, ?)"
)


def old_file(db: Path) -> None:
    """A schema-1 file as a running app of that version left it (times are Unix times)."""
    now = time.time()
    dead = f"{socket.gethostname()}:{2**22 + 1}:1:0"  # as that version named holders; beyond any PID
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.executescript(SCHEMA_1)
        with conn:
            for row in [
                ("ready", b'{"n":1}', msgpack.packb({"k": 7}), 0, now - 10, None, None, now - 10),
                ("delayed", b'{"n":2}', msgpack.packb({}), 1, now + 600, None, None, now - 20),
                ("dead-holder", b'{"n":3}', msgpack.packb({}), 1, now - 30, dead, now + 600, now - 30),
                (
                    "held-elsewhere",
                    b'{"n":4}',
                    msgpack.packb({}),
                    1,
                    now - 40,
                    "elsewhere:1:1:1",
                    now + 600,
                    0,
                ),
            ]:
                conn.execute(INSERT_1, row)
            conn.execute("INSERT INTO consumers VALUES ('c1', 'jobs', 'elsewhere:1:1:1', ?)", (now,))


def test_a_file_of_schema_1_is_upgraded_in_place_and_keeps_every_message(tmp_path: Path) -> None:
    """Faults C2 (nothing dropped), S03: the file an older conveyor wrote keeps working.

    Its Unix times move onto the boot clock: the retry delay keeps its remaining ten
    minutes, the lease of the holder on another host its ten minutes, the lease of
    the dead holder is freed; a process of the older version writing to the upgraded
    file fails loudly instead of writing Unix times into it.
    """
    path = write_app(tmp_path, consumer=False)
    db = tmp_path / "queues.db"
    old_file(db)

    with conveyor.load(path) as app:
        info = queue.info("t:jobs")
        assert (info["message_count"], info["ready"], info["delayed"], info["in_flight"]) == (4, 2, 1, 1)
        assert info["consumer_count"] == 1
        bound = app.runtime.queue("t:jobs")

        async def take() -> list[tuple[str, bytes, dict[str, Any], int]]:
            sub = await bound.driver.subscribe(bound.spec, prefetch=4, auto_ack=False, options={})
            got = [await next_delivery(sub) for _ in range(2)]
            for d in got:
                await sub.ack(d)
            await sub.close()
            return [(d.id, d.body, d.headers, d.attempts) for d in got]

        got = asyncio.run_coroutine_threadsafe(take(), app.loop).result(20)
    assert got == [("dead-holder", b'{"n":3}', {}, 2), ("ready", b'{"n":1}', {"k": 7}, 1)]

    with contextlib.closing(sqlite3.connect(db)) as conn:
        meta = dict(conn.execute("SELECT key, value FROM conveyor_meta"))
        assert meta == {"schema_version": str(SCHEMA_VERSION), "clock_boot": leases.boot_id()}
        times = dict(conn.execute("SELECT id, COALESCE(lease_expires, ready_at) FROM messages"))
        with pytest.raises(sqlite3.OperationalError, match="available_at"):
            conn.execute(INSERT_1, ("late", b"{}", msgpack.packb({}), 0, 0, None, None, 0))
    for msg_id in ("delayed", "held-elsewhere"):
        assert 600 - 60 < times[msg_id] - leases.now() <= 600, (msg_id, times)

    with conveyor.load(path):  # opening again changes nothing
        assert queue.info("t:jobs")["delayed"] == 1
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert dict(conn.execute("SELECT id, COALESCE(lease_expires, ready_at) FROM messages")) == times
    assert integrity(db) == "ok"


def test_a_file_of_a_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    path = write_app(tmp_path, consumer=False)
    db = tmp_path / "queues.db"
    publish(path, {"n": 1})
    with contextlib.closing(sqlite3.connect(db)) as conn:
        with conn:
            conn.execute("UPDATE conveyor_meta SET value = '99' WHERE key = 'schema_version'")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = db.read_bytes()
    with pytest.raises(errors.Error) as info:
        conveyor.load(path).start()
    assert (info.value.kind, info.value.retryable) == (errors.INTERNAL, False)
    assert "schema version 99" in info.value.message
    assert db.read_bytes() == before


# -- values the driver cannot store --------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"big": 2**70},
        {"big": 2**63},
        {"small": -(2**63) - 1},
        {"text": "\ud800"},
        {"\udcff": 1},
        {"none": None},
        {"raw": b"x"},
        {"list": [1]},
        {1: "int key"},
    ],
    ids=repr,
)
def test_a_header_sqlite_cannot_store_is_invalid_and_stores_nothing(
    tmp_path: Path, headers: dict[Any, Any]
) -> None:
    """Fault I05 (header types: int > 2**63, None, bytes, non-str keys...).

    The publish fails INVALID (not retryable) and stores nothing, not even the valid
    message of its batch; publishes that share its transaction are stored.
    """
    kit = DriverKit("sqlite", tmp_path)
    jobs = kit.queue("jobs")

    async def main() -> None:
        async with kit.opened() as drv:
            assert isinstance(drv, SqliteDriver)
            results = await in_one_transaction(
                drv,
                [
                    drv.publish(jobs, [Outgoing("before", b"1", {"n": 1})]),
                    drv.publish(jobs, [Outgoing("fine", b"2", {}), Outgoing("bad", b"3", headers)]),
                    drv.publish(jobs, [Outgoing("after", b"4", {"n": 2**63 - 1})]),
                ],
            )
            assert results[0] is None and results[2] is None, results
            exc = results[1]
            assert isinstance(exc, errors.Error), exc
            assert (exc.kind, exc.retryable) == (errors.INVALID, False)
            assert "bad" in exc.message
            assert (await drv.info(jobs))["message_count"] == 2

    run(main())


async def in_one_transaction(drv: SqliteDriver, calls: list[Awaitable[None]]) -> list[Any]:
    """Run ``calls`` so that their jobs share one write transaction of the database thread."""
    running, gate = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        running.set()
        gate.wait(10)

    busy = drv.db.submit(hold)  # holds the thread: the next jobs queue up meanwhile
    await asyncio.to_thread(running.wait, 10)
    tasks = [asyncio.ensure_future(call) for call in calls]
    await asyncio.sleep(0)  # one turn of the loop: each call runs up to its submit, its first wait
    gate.set()
    await busy
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_values_the_driver_cannot_store_are_invalid_and_change_nothing(tmp_path: Path) -> None:
    """Fault I05: a message id, a retry delay or a dead-letter copy SQLite cannot take."""
    kit = DriverKit("sqlite", tmp_path)
    jobs, dead = kit.queue("jobs"), kit.queue("dead")

    async def main() -> None:
        async with kit.opened() as drv:
            for bad in (Outgoing("\ud800", b"1", {}), Outgoing("m", "text", {})):  # type: ignore[arg-type]
                exc = await refused(drv.publish(jobs, [bad]))
                assert (exc.kind, exc.retryable) == (errors.INVALID, False), bad
            await drv.publish(jobs, [Outgoing("m", bytearray(b"1"), {})])  # type: ignore[arg-type]
            sub = await drv.subscribe(jobs, prefetch=1, auto_ack=False, options={})
            delivery = await next_delivery(sub)
            for delay in (math.nan, math.inf, -1.0, 2**2000):
                exc = await refused(sub.nack(delivery, delay))
                assert (exc.kind, exc.retryable) == (errors.INVALID, False), delay
            copy = Outgoing(delivery.id, delivery.body, {"x_attempts": 2**70})
            exc = await refused(sub.dead_letter(delivery, dead, copy))
            assert exc.kind == errors.INVALID
            info = await drv.info(jobs)
            assert (info["message_count"], info["in_flight"]) == (1, 1)
            assert (await drv.info(dead))["message_count"] == 0
            await sub.ack(delivery)  # still held: the refusals changed nothing
            assert (await drv.info(jobs))["message_count"] == 0
            await sub.close()

    run(main())


def test_a_message_beyond_sqlites_length_limit_is_invalid_and_fails_alone(tmp_path: Path) -> None:
    """Fault I05 / I01: SQLite refuses the row (SQLITE_TOOBIG); the publishes beside it commit."""
    kit = DriverKit("sqlite", tmp_path)
    jobs = kit.queue("jobs")

    async def main() -> None:
        async with kit.opened() as drv:
            assert isinstance(drv, SqliteDriver)
            await drv.db.submit(lambda conn: conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 10_000))
            results = await in_one_transaction(
                drv,
                [
                    drv.publish(jobs, [Outgoing("small", b"1", {})]),
                    drv.publish(jobs, [Outgoing("huge", b"x" * 20_000, {})]),
                ],
            )
            assert results[0] is None
            exc = results[1]
            assert isinstance(exc, errors.Error)
            assert (exc.kind, exc.retryable) == (errors.INVALID, False)
            assert "too big" in exc.message
            assert (await drv.info(jobs))["message_count"] == 1

    run(main())


def test_publishing_a_header_beyond_64_bits_through_the_app_is_invalid(tmp_path: Path) -> None:
    """Fault I05: ``queue.publish(..., {"big": 2**70})`` on an SQLite queue."""
    path = write_app(tmp_path, consumer=False)
    with conveyor.load(path):
        with pytest.raises(errors.Error) as info:
            queue.publish("t:jobs", {"n": 1}, {"big": 2**70})
        assert (info.value.kind, info.value.retryable) == (errors.INVALID, False)
        assert queue.info("t:jobs")["message_count"] == 0
        assert queue.publish("t:jobs", {"n": 2}, {"big": 2**63 - 1})
