"""SQLite driver: durability, multi-process use, leases, crashes and failures.

The shared behaviour is in tests/conformance (which runs on sqlite too); these tests
cover what only a durable, multi-process driver promises. Child processes are real
(``python -m tests.sqlite.procs``) and are killed with SIGKILL where a test says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import conveyor
from conveyor import errors, queue
from conveyor.drivers.sqlite.leases import now as boot_clock
from tests.sqlite.helpers import (
    ROOT,
    child,
    integrity,
    kill,
    lines,
    records,
    stored_payloads,
    write_app,
)
from tests.support.waiting import wait_until

# -- durability -----------------------------------------------------------------------------


def test_messages_survive_a_restart_of_the_app(tmp_path: Path) -> None:
    path = write_app(tmp_path, consumer=False)
    with conveyor.load(path):
        queue.publish("t:jobs", {"n": 1}, {"k": 7, "flag": True})
        queue.publish_many("t:jobs", [{"n": 2}, {"n": 3}])
    with conveyor.load(path) as app:
        assert queue.info("t:jobs")["message_count"] == 3
        bound = app.runtime.queue("t:jobs")

        async def take_all() -> list[Any]:
            sub = await bound.driver.subscribe(bound.spec, prefetch=10, auto_ack=False, options={})
            got = []
            for _ in range(3):
                d = await asyncio.wait_for(sub.get(), 5)
                assert d is not None
                got.append((d.body, d.headers, d.attempts))
                await sub.ack(d)
            await sub.close()
            return got

        got = asyncio.run_coroutine_threadsafe(take_all(), app.loop).result(10)
        assert queue.info("t:jobs")["message_count"] == 0
    assert got[0] == (b'{"n":1}', {"k": 7, "flag": True}, 1)
    assert [g[0] for g in got[1:]] == [b'{"n":2}', b'{"n":3}']
    assert integrity(tmp_path / "queues.db") == "ok"


def test_concurrent_publishes_share_commits(tmp_path: Path) -> None:
    path = write_app(tmp_path, consumer=False)
    app = conveyor.load(path)

    async def main() -> tuple[int, int]:
        async with app:
            driver = app.runtime.queue("t:jobs").driver
            before = driver.db.commits  # type: ignore[attr-defined]
            await asyncio.gather(*(queue.apublish("t:jobs", {"n": i}) for i in range(200)))
            return driver.db.commits - before, (await queue.ainfo("t:jobs"))["message_count"]  # type: ignore[attr-defined]

    commits, count = asyncio.run(main())
    assert count == 200
    assert commits < 100, f"200 concurrent publishes took {commits} commits"


def test_publish_many_is_one_transaction(tmp_path: Path) -> None:
    path = write_app(tmp_path, consumer=False)
    app = conveyor.load(path)

    async def main() -> int:
        async with app:
            driver = app.runtime.queue("t:jobs").driver
            before = driver.db.commits  # type: ignore[attr-defined]
            assert await queue.apublish_many("t:jobs", [{"n": i} for i in range(500)]) == 500
            return int(driver.db.commits - before)  # type: ignore[attr-defined]

    assert asyncio.run(main()) == 1


# -- leases ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_killed_consumer_messages_come_back_with_attempts_raised(tmp_path: Path, procs: list[Any]) -> None:
    path = write_app(tmp_path, lease="60s")  # far longer than the test: reclaim must not wait for it
    with conveyor.load(path):
        queue.publish_many("t:jobs", [{"n": 1}, {"n": 2}])
    worker = child("consume", str(path), out=tmp_path, mode="hang")
    procs.append(worker)
    wait_until(lambda: len(lines(tmp_path / "started.txt")) >= 1, timeout=20)
    kill(worker)

    handled: list[Any] = []

    def record(payload: Any) -> None:
        handled.append((payload["n"], queue.message().attempts))

    from tests.support.handlers import install

    text = path.read_text().replace("tests.sqlite.procs:handler", install(record))
    path.write_text(text)
    started = time.monotonic()
    app = conveyor.load(path)
    app.start(consumers=True)
    try:
        wait_until(lambda: len(handled) == 2, timeout=20)
        assert app.wait_idle(timeout=10)
    finally:
        app.stop()
    assert time.monotonic() - started < 20
    attempts = dict(handled)
    first = records(tmp_path / "started.txt")[0][1]["n"]
    assert attempts[first] == 2, "the crash used an attempt"
    assert integrity(tmp_path / "queues.db") == "ok"


@pytest.mark.timeout(90)
def test_message_that_kills_every_worker_reaches_the_dead_letter_queue(
    tmp_path: Path, procs: list[Any]
) -> None:
    path = write_app(tmp_path, dead_letter=True, lease="60s")
    with conveyor.load(path):
        queue.publish("t:jobs", {"poison": True})
    for run in range(2):  # each run takes the message and dies with it
        worker = child("consume", str(path), out=tmp_path, mode="crash")
        procs.append(worker)
        worker.wait(30)
        assert worker.returncode == -signal.SIGKILL, (run, worker.stderr.read() if worker.stderr else "")
    # the third run finds attempts exhausted and moves the message without running it
    worker = child("consume", str(path), out=tmp_path, mode="crash")
    procs.append(worker)

    def dead_lettered() -> bool:
        with contextlib.closing(sqlite3.connect(tmp_path / "queues.db")) as conn:
            (n,) = conn.execute("SELECT COUNT(*) FROM messages WHERE queue = 'jobs_dlq'").fetchone()
        return bool(n == 1)

    wait_until(dead_lettered, timeout=30)
    kill(worker)
    assert len(lines(tmp_path / "started.txt")) == 2
    with conveyor.load(path):
        assert queue.info("t:jobs")["message_count"] == 0
        assert queue.info("t:jobs_dlq")["message_count"] == 1
    with contextlib.closing(sqlite3.connect(tmp_path / "queues.db")) as conn:
        (blob,) = conn.execute("SELECT headers FROM messages WHERE queue = 'jobs_dlq'").fetchone()
    import msgpack

    headers = msgpack.unpackb(blob)
    assert headers["attempts"] == 3
    assert "attempts exhausted" in headers["x_dead_letter_reason"]


def test_lease_is_extended_while_the_handler_runs(tmp_path: Path) -> None:
    path = write_app(tmp_path, consumer=False, lease="400ms")
    calls: list[int] = []

    def slow(payload: Any) -> None:
        calls.append(queue.message().attempts)
        time.sleep(1.5)

    from tests.support.handlers import install

    text = path.read_text() + textwrap.indent(
        textwrap.dedent(
            f"""
            - {{name: w1, kind: queue.consumer, queue: jobs, handler: "{install(slow)}", prefetch: 1}}
            - {{name: w2, kind: queue.consumer, queue: jobs, handler: "{install(slow)}", prefetch: 1}}
            """
        ),
        "  ",
    )
    path.write_text(text)
    app = conveyor.load(path)
    app.start(consumers=True)
    try:
        queue.publish("t:jobs", "slow")
        wait_until(lambda: len(calls) >= 1)
        time.sleep(2.0)
        assert app.wait_idle(timeout=10)
    finally:
        app.stop()
    assert calls == [1], "the lease expired under a running handler"


def test_expired_lease_of_a_stalled_holder_makes_the_message_available(tmp_path: Path) -> None:
    path = write_app(tmp_path, consumer=False, lease="300ms")
    db = tmp_path / "queues.db"
    got: list[int] = []
    with conveyor.load(path) as app:
        queue.publish("t:jobs", "x")
        # a holder on another host that stopped extending its lease a moment ago
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.execute(
                "UPDATE messages SET lease_owner = 'elsewhere:1:1:1', lease_token = 1, "
                "lease_expires = ?, attempts = 1",
                (boot_clock() + 0.3,),
            )
        info = queue.info("t:jobs")
        assert (info["in_flight"], info["ready"]) == (1, 0)
        bound = app.runtime.queue("t:jobs")

        async def take() -> None:
            sub = await bound.driver.subscribe(bound.spec, prefetch=1, auto_ack=False, options={})
            d = await asyncio.wait_for(sub.get(), 10)
            assert d is not None
            got.append(d.attempts)
            await sub.ack(d)
            await sub.close()

        asyncio.run_coroutine_threadsafe(take(), app.loop).result(15)
    assert got == [2]


# -- several processes on one file --------------------------------------------------------------


@pytest.mark.timeout(120)
def test_two_publishers_two_consumers_lose_nothing_and_never_double_lease(
    tmp_path: Path, procs: list[Any]
) -> None:
    path = write_app(tmp_path, concurrency=4, lease="2s")
    consumers = [child("consume", str(path), out=tmp_path, mode="exclusive") for _ in range(2)]
    procs.extend(consumers)
    wait_until(lambda: len(lines(tmp_path / "ready.txt")) == 2, timeout=20)
    per = 400
    publishers = [
        child("publish", str(path), "t:jobs", str(i * per), str(per), out=tmp_path) for i in range(2)
    ]
    procs.extend(publishers)
    for pub in publishers:
        out, err = pub.communicate(timeout=60)
        assert pub.returncode == 0, err
        assert len(out.split()) == per

    wait_until(lambda: len(lines(tmp_path / "handled.txt")) >= 2 * per, timeout=60)
    time.sleep(0.5)
    handled = records(tmp_path / "handled.txt")
    numbers = Counter(record[1]["n"] for record in handled)
    assert set(numbers) == set(range(2 * per)), "messages lost"
    assert max(numbers.values()) == 1, "a message was handled twice without any fault"
    assert lines(tmp_path / "violations.txt") == []
    assert len({record[3] for record in handled}) == 2, "both consumers took part"
    for consumer in consumers:
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(20)
        assert consumer.returncode == 0
    assert integrity(tmp_path / "queues.db") == "ok"


@pytest.mark.timeout(60)
def test_publisher_killed_mid_loop_stores_every_returned_publish_exactly_once(
    tmp_path: Path, procs: list[Any]
) -> None:
    path = write_app(tmp_path, consumer=False)
    publisher = child("publish", str(path), "t:jobs", "0", "1000000", out=tmp_path)
    procs.append(publisher)
    assert publisher.stdout is not None
    confirmed: list[int] = []

    def read() -> None:
        assert publisher.stdout is not None
        for line in publisher.stdout:
            confirmed.append(int(line))

    reader = threading.Thread(target=read)
    reader.start()
    wait_until(lambda: len(confirmed) > 300, timeout=30)
    kill(publisher)
    reader.join(10)
    stored = [p["n"] for p in stored_payloads(tmp_path / "queues.db")]
    assert len(stored) == len(set(stored)), "a publish was stored twice"
    assert set(confirmed) <= set(stored), "a publish that returned was lost"
    assert len(stored) - len(confirmed) <= 1, "at most the publish in progress may be stored unconfirmed"
    assert integrity(tmp_path / "queues.db") == "ok"


@pytest.mark.timeout(60)
def test_publish_from_another_process_is_noticed_within_poll_interval(
    tmp_path: Path, procs: list[Any]
) -> None:
    path = write_app(tmp_path, consumer=False, poll="100ms")
    seen: list[float] = []
    from tests.support.handlers import install

    ref = install(lambda p: seen.append(time.monotonic()))
    path.write_text(
        path.read_text() + f'  - {{name: w, kind: queue.consumer, queue: jobs, handler: "{ref}"}}\n'
    )
    app = conveyor.load(path)
    app.start(consumers=True)
    try:
        delays = []
        for _ in range(3):
            count = len(seen)
            publisher = child("publish", str(path), "t:jobs", "0", "1", out=tmp_path)
            procs.append(publisher)
            assert publisher.stdout is not None
            publisher.stdout.readline()  # the publish returned
            returned = time.monotonic()
            wait_until(lambda c=count: len(seen) > c, timeout=10)
            delays.append(seen[-1] - returned)
            publisher.wait(20)
    finally:
        app.stop()
    # poll_interval bounds the wait; allow scheduling slack on a loaded machine
    assert min(delays) < 0.35, delays


def test_idle_consumers_use_little_cpu(tmp_path: Path) -> None:
    path = write_app(tmp_path, concurrency=4)
    script = textwrap.dedent(
        f"""
        import time, conveyor
        app = conveyor.load({str(path)!r})
        app.start(consumers=True)
        time.sleep(0.5)
        cpu, wall = time.process_time(), time.monotonic()
        time.sleep(3)
        print((time.process_time() - cpu) / (time.monotonic() - wall))
        app.stop()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    share = float(out.stdout.strip())
    assert share < 0.02, f"idle CPU {share:.1%} of one core"


