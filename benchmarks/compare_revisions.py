"""Compare two checkouts of conveyor on one benchmark: before vs after a change.

Runs the same benchmark script (from this folder) with each checkout's interpreter —
``<checkout>/.venv/bin/python``, whose editable install imports that checkout's
``conveyor`` — alternating the order every round (before, after; after, before; ...),
a fresh process per run. Each run writes its figures as JSON; a run that fails or
writes no figures fails the comparison. The report gives, per figure, the median of
the rounds on each side and their ratio, and — where the run measured a raw baseline
in the same process — the ratio to that baseline, which cancels most of what the
machine was doing at the time.

    .venv/bin/python benchmarks/compare_revisions.py --before /tmp/old --after . --rounds 5 \\
        memory_throughput.py -- --only raw,conveyor --n 20000 --repeat 1

Scripts it understands: memory_throughput.py, sqlite_throughput.py (baseline: the
``raw`` row), lua_overhead.py (baseline: the Python handler of the same case), and
amqp_throughput.py (baseline: the raw client of the same benchmark, when run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

Figures = dict[str, float]


def _rates(doc: Any) -> Figures:
    """memory_throughput / sqlite_throughput: {"results": [{"name", "rate", ...}]}."""
    return {r["name"]: float(r["rate"]) for r in doc["results"] if r.get("rate")}


def _lua(doc: Any) -> Figures:
    out: Figures = {}
    for row in doc:
        out[f"{row['case']} c={row['concurrency']} python"] = float(row["python"])
        out[f"{row['case']} c={row['concurrency']} lua"] = float(row["lua"])
    return out


def _amqp(doc: Any) -> Figures:
    """amqp_throughput: throughput rows (latency rows, in ms, are left out)."""
    return {
        f"{r['bench']} {r['name']}": float(r["best"]) for r in doc if r.get("best") and r.get("p50") is None
    }


PARSERS: dict[str, Callable[[Any], Figures]] = {
    "memory_throughput.py": _rates,
    "sqlite_throughput.py": _rates,
    "lua_overhead.py": _lua,
    "amqp_throughput.py": _amqp,
}


def baseline_of(script: str, figure: str, figures: Figures) -> float | None:
    """The same-run baseline a figure is divided by, if the script measures one."""
    if script in ("memory_throughput.py", "sqlite_throughput.py"):
        raw = [v for k, v in figures.items() if k.startswith("raw")]
        return raw[0] if raw and not figure.startswith("raw") else None
    if script == "lua_overhead.py" and figure.endswith(" lua"):
        return figures.get(figure.removesuffix(" lua") + " python")
    if script == "amqp_throughput.py" and "raw" not in figure:
        bench = figure.split(" ", 1)[0]
        raw = [v for k, v in figures.items() if k.startswith(f"{bench} raw")]
        return raw[0] if raw else None
    return None


def run_once(checkout: Path, script: str, args: Sequence[str], timeout: float) -> Figures:
    python = checkout / ".venv" / "bin" / "python"
    with tempfile.TemporaryDirectory(prefix="conveyor-compare-") as tmp:
        out = Path(tmp) / "figures.json"
        command = [str(python), str(HERE / script), *args, "--json", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=tmp, check=False)
        if done.returncode != 0 or not out.exists():
            tail = f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            raise SystemExit(f"run failed ({checkout}, exit {done.returncode}):\n{tail}")
        figures = PARSERS[script](json.loads(out.read_text()))
    if not figures:
        raise SystemExit(f"run on {checkout} produced no figures")
    return figures


def compare(
    sides: tuple[Path, Path], script: str, args: Sequence[str], rounds: int, timeout: float
) -> dict[str, dict[str, list[Figures]]]:
    runs: dict[str, list[Figures]] = {"before": [], "after": []}
    for number in range(rounds):
        order = [("before", sides[0]), ("after", sides[1])]
        for side, checkout in order if number % 2 == 0 else reversed(order):
            started = time.monotonic()
            runs[side].append(run_once(checkout, script, args, timeout))
            print(f"round {number + 1}/{rounds} {side}: {time.monotonic() - started:.0f}s", file=sys.stderr)
    return {"runs": runs}


def report(script: str, runs: dict[str, list[Figures]]) -> str:
    names = [n for n in runs["before"][0] if all(n in f for side in runs.values() for f in side)]
    lines = [f"{'figure':<46} {'before':>12} {'after':>12} {'after/before':>12} {'vs baseline b/a':>17}"]
    for name in names:
        before = statistics.median(f[name] for f in runs["before"])
        after = statistics.median(f[name] for f in runs["after"])
        rel = []
        for side in ("before", "after"):
            ratios = [f[name] / b for f in runs[side] if (b := baseline_of(script, name, f))]
            rel.append(f"{statistics.median(ratios):.3f}" if ratios else "-")
        lines.append(
            f"{name:<46} {before:>12,.0f} {after:>12,.0f} {after / before:>12.3f} {' / '.join(rel):>17}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", type=Path, required=True, help="checkout with a .venv (the baseline)")
    parser.add_argument("--after", type=Path, required=True, help="checkout with a .venv (the change)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side, alternating (default 3)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    parser.add_argument("script", choices=sorted(PARSERS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="after --: the script's own arguments")
    opts = parser.parse_args(argv)
    if opts.rounds < 3:
        parser.error("--rounds must be at least 3 (medians of fewer runs are noise)")
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    sides = (opts.before.resolve(), opts.after.resolve())
    result = compare(sides, opts.script, args, opts.rounds, opts.timeout)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"command: {command}\nrounds: {opts.rounds} per side, alternating; medians\n")
    print(report(opts.script, result["runs"]))
    if opts.json is not None:
        opts.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
