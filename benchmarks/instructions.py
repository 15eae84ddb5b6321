"""Instructions per message on the memory driver, counted by callgrind: before vs after.

Wall-clock figures on a shared 2-core machine move by 10 % or more between runs;
instruction counts do not (valgrind counts instructions, not seconds). This script
runs one fixed workload — publish N messages to a memory queue, consume them with a
no-op handler (concurrency 4, prefetch 100) — under ``valgrind --tool=callgrind``
with each checkout's interpreter, once with N = 0 (start-up: imports, load, start,
stop) and ``--runs`` times with N, and reports the instructions per message and the
start-up count of each side.

    .venv/bin/python benchmarks/instructions.py --before /tmp/old --after . [--n 3000] [--modes async,sync]

Modes: ``async`` (``queue.apublish`` one at a time, ``async def`` handler), ``many``
(``queue.apublish_many`` in batches of 100, ``async def`` handler), ``sync``
(``queue.apublish``, plain ``def`` handler on the consumer's threads; thread
scheduling makes it vary a little more). Needs ``valgrind`` (Debian's package).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODES = ("async", "many", "sync")
_COUNT = itertools.count(1)
_DONE: list[Any] = []
_N = 0


def _tick() -> None:
    if next(_COUNT) == _N:
        loop, event = _DONE
        loop.call_soon_threadsafe(event.set)


async def noop(payload: Any) -> None:
    _tick()


def noop_sync(payload: Any) -> None:
    _tick()


async def _workload(n: int, mode: str) -> None:
    import conveyor
    from conveyor import queue

    handler = "instructions:noop_sync" if mode == "sync" else "instructions:noop"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "app.yaml"
        path.write_text(
            'version: "1.0"\nnamespace: b\nentries:\n'
            "  - {name: mem, kind: queue.driver.memory}\n"
            "  - {name: q, kind: queue.queue, driver: mem, retry: {delay: 0}}\n"
            f'  - {{name: w, kind: queue.consumer, queue: q, handler: "{handler}", '
            "concurrency: 4, prefetch: 100}\n"
        )
        _DONE.extend([asyncio.get_running_loop(), asyncio.Event()])
        app = conveyor.load(path)
        async with app:
            await app.astart_consumers()
            if mode == "many":
                for low in range(0, n, 100):
                    batch = [{"n": i, "action": "send_email"} for i in range(low, min(n, low + 100))]
                    await queue.apublish_many("b:q", batch)
            else:
                for i in range(n):
                    await queue.apublish("b:q", {"n": i, "action": "send_email"})
            if n:
                await _DONE[1].wait()


def count(checkout: Path, n: int, mode: str) -> int:
    """Instructions of one workload run under callgrind with ``checkout``'s interpreter."""
    python = checkout / ".venv" / "bin" / "python"
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    command += [str(python), str(Path(__file__).resolve()), "--workload", str(n), mode]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"callgrind run failed ({checkout}, {mode}, n={n}):\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", type=Path, help="checkout with a .venv (the baseline)")
    parser.add_argument("--after", type=Path, help="checkout with a .venv (the change)")
    parser.add_argument("--n", type=int, default=3000, help="messages per run (3000)")
    parser.add_argument("--runs", type=int, default=2, help="runs with n messages per side and mode (2)")
    parser.add_argument("--modes", default=",".join(MODES), help="async,many,sync")
    parser.add_argument("--workload", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.workload:
        global _N
        _N = int(opts.workload[0])
        sys.modules.setdefault("instructions", sys.modules[__name__])
        asyncio.run(_workload(_N, opts.workload[1]))
        return 0
    if opts.before is None or opts.after is None:
        parser.error("--before and --after are required")
    print(f"instructions per message, n={opts.n}, {opts.runs} run(s) per side; start-up = the run with n=0\n")
    print(
        f"{'mode':<6} {'before':>10} {'after':>10} {'after/before':>12} {'start-up before':>16} {'after':>14}"
    )
    for mode in opts.modes.split(","):
        per: dict[str, float] = {}
        startup: dict[str, int] = {}
        for side, checkout in (("before", opts.before.resolve()), ("after", opts.after.resolve())):
            startup[side] = count(checkout, 0, mode)
            runs = [(count(checkout, opts.n, mode) - startup[side]) / opts.n for _ in range(opts.runs)]
            per[side] = statistics.mean(runs)
        ratio = per["after"] / per["before"]
        print(
            f"{mode:<6} {per['before']:>10,.0f} {per['after']:>10,.0f} {ratio:>12.3f} "
            f"{startup['before']:>16,} {startup['after']:>14,}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
