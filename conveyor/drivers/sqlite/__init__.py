"""``queue.driver.sqlite``: a durable queue in one SQLite file, shared by processes.

Model (see docs/sqlite.md): each message is a row. Handing a message out *leases* it
(``lease_owner``, ``lease_until``) and counts the attempt in the same transaction, so
a process that dies mid-handler has used an attempt. The holder extends its leases
while handlers run; an expired lease, or one held by a process that is provably dead
(same host, PID gone), makes the message available again. ``ack`` deletes the row,
``nack`` clears the lease and moves ``available_at`` by the retry delay, and a
dead-letter move (insert the copy, delete the original) is one transaction.

Idle consumers do not poll the table: they sleep until a publish in this process
wakes them, until the next known ``available_at``, or for ``poll_interval``, after
which one cheap read (``PRAGMA data_version``) tells whether another process wrote.
"""

from __future__ import annotations

from conveyor.drivers.sqlite.driver import SqliteDriver

__all__ = ["SqliteDriver"]
