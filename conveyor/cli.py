"""The ``conveyor`` command line: ``run``, ``publish``, ``info``, ``check``, ``call``.

Every command finds its configuration the same way: the PATH given on the command
line (positional for ``run``/``check``, ``-c/--config`` for the others), else
``$CONVEYOR_CONFIG``, else ``./conveyor.yaml``.

Exit codes (docs/cli.md#exit-codes): 0 ok; 1 runtime failure; 2 usage or configuration error
(bad arguments, missing configuration, INVALID / NOT_FOUND errors); 130 when
interrupted outside ``run``. Errors are one line on stderr (a configuration error
adds one indented line per problem); ``--debug`` prints the full traceback too.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import conveyor
from conveyor import errors, queue
from conveyor.app import App, RunReport
from conveyor.queue.headers import check_headers
from conveyor.registry.ids import canonical_id
from conveyor.registry.problems import Problem

__all__ = ["build_parser", "main"]

log = logging.getLogger("conveyor.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

CONFIG_ENV = "CONVEYOR_CONFIG"
DEFAULT_CONFIG = "conveyor.yaml"
USAGE_KINDS = frozenset({errors.INVALID, errors.NOT_FOUND})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

CONSUMER_COLUMNS = (
    ("DELIVERED", "delivered"),
    ("ACKED", "acked"),
    ("FAILED_ATTEMPTS", "failed"),
    ("DEAD_LETTERED", "dead_lettered"),
    ("UNDECODABLE", "undecodable"),
)
QUEUE_COLUMNS = (
    ("MESSAGES", "message_count"),
    ("READY", "ready"),
    ("IN_FLIGHT", "in_flight"),
    ("DELAYED", "delayed"),
)


class UsageError(Exception):
    """A bad command line or a missing configuration file: one line, exit 2."""


class CommandFailed(Exception):
    """A runtime failure that is not an ``errors.Error``: one line, exit 1."""


# --------------------------------------------------------------------------- output


def _out(text: str = "") -> None:
    print(text, file=sys.stdout)


def _err(text: str) -> None:
    print(text, file=sys.stderr)


def _json_default(value: Any) -> Any:
    """Make function results JSON-printable: bytes as text, sets and tuples as lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, errors.Error):
        return value.to_dict()
    return str(value)


def _print_json(value: Any) -> None:
    _out(json.dumps(value, indent=2, ensure_ascii=False, default=_json_default))


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An aligned text table with a header row; ``None`` cells show as ``-``."""
    cells = [list(headers), *([_cell(v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)
    return "\n".join(lines)


def _plural(count: int, noun: str) -> str:
    if count == 1:
        return f"1 {noun}"
    return f"{count} {noun[:-1]}ies" if noun.endswith("y") else f"{count} {noun}s"


def _format_problem(problem: Any) -> str:
    """One configuration problem as ``file: entry E: field F: message (line N)``."""
    return str(Problem.from_dict(problem)) if isinstance(problem, Mapping) else str(problem)


def _error_lines(exc: errors.Error) -> list[str]:
    """The summary line of an error, then one indented line per problem (if any)."""
    lines = exc.message.splitlines() or [""]
    problems = exc.details.get("problems")
    if isinstance(problems, list) and problems:
        rest = [_format_problem(p) for p in problems]
    else:
        rest = [line.strip() for line in lines[1:] if line.strip()]
    return [f"conveyor: {exc.kind}: {lines[0]}", *(f"  {line}" for line in rest)]


# --------------------------------------------------------------------------- parsing values


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value here")


def parse_value(text: str) -> Any:
    """``text`` as JSON when it is valid (finite) JSON, else the string itself."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return text
    if isinstance(value, float) and not math.isfinite(value):
        return text
    return value


