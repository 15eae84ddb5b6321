"""The SQLite file behind ``queue.driver.sqlite``: schema, one database thread, group commit.

Every statement runs in one dedicated thread that owns the connection, so the event
loop never blocks on disk I/O. Jobs queue up while a transaction commits; the next
transaction takes all of them at once (group commit): one ``fsync`` covers every
publish, lease and settlement that arrived together, and each caller is answered
only after the commit that holds its own change.

Read-only jobs (``info``, the idle probe) run outside the write transaction.
``SQLITE_BUSY`` from other processes is waited out (``busy_timeout``) and retried;
it never reaches a caller as "database is locked". Each job runs in a savepoint, so
one that fails is rolled back alone and the others of its transaction commit.

Opening the file creates the schema, upgrades a file of schema 1, or, when the file's
times belong to an earlier boot, rebases them (see ``leases``): one transaction,
done by whichever process opens the file first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conveyor import errors
from conveyor.drivers.sqlite import leases

__all__ = ["SCHEMA_VERSION", "Database", "Job", "translate"]

log = logging.getLogger("conveyor.sqlite")

SCHEMA_VERSION = 2

# Times: ready_at, lease_expires and seen_at are seconds on the boot clock of the boot
# named by conveyor_meta's clock_boot (see leases.py); created_at is Unix time, for
# people reading the file, and schedules nothing.
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS conveyor_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS messages (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        queue         TEXT    NOT NULL,
        id            TEXT    NOT NULL,
        body          BLOB    NOT NULL,
        headers       BLOB    NOT NULL,
        attempts      INTEGER NOT NULL DEFAULT 0,
        ready_at      REAL    NOT NULL,
        lease_owner   TEXT,
        lease_expires REAL,
        created_at    REAL    NOT NULL,
        lease_token   INTEGER
    )""",
    "CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, ready_at, seq) WHERE lease_owner IS NULL",
    "CREATE INDEX IF NOT EXISTS messages_leased "
    "ON messages (lease_owner, lease_expires) WHERE lease_owner IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS messages_queue ON messages (queue)",
    """CREATE TABLE IF NOT EXISTS consumers (
        id      TEXT PRIMARY KEY,
        queue   TEXT NOT NULL,
        owner   TEXT NOT NULL,
        seen_at REAL NOT NULL
    )""",
)

# Schema 1 stored Unix times in available_at, lease_until and heartbeat. Schema 2 renames
# them as it moves them onto the boot clock: a process of the older version still
# writing to the file then fails loudly ("no such column") instead of writing times
# from the wrong clock.
_FROM_1 = (
    "ALTER TABLE messages RENAME COLUMN available_at TO ready_at",
    "ALTER TABLE messages RENAME COLUMN lease_until TO lease_expires",
    "ALTER TABLE messages ADD COLUMN lease_token INTEGER",
    "ALTER TABLE consumers RENAME COLUMN heartbeat TO seen_at",
)

# How long a write transaction may wait for other processes before the job fails.
BUSY_DEADLINE = 60.0
_MAX_BATCH = 512


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


# Errors of one statement, not of the transaction: the job that ran it fails alone.
_JOB_LOCAL = (sqlite3.DataError, sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError)


