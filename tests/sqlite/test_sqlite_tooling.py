"""Replaying dead letters on SQLite is atomic per message, even for a process killed mid-replay.

A replay moves pages of dead letters back to their queue, each page one ``move``:
one transaction that inserts the copies and deletes the originals. A process killed
with SIGKILL at any moment leaves every message on exactly one of the two queues,
the file intact, and a later replay finishes the job. Faults S01 (kill -9 during
writes), C2 (nothing lost, nothing duplicated).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import conveyor
from conveyor import queue
from conveyor.drivers.base import Outgoing
from conveyor.drivers.options.sqlite import SCHEMA
from conveyor.drivers.sqlite import SqliteDriver
from conveyor.drivers.sqlite.rows import unpack
from conveyor.registry.model import DriverSpec, QueueSpec
from tests.sqlite.helpers import ROOT, integrity

COUNT = 2000  # four replay pages (conveyor.queue.tools.PAGE)
ROUNDS = 3


def write_app(tmp_path: Path, db: Path) -> Path:
    path = tmp_path / f"{db.stem}.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            namespace: t
            entries:
              - {{name: store, kind: queue.driver.sqlite, path: {db}, busy_timeout: 200ms}}
              - {{name: jobs, kind: queue.queue, driver: store}}
              - {{name: jobs_dlq, kind: queue.queue, driver: store}}
            """
        )
    )
    return path


async def _store_dead_letters(db: Path, count: int) -> list[str]:
    """``count`` dead letters on ``jobs_dlq``, as a consumer's dead-letter move leaves them."""
    drv = SqliteDriver(DriverSpec(id="t:store", kind=SqliteDriver.kind, options=SCHEMA.driver(path=str(db))))
    dlq = QueueSpec(id="t:jobs_dlq", driver="t:store", queue_name="jobs_dlq")
    headers: dict[str, Any] = {
        "x_original_queue": "t:jobs",
        "x_dead_letter_reason": "ValueError: smtp refused",
        "x_dead_letter_time": "2025-01-01T00:00:00.000Z",
        "attempts": 2,
        "correlation_id": "c-1",
    }
    batch = [Outgoing(f"dead-{n:05d}", b'{"n": %d}' % n, dict(headers)) for n in range(count)]
    await drv.open()
    try:
        await drv.publish(dlq, batch)
    finally:
        await drv.close()
    return [out.id for out in batch]


def rows(db: Path) -> list[tuple[str, str, int, bytes]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        found = conn.execute("SELECT id, queue, attempts, headers FROM messages ORDER BY seq").fetchall()
    return [(msg_id, name, attempts, headers) for msg_id, name, attempts, headers in found]


def check_each_on_one_queue(db: Path, ids: list[str]) -> tuple[int, int]:
    """Every ID exactly once, on ``jobs`` or ``jobs_dlq``; how many are on each."""
    assert integrity(db) == "ok"
    found = rows(db)
    copies = Counter(msg_id for msg_id, *_ in found)
    assert set(copies) == set(ids), f"lost: {sorted(set(ids) - set(copies))[:10]}"
    assert [i for i, n in copies.items() if n > 1] == [], "on both queues"
    places = Counter(name for _, name, *_ in found)
    assert set(places) <= {"jobs", "jobs_dlq"}, places
    for _, name, attempts, headers in found:
        if name == "jobs":  # replayed: attempts start over, the runtime's headers are gone
            assert attempts == 0
            assert unpack(headers) == {"correlation_id": "c-1"}
    return places["jobs"], places["jobs_dlq"]


def replay_and_kill(path: Path) -> None:
    """Run a replay in a child process; SIGKILL it soon after its first page moved."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.sqlite.replay_child", str(path), "t:jobs_dlq"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "start", proc.stderr.read() if proc.stderr else ""
        first = proc.stdout.readline()  # the first page has moved
        assert first.strip(), proc.stderr.read() if proc.stderr else ""
        time.sleep(random.choice([0.0, random.uniform(0.0, 0.02)]))
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_a_replay_killed_midway_leaves_each_message_on_one_queue(tmp_path: Path) -> None:
    outcomes: list[tuple[int, int]] = []  # per round: (replayed, still dead letters) at the kill
    for round_ in range(ROUNDS):
        db = tmp_path / f"round{round_}.db"
        ids = asyncio.run(_store_dead_letters(db, COUNT))
        path = write_app(tmp_path, db)
        replay_and_kill(path)
        on_jobs, on_dlq = check_each_on_one_queue(db, ids)
        outcomes.append((on_jobs, on_dlq))
        with conveyor.load(path):  # a new process finishes the job
            assert queue.replay("t:jobs_dlq") == on_dlq
            assert queue.info("t:jobs")["message_count"] == COUNT
            assert queue.info("t:jobs_dlq")["message_count"] == 0
        assert check_each_on_one_queue(db, ids) == (COUNT, 0)
    assert any(a and b for a, b in outcomes), f"no kill landed while the replay was under way: {outcomes}"
