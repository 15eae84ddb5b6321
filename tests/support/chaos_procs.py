"""The child-process side of the chaos tests (see tests/support/chaos.py).

Workers are plain ``conveyor run APP_DIR`` processes whose YAML names the handlers
below; publishers are ``python -m tests.support.chaos_procs publish APP_DIR QUEUE
PREFIX SEED``. Everything a child learns or does goes to files in
``$CONVEYOR_CHAOS_OUT``, written so that a SIGKILL at any instant leaves whole lines:

- ``deliveries-<pid>.txt`` (one file per process): ``start``, then ``ok`` or ``fail``,
  for every handler call on the source queue, and ``dead`` (with the headers) for
  every delivery from the dead-letter queue; each with the time, the message id, the
  ledger id and the attempt. Each line is one ``os.write`` on an ``O_APPEND``
  descriptor (append and flush in one step).
- ``ready-<pid>``: the worker's consumers are running (an ``on_start`` function).
- ``intent-<prefix>.txt``: the ids a publisher is about to publish (written before
  the call), and ``ledger-<prefix>.txt``: the ids whose publish returned, appended and
  fsync'd only after the call returned (or, for a batch the broker took in part, the
  ids it reports as stored).

What the handler does with a message is a pure function of its ledger id
(:func:`plan`), so the parent can check the outcome without talking to the children.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import conveyor
from conveyor import errors, queue

MAX_ATTEMPTS = 3  # the source queue's dead_letter.max_attempts
POISON = 10**9  # "fails every attempt"

__all__ = ["MAX_ATTEMPTS", "POISON", "handle", "plan", "read_dead_letter", "ready"]


class PlannedFailure(Exception):
    """The failure a message's plan asks for."""


def plan(ledger_id: str) -> tuple[int, float]:
    """(how many first attempts fail, how long each handler call takes) for ``ledger_id``.

    1 in 20 messages is poison (fails every attempt, ends on the dead-letter queue),
    4 in 20 fail once or twice and then succeed; the rest succeed at once. Most calls
    take 0-19 ms, 1 in 25 takes 300 ms (a likely victim of a kill mid-handler).
    """
    h = zlib.crc32(ledger_id.encode())
    bucket = h % 20
    fails = POISON if bucket == 0 else 1 if bucket in (1, 2, 3) else 2 if bucket == 4 else 0
    slow = (h >> 8) % 25 == 0
    return fails, 0.3 if slow else ((h >> 12) % 20) / 1000


# -- files ---------------------------------------------------------------------------------


def out_dir() -> Path:
    return Path(os.environ["CONVEYOR_CHAOS_OUT"])


_fd_lock = threading.Lock()
_fd: tuple[int, int] | None = None  # (pid, descriptor) of this process's deliveries file


def _record(*fields: str) -> None:
    """Append one tab-separated line, stamped with the wall clock, to this process's
    deliveries file (one write call)."""
    global _fd
    with _fd_lock:
        if _fd is None or _fd[0] != os.getpid():
            path = out_dir() / f"deliveries-{os.getpid()}.txt"
            _fd = (os.getpid(), os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        fd = _fd[1]
    os.write(fd, ("\t".join((f"{time.time():.6f}", *fields)) + "\n").encode())


# -- handlers (named in the app's YAML) ----------------------------------------------------


def handle(payload: dict[str, Any]) -> None:
    """The source queue's handler: record the call, sleep, fail or succeed by plan."""
    msg = queue.message()
    ledger_id = str(payload["id"])
    attempt = msg.attempts
    fails, duration = plan(ledger_id)
    _record("start", msg.id, ledger_id, str(attempt))
    time.sleep(duration)
    if attempt <= fails:
        _record("fail", msg.id, ledger_id, str(attempt))
        raise PlannedFailure(f"attempt {attempt} of {ledger_id} fails by plan")
    _record("ok", msg.id, ledger_id, str(attempt))


def read_dead_letter(payload: dict[str, Any]) -> None:
    """The dead-letter queue's handler: record the copy and its headers."""
    msg = queue.message()
    _record("dead", msg.id, str(payload["id"]), str(msg.attempts), json.dumps(msg.headers, sort_keys=True))


def ready() -> None:
    """``on_start``: the worker's consumers are running (it may now be stopped gracefully)."""
    (out_dir() / f"ready-{os.getpid()}").touch()


# -- the publisher -------------------------------------------------------------------------


def publish(app_dir: str, queue_id: str, prefix: str, seed: int) -> None:
    """Publish ``<prefix>-0``, ``<prefix>-1``, ... until SIGTERM (then exit 0) or SIGKILL.

    Mostly one message per call, sometimes a batch of 2-5 (``publish_many``).
    """
    rng = random.Random(seed)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    out = out_dir()
    intent = os.open(out / f"intent-{prefix}.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    ledger = os.open(out / f"ledger-{prefix}.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    n = 0
    with conveyor.load(app_dir):
        (out / f"ready-{os.getpid()}").touch()
        while not stop.is_set():
            size = 1 if rng.random() < 0.8 else rng.randint(2, 5)
            ids = [f"{prefix}-{i}" for i in range(n, n + size)]
            n += size
            os.write(intent, "".join(i + "\n" for i in ids).encode())
            try:
                if size == 1:
                    queue.publish(queue_id, {"id": ids[0]})
                else:
                    queue.publish_many(queue_id, [{"id": i} for i in ids])
                stored = ids
            except errors.Error as exc:
                print(f"publish of {ids} failed: {exc}", file=sys.stderr, flush=True)
                indexes = exc.details.get("stored") or []
                stored = [ids[i] for i in indexes]
            if stored:
                os.write(ledger, "".join(i + "\n" for i in stored).encode())
                os.fsync(ledger)
            time.sleep(rng.uniform(0, 0.04))


def main(argv: list[str]) -> None:
    if not argv or argv[0] != "publish" or len(argv) != 5:
        raise SystemExit("usage: python -m tests.support.chaos_procs publish APP_DIR QUEUE PREFIX SEED")
    publish(argv[1], argv[2], argv[3], int(argv[4]))


if __name__ == "__main__":
    main(sys.argv[1:])
