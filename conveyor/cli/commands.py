"""The commands ``run``, ``info``, ``check`` and ``call``; each returns its exit code.

``publish`` is in :mod:`conveyor.cli.publishing`; ``peek`` and ``dlq`` in :mod:`conveyor.cli.tooling`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import conveyor
from conveyor import errors, queue
from conveyor.app import App, RunReport
from conveyor.cli.inputs import (
    declared_function,
    declared_queue,
    load_app,
    parse_value,
    resolve_config,
)
from conveyor.cli.output import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    USAGE_KINDS,
    CommandFailed,
    UsageError,
    cell,
    err,
    format_table,
    out,
    plural,
    print_json,
)
from conveyor.observe.http import Listen
from conveyor.prefork import Prefork, PreforkResult, WorkerLink, check_shareable, combine_reports

__all__ = ["RunOutcome", "cmd_call", "cmd_check", "cmd_info", "cmd_run", "idle_for"]

log = logging.getLogger("conveyor.cli")

CONSUMER_COLUMNS = (
    ("DELIVERED", "delivered"),
    ("ACKED", "acked"),
    ("FAILED_ATTEMPTS", "failed"),
    ("DEAD_LETTERED", "dead_lettered"),
    ("UNDECODABLE", "undecodable"),
    ("DROPPED", "dropped"),
)

QUEUE_COLUMNS = (
    ("MESSAGES", "message_count"),
    ("READY", "ready"),
    ("IN_FLIGHT", "in_flight"),
    ("DELAYED", "delayed"),
)


@dataclass
class RunOutcome:
    """How ``conveyor run`` ended and what it did (an ``App.run`` report, as the CLI names it)."""

    reason: str  # "idle", "signal", "timeout"; with --processes also "failed" (a worker's exit code)
    forced: bool
    elapsed: float
    consumers: dict[str, dict[str, int]]
    queues: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, report: RunReport) -> RunOutcome:
        reason = {"until": "idle", "request": "signal"}.get(report.reason, report.reason)
        return cls(reason, report.forced, report.elapsed, report.consumers, report.queues)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.reason not in ("timeout", "failed"),
            "reason": self.reason,
            "forced": self.forced,
            "elapsed": round(self.elapsed, 3),
            "consumers": self.consumers,
            "queues": self.queues,
        }


def idle_for(app: App, settle: float) -> Callable[[], bool]:
    """An ``until`` for ``App.run``: true once the app has been idle for ``settle`` s in a row."""
    idle_since: float | None = None

    def until() -> bool:
        nonlocal idle_since
        now = time.monotonic()
        if not app.is_idle():
            idle_since = None
            return False
        idle_since = now if idle_since is None else idle_since
        return now - idle_since >= settle

    return until


def print_run_summary(outcome: RunOutcome, workers: str | None = None) -> None:
    how = {
        "idle": "idle after",
        "signal": "stopped by a signal after",
        "timeout": "timed out after",
        "failed": "stopped (a worker failed) after",
    }
    forced = " (forced)" if outcome.forced else ""
    out(f"{how[outcome.reason]} {outcome.elapsed:.1f}s{forced}")
    if workers is not None:
        out(workers)
    if outcome.consumers:
        rows = [[cid, *(s.get(k) for _, k in CONSUMER_COLUMNS)] for cid, s in outcome.consumers.items()]
        out(format_table(["CONSUMER", *(h for h, _ in CONSUMER_COLUMNS)], rows))
    else:
        out("no consumers")
    if outcome.queues:
        rows = [[qid, *(i.get(k) for _, k in QUEUE_COLUMNS)] for qid, i in outcome.queues.items()]
        out()
        out(format_table(["QUEUE", *(h for h, _ in QUEUE_COLUMNS)], rows))


def cmd_run(args: argparse.Namespace) -> int:
    """``conveyor run``: drivers, queues and consumers until a signal (or idle)."""
    if args.timeout is not None and not args.until_idle:
        raise UsageError("--timeout only applies with --until-idle")
    if args.metrics_host is not None and args.metrics_port is None:
        raise UsageError("--metrics-host only applies with --metrics-port")
    if args.processes > 1:
        if args.prefork_worker is not None:
            raise UsageError("--prefork-worker and --processes cannot be combined")
        return _run_processes(args)
    link = None
    if args.prefork_worker is not None:  # started by a --processes supervisor
        slot, fd = args.prefork_worker
        link = WorkerLink.attach(slot, fd, args.grace)
    app = load_app(args.config, log_bodies=args.log_bodies)
    if args.metrics_socket is not None:  # a worker: its supervisor asks it and serves the sum
        app.serve_metrics(path=args.metrics_socket)
    elif args.metrics_port is not None:
        app.serve_metrics(args.metrics_port, args.metrics_host or "127.0.0.1")
    if link is None:  # a worker's supervisor has logged them once already
        for warning in app.registry.warnings:
            log.warning("%s", warning)
    until = idle_for(app, args.idle_settle) if args.until_idle else None
    report = app.run(grace=args.grace, until=until, timeout=args.timeout)
    outcome = RunOutcome.of(report)
    if link is not None:  # a worker: its supervisor prints the summary (and the TIMEOUT line)
        link.send_report(outcome.to_dict())
    elif args.json:
        print_json(outcome.to_dict())
    else:
        print_run_summary(outcome)
    if outcome.reason == "timeout":
        if link is None:
            err(f"conveyor: TIMEOUT: not idle after {args.timeout:g}s (--timeout)")
        return EXIT_FAILURE
    if outcome.forced:  # a second signal: handlers were cancelled, not finished
        return 128 + report.signal if report.signal is not None else EXIT_FAILURE
    return EXIT_OK


def _worker_args(args: argparse.Namespace, path: str) -> list[str]:
    """A worker's ``conveyor run`` arguments: the same as ours, minus --processes, --timeout, --json."""
    argv = [path, "--idle-settle", repr(args.idle_settle)]
    if args.until_idle:
        argv.append("--until-idle")
    if args.grace is not None:
        argv += ["--grace", repr(args.grace)]
    if args.log_bodies:
        argv.append("--log-bodies")
    if args.log_level:
        argv += ["--log-level", str(args.log_level)]
    if args.log_format != "text":
        argv += ["--log-format", args.log_format]
    if args.debug:
        argv.append("--debug")
    return argv


