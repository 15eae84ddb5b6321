"""What the throughput benchmarks share: result rows, target checks, reporting helpers.

Imported by the scripts in this folder (run as ``python benchmarks/<script>.py``, which
puts this folder on ``sys.path``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BenchTimeout",
    "Check",
    "PeerMissing",
    "Result",
    "check_target",
    "executable",
    "payload",
    "progress",
    "rate_or_reason",
]


class BenchTimeout(Exception):
    """A run did not finish within ``--timeout`` seconds."""


class PeerMissing(Exception):
    """A peer library could not be imported."""


def payload(i: int) -> dict[str, Any]:
    """The message every benchmark sends (a small, typical task payload)."""
    return {"n": i, "action": "send_email", "user_id": 456, "template": "welcome"}


@dataclass
class Result:
    key: str
    name: str
    rate: float | None = None  # msgs/s of the best run
    runs: list[float] = field(default_factory=list)  # msgs/s of every run
    note: str = ""
    status: str = "ok"  # ok | not installed | error: ...


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str


def rate_or_reason(what: str, row: Result | None) -> float | str:
    if row is None:
        return f"{what} not measured"
    return row.rate if row.rate is not None else f"{what} {row.status}"


def check_target(name: str, value: Result | None, factor: float, base: Result | None) -> Check:
    ours, theirs = rate_or_reason("conveyor", value), rate_or_reason("baseline", base)
    if isinstance(ours, str) or isinstance(theirs, str):
        return Check(name, "SKIP", ours if isinstance(ours, str) else str(theirs))
    needed = factor * theirs
    status = "PASS" if ours >= needed else "FAIL"
    return Check(name, status, f"{ours:,.0f} msgs/s = {ours / theirs:.2f}x (needs >= {needed:,.0f})")


def executable() -> str:
    relative = os.path.relpath(sys.executable)
    return sys.executable if relative.startswith("..") else relative


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
