"""``queue.driver.sqlite``: a durable queue in one SQLite file, shared by processes.

Model (see docs/sqlite.md): each message is a row. Handing a message out *leases* it
(``lease_owner``, ``lease_token``, ``lease_expires``) and counts the attempt in the
same transaction, so a process that dies mid-handler has used an attempt. The holder
extends its leases while handlers run; an expired lease, or one held by a process that
is provably dead (same host, PID gone, reused or a zombie), makes the message
available again. Settlements match the lease token, so one from a lost lease changes
nothing; a delivery fetched ahead is renewed before it is handed out if its lease ran
low. ``ack`` deletes the row, ``nack`` clears the lease and moves ``ready_at`` by the
retry delay, and a dead-letter move (insert the copy, delete the original) is one
transaction. Every scheduling time is on the machine's boot clock (``leases``), never
the wall clock.

Idle consumers do not poll the table: they sleep until a publish in this process
wakes them, until the next known ``ready_at``, or for ``poll_interval``, after
which one cheap read (``PRAGMA data_version``) tells whether another process wrote.
"""

from __future__ import annotations

from conveyor.drivers.sqlite.driver import SqliteDriver

__all__ = ["SqliteDriver"]
