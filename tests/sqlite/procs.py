"""Child processes for the SQLite crash tests: ``python -m tests.sqlite.procs ROLE ...``.

Roles:
  consume YAML OUTDIR   run the app's consumers; the handler's behaviour comes from
                        $CONVEYOR_TEST_MODE (record | hang | crash | exclusive | gate)
  publish YAML QUEUE START COUNT
                        publish START..START+COUNT-1 one at a time, printing each number
                        only after publish returned (so the parent knows what was stored)

$CONVEYOR_TEST_WALL_SKEW (seconds, may be negative) sets this process's wall clock
wrong by that much: ``time.time`` and ``time.time_ns`` are shifted before conveyor
is imported, as if the administrator, NTP or a container had set the clock.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

SKEW = float(os.environ.get("CONVEYOR_TEST_WALL_SKEW", "0"))
if SKEW:
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + SKEW
    time.time_ns = lambda: _time_ns() + int(SKEW * 1e9)

import conveyor  # noqa: E402  (after the clock is set)
from conveyor import queue  # noqa: E402

OUT = Path(os.environ.get("CONVEYOR_TEST_OUT", "."))
MODE = os.environ.get("CONVEYOR_TEST_MODE", "record")


def _append(name: str, line: str) -> None:
    with open(OUT / name, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def handler(payload: Any) -> None:
    msg = queue.message()
    line = "\t".join([msg.id, json.dumps(payload), str(msg.attempts), str(os.getpid())])
    if MODE == "record":
        _append("handled.txt", line)
    elif MODE == "hang":
        _append("started.txt", line)
        time.sleep(3600)
    elif MODE == "crash":
        _append("started.txt", line)
        os.kill(os.getpid(), signal.SIGKILL)
    elif MODE == "gate":
        # The first message waits for the file "go" (the test freezes and resumes the
        # process meanwhile); every message is recorded when its handler ends.
        _append("started.txt", line)
        if not (OUT / "gate-passed").exists():
            while not (OUT / "go").exists():
                time.sleep(0.01)
            (OUT / "gate-passed").touch()
        _append("handled.txt", line)
    elif MODE == "exclusive":
        # Each message may be held by one live consumer at a time: an O_EXCL marker
        # file proves it (a second holder fails to create it).
        marker = OUT / f"held-{msg.id}"
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            _append("violations.txt", line)
            raise
        os.close(fd)
        time.sleep(0.002)
        os.unlink(marker)
        _append("handled.txt", line)


def consume(path: str) -> None:
    app = conveyor.load(path)
    _append("ready.txt", str(os.getpid()))
    app.run(grace=5)


def publish(path: str, queue_id: str, start: int, count: int) -> None:
    app = conveyor.load(path)
    with app:
        for n in range(start, start + count):
            queue.publish(queue_id, {"n": n})
            print(n, flush=True)


def main(argv: list[str]) -> None:
    role = argv[0]
    if role == "consume":
        consume(argv[1])
    elif role == "publish":
        publish(argv[1], argv[2], int(argv[3]), int(argv[4]))
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main(sys.argv[1:])
