"""Chaos on the SQLite driver: workers and publishers killed and restarted at random.

Faults F01, F02, F04, F05, H01, P01, P02, S01, S03, S04; contract C1, C2, C3.
See tests/support/chaos.py for the run and the audit.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from tests.support.chaos import chaos_run, chaos_timeout, write_app

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


def _rows(db: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT queue, COUNT(*) FROM messages GROUP BY queue").fetchall()
    return {str(q): int(n) for q, n in rows}


@pytest.mark.timeout(chaos_timeout())
def test_sqlite_loses_nothing_while_workers_and_publishers_are_killed(tmp_path: Path) -> None:
    """Faults F01, F02, F04, F05, H01, P01, P02, S01, S03, S04.

    Two ``conveyor run`` workers (concurrency 4, prefetch 8) and two publishers share
    one database file; every 0.3-1.5 s one of them gets SIGKILL or SIGTERM and a new
    one starts. Afterwards: every confirmed publish was handled or dead-lettered,
    nothing unexpected arrived, duplicates stay within what the killed workers held,
    dead letters carry their headers, and the file passes ``PRAGMA integrity_check``.
    """
    db = tmp_path / "queues.db"
    driver = {
        "kind": "queue.driver.sqlite",
        "path": str(db),
        "lease_duration": "10s",
        "poll_interval": "50ms",
    }
    app_dir = write_app(tmp_path / "app", driver)
    chaos_run(app_dir, tmp_path / "out", lambda: _rows(db), "sqlite", copies=False)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