def _prefork_verdict(args: argparse.Namespace, result: PreforkResult) -> tuple[int, str | None]:
    """The exit code of a ``--processes`` run, and the line that explains a failure."""
    if result.failed is not None:
        code = result.failed.returncode or EXIT_FAILURE
        return code, f"conveyor: worker {result.failed.worker} {result.failed.ended}; stopped the others"
    if result.forced:
        killed = f"; {plural(result.killed, 'worker')} killed (SIGKILL)" if result.killed else ""
        return EXIT_FAILURE, f"conveyor: the stop was forced{killed}"
    if result.reason == "timeout":
        return EXIT_FAILURE, f"conveyor: TIMEOUT: not idle after {args.timeout:g}s (--timeout)"
    if result.unclean:
        how = ", ".join(f"worker {run.worker} {run.ended}" for run in result.unclean)
        return EXIT_FAILURE, f"conveyor: not every worker stopped cleanly: {how}"
    return EXIT_OK, None


def _run_processes(args: argparse.Namespace) -> int:
    """``conveyor run --processes N``: N workers under one supervisor (``conveyor.prefork``)."""
    path = os.path.abspath(resolve_config(args.config))
    app = conveyor.load(path, log_bodies=args.log_bodies)
    check_shareable(app.registry, args.processes)
    for warning in app.registry.warnings:
        log.warning("%s", warning)
    host = args.metrics_host or "127.0.0.1"
    metrics = None if args.metrics_port is None else Listen(host, args.metrics_port)
    supervisor = Prefork(
        _worker_args(args, path),
        args.processes,
        timeout=args.timeout,
        fatal_codes=(EXIT_USAGE,),
        metrics=metrics,
    )
    result = asyncio.run(supervisor.run())
    reports = result.reports
    consumers, queues = combine_reports(reports)
    forced = result.forced or any(report.get("forced") for report in reports)
    outcome = RunOutcome(result.reason, forced, result.elapsed, consumers, queues)
    code, problem = _prefork_verdict(args, result)
    if args.json:
        print_json(
            {
                **outcome.to_dict(),
                "ok": code == EXIT_OK,
                "processes": result.processes,
                "restarts": result.restarts,
                "workers": [run.to_dict() for run in result.runs],
            }
        )
    else:
        workers = (
            f"{result.processes} worker processes, {plural(result.restarts, 'restart')}; "
            f"consumer counts summed over {len(reports)} of {len(result.runs)} worker runs"
        )
        print_run_summary(outcome, workers)
    if problem is not None:
        err(problem)
    return code


def _queue_row(app: App, qid: str) -> dict[str, Any]:
    return {"queue": qid, "driver": app.registry.queues[qid].driver, **queue.info(qid)}


