"""The SQLite file behind ``queue.driver.sqlite``: schema, one database thread, group commit.

Every statement runs in one dedicated thread that owns the connection, so the event
loop never blocks on disk I/O. Jobs queue up while a transaction commits; the next
transaction takes all of them at once (group commit): one ``fsync`` covers every
publish, lease and settlement that arrived together, and each caller is answered
only after the commit that holds its own change.

Read-only jobs (``info``, the idle probe) run outside the write transaction.
``SQLITE_BUSY`` from other processes is waited out (``busy_timeout``) and retried;
it never reaches a caller as "database is locked".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import random
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conveyor import errors

__all__ = ["Database", "Job", "owner_alive", "owner_id", "translate"]

SCHEMA_VERSION = 1

_SCHEMA = """
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
"""

# How long a write transaction may wait for other processes before the job fails.
BUSY_DEADLINE = 60.0
_MAX_BATCH = 512


# -- owners: which process holds a lease ---------------------------------------------------


def _start_time(pid: int) -> str:
    """The kernel's start time of ``pid`` (tells a live process from a reused PID)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return "?"


def owner_id() -> str:
    """``host:pid:start:random``: unique per driver instance, checkable for liveness."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}:{random.getrandbits(32):08x}"


def owner_alive(owner: str) -> bool:
    """False only when ``owner`` is provably dead: same host, and its PID is gone or reused."""
    try:
        host, pid_text, start, _ = owner.rsplit(":", 3)
        pid = int(pid_text)
    except ValueError:
        return True  # not ours to judge: wait for the lease to expire
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return start == "?" or _start_time(pid) == start


# -- errors --------------------------------------------------------------------------------


def translate(exc: sqlite3.Error, path: str) -> errors.Error:
    """Map a sqlite3 exception to ``errors.Error`` (INTERNAL; retryable where it can help)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return errors.internal(
            f"SQLite file {path} stayed busy (another process holds its write lock)",
            path=path,
            retryable=True,
        )
    if name.startswith("SQLITE_FULL") or "disk is full" in text:
        return errors.internal(
            f"disk full: cannot write {path}; nothing was stored", path=path, retryable=True
        )
    if name.startswith("SQLITE_READONLY") or "readonly" in text:
        return errors.internal(
            f"SQLite file {path} is read-only: {text}", retryable=False, path=path, reason="readonly"
        )
    if (
        name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
        or "malformed" in text
        or "not a database" in text
    ):
        return errors.internal(
            f"SQLite file {path} is corrupt ({text}); refusing to use it: restore it from a backup "
            "or move it aside",
            retryable=False,
            path=path,
            reason="corrupt",
        )
    if name.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
        return errors.internal(f"cannot open SQLite file {path}: {text}", retryable=False, path=path)
    if name.startswith("SQLITE_IOERR"):
        return errors.internal(
            f"I/O error on SQLite file {path} ({name}): {text}; check that the file is writable "
            "and the disk healthy",
            path=path,
            retryable=True,
        )
    return errors.internal(f"SQLite error on {path}: {text}", path=path, retryable=True)


def _is_busy(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(exc)


# -- the database thread -------------------------------------------------------------------


class Job:
    """One unit of work for the database thread: ``fn(connection) -> result``."""

    __slots__ = ("fn", "future", "write")

    def __init__(
        self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any], write: bool
    ) -> None:
        self.fn = fn
        self.future = future
        self.write = write


