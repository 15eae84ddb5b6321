"""What the SQLite tests share: app files, child processes and their records, the file."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def write_app(
    tmp_path: Path,
    *,
    db: Path | None = None,
    consumer: bool = True,
    concurrency: int = 1,
    prefetch: int | None = None,
    dead_letter: bool = False,
    lease: str = "30s",
    poll: str = "100ms",
    extra_driver: str = "",
    retry: str = "{delay: 0}",
) -> Path:
    db = db or tmp_path / "queues.db"
    dlq = "dead_letter: {queue: jobs_dlq, max_attempts: 2}" if dead_letter else ""
    text = f"""
    namespace: t
    entries:
      - name: store
        kind: queue.driver.sqlite
        path: {db}
        poll_interval: {poll}
        lease_duration: {lease}
        busy_timeout: 200ms
        {extra_driver}
      - {{name: jobs, kind: queue.queue, driver: store, retry: {retry}, {dlq}}}
      - {{name: jobs_dlq, kind: queue.queue, driver: store}}
    """
    if consumer:
        text += f"""
      - name: worker
        kind: queue.consumer
        queue: jobs
        handler: "tests.sqlite.procs:handler"
        concurrency: {concurrency}
        prefetch: {prefetch if prefetch is not None else max(concurrency, 4)}
    """
    path = tmp_path / "app.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def child(
    role: str, *args: str, out: Path, mode: str = "record", wall_skew: float = 0.0
) -> subprocess.Popen[str]:
    """``python -m tests.sqlite.procs ROLE ARGS``; ``wall_skew`` sets its wall clock wrong."""
    env = {
        **os.environ,
        "CONVEYOR_TEST_OUT": str(out),
        "CONVEYOR_TEST_MODE": mode,
        "CONVEYOR_TEST_WALL_SKEW": str(wall_skew),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tests.sqlite.procs", role, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def records(path: Path) -> list[tuple[str, Any, int, int]]:
    """The handler records a child wrote: (message id, payload, attempts, pid)."""
    out = []
    for line in lines(path):
        msg_id, payload, attempts, pid = line.split("\t")
        out.append((msg_id, json.loads(payload), int(attempts), int(pid)))
    return out


def kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def integrity(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def stored_payloads(db: Path, queue_name: str = "jobs", *, read_only_fs: bool = False) -> list[Any]:
    target = f"file:{db}?immutable=1" if read_only_fs else str(db)
    with contextlib.closing(sqlite3.connect(target, uri=read_only_fs)) as conn:
        rows = conn.execute(
            "SELECT body FROM messages WHERE queue = ? ORDER BY seq", (queue_name,)
        ).fetchall()
    return [json.loads(body) for (body,) in rows]


def proc_state(pid: int) -> str:
    """The state letter of ``pid`` in /proc (R, S, T stopped, Z zombie...)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0].decode()
