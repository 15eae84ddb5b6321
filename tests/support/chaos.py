"""Chaos runs for the durable drivers: kill and restart workers and publishers, then audit.

A run writes an app directory (one YAML file: the driver, a source queue with a
dead-letter queue, a consumer on each, an ``on_start`` readiness marker), starts
``conveyor run APP_DIR`` workers and publisher processes (tests/support/chaos_procs.py),
and for a bounded time picks a process at random every 0.3-1.5 s and stops it with
SIGKILL or SIGTERM, starting a replacement at once. Then it stops everything, drains
both queues with ``conveyor run --until-idle`` and audits the files the children
wrote (:class:`Audit`): every confirmed publish was handled or dead-lettered (lost),
nothing arrived that was never published (unexpected), duplicates are counted and
bounded by what the killed workers can have held, dead-lettered copies carry the
runtime's headers, a message whose handler died with its process came back with its
attempt count raised, and acks given by workers that were not killed held. The checks
are listed in docs/chaos.md.

The run is bounded by ``CONVEYOR_CHAOS_SECONDS`` (default 12) and driven by one seed,
``CONVEYOR_CHAOS_SEED`` (default: a fresh one), printed at the start so that a failing
schedule can be replayed (process timing still varies from run to run).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from tests.support.chaos_procs import MAX_ATTEMPTS, POISON, plan
from tests.support.waiting import wait_until

__all__ = [
    "CONCURRENCY",
    "PREFETCH",
    "SOURCE",
    "Audit",
    "Call",
    "Fleet",
    "Settings",
    "chaos_run",
    "chaos_timeout",
    "write_app",
]

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "chaos"
SOURCE = f"{NAMESPACE}:jobs"
CONCURRENCY = 4
PREFETCH = 8
DLQ_PREFETCH = 4
GRACE = 5.0  # --grace of the workers
STOP_LIMIT = GRACE + 60.0  # a gracefully stopped process that is still running then is hung
DRAIN_LIMIT = 240.0  # one drain (`conveyor run --until-idle --timeout 180`) that takes longer is hung
DRAIN_ROUNDS = 2
WORKERS = 2
PUBLISHERS = 2


def say(text: str) -> None:
    print(f"[chaos] {text}", flush=True)


# -- settings ------------------------------------------------------------------------------


def _seconds() -> float:
    raw = os.environ.get("CONVEYOR_CHAOS_SECONDS", "12")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"CONVEYOR_CHAOS_SECONDS must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"CONVEYOR_CHAOS_SECONDS must be > 0, got {raw!r}")
    return value


def chaos_timeout() -> int:
    """The pytest timeout of one chaos test: longer than the chaos (which a starved
    machine stretches), the stop and every drain at their limits, so that the run's own
    diagnostics (log tails, tracebacks) come first."""
    return int(_seconds() * 2 + STOP_LIMIT + DRAIN_ROUNDS * DRAIN_LIMIT + 120)


@dataclass(frozen=True)
class Settings:
    seconds: float
    seed: int

    @classmethod
    def from_env(cls) -> Settings:
        raw = os.environ.get("CONVEYOR_CHAOS_SEED")
        seed = int(raw) if raw else random.SystemRandom().randrange(2**32)
        return cls(_seconds(), seed)


# -- the app -------------------------------------------------------------------------------


def write_app(app_dir: Path, driver: dict[str, Any], queue_fields: dict[str, Any] | None = None) -> Path:
    """Write the chaos app into ``app_dir`` (created) and return the directory."""
    app_dir.mkdir(parents=True, exist_ok=True)
    extra = queue_fields or {}
    entries: list[dict[str, Any]] = [
        {"name": "store", **driver},
        {
            "name": "jobs",
            "kind": "queue.queue",
            "driver": "store",
            "dead_letter": {"queue": "jobs_dlq", "max_attempts": MAX_ATTEMPTS},
            "retry": {"delay": "50ms", "backoff": 2.0, "max_delay": "400ms"},
            **extra.get("jobs", {}),
        },
        {"name": "jobs_dlq", "kind": "queue.queue", "driver": "store", **extra.get("jobs_dlq", {})},
        {
            "name": "worker",
            "kind": "queue.consumer",
            "queue": "jobs",
            "handler": "tests.support.chaos_procs:handle",
            "concurrency": CONCURRENCY,
            "prefetch": PREFETCH,
        },
        {
            "name": "dead_letters",
            "kind": "queue.consumer",
            "queue": "jobs_dlq",
            "handler": "tests.support.chaos_procs:read_dead_letter",
            "prefetch": DLQ_PREFETCH,
        },
        {
            "name": "ready",
            "kind": "function.python",
            "source": "tests.support.chaos_procs:ready",
            "lifecycle": {"on_start": True},
        },
    ]
    doc = {"version": "1.0", "namespace": NAMESPACE, "entries": entries}
    (app_dir / "conveyor.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return app_dir


# -- processes -----------------------------------------------------------------------------


@dataclass
class Proc:
    role: str  # "worker" or "publisher"
    tag: str
    popen: subprocess.Popen[bytes]
    log: Path
    signal: str | None = None  # "KILL" or "TERM" once the chaos (or the end of the run) sent one
    signalled_at: float = 0.0
    ended: float | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Fleet:
    """The workers and publishers of one run, and what was done to them."""

    app_dir: Path
    out: Path
    rng: random.Random
    procs: list[Proc] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    _generation: int = 0

    def env(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "PYTHONPATH": path, "CONVEYOR_CHAOS_OUT": str(self.out)}

    def _spawn(self, role: str, argv: list[str]) -> Proc:
        self._generation += 1
        tag = f"{role[0]}{self._generation}"
        log = self.out / f"{tag}.log"
        with open(log, "wb") as sink:
            popen = subprocess.Popen(
                argv, cwd=self.out, env=self.env(), stdout=sink, stderr=subprocess.STDOUT
            )
        proc = Proc(role, tag, popen, log)
        self.procs.append(proc)
        self.event(f"start {tag} {role} pid {popen.pid}")
        return proc

    def event(self, text: str) -> None:
        """Note what the run did, with the wall clock the children stamp their lines with."""
        with open(self.out / "events.txt", "a") as f:
            f.write(f"{time.time():.6f}\t{text}\n")

    def worker_argv(self, *extra: str) -> list[str]:
        # -X faulthandler: SIGABRT makes a hung process print every thread's traceback
        command = [sys.executable, "-X", "faulthandler", "-m", "conveyor", "run", str(self.app_dir)]
        return [*command, "--grace", f"{GRACE:g}", *extra]

    def spawn_worker(self) -> Proc:
        return self._spawn("worker", self.worker_argv())

    def spawn_publisher(self) -> Proc:
        tag = f"p{self._generation + 1}"
        module = [sys.executable, "-X", "faulthandler", "-m", "tests.support.chaos_procs"]
        argv = [*module, "publish", str(self.app_dir), SOURCE, tag]
        return self._spawn("publisher", [*argv, str(self.rng.randrange(2**32))])

    def live(self, role: str) -> list[Proc]:
        return [p for p in self.procs if p.role == role and p.signal is None]

    def ready(self, proc: Proc) -> bool:
        return (self.out / f"ready-{proc.pid}").exists() and proc.popen.poll() is None

    def send(self, proc: Proc, how: str) -> None:
        proc.signal = how
        proc.signalled_at = time.monotonic()
        self.counts[f"{proc.role}_{how.lower()}"] += 1
        self.event(f"SIG{how} {proc.tag} {proc.role} pid {proc.pid}")
        with contextlib.suppress(ProcessLookupError):
            proc.popen.send_signal(signal.SIGKILL if how == "KILL" else signal.SIGTERM)

    def unexpected_exits(self) -> list[Proc]:
        """Processes that ended without being told to."""
        return [p for p in self.procs if p.signal is None and p.popen.poll() is not None]

    def reap(self) -> None:
        now = time.monotonic()
        for proc in self.procs:
            if proc.signal is not None and proc.ended is None and proc.popen.poll() is not None:
                proc.ended = now

    def wait_all(self, limit: float = STOP_LIMIT) -> None:
        """Wait for every process; one still running after ``limit`` gets SIGABRT, so that
        its log shows where every thread was (it is then reported as hung)."""
        deadline = time.monotonic() + limit
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
        self.reap()
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGABRT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(30)

    def stop_all(self) -> None:
        """The end of the chaos: SIGTERM every ready process, SIGKILL the others, wait."""
        for proc in self.procs:
            if proc.signal is None:
                self.send(proc, "TERM" if self.ready(proc) else "KILL")
        self.wait_all()

    def close(self) -> None:
        """Teardown: nothing of this run survives it."""
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait(30)

    def stop_problems(self) -> list[str]:
        """A graceful stop must end with exit code 0 within the limit; a kill with SIGKILL."""
        problems = []
        for proc in self.procs:
            rc = proc.popen.returncode
            if proc.signal == "TERM":
                took = (proc.ended or time.monotonic()) - proc.signalled_at
                if rc != 0 or took > STOP_LIMIT:
                    problems.append(
                        f"{proc.tag} ({proc.role}, pid {proc.pid}) SIGTERM: rc={rc} after {took:.1f}s\n"
                        + proc.tail()
                    )
            elif proc.signal == "KILL" and rc != -signal.SIGKILL:
                problems.append(f"{proc.tag} ({proc.role}, pid {proc.pid}) SIGKILL: rc={rc}\n{proc.tail()}")
        return problems

    def worker_pids(self, how: str) -> set[int]:
        """The pids of the workers stopped with SIGKILL (``how="KILL"``) or SIGTERM."""
        return {p.pid for p in self.procs if p.role == "worker" and p.signal == how}


# -- the chaos -----------------------------------------------------------------------------

ACTIONS = ("worker KILL", "worker TERM", "publisher KILL", "publisher TERM")
WEIGHTS = (4, 2, 3, 1)


def _act(fleet: Fleet, action: str) -> bool:
    """Stop one process as ``action`` says and start its replacement; False if none fits yet."""
    role, how = action.split()
    candidates = fleet.live(role)
    if how == "TERM":  # only a process that has installed its signal handling stops gracefully
        candidates = [p for p in candidates if fleet.ready(p)]
    if not candidates:
        return False
    victim = fleet.rng.choice(candidates)
    fleet.send(victim, how)
    if role == "worker":
        fleet.spawn_worker()
    else:
        fleet.spawn_publisher()
    return True


def run_chaos(fleet: Fleet, seconds: float) -> None:
    """Start the fleet and stop/restart its processes at random for ``seconds``."""
    for _ in range(WORKERS):
        fleet.spawn_worker()
    for _ in range(PUBLISHERS):
        fleet.spawn_publisher()
    pending = list(ACTIONS)  # every kind of fault happens at least once (when time allows)
    fleet.rng.shuffle(pending)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(fleet.rng.uniform(0.3, 1.5))
        fleet.reap()
        gone = fleet.unexpected_exits()
        assert not gone, "\n".join(
            f"{p.tag} ({p.role}) exited by itself: rc={p.popen.returncode}\n{p.tail()}" for p in gone
        )
        action = pending[0] if pending else fleet.rng.choices(ACTIONS, WEIGHTS)[0]
        if _act(fleet, action) and pending and action == pending[0]:
            pending.pop(0)
    missing = [a for a in ACTIONS if not fleet.counts[a.replace(" ", "_").lower()]]
    assert not missing, f"the run was too short to inject {missing}: raise CONVEYOR_CHAOS_SECONDS"


def _run_drain(fleet: Fleet, round_: int) -> dict[str, Any]:
    """One ``conveyor run --until-idle``; its JSON summary. A drain still running after
    DRAIN_LIMIT gets SIGABRT first, so that its log shows where every thread was."""
    log = fleet.out / f"drain{round_}.log"
    argv = fleet.worker_argv("--until-idle", "--idle-settle", "2", "--timeout", "180", "--json")
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, cwd=fleet.out, env=fleet.env(), stdout=subprocess.PIPE, stderr=err)
    try:
        stdout, _ = proc.communicate(timeout=DRAIN_LIMIT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=30)
        proc.kill()
        proc.communicate()
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        raise AssertionError(
            f"drain {round_} still running after {DRAIN_LIMIT:g}s; its log ends:\n{tail}"
        ) from None
    text = log.read_text(errors="replace")[-3000:]
    assert proc.returncode == 0, f"drain {round_} exited {proc.returncode}: {stdout!r}\n{text}"
    summary: dict[str, Any] = json.loads(stdout)
    return summary


def drain(fleet: Fleet, remaining: Callable[[], dict[str, int]], rounds: int = DRAIN_ROUNDS) -> None:
    """``conveyor run --until-idle`` until nothing is left anywhere (``remaining()`` reads the
    store or broker directly, delay queues included). A broker may apply the last acks a
    moment after the drain exits, so the counts get a few seconds to settle first."""
    for round_ in range(1, rounds + 1):
        summary = _run_drain(fleet, round_)
        counts = {qid: info.get("message_count") for qid, info in summary["queues"].items()}
        keys = ("delivered", "acked", "failed", "dead_lettered")
        stats = {cid: {k: s.get(k) for k in keys} for cid, s in summary["consumers"].items()}
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not any(remaining().values()), timeout=10, interval=0.5)
        left = {name: n for name, n in remaining().items() if n}
        say(f"drain {round_}: {stats}; queues at its end {counts}; left: {left or 'nothing'}")
        if not left:
            return
    raise AssertionError(f"messages left after {rounds} drains: {remaining()}")


# -- the audit -----------------------------------------------------------------------------


def _lines(path: Path) -> list[str]:
    text = path.read_text()
    return [line.rstrip("\n") for line in text.splitlines(keepends=True) if line.endswith("\n")]


class Call(NamedTuple):
    """One line a handler wrote: ``start``, ``ok`` or ``fail`` (source queue), ``dead`` (DLQ)."""

    kind: str
    at: float  # wall clock, seconds
    msg_id: str
    lid: str  # the ledger id
    attempt: int
    pid: int
    headers: dict[str, Any]  # the delivery's headers (``dead`` lines only)


@dataclass
class Audit:
    """What the children wrote, and the checks over it."""

    intended: set[str]  # every id a publisher was about to publish
    confirmed: set[str]  # every id whose publish returned
    calls: list[Call]  # source-queue handler lines
    dead: list[Call]  # dead-letter queue deliveries
    report: list[str] = field(default_factory=list)  # the numbers, written by check()

    @classmethod
    def read(cls, out: Path) -> Audit:
        intended = {i for path in out.glob("intent-*.txt") for i in _lines(path)}
        confirmed = {i for path in out.glob("ledger-*.txt") for i in _lines(path)}
        calls: list[Call] = []
        dead: list[Call] = []
        for path in out.glob("deliveries-*.txt"):
            pid = int(path.stem.split("-")[1])
            for line in _lines(path):
                at, kind, msg_id, lid, attempt, *rest = line.split("\t")
                headers = json.loads(rest[0]) if rest else {}
                call = Call(kind, float(at), msg_id, lid, int(attempt), pid, headers)
                (dead if kind == "dead" else calls).append(call)
        return cls(intended, confirmed, calls, dead)

    def count(self, kind: str) -> Counter[str]:
        return Counter(c.lid for c in self.calls if c.kind == kind)

    def check(self, killed: set[int], duplicate_bound: int, *, copies: bool) -> list[str]:
        """Every problem found (empty when the run is clean); the numbers go to ``report``.

        ``killed``: the pids of the workers stopped with SIGKILL. ``copies``: a kill can
        leave two copies of one message (AMQP: a retry or a recount is a confirmed
        republish, then an ack of the original); the checks that assume one copy then
        cover only :meth:`single_copy_ids`.
        """
        problems: list[str] = []
        ok, fail, start = self.count("ok"), self.count("fail"), self.count("start")
        dead_ids = Counter(c.lid for c in self.dead)
        seen = set(start) | set(dead_ids)

        lost = self.confirmed - set(ok) - set(dead_ids)
        unexpected = seen - self.intended
        if lost:
            problems.append(
                f"lost: {len(lost)} confirmed publishes never handled nor dead-lettered: {sorted(lost)[:10]}"
            )
        if unexpected:
            problems.append(
                f"unexpected: {len(unexpected)} ids that were never published: {sorted(unexpected)[:10]}"
            )

        msg_ids: dict[str, set[str]] = defaultdict(set)
        for c in self.calls + self.dead:
            msg_ids[c.lid].add(c.msg_id)
        split = {lid: ids for lid, ids in msg_ids.items() if len(ids) > 1}
        if split:
            problems.append(
                f"{len(split)} published messages came under several message ids: {list(split.items())[:5]}"
            )

        beyond = [c for c in self.calls if not 1 <= c.attempt <= MAX_ATTEMPTS]
        if beyond:
            problems.append(f"handler ran with attempts outside 1..{MAX_ATTEMPTS}: {beyond[:5]}")

        problems += self._check_plan(ok, dead_ids)
        problems += self._check_dead_letters()
        problems += self._check_cut_off(killed)
        single = self.single_copy_ids(killed) if copies else set(msg_ids)
        problems += self._check_acks_hold(killed, single)
        problems += self._check_one_holder(single)

        duplicates = sum(n - 1 for n in ok.values() if n > 1)
        dead_repeats = sum(n - 1 for n in dead_ids.values() if n > 1)
        unknown = self.intended - self.confirmed
        retried_ok = sum(1 for c in self.calls if c.kind == "ok" and c.attempt > 1 and plan(c.lid)[0] >= 1)
        exhausted = sum(1 for c in self.dead if _reason(c).startswith("attempts exhausted"))
        self.report.append(
            f"published: {len(self.intended)} attempted, {len(self.confirmed)} confirmed, "
            f"{len(unknown)} unconfirmed (of which {len(unknown & seen)} arrived anyway)"
        )
        self.report.append(
            f"handled: {len(ok)} ids, {sum(start.values())} handler calls, {sum(fail.values())} planned "
            f"failures, {retried_ok} successes after a failure; dead-lettered: {len(dead_ids)} ids "
            f"({exhausted} with attempts exhausted)"
        )
        self.report.append(
            f"lost: {len(lost)}, unexpected: {len(unexpected)}, duplicates: {duplicates} extra successful "
            f"handler calls, {dead_repeats} dead letters delivered again (bound {duplicate_bound})"
        )
        if duplicates + dead_repeats > duplicate_bound:
            worst = sorted(((n, lid) for lid, n in ok.items() if n > 1), reverse=True)[:5]
            problems.append(
                f"duplicates {duplicates} + {dead_repeats} exceed the bound {duplicate_bound}: {worst}"
            )
        if not self.confirmed or not retried_ok or not dead_ids:
            problems.append(
                f"the run exercised too little: {len(self.confirmed)} confirmed, {retried_ok} retried, "
                f"{len(dead_ids)} dead-lettered"
            )
        return problems

    def _check_plan(self, ok: Counter[str], dead_ids: Counter[str]) -> list[str]:
        """A poison message is never handled successfully and always ends dead-lettered."""
        poison = {lid for lid in self.confirmed if plan(lid)[0] == POISON}
        handled = sorted(lid for lid in ok if plan(lid)[0] == POISON)
        missing = sorted(poison - set(dead_ids))
        problems = []
        if handled:
            problems.append(f"poison messages reported as handled: {handled[:5]}")
        if missing:
            problems.append(f"confirmed poison messages not dead-lettered: {missing[:5]}")
        return problems

    def _check_dead_letters(self) -> list[str]:
        """Each dead-lettered copy carries the runtime's headers, consistent with its story."""
        problems = []
        for c in self.dead:
            headers = c.headers
            reason = headers.get("x_dead_letter_reason")
            attempts = headers.get("attempts")
            stamp = headers.get("x_dead_letter_time")
            bad = []
            if headers.get("x_original_queue") != SOURCE:
                bad.append(f"x_original_queue={headers.get('x_original_queue')!r}")
            if not isinstance(stamp, str) or not stamp.endswith("Z") or not _is_time(stamp):
                bad.append(f"x_dead_letter_time={stamp!r}")
            if not isinstance(reason, str) or not isinstance(attempts, int):
                bad.append(f"x_dead_letter_reason={reason!r} attempts={attempts!r}")
            elif reason.startswith("attempts exhausted"):
                if attempts <= MAX_ATTEMPTS:
                    bad.append(f"exhausted after only {attempts} attempts")
            elif reason.startswith("PlannedFailure: "):
                # a failure moves a message only at the last attempt, and only poison fails then
                if attempts != MAX_ATTEMPTS or plan(c.lid)[0] != POISON:
                    bad.append(
                        f"failure at attempt {attempts} dead-lettered it (plan: {plan(c.lid)[0]} failures)"
                    )
            else:
                bad.append(f"unknown reason {reason!r}")
            if bad:
                problems.append(f"dead letter {c.msg_id} ({c.lid}): {'; '.join(bad)}; headers {headers}")
        return problems[:10]

    def _ends(self) -> dict[tuple[str, int, int], list[Call]]:
        ends: dict[tuple[str, int, int], list[Call]] = defaultdict(list)
        for c in self.calls:
            if c.kind in ("ok", "fail"):
                ends[c.lid, c.attempt, c.pid].append(c)
        return ends

    def _check_cut_off(self, killed: set[int]) -> list[str]:
        """A handler call that never ended died with its (killed) process, and its message
        came back with a higher attempt (or was dead-lettered as exhausted)."""
        ends = self._ends()
        highest: dict[str, int] = defaultdict(int)
        for c in self.calls:
            highest[c.lid] = max(highest[c.lid], c.attempt)
        for c in self.dead:
            attempts = c.headers.get("attempts")
            if isinstance(attempts, int):
                highest[c.lid] = max(highest[c.lid], attempts)
        cut = [c for c in self.calls if c.kind == "start" and not ends.get((c.lid, c.attempt, c.pid))]
        problems = []
        for c in cut:
            if c.pid not in killed:
                problems.append(
                    f"handler of {c.lid} (attempt {c.attempt}) in pid {c.pid} never ended; not killed"
                )
            elif highest[c.lid] <= c.attempt:
                problems.append(
                    f"{c.lid} cut off at attempt {c.attempt} by a kill never came back with a higher one"
                )
        self.report.append(
            f"handler calls cut off by a kill: {len(cut)}; each message came back with its attempt raised"
        )
        return problems[:10]

    def single_copy_ids(self, killed: set[int]) -> set[str]:
        """The ids whose records show no trace of a kill, so no second copy can exist:
        no handler call on them ran in a killed worker, and their handler calls have the
        attempts 1, 2, 3, ... each once. (A kill between a republish and the ack of the
        original leaves two copies; a kill of a worker that only held the message in its
        prefetch buffer uses an attempt that no handler call has: a gap.)"""
        touched = {c.lid for c in self.calls if c.pid in killed}
        attempts: dict[str, list[int]] = defaultdict(list)
        for c in self.calls:
            if c.kind == "start":
                attempts[c.lid].append(c.attempt)
        return {
            lid
            for lid, seen in attempts.items()
            if lid not in touched and sorted(seen) == list(range(1, len(seen) + 1))
        }

    def _check_acks_hold(self, killed: set[int], ids: set[str]) -> list[str]:
        """A message handled successfully by a worker that was not killed (it went on, or
        stopped gracefully) is never handed out again: its ack was not lost."""
        finished: dict[str, Call] = {}
        for c in sorted(self.calls, key=lambda c: c.at):
            if c.kind == "ok" and c.pid not in killed and c.lid in ids:
                finished.setdefault(c.lid, c)
        again = [
            (c.lid, finished[c.lid].pid, c.pid)
            for c in self.calls
            if c.kind == "start" and c.lid in finished and c.at > finished[c.lid].at
        ]
        if again:
            return [
                f"handled again after a worker that was not killed finished it (id, pid, pid): {again[:5]}"
            ]
        return []

    def _check_one_holder(self, ids: set[str]) -> list[str]:
        """No two handler calls on one message overlap in time (one live holder at a time)."""
        ends = {key: sorted(v, key=lambda c: c.at) for key, v in self._ends().items()}
        spans: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
        taken: Counter[tuple[str, int, int]] = Counter()
        for c in sorted(self.calls, key=lambda c: c.at):
            key = (c.lid, c.attempt, c.pid)
            if c.kind == "start" and c.lid in ids and taken[key] < len(ends.get(key, [])):
                spans[c.lid].append((c.at, ends[key][taken[key]].at, c.pid))
                taken[key] += 1
        overlaps = []
        for lid, found in spans.items():
            found.sort()
            for (_s1, e1, p1), (s2, _e2, p2) in itertools.pairwise(found):
                if s2 < e1:
                    overlaps.append((lid, p1, p2))
        if overlaps:
            return [f"handler calls on one message overlapped (id, pid, pid): {overlaps[:5]}"]
        return []