def parse_header(text: str) -> tuple[str, Any]:
    """``key=value``; the value is a JSON scalar when it parses as one, else the literal text."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise UsageError(f"header {text!r} is not key=value")
    value = parse_value(raw)
    if value is None or isinstance(value, (dict, list)):
        value = raw
    return key, value


def parse_headers(items: Sequence[str]) -> dict[str, Any]:
    return dict(parse_header(item) for item in items)


# --------------------------------------------------------------------------- configuration


def resolve_config(given: str | None) -> str:
    """The configuration path: ``given``, else ``$CONVEYOR_CONFIG``, else ``./conveyor.yaml``."""
    if given:
        path, origin = given, ""
    elif os.environ.get(CONFIG_ENV):
        path, origin = os.environ[CONFIG_ENV], f" (from ${CONFIG_ENV})"
    else:
        path = DEFAULT_CONFIG
        origin = f" (the default; pass a path or set ${CONFIG_ENV})"
    if not os.path.exists(path):
        raise UsageError(f"configuration not found: {os.path.abspath(path)}{origin}")
    return path


def load_app(given: str | None, *, log_bodies: bool = False) -> App:
    return conveyor.load(resolve_config(given), log_bodies=log_bodies)


def declared_queue(app: App, queue_id: str) -> str:
    """``queue_id`` checked: well-formed (INVALID) and declared by the app (NOT_FOUND)."""
    qid = canonical_id(queue_id)
    if qid not in app.registry.queues:
        raise errors.not_found(f"queue {qid} is not declared", queue=qid)
    return qid


def declared_function(app: App, func_id: str) -> str:
    fid = canonical_id(func_id, what="function ID")
    if fid not in app.registry.functions:
        raise errors.not_found(f"function {fid} is not declared", function=fid)
    return fid


# --------------------------------------------------------------------------- logging

_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


def _field_text(value: Any) -> str:
    text = str(value)
    if not text or any(ch.isspace() or ch in "\"'=" for ch in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class ConsoleFormatter(logging.Formatter):
    """``time level logger: message [key=value ...]`` with the record's extra fields."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S"
        )

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        extra = {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS and not k.startswith("_")}
        if not extra:
            return text
        return text + " [" + " ".join(f"{k}={_field_text(v)}" for k, v in extra.items()) + "]"


class _CliHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler installed by :func:`configure_logging` (replaced on each call)."""


def configure_logging(level: str) -> None:
    """Log to stderr at ``level`` through :class:`ConsoleFormatter`."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _CliHandler)]:
        root.removeHandler(handler)
    handler = _CliHandler(sys.stderr)
    handler.setFormatter(ConsoleFormatter())
    root.addHandler(handler)
    root.setLevel(level)


# --------------------------------------------------------------------------- run


@dataclass
class RunOutcome:
    """How ``conveyor run`` ended and what it did (an ``App.run`` report, as the CLI names it)."""

    reason: str  # "idle", "signal" or "timeout"
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
            "ok": self.reason != "timeout",
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


def print_run_summary(outcome: RunOutcome) -> None:
    how = {"idle": "idle after", "signal": "stopped by a signal after", "timeout": "timed out after"}
    forced = " (forced)" if outcome.forced else ""
    _out(f"{how[outcome.reason]} {outcome.elapsed:.1f}s{forced}")
    if outcome.consumers:
        rows = [[cid, *(s.get(k) for _, k in CONSUMER_COLUMNS)] for cid, s in outcome.consumers.items()]
        _out(format_table(["CONSUMER", *(h for h, _ in CONSUMER_COLUMNS)], rows))
    else:
        _out("no consumers")
    if outcome.queues:
        rows = [[qid, *(i.get(k) for _, k in QUEUE_COLUMNS)] for qid, i in outcome.queues.items()]
        _out()
        _out(format_table(["QUEUE", *(h for h, _ in QUEUE_COLUMNS)], rows))


def cmd_run(args: argparse.Namespace) -> int:
    """``conveyor run``: drivers, queues and consumers until a signal (or idle)."""
    if args.timeout is not None and not args.until_idle:
        raise UsageError("--timeout only applies with --until-idle")
    app = load_app(args.path, log_bodies=args.log_bodies)
    for warning in app.registry.warnings:
        log.warning("%s", warning)
    until = idle_for(app, args.idle_settle) if args.until_idle else None
    outcome = RunOutcome.of(app.run(grace=args.grace, until=until, timeout=args.timeout))
    if args.json:
        _print_json(outcome.to_dict())
    else:
        print_run_summary(outcome)
    if outcome.reason == "timeout":
        _err(f"conveyor: TIMEOUT: not idle after {args.timeout:g}s (--timeout)")
        return EXIT_FAILURE
    return EXIT_OK


# --------------------------------------------------------------------------- publish, info