def _refused(exc: sqlite3.Error, path: str) -> errors.Error:
    """A statement SQLite refused for the values it was given (never retryable)."""
    if isinstance(exc, sqlite3.DataError):  # SQLITE_TOOBIG: past SQLite's length limit
        return errors.invalid(f"too big for SQLite file {path}: {exc}; nothing was stored", path=path)
    return errors.internal(f"SQLite refused a statement on {path}: {exc}", retryable=False, path=path)


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
            self._with_retry(conn, self._prepare)
        except sqlite3.Error as exc:
            conn.close()
            raise translate(exc, self.path) from None
        except errors.Error:
            conn.close()
            raise
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

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Create, migrate or rebase the schema: one transaction, whoever comes first."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = _meta(conn, "schema_version")
            if version is None:
                for statement in _SCHEMA:
                    conn.execute(statement)
                _set_meta(conn, "schema_version", str(SCHEMA_VERSION))
                _set_meta(conn, "clock_boot", leases.boot_id())
            elif version == "1":
                self._migrate_from_1(conn)
            elif version == str(SCHEMA_VERSION):
                if _meta(conn, "clock_boot") != leases.boot_id():
                    self._rebase(conn)
            else:
                raise errors.internal(
                    f"SQLite file {self.path} has schema version {version}; this conveyor knows "
                    f"{SCHEMA_VERSION} (a newer conveyor wrote it)",
                    retryable=False,
                    path=self.path,
                )
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def _migrate_from_1(self, conn: sqlite3.Connection) -> None:
        """Schema 1 -> 2: rename the time columns and move their Unix times onto the boot clock.

        What was due in N seconds by the wall clock is due in N seconds by the boot
        clock; a lease keeps what it had left (its holder, if still alive, renews it
        or loses it).
        """
        shift = leases.now() - time.time()
        for statement in _FROM_1:
            conn.execute(statement)
        conn.execute(
            "UPDATE messages SET ready_at = ready_at + ?, lease_expires = lease_expires + ?", (shift, shift)
        )
        conn.execute("UPDATE consumers SET seen_at = seen_at + ?", (shift,))
        _set_meta(conn, "schema_version", str(SCHEMA_VERSION))
        _set_meta(conn, "clock_boot", leases.boot_id())
        (count,) = conn.execute("SELECT COUNT(*) FROM messages").fetchone()
        log.warning(
            "SQLite file %s upgraded from schema 1 to %d (%d message(s) kept)",
            self.path,
            SCHEMA_VERSION,
            count,
        )

    def _rebase(self, conn: sqlite3.Connection) -> None:
        """The file's times belong to an earlier boot: its clock started again at zero.

        Every lease holder died with that boot, so every lease is cleared (the attempt
        stays counted, as for any holder that died). Retry delays end: the boot clock
        cannot say how long the machine was down, and the wall clock is not trusted,
        so every waiting message is ready now, in the order it had.
        """
        now = leases.now()
        freed = conn.execute(
            "UPDATE messages SET lease_owner = NULL, lease_token = NULL, lease_expires = NULL "
            "WHERE lease_owner IS NOT NULL"
        ).rowcount
        (latest,) = conn.execute("SELECT MAX(ready_at) FROM messages").fetchone()
        if latest is not None:
            conn.execute("UPDATE messages SET ready_at = ready_at - ? + ?", (latest, now))
        conn.execute("DELETE FROM consumers")
        _set_meta(conn, "clock_boot", leases.boot_id())
        log.warning(
            "SQLite file %s was last used before this machine booted: %d lease(s) of processes "
            "that are gone cleared, retry delays ended",
            self.path,
            freed,
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
        """Run every job in one transaction; a job that fails wrote nothing.

        Each job runs in its own savepoint: one that refuses (``errors.Error``), is
        handed a value SQLite will not take, or has a bug is rolled back alone and
        answered alone, and the others commit. Only a failure of the transaction itself
        (busy past the deadline, disk full, I/O, corruption) fails them all.
        """
        outcomes: list[tuple[asyncio.Future[Any], bool, Any]] = []
        try:
            self._with_retry(conn, lambda c: c.execute("BEGIN IMMEDIATE"))
            for job in jobs:
                outcomes.append(self._job(conn, job))
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

    def _job(self, conn: sqlite3.Connection, job: Job) -> tuple[asyncio.Future[Any], bool, Any]:
        conn.execute("SAVEPOINT job")
        try:
            value = job.fn(conn)
        except errors.Error as exc:
            failure = exc
        except _JOB_LOCAL as exc:  # this job's statement was refused; the transaction is fine
            failure = _refused(exc, self.path)
        except sqlite3.Error:
            raise  # the transaction failed: every job of it fails
        except Exception as exc:  # a bug in a job: answer it, keep the others
            failure = errors.internal(f"unexpected error in the SQLite driver: {exc!r}", retryable=False)
        else:
            conn.execute("RELEASE job")
            return (job.future, True, value)
        conn.execute("ROLLBACK TO job")
        conn.execute("RELEASE job")
        return (job.future, False, failure)

    def _reply(self, outcomes: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting any more
            self._loop.call_soon_threadsafe(_settle, outcomes)


def _meta(conn: sqlite3.Connection, key: str) -> str | None:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'conveyor_meta'"
    ).fetchone()
    if exists is None:
        return None
    row = conn.execute("SELECT value FROM conveyor_meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO conveyor_meta (key, value) VALUES (?, ?)", (key, value))


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