def _info_one(app: App, qid: str, as_json: bool) -> int:
    with app:
        row = _queue_row(app, qid)
    if as_json:
        print_json(row)
    else:
        width = max(len(k) for k in row) + 1
        for key, value in row.items():
            out(f"{key + ':':<{width}} {cell(value)}")
    return EXIT_OK


def _info_all(app: App, as_json: bool) -> int:
    rows: list[dict[str, Any]] = []
    failed = False
    with app:
        for qid, spec in app.registry.queues.items():
            try:
                rows.append(_queue_row(app, qid))
            except errors.Error as exc:
                failed = True
                err(f"conveyor: {exc.kind}: {qid}: {exc.message}")
                rows.append({"queue": qid, "driver": spec.driver, "error": exc.to_dict()})
    if as_json:
        print_json(rows)
    else:
        columns = [*QUEUE_COLUMNS, ("CONSUMERS", "consumer_count")]
        table = [[r["queue"], r["driver"], *(r.get(k) for _, k in columns)] for r in rows]
        out(format_table(["QUEUE", "DRIVER", *(h for h, _ in columns)], table))
    return EXIT_FAILURE if failed else EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    """``conveyor info``: statistics of one queue, or a table of every declared queue."""
    app = load_app(args.config)
    if args.queue_id is not None:
        return _info_one(app, declared_queue(app, args.queue_id), args.json)
    return _info_all(app, args.json)


def _counts(app: App) -> dict[str, int]:
    reg = app.registry
    return {
        "drivers": len(reg.drivers),
        "queues": len(reg.queues),
        "consumers": len(reg.consumers),
        "functions": len(reg.functions),
        "policies": len(reg.policies),
    }


def _problems_of(exc: errors.Error, path: str) -> list[Any]:
    problems = exc.details.get("problems")
    if isinstance(problems, list) and problems:
        return problems
    return [{"file": path, "entry": "", "field": "", "message": exc.message, "line": None}]


def cmd_check(args: argparse.Namespace) -> int:
    """``conveyor check``: load and validate; print every problem, or a summary and warnings."""
    path = resolve_config(args.config)
    try:
        app = conveyor.load(path)
        app.preflight(consumers=True)  # drivers available, handlers importable
    except errors.Error as exc:
        if not args.json:
            raise
        print_json({"ok": False, "problems": _problems_of(exc, path), "warnings": [], "counts": None})
        return EXIT_USAGE if exc.kind in USAGE_KINDS else EXIT_FAILURE
    counts = _counts(app)
    warnings = list(app.registry.warnings)
    if args.json:
        print_json({"ok": True, "problems": [], "warnings": warnings, "counts": counts})
        return EXIT_OK
    nouns = ("driver", "queue", "consumer", "function", "policy")
    summary = ", ".join(plural(n, noun) for n, noun in zip(counts.values(), nouns, strict=True))
    out(f"ok: {path} — {summary}")
    for warning in warnings:
        out(f"warning: {warning}")
    return EXIT_OK


def _call_within(app: App, fid: str, call_args: list[Any], timeout: float) -> Any:
    """``app.call`` bounded by ``timeout``: TIMEOUT once it is over.

    The call runs in a daemon thread, so nothing waits for a function that overruns:
    the app then stops (an async function's task is cancelled with the loop) and the
    command exits, leaving a sync function's thread behind (a thread cannot be killed).
    """
    outcome: list[tuple[bool, Any]] = []

    def call() -> None:
        try:
            outcome.append((True, app.call(fid, *call_args)))
        except BaseException as exc:  # handed to the command's thread below
            outcome.append((False, exc))

    worker = threading.Thread(target=call, name=f"conveyor-call {fid}", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise errors.Error(
            errors.TIMEOUT, f"function {fid} did not return within {timeout:g}s", retryable=True
        )
    returned, value = outcome[0]
    if returned:
        return value
    raise value


def cmd_call(args: argparse.Namespace) -> int:
    """``conveyor call``: start the app without consumers, call a function entry, print JSON."""
    call_args = [parse_value(a) for a in args.args]
    app = load_app(args.config)
    fid = declared_function(app, args.func_id)
    with app:
        try:
            if args.timeout is None:
                result = app.call(fid, *call_args)
            else:
                result = _call_within(app, fid, call_args, args.timeout)
        except errors.Error:
            raise
        except Exception as exc:
            raise CommandFailed(f"function {fid} raised {type(exc).__name__}: {exc}") from exc
    print_json(result)
    return EXIT_OK