def cmd_publish(args: argparse.Namespace) -> int:
    """``conveyor publish``: start the app without consumers, publish one message, stop."""
    data = args.data if args.string else parse_value(args.data)
    headers = check_headers(parse_headers(args.header))
    app = load_app(args.config)
    qid = declared_queue(app, args.queue_id)
    with app:
        queue.publish(qid, data, headers or None)
    if args.json:
        _print_json({"ok": True, "queue": qid, "headers": headers})
    else:
        _out(f"published to {qid}")
    return EXIT_OK


def _queue_row(app: App, qid: str) -> dict[str, Any]:
    return {"queue": qid, "driver": app.registry.queues[qid].driver, **queue.info(qid)}


def _info_one(app: App, qid: str, as_json: bool) -> int:
    with app:
        row = _queue_row(app, qid)
    if as_json:
        _print_json(row)
    else:
        width = max(len(k) for k in row) + 1
        for key, value in row.items():
            _out(f"{key + ':':<{width}} {_cell(value)}")
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
                _err(f"conveyor: {exc.kind}: {qid}: {exc.message}")
                rows.append({"queue": qid, "driver": spec.driver, "error": exc.to_dict()})
    if as_json:
        _print_json(rows)
    else:
        columns = [*QUEUE_COLUMNS, ("CONSUMERS", "consumer_count")]
        table = [[r["queue"], r["driver"], *(r.get(k) for _, k in columns)] for r in rows]
        _out(format_table(["QUEUE", "DRIVER", *(h for h, _ in columns)], table))
    return EXIT_FAILURE if failed else EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    """``conveyor info``: statistics of one queue, or a table of every declared queue."""
    app = load_app(args.config)
    if args.queue_id is not None:
        return _info_one(app, declared_queue(app, args.queue_id), args.json)
    return _info_all(app, args.json)


# --------------------------------------------------------------------------- check, call


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
    path = resolve_config(args.path)
    try:
        app = conveyor.load(path)
        app.preflight(consumers=True)  # drivers available, handlers importable
    except errors.Error as exc:
        if not args.json:
            raise
        _print_json({"ok": False, "problems": _problems_of(exc, path), "warnings": [], "counts": None})
        return EXIT_USAGE if exc.kind in USAGE_KINDS else EXIT_FAILURE
    counts = _counts(app)
    warnings = list(app.registry.warnings)
    if args.json:
        _print_json({"ok": True, "problems": [], "warnings": warnings, "counts": counts})
        return EXIT_OK
    nouns = ("driver", "queue", "consumer", "function", "policy")
    summary = ", ".join(_plural(n, noun) for n, noun in zip(counts.values(), nouns, strict=True))
    _out(f"ok: {path} — {summary}")
    for warning in warnings:
        _out(f"warning: {warning}")
    return EXIT_OK


def cmd_call(args: argparse.Namespace) -> int:
    """``conveyor call``: start the app without consumers, call a function entry, print JSON."""
    call_args = [parse_value(a) for a in args.args]
    app = load_app(args.config)
    fid = declared_function(app, args.func_id)
    with app:
        try:
            result = app.call(fid, *call_args)
        except errors.Error:
            raise
        except Exception as exc:
            raise CommandFailed(f"function {fid} raised {type(exc).__name__}: {exc}") from exc
    _print_json(result)
    return EXIT_OK


# --------------------------------------------------------------------------- the parser

_EPILOG = f"""\
PATH: the configuration file or directory. run and check take it as an argument;
publish, info and call take -c/--config. Default: ${CONFIG_ENV}, else ./{DEFAULT_CONFIG}.

exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error, 130 interrupted.
"""


