"""Who holds a lease and until when: the clock, the boot, the holders.

Every time the SQLite driver stores for scheduling (when a message is ready, when a
lease expires, when a consumer was last seen) is a reading of ``CLOCK_BOOTTIME``: the
seconds since the machine booted, suspend included. It never jumps when the wall clock
is set (by an administrator, NTP or a skewed container), and every process on the
machine reads the same value. It restarts at zero on every boot, so the file records
which boot its times belong to (the kernel's boot id); the first process to open the
file after a reboot rebases them (``store.Database._prepare``). Without a boot id (a
system other than Linux) the wall clock stays the clock.

A holder is ``host:pid:start:random``: the host name (with the PID namespace), the
PID, the kernel's start time of that PID (so a reused PID is not mistaken for the
holder) and a random suffix (one per driver instance).
"""

from __future__ import annotations

import os
import random
import socket
import time

__all__ = ["boot_id", "now", "owner_alive", "owner_id"]

_BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


def _read_boot_id() -> str | None:
    try:
        with open(_BOOT_ID_FILE, encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


_BOOT_ID = _read_boot_id()
# Where the kernel names no boot (not Linux), boots cannot be told apart, and a clock
# that restarts at each boot would leave a file's old times meaningless: the wall clock
# then stays the clock, with its faults, as "the boot" named "wall-clock".
_BOOT_CLOCK: int | None = getattr(time, "CLOCK_BOOTTIME", None) if _BOOT_ID is not None else None


def now() -> float:
    """Seconds on the machine's boot clock (the same in every process, never set)."""
    if _BOOT_CLOCK is None:
        return time.time()
    return time.clock_gettime(_BOOT_CLOCK)


def boot_id() -> str:
    """The kernel's id of the current boot (a new one after every reboot)."""
    return _BOOT_ID if _BOOT_CLOCK is not None and _BOOT_ID is not None else "wall-clock"


# -- holders -------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time)`` of ``pid`` from ``/proc/<pid>/stat``; None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (comm) state ... starttime ...": comm may hold spaces and parentheses
            fields = stat.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), fields[19].decode()  # fields 3 and 22 of proc(5)
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def _host() -> str:
    """This host as holders name it: the host name and, where known, the PID namespace.

    Two containers can share a file and a host name, never their PIDs: a PID is only
    checked by a process that sees the holder's PID namespace.
    """
    try:
        namespace = f"/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        namespace = ""
    return socket.gethostname() + namespace


def owner_id() -> str:
    """``host:pid:start:random``: unique per driver instance, checkable for liveness."""
    pid = os.getpid()
    stat = _stat(pid)
    start = stat[1] if stat is not None else "?"
    return f"{_host()}:{pid}:{start}:{random.getrandbits(32):08x}"


def owner_alive(owner: str) -> bool:
    """False only when ``owner`` is provably dead.

    Provably dead: on this host (and PID namespace), and its PID is gone, reused by a
    process that started later, or a zombie (exited, not yet reaped by its parent: it
    runs nothing any more, although ``kill(pid, 0)`` still succeeds).
    """
    try:
        host, pid_text, start, _ = owner.rsplit(":", 3)
        pid = int(pid_text)
    except ValueError:
        return True  # not ours to judge: wait for the lease to expire
    # A bare host name: a holder named by conveyor before PID namespaces were recorded.
    if host not in (_host(), socket.gethostname()) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        ours = False  # exists, owned by another user
    else:
        ours = True
    stat = _stat(pid)
    if stat is None:
        # Another user's process hidden by /proc's hidepid, or no /proc at all: kill()
        # said it exists. Our own process with /proc present: it exited in between.
        return not (ours and os.path.isdir("/proc/self"))
    state, started = stat
    if state in ("Z", "X"):  # a zombie (exited, not reaped yet), or dead
        return False
    return start in ("?", started)
