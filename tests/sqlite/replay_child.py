"""Child process of the SQLite replay crash test: ``python -m tests.sqlite.replay_child YAML DLQ``.

Starts the app, prints ``start``, replays every dead letter of DLQ (printing
``DONE TOTAL`` after each page, flushed, so the parent knows a replay is under way),
then prints ``done``. The parent kills it with SIGKILL somewhere in between.
"""

from __future__ import annotations

import sys

import conveyor
from conveyor import queue


def main(path: str, dlq: str) -> None:
    with conveyor.load(path):
        print("start", flush=True)
        queue.replay(dlq, progress=lambda done, total: print(done, total, flush=True))
        print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
