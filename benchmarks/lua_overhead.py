"""Per-message overhead of a Lua handler versus a Python sync handler (memory driver).

Each case builds two apps — a memory-driver queue and one consumer whose handler is a
Python ``def`` in one app and a ``function.lua`` entry in the other — and starts both.
A run publishes N messages with ``queue.apublish_many`` (batches of 500) into the
idle, attached consumer and ends when it has acked all N; runs alternate between the
two apps (python, lua, python, ...) so that drift on the machine hits both alike. The
figures are messages per second end to end, the median of ``--repeat`` runs.

Cases, each at every ``--concurrency`` value:

- ``noop``: the handler does nothing (Python ``pass``; Lua ``function noop(p) end``),
- ``context``: the handler reads the delivery context as the example handlers do
  (``queue.message()``, the message ID, one header, one payload field),
- ``context+timeout``: ``context`` with ``timeout: 30s`` on the consumer, so the Lua
  deadline hook is armed for every call.

The Lua overhead per message is ``1/median_lua - 1/median_python`` in microseconds.

A second table shows what an armed deadline costs CPU-bound Lua code: a loop of
``--loop`` iterations called directly (no queue), best of ``--repeat``, without and
with a deadline (Lua 5.4 checks hooks on every instruction once one is set).

    .venv/bin/python benchmarks/lua_overhead.py [--n 20000] [--repeat 5] [--concurrency 1 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import conveyor
from conveyor import queue
from conveyor.queue import context as qctx

# The YAML imports the Python handlers as `lua_overhead:...`: make that this module.
sys.modules.setdefault("lua_overhead", sys.modules[__name__])

NAMESPACE = "bench"
QUEUE_ID = f"{NAMESPACE}:q"
CONSUMER_ID = f"{NAMESPACE}:worker"
BATCH = 500
CASES = ("noop", "context", "context+timeout")

LUA_SOURCE = """\
function noop(payload) end

function spin(n)
    local s = 0
    for i = 1, n do s = s + i % 7 end
    return s
end

function context(payload)
    local msg = queue.message()
    local id = msg:id()
    local priority = msg:header("priority")
    local n = payload.n
