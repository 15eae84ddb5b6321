"""``conveyor run --processes N`` on CPU-bound work: N = 2 against N = 1, on SQLite.

The handler is a plain ``def`` that spins a pure-Python loop for about ``--work-ms``
milliseconds (the loop length is calibrated in this process before the first run).
In one process the GIL lets only one such handler run at a time, whatever the
consumer's concurrency; separate processes each have their own. This measures how
much of that a second process delivers.

Every run gets a fresh directory with a SQLite app (one queue; one consumer,
``concurrency: 1``, ``prefetch: 2``; the driver's defaults otherwise, so
``synchronous: full``), has ``--messages`` messages (the numbers 0..M-1) published
before it starts, and then runs one fresh process:

    python -m conveyor run app.yaml --until-idle --idle-settle 0.3 --processes N --json

Runs alternate between the two sides, the order swapped every round (1, 2; 2, 1; ...).
The figure of a run is messages per second from the first handler's start to the last
handler's end (each handler records both), which leaves out interpreter start-up and
the idle settle; the wall-clock time of the whole command is shown too. The report
gives each round, the median of each side, and the median of the per-round ratios.

Checked after every run (a failure exits with status 1): the command exited 0; every
number 0..M-1 was handled exactly once; the summary counts M acks and an empty queue;
with N = 2, both workers handled messages.

    .venv/bin/python benchmarks/processes_scaling.py [--messages 400] [--rounds 3] [--work-ms 10]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import executable, progress

import conveyor
from conveyor import queue

QUEUE_ID = "bench:jobs"
CONSUMER_ID = "bench:worker"

SPIN = """\
def spin(n):
    total = 0
    for i in range(n):
        total += i * i % 7
    return total
"""

APP = """\
version: "1.0"
namespace: bench
entries:
  - {name: store, kind: queue.driver.sqlite, path: queue.db}
  - {name: jobs, kind: queue.queue, driver: store}
  - name: worker
    kind: queue.consumer
    queue: bench:jobs
    handler: "scaling_handlers:handle"
    concurrency: 1
    prefetch: 2
"""

HANDLERS = """\
import os
import pathlib
import time

HERE = pathlib.Path(__file__).parent
ITERATIONS = {iterations}

{spin}

def handle(payload):
    started = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
    spin(ITERATIONS)
    ended = time.monotonic()
    with open(HERE / "handled.txt", "a", encoding="utf-8") as f:
        f.write(f"{{payload['n']}} {{os.getpid()}} {{started:.6f}} {{ended:.6f}}\\n")
"""


class BenchFailure(Exception):
    """A run's outcome was wrong."""


@dataclass
class Run:
    processes: int
    round: int
    rate: float  # msgs/s, first handler start to last handler end
    span: float  # seconds of that window
    wall: float  # seconds of the whole command
    pids: int  # processes that handled messages


def _spin() -> Any:
    space: dict[str, Any] = {}
    exec(SPIN, space)
    return space["spin"]


def _timed(spin: Any, iterations: int) -> float:
    started = time.perf_counter()
    spin(iterations)
    return time.perf_counter() - started


def calibrate(work_ms: float) -> tuple[int, float]:
    """Loop iterations that take about ``work_ms`` ms here, and the median of 9 timed calls.

    The length comes from the fastest of 5 probes (the least disturbed by other work)."""
    spin = _spin()
    probe = 100_000
    per_iteration = min(_timed(spin, probe) for _ in range(5)) / probe
    iterations = max(1, round(work_ms / 1000 / per_iteration))
    return iterations, statistics.median(_timed(spin, iterations) * 1000 for _ in range(9))


def prepare(directory: Path, iterations: int, messages: int) -> Path:
    (directory / "scaling_handlers.py").write_text(HANDLERS.format(iterations=iterations, spin=SPIN))
    config = directory / "app.yaml"
    config.write_text(APP)
    with conveyor.load(config):
        queue.publish_many(QUEUE_ID, [{"n": n} for n in range(messages)])
    return config


def run_once(processes: int, number: int, iterations: int, messages: int, timeout: float) -> Run:
    with tempfile.TemporaryDirectory(prefix="conveyor-scaling-") as tmp:
        directory = Path(tmp)
        config = prepare(directory, iterations, messages)
        command = [sys.executable, "-m", "conveyor", "run", str(config), "--until-idle"]
        command += ["--idle-settle", "0.3", "--processes", str(processes), "--json", "--log-level", "WARNING"]
        started = time.monotonic()
        done = subprocess.run(
            command, cwd=directory, capture_output=True, text=True, timeout=timeout, check=False
        )
        wall = time.monotonic() - started
        if done.returncode != 0:
            raise BenchFailure(f"N={processes}: exit {done.returncode}:\n{done.stderr[-3000:]}")
        rows = [line.split() for line in (directory / "handled.txt").read_text().splitlines()]
        check(processes, json.loads(done.stdout), rows, messages)
    first = min(float(row[2]) for row in rows)
    last = max(float(row[3]) for row in rows)
    pids = len({row[1] for row in rows})
    return Run(processes, number, messages / (last - first), last - first, wall, pids)


