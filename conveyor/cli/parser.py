"""The argument parser of the ``conveyor`` command."""

from __future__ import annotations

import argparse
import math
from typing import Any

import conveyor
from conveyor.cli.commands import cmd_call, cmd_check, cmd_info, cmd_publish, cmd_run
from conveyor.cli.inputs import CONFIG_ENV, DEFAULT_CONFIG

__all__ = ["LOG_LEVELS", "build_parser"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

MAX_PROCESSES = 256  # run --processes: a typo must not start thousands of interpreters

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


def _processes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= MAX_PROCESSES:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_PROCESSES}, got {value}")
    return value


def _prefork_worker(text: str) -> tuple[int, int]:
    index, sep, fd = text.partition(":")
    if not (sep and index.isdigit() and fd.isdigit()):
        raise argparse.ArgumentTypeError(f"expected SLOT:FD, got {text!r}")
    return int(index), int(fd)


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
    run.add_argument(
        "--processes",
        type=_processes,
        default=1,
        metavar="N",
        help=f"run N worker processes under one supervisor (1..{MAX_PROCESSES}, default: 1); "
        "needs queues that processes share (not the memory driver)",
    )
    # Set by the supervisor of --processes on each worker it starts: slot and control socket.
    run.add_argument("--prefork-worker", type=_prefork_worker, metavar="I:FD", help=argparse.SUPPRESS)
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