# -- failures --------------------------------------------------------------------------------


def test_busy_file_is_waited_out_not_reported_as_locked(tmp_path: Path) -> None:
    path = write_app(tmp_path, consumer=False)
    db = tmp_path / "queues.db"
    with conveyor.load(path):
        queue.publish("t:jobs", 1)
        blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        blocker.execute("BEGIN IMMEDIATE")
        timer = threading.Timer(1.0, lambda: blocker.execute("COMMIT"))
        timer.start()
        try:
            assert queue.publish("t:jobs", 2)  # busy_timeout is 200ms: retried past it
        finally:
            timer.join()
            blocker.close()
        assert queue.info("t:jobs")["message_count"] == 2


def test_corrupt_file_is_reported_loudly_not_treated_as_empty(tmp_path: Path) -> None:
    db = tmp_path / "queues.db"
    db.write_bytes(b"this is not a database, but it holds someone's data" * 100)
    before = db.read_bytes()
    app = conveyor.load(write_app(tmp_path, consumer=False))
    with pytest.raises(errors.Error) as info:
        app.start()
    assert info.value.kind == errors.INTERNAL
    assert info.value.retryable is False
    assert "corrupt" in info.value.message
    assert db.read_bytes() == before, "the file was modified"
    assert not app.running


def test_damaged_page_fails_the_integrity_check(tmp_path: Path) -> None:
    path = write_app(tmp_path, consumer=False)
    db = tmp_path / "queues.db"
    with conveyor.load(path):
        queue.publish_many("t:jobs", [{"pad": "x" * 2000, "n": i} for i in range(50)])
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(db.read_bytes())
    page = 4096
    data[3 * page + 8 : 3 * page + 40] = b"\xff" * 32  # scribble over a b-tree page header
    db.write_bytes(bytes(data))
    with pytest.raises(errors.Error) as info:
        conveyor.load(path).start()
    assert info.value.kind == errors.INTERNAL
    assert "corrupt" in info.value.message or "integrity" in info.value.message


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_publish_fails_cleanly_and_keeps_what_was_stored(tmp_path: Path, small_tmpfs: Path) -> None:
    db = small_tmpfs / "queues.db"
    path = write_app(tmp_path, db=db, consumer=False)
    stored = 0
    failure: errors.Error | None = None
    with conveyor.load(path):
        for i in range(10_000):
            try:
                queue.publish("t:jobs", {"n": i, "pad": "y" * 4000})
            except errors.Error as exc:
                failure = exc
                break
            stored += 1
        assert failure is not None, "the disk never filled"
        assert failure.kind == errors.INTERNAL
        assert failure.retryable is True
        assert "disk full" in failure.message
        assert queue.info("t:jobs")["message_count"] == stored
    assert [p["n"] for p in stored_payloads(db)] == list(range(stored))
    assert integrity(db) == "ok"


