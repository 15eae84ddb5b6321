"""Options of ``queue.driver.sqlite`` (see docs/sqlite.md for what each one does)."""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.drivers.options import message_size_option
from conveyor.registry.convert import choice, duration, integer, string
from conveyor.registry.options import DriverSchema, NoOptions, Options, PathKind, option

__all__ = ["SCHEMA", "SqliteOptions", "SqliteQueueOptions"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SqliteOptions(Options):
    """The ``queue.driver.sqlite`` entry."""

    path: str = option(string, path=PathKind.FILE)  # the database file, absolute once loaded
    busy_timeout: float = option(duration(), 5.0)  # how long a write waits for another process's lock
    poll_interval: float = option(duration(positive=True, maximum=60.0), 0.1)  # idle check for other writers
    synchronous: str = option(choice("full", "normal", "off"), "full")  # SQLite's durability level
    lease_duration: float = option(duration(positive=True, maximum=86400.0), 30.0)  # a stalled holder's limit
    # 16 MiB by default; at most SQLite's own limit on a value (1,000,000,000 bytes).
    max_message_size: int = message_size_option(maximum=1_000_000_000)


@dataclass(frozen=True, slots=True, kw_only=True)
class SqliteQueueOptions(Options):
    """``driver_options.sqlite`` on a queue."""

    max_length: int | None = option(integer(1), None)


SCHEMA: DriverSchema[SqliteOptions, SqliteQueueOptions, NoOptions] = DriverSchema(
    "sqlite", SqliteOptions, SqliteQueueOptions
)