def check(processes: int, summary: dict[str, Any], rows: list[list[str]], messages: int) -> None:
    handled = sorted(int(row[0]) for row in rows)
    if handled != list(range(messages)):
        missing = sorted(set(range(messages)) - set(handled))
        twice = len(handled) - len(set(handled))
        raise BenchFailure(f"N={processes}: {len(missing)} missing, {twice} handled twice")
    acked = summary["consumers"][CONSUMER_ID]["acked"]
    left = summary["queues"][QUEUE_ID]["message_count"]
    if acked != messages or left != 0:
        raise BenchFailure(f"N={processes}: summary says {acked} acked, {left} left in the queue")
    pids = len({row[1] for row in rows})
    if pids != processes:
        raise BenchFailure(f"N={processes}: {pids} process(es) handled messages")


def report(runs: Sequence[Run], info: dict[str, Any]) -> str:
    head = (
        f"conveyor run --processes N, CPU-bound sync handler, {dt.date.today().isoformat()}: "
        f"M={info['messages']:,} messages of ~{info['work_ms']:.1f} ms "
        f"({info['iterations']:,} loop iterations), {info['rounds']} rounds; "
        f"Python {info['python']}, {info['nproc']} CPUs; load average before: {info['loadavg_before']}"
    )
    lines = [head, f"command: {info['command']}", ""]
    lines.append(
        f"{'round':<6} {'order':<6} {'N=1 msgs/s':>11} {'N=2 msgs/s':>11} {'N=2/N=1':>8}   wall N=1 / N=2"
    )
    ones = {r.round: r for r in runs if r.processes == 1}
    twos = {r.round: r for r in runs if r.processes == 2}
    ratios = []
    for number in sorted(ones):
        one, two = ones[number], twos[number]
        ratios.append(two.rate / one.rate)
        order = "1, 2" if number % 2 else "2, 1"
        lines.append(
            f"{number:<6} {order:<6} {one.rate:>11,.1f} {two.rate:>11,.1f} {ratios[-1]:>8.2f}"
            f"   {one.wall:.1f} s / {two.wall:.1f} s"
        )
    one_median = statistics.median(r.rate for r in ones.values())
    two_median = statistics.median(r.rate for r in twos.values())
    lines.append(
        f"{'median':<13} {one_median:>11,.1f} {two_median:>11,.1f} {two_median / one_median:>8.2f}"
        f"   (median of the per-round ratios: {statistics.median(ratios):.2f})"
    )
    ideal = 1000 / info["work_ms"]
    lines.append("")
    lines.append(
        f"one handler's loop alone: {ideal:,.1f} msgs/s per process (1000 / {info['work_ms']:.1f} ms)"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=400, help="messages per run (default 400)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of N=1 and N=2, alternating (3)")
    parser.add_argument("--work-ms", type=float, default=10.0, help="handler CPU time per message (10)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take (300)")
    parser.add_argument("--json", type=Path, help="also write every run to this JSON file")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (a median of fewer runs is noise)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    iterations, measured = calibrate(args.work_ms)
    info = {
        "messages": args.messages,
        "rounds": args.rounds,
        "iterations": iterations,
        "work_ms": measured,
        "python": platform.python_version(),
        "nproc": os.cpu_count(),
        "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "command": " ".join([executable(), *(sys.argv if argv is None else [sys.argv[0], *argv])]),
    }
    progress(f"calibrated: {iterations:,} iterations = {measured:.2f} ms")
    runs: list[Run] = []
    try:
        for number in range(1, args.rounds + 1):
            for processes in (1, 2) if number % 2 else (2, 1):
                run = run_once(processes, number, iterations, args.messages, args.timeout)
                progress(f"round {number} N={processes}: {run.rate:,.1f} msgs/s ({run.wall:.1f} s)")
                runs.append(run)
    except BenchFailure as exc:
        print(f"correctness check failed: {exc}", file=sys.stderr)
        return 1
    print(report(runs, info))
    if args.json is not None:
        args.json.write_text(json.dumps({"info": info, "runs": [asdict(r) for r in runs]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