def test_read_only_filesystem_is_refused_at_start(tmp_path: Path, small_tmpfs: Path) -> None:
    db = small_tmpfs / "queues.db"
    path = write_app(tmp_path, db=db, consumer=False)
    with conveyor.load(path):
        queue.publish("t:jobs", {"n": 1})
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    app = conveyor.load(path)
    with pytest.raises(errors.Error) as info:
        app.start()
    assert info.value.kind == errors.INTERNAL
    assert info.value.retryable is False
    assert str(db) in info.value.message
    assert stored_payloads(db, read_only_fs=True) == [{"n": 1}]


def test_file_turned_read_only_while_running_fails_publish_and_recovers(tmp_path: Path) -> None:
    path = write_app(tmp_path, consumer=False)
    db = tmp_path / "queues.db"
    files = [str(db), f"{db}-wal"]  # not -shm: it is memory-mapped
    with conveyor.load(path):
        queue.publish("t:jobs", {"n": 1})
        locked = subprocess.run(["chattr", "+i", *files], capture_output=True, text=True, check=False)
        if locked.returncode != 0:
            pytest.skip(f"cannot make files immutable here (needs root on ext4): {locked.stderr.strip()}")
        try:
            with pytest.raises(errors.Error) as info:
                queue.publish("t:jobs", {"n": 2})
        finally:
            subprocess.run(["chattr", "-i", *files], check=True)
        assert info.value.kind == errors.INTERNAL
        assert str(db) in info.value.message
        assert queue.info("t:jobs")["message_count"] == 1
        assert queue.publish("t:jobs", {"n": 3})
    assert stored_payloads(db) == [{"n": 1}, {"n": 3}]
    assert integrity(db) == "ok"


def test_a_job_that_raises_does_not_take_the_database_thread_down(tmp_path: Path) -> None:
    from conveyor.drivers.sqlite.store import Database

    async def main() -> int:
        db = Database(str(tmp_path / "x.db"), synchronous="full", busy_timeout=1.0)
        await db.open()
        try:

            def broken(conn: sqlite3.Connection) -> None:
                raise ValueError("bug")

            for write in (True, False):
                with pytest.raises(errors.Error) as info:
                    await db.submit(broken, write=write)
                assert info.value.kind == errors.INTERNAL
                assert "bug" in info.value.message
            count = await db.submit(lambda c: c.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
            return int(count)
        finally:
            await db.close()

    assert asyncio.run(main()) == 0