def _reason(call: Call) -> str:
    return str(call.headers.get("x_dead_letter_reason", ""))


def _is_time(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


# -- one run ---------------------------------------------------------------------------------


@contextlib.contextmanager
def fleet_of(app_dir: Path, out: Path, seed: int) -> Iterator[Fleet]:
    out.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(app_dir, out, random.Random(seed))
    try:
        yield fleet
    finally:
        fleet.close()


def chaos_run(
    app_dir: Path,
    out: Path,
    remaining: Callable[[], dict[str, int]],
    label: str,
    *,
    copies: bool,
    store_problems: Callable[[], list[str]] = list,
) -> Audit:
    """The whole run: chaos, a graceful end, the drain, the audit. Fails on any problem.

    ``remaining()`` counts the messages left in the store or on the broker (by queue);
    ``copies``: see :meth:`Audit.check`; ``store_problems()`` reports what the store or
    broker itself saw go wrong during the run. On a failure the records are copied to a
    directory that outlives pytest's rotation of temporary directories (named in the
    assertion), since other test runs on the machine may remove ``out`` soon after.
    """
    settings = Settings.from_env()
    say(
        f"{label}: {settings.seconds:g}s of chaos, seed {settings.seed} "
        f"(replay: CONVEYOR_CHAOS_SEED={settings.seed} CONVEYOR_CHAOS_SECONDS={settings.seconds:g})"
    )
    try:
        with fleet_of(app_dir, out, settings.seed) as fleet:
            run_chaos(fleet, settings.seconds)
            fleet.stop_all()
            say(f"faults injected: {dict(sorted(fleet.counts.items()))}")
            problems = fleet.stop_problems()
            assert not problems, "\n".join(problems)
            drain(fleet, remaining)
            audit = Audit.read(out)
            kills = fleet.counts["worker_kill"]
            bound = kills * (PREFETCH + DLQ_PREFETCH)  # what a killed worker can hold unsettled
            problems = audit.check(fleet.worker_pids("KILL"), bound, copies=copies) + store_problems()
            for line in audit.report:
                say(line)
        assert not problems, "\n".join(problems)
    except AssertionError as exc:
        kept = Path(tempfile.gettempdir()) / "conveyor-chaos" / f"{out.parent.name}-{settings.seed}"
        shutil.copytree(out.parent, kept, dirs_exist_ok=True, ignore=shutil.ignore_patterns("rabbit*"))
        raise AssertionError(f"{label}, seed {settings.seed}, records kept in {kept}:\n{exc}") from None
    return audit