def _settle(outcomes: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in outcomes:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class Database:
    """The connection, its thread and the job queue. Use from the event loop only."""

    def __init__(self, path: str, *, synchronous: str, busy_timeout: float) -> None:
        self.path = path
        self._synchronous = synchronous.upper()
        self._busy_timeout = busy_timeout
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.commits = 0  # write transactions committed (observability and tests)

    async def open(self) -> None:
        """Open (creating the file and schema if needed) and check the file; raise on failure."""
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._main, args=(ready,), name=f"conveyor-sqlite:{Path(self.path).name}", daemon=True
        )
        self._thread.start()
        await ready

    def submit(self, fn: Callable[[sqlite3.Connection], Any], *, write: bool = True) -> asyncio.Future[Any]:
        """Queue ``fn`` for the database thread; the future resolves after its commit."""
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        if self._closed:
            # Like a closed AMQP driver: trying again cannot help, this driver stays closed.
            future.set_exception(errors.internal(f"SQLite driver for {self.path} is closed"))
            return future
        self._jobs.put(Job(fn, future, write))
        return future

    async def close(self) -> None:
        if self._closed or self._thread is None:
            return
        self._closed = True
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)

    # -- inside the thread -------------------------------------------------------------

    def _main(self, ready: asyncio.Future[None]) -> None:
        try:
            conn = self._connect()
        except errors.Error as exc:
            self._reply([(ready, False, exc)])
            return
        self._reply([(ready, True, None)])
        try:
            self._serve(conn)
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise errors.internal(
                f"cannot create the directory of {self.path}: {exc}", retryable=False
            ) from None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=self._busy_timeout)
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            self._check(conn)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            self._with_retry(conn, lambda c: c.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;"))
            self._init_meta(conn)
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from None
        return conn

    def _check(self, conn: sqlite3.Connection) -> None:
        """Refuse a corrupt file loudly instead of treating it as an empty queue."""
        row = conn.execute("PRAGMA quick_check(1)").fetchone()
        if row is None or row[0] != "ok":
            raise errors.internal(
                f"SQLite file {self.path} failed its integrity check ({row[0] if row else 'no answer'}); "
                "refusing to use it: restore it from a backup or move it aside",
                retryable=False,
                path=self.path,
                reason="corrupt",
            )

    def _init_meta(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO conveyor_meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        (version,) = conn.execute("SELECT value FROM conveyor_meta WHERE key = 'schema_version'").fetchone()
        if int(version) != SCHEMA_VERSION:
            raise errors.internal(
                f"SQLite file {self.path} has schema version {version}; this conveyor knows {SCHEMA_VERSION}",
                retryable=False,
            )

    def _with_retry(self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        deadline = time.monotonic() + BUSY_DEADLINE
        pause = 0.001
        while True:
            try:
                return fn(conn)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() > deadline:
                    raise
                _rollback(conn)
                time.sleep(pause)
                pause = min(pause * 2, 0.05)

    def _serve(self, conn: sqlite3.Connection) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            batch = [job]
            while len(batch) < _MAX_BATCH:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._jobs.put(None)  # finish this batch, then stop
                    break
                batch.append(more)
            outcomes = [self._read(conn, j) for j in batch if not j.write]
            writes = [j for j in batch if j.write]
            if writes:
                outcomes.extend(self._write(conn, writes))
            self._reply(outcomes)

    def _read(self, conn: sqlite3.Connection, job: Job) -> tuple[asyncio.Future[Any], bool, Any]:
        try:
            return (job.future, True, self._with_retry(conn, job.fn))
        except errors.Error as exc:
            return (job.future, False, exc)
        except sqlite3.Error as exc:
            return (job.future, False, translate(exc, self.path))
        except Exception as exc:  # a bug in a job: answer it, keep the thread alive
            # Not retryable, as for a write: the same job would fail the same way again.
            failure = errors.internal(f"unexpected error in the SQLite driver: {exc!r}")
            return (job.future, False, failure)

    def _write(
        self, conn: sqlite3.Connection, jobs: list[Job]
    ) -> list[tuple[asyncio.Future[Any], bool, Any]]:
        """Run every job in one transaction; a job that refuses (errors.Error) wrote nothing."""
        outcomes: list[tuple[asyncio.Future[Any], bool, Any]] = []
        try:
            self._with_retry(conn, lambda c: c.execute("BEGIN IMMEDIATE"))
            for job in jobs:
                try:
                    outcomes.append((job.future, True, job.fn(conn)))
                except errors.Error as exc:
                    outcomes.append((job.future, False, exc))
            conn.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:
            _rollback(conn)
            failure = translate(exc, self.path)
            return [(job.future, False, failure) for job in jobs]
        except Exception as exc:  # a bug in a job: fail the batch, keep the thread alive
            _rollback(conn)
            failure = errors.internal(f"unexpected error in the SQLite driver: {exc!r}", retryable=False)
            return [(job.future, False, failure) for job in jobs]
        return outcomes

    def _reply(self, outcomes: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting any more
            self._loop.call_soon_threadsafe(_settle, outcomes)


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