end
"""


def noop(payload: Any) -> None:
    return None


def context(payload: Any) -> None:
    msg = queue.message()
    _ = (msg.id, msg.header("priority"), payload["n"])


@dataclass
class Row:
    case: str
    concurrency: int
    python_runs: list[float]  # msgs/s of every run
    lua_runs: list[float]

    @property
    def python(self) -> float:
        return statistics.median(self.python_runs)

    @property
    def lua(self) -> float:
        return statistics.median(self.lua_runs)

    @property
    def overhead_us(self) -> float:
        """Extra time per message of the Lua handler, from the medians."""
        return (1 / self.lua - 1 / self.python) * 1e6


def write_app(directory: Path, language: str, case: str, concurrency: int) -> Path:
    handler = case.partition("+")[0]
    consumer: dict[str, Any] = {
        "name": "worker",
        "kind": "queue.consumer",
        "queue": "q",
        "concurrency": concurrency,
        "prefetch": max(10, 2 * concurrency),
    }
    if case.endswith("+timeout"):
        consumer["timeout"] = "30s"
    entries: list[dict[str, Any]] = [
        {"name": "mem", "kind": "queue.driver.memory"},
        {"name": "q", "kind": "queue.queue", "driver": "mem"},
        consumer,
    ]
    if language == "python":
        consumer["handler"] = f"lua_overhead:{handler}"
    else:
        (directory / "handlers.lua").write_text(LUA_SOURCE)
        consumer["func"] = "lua_handler"
        lua = {
            "name": "lua_handler",
            "kind": "function.lua",
            "source": "file://handlers.lua",
            "method": handler,
        }
        entries.append(lua)
    path = directory / f"{language}-{case}-c{concurrency}.yaml"
    path.write_text(yaml.safe_dump({"version": "1.0", "namespace": NAMESPACE, "entries": entries}))
    return path


@contextmanager
def entered(app: conveyor.App) -> Iterator[None]:
    """Make ``app`` the current app (two are started, so neither is current by default).

    What is current is the app's queue runtime; checkouts older than the runtime's
    split made the App itself current, and ``compare_revisions.py`` runs this script
    against those too.
    """
    var: Any = getattr(qctx, "entered", None) or getattr(qctx, "entered_app")  # noqa: B009
    token = var.set(getattr(app, "runtime", app))
    try:
        yield
    finally:
        var.reset(token)


def _acked(app: conveyor.App) -> int:
    return app.stats()[CONSUMER_ID]["acked"]


async def _once(app: conveyor.App, n: int, timeout: float) -> float:
    """msgs/s of one run: publish ``n`` messages, wait until all are acked."""
    target = _acked(app) + n
    start = time.perf_counter()
    with entered(app):
        for low in range(0, n, BATCH):
            items = [{"n": i, "action": "send_email"} for i in range(low, min(n, low + BATCH))]
            await queue.apublish_many(QUEUE_ID, items, {"priority": "high"})
    while _acked(app) < target:
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"{target - _acked(app)} of {n} messages still unacked after {timeout:g}s")
        await asyncio.sleep(0.0005)
    return n / (time.perf_counter() - start)


async def _pair(paths: Sequence[Path], n: int, repeat: int, timeout: float) -> list[list[float]]:
    apps = [conveyor.load(path) for path in paths]
    for app in apps:
        await app.astart(consumers=True)
    await asyncio.sleep(0.05)  # workers idle and waiting before the first publish
    rates: list[list[float]] = [[] for _ in apps]
    try:
        for _ in range(repeat):
            for app, runs in zip(apps, rates, strict=True):
                runs.append(await _once(app, n, timeout))
    finally:
        for app in apps:
            await app.astop(5.0)
    return rates


def run(opts: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="conveyor-lua-bench-") as tmp:
        for concurrency in opts.concurrency:
            for case in CASES:
                paths = [write_app(Path(tmp), lang, case, concurrency) for lang in ("python", "lua")]
                python, lua = asyncio.run(_pair(paths, opts.n, opts.repeat, opts.timeout))
                rows.append(Row(case, concurrency, python, lua))
                print(f"  {case} c={concurrency} done", file=sys.stderr)
    return rows


def cpu_loop(opts: argparse.Namespace) -> tuple[float, float]:
    """Seconds for ``spin(--loop)`` without and with an armed deadline (best of --repeat)."""
    from conveyor.lua import load_function
    from conveyor.registry.model import FunctionSpec

    with tempfile.TemporaryDirectory(prefix="conveyor-lua-bench-") as tmp:
        source = Path(tmp) / "handlers.lua"
        source.write_text(LUA_SOURCE)
        spec = FunctionSpec(id="bench:spin", kind="function.lua", source=str(source), method="spin")
        spin = load_function(spec)
        timings: list[float] = []
        for deadline in (None, time.monotonic() + 3600):
            token = qctx.deadline_var.set(deadline)
            try:
                timings.append(min(_timed(spin, opts.loop) for _ in range(opts.repeat)))
            finally:
                qctx.deadline_var.reset(token)
    return timings[0], timings[1]


def _timed(fn: Any, n: int) -> float:
    start = time.perf_counter()
    fn(n)
    return time.perf_counter() - start


def cpu_report(plain: float, armed: float, loop: int) -> str:
    return (
        f"CPU-bound Lua ({loop:,}-iteration loop, best run): {plain:.3f}s without a deadline, "
        f"{armed:.3f}s with one armed ({armed / plain:.2f}x)"
    )


def report(rows: Sequence[Row], opts: argparse.Namespace, command: str) -> str:
    head = (
        f"Lua vs Python sync handler, memory driver: N={opts.n:,} per run, median of {opts.repeat} runs; "
        f"Python {platform.python_version()}, {platform.machine()}"
    )
    lines = [head, f"command: {command}", ""]
    lines.append(
        f"{'case':<16} {'c':>2} {'python msgs/s':>14} {'lua msgs/s':>11} {'lua/py':>6} {'overhead':>9}"
        "  runs python | lua (msgs/s)"
    )
    for r in rows:
        spread = (
            " ".join(f"{x:,.0f}" for x in r.python_runs) + " | " + " ".join(f"{x:,.0f}" for x in r.lua_runs)
        )
        lines.append(
            f"{r.case:<16} {r.concurrency:>2} {r.python:>14,.0f} {r.lua:>11,.0f} "
            f"{r.lua / r.python:>6.2f} {r.overhead_us:>7.1f}us  {spread}"
        )
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Per-message overhead of Lua handlers vs Python ones.")
    parser.add_argument("--n", type=int, default=20_000, help="messages per run (default 20000)")
    parser.add_argument(
        "--repeat", type=int, default=5, help="runs per handler; the median counts (default 5)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="default: 1 4")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run before giving up")
    parser.add_argument(
        "--loop", type=int, default=20_000_000, help="iterations of the CPU loop (default 2e7)"
    )
    parser.add_argument("--json", type=Path, help="also write the handler results to this JSON file")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU-loop measurement")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    command = " ".join([".venv/bin/python", *sys.argv]) if argv is None else "main(...)"
    rows = run(opts)
    print(report(rows, opts, command))
    if opts.json is not None:
        doc = [{"case": r.case, "concurrency": r.concurrency, "python": r.python, "lua": r.lua} for r in rows]
        opts.json.write_text(json.dumps(doc, indent=2) + "\n")
    if not opts.no_cpu:
        print()
        print(cpu_report(*cpu_loop(opts), opts.loop))
    return 0


if __name__ == "__main__":
    sys.exit(main())