def _common_flags(suppress: bool) -> argparse.ArgumentParser:
    """``--debug`` and ``--log-level``, accepted before and after the command name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print full tracebacks on errors (and log at DEBUG unless --log-level is given)",
    )
    common.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS if suppress else None,
        metavar="LEVEL",
        help=f"log level on stderr: {', '.join(LOG_LEVELS)} (default: INFO for run, WARNING otherwise)",
    )
    return common


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0: {text!r}")
    return value


def _add_run(commands: Any, common: argparse.ArgumentParser) -> None:
    run = commands.add_parser(
        "run", parents=[common], help="run drivers, queues and consumers until SIGINT/SIGTERM"
    )
    run.add_argument("path", nargs="?", metavar="PATH", help="configuration file or directory")
    run.add_argument("--until-idle", action="store_true", help="exit once every consumed queue is idle")
    run.add_argument(
        "--idle-settle",
        type=_seconds,
        default=0.5,
        metavar="SECONDS",
        help="how long the app must stay idle for --until-idle (default: 0.5)",
    )
    run.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="with --until-idle: fail (exit 1) if not idle within SECONDS",
    )
    run.add_argument(
        "--grace",
        type=_seconds,
        metavar="SECONDS",
        help="how long in-flight handlers may finish when stopping (default: 30)",
    )
    run.add_argument("--log-bodies", action="store_true", help="include message bodies in failure logs")
    run.add_argument("--json", action="store_true", help="print the final summary as JSON")
    run.set_defaults(handler=cmd_run, default_log_level="INFO")


def _add_publish(commands: Any, common: argparse.ArgumentParser) -> None:
    publish = commands.add_parser("publish", parents=[common], help="publish one message")
    publish.add_argument("queue_id", metavar="QUEUE_ID", help="e.g. app:tasks")
    publish.add_argument("data", metavar="DATA", help="the message: JSON if it parses as JSON, else a string")
    publish.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a header (repeatable); VALUE is a JSON scalar when it parses as one, else a string",
    )
    publish.add_argument("--string", action="store_true", help="send DATA as a string, never as JSON")
    publish.add_argument("-c", "--config", metavar="PATH", help="configuration file or directory")
    publish.add_argument("--json", action="store_true", help="print the result as JSON")
    publish.set_defaults(handler=cmd_publish)


def _add_info(commands: Any, common: argparse.ArgumentParser) -> None:
    info = commands.add_parser("info", parents=[common], help="show queue statistics")
    info.add_argument("queue_id", nargs="?", metavar="QUEUE_ID", help="one queue (default: every queue)")
    info.add_argument("-c", "--config", metavar="PATH", help="configuration file or directory")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(handler=cmd_info)


def _add_check(commands: Any, common: argparse.ArgumentParser) -> None:
    check = commands.add_parser("check", parents=[common], help="validate the configuration")
    check.add_argument("path", nargs="?", metavar="PATH", help="configuration file or directory")
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(handler=cmd_check)


def _add_call(commands: Any, common: argparse.ArgumentParser) -> None:
    call = commands.add_parser("call", parents=[common], help="call a function entry, print its result")
    call.add_argument("func_id", metavar="FUNC_ID", help="e.g. app:add")
    call.add_argument(
        "args", nargs="*", metavar="JSON_ARG", help="arguments: JSON when they parse as JSON, else strings"
    )
    call.add_argument("-c", "--config", metavar="PATH", help="configuration file or directory")
    call.set_defaults(handler=cmd_call)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``conveyor`` command."""
    parser = argparse.ArgumentParser(
        prog="conveyor",
        description="Message queues: run consumers, publish, inspect and validate conveyor apps.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common_flags(suppress=False)],
    )
    parser.add_argument("--version", action="version", version=f"conveyor {conveyor.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_flags(suppress=True)
    for add in (_add_run, _add_publish, _add_info, _add_check, _add_call):
        add(commands, common)
    return parser


# --------------------------------------------------------------------------- main


def _log_level(args: argparse.Namespace) -> str:
    if args.log_level:
        return str(args.log_level)
    if args.debug:
        return "DEBUG"
    return str(getattr(args, "default_log_level", "WARNING"))


def _run_command(args: argparse.Namespace) -> int:
    """Run the command; turn every failure into its exit code and one line on stderr."""
    try:
        code: int = args.handler(args)
        return code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except UsageError as exc:
        _err(f"conveyor: error: {exc}")
        return EXIT_USAGE
    except errors.Error as exc:
        if args.debug:
            traceback.print_exc()
        for line in _error_lines(exc):
            _err(line)
        return EXIT_USAGE if exc.kind in USAGE_KINDS else EXIT_FAILURE
    except CommandFailed as exc:
        if args.debug:
            traceback.print_exc()
        _err(f"conveyor: {exc}")
        return EXIT_FAILURE
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        _err(f"conveyor: unexpected error: {type(exc).__name__}: {exc} (--debug shows the traceback)")
        return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``conveyor`` command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    configure_logging(_log_level(args))
    return _run_command(args)
