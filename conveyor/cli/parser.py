"""The argument parser of the ``conveyor`` command."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from typing import Any

import conveyor
from conveyor.cli import completion
from conveyor.cli.commands import cmd_call, cmd_check, cmd_info, cmd_run
from conveyor.cli.inputs import CONFIG_ENV, DEFAULT_CONFIG
from conveyor.cli.publishing import cmd_publish
from conveyor.cli.tooling import cmd_dlq_list, cmd_dlq_purge, cmd_dlq_replay, cmd_dlq_show, cmd_peek

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "build_parser"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")

MAX_PROCESSES = 256  # run --processes: a typo must not start thousands of interpreters

MAX_LIMIT = 10_000  # --limit: the most one browse call returns

_EPILOG = f"""\
-c/--config PATH: the configuration file or directory, on every command (run and check
also take it as their PATH argument). Default: ${CONFIG_ENV}, else ./{DEFAULT_CONFIG}.

exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error, 130 interrupted,
141 stdout closed early (e.g. piped into head). Details: docs/cli.md.
"""


def _completer(action: argparse.Action, function: Callable[..., Iterable[str]]) -> None:
    """Give ``action`` an argcomplete completer (read only when completing)."""
    action.completer = function  # type: ignore[attr-defined]


def _common_flags(suppress: bool) -> argparse.ArgumentParser:
    """``--debug``, ``--log-level``, ``--log-format``, ``-c/--config``: before or after the command."""
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
    common.add_argument(
        "--log-format",
        type=str.lower,
        choices=LOG_FORMATS,
        default=argparse.SUPPRESS if suppress else "text",
        help="log lines on stderr: text (default), or json (one JSON object per line)",
    )
    common.add_argument(
        "-c",
        "--config",
        default=argparse.SUPPRESS if suppress else None,
        metavar="PATH",
        help=f"configuration file or directory (default: ${CONFIG_ENV}, else ./{DEFAULT_CONFIG})",
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


def _whole(low: int, high: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return convert


def _prefork_worker(text: str) -> tuple[int, int]:
    index, sep, fd = text.partition(":")
    if not (sep and index.isdigit() and fd.isdigit()):
        raise argparse.ArgumentTypeError(f"expected SLOT:FD, got {text!r}")
    return int(index), int(fd)


def _queue_arg(parser: argparse.ArgumentParser, *, dead_letter: bool = False, **kwargs: Any) -> None:
    action = parser.add_argument("queue_id", metavar="QUEUE", **kwargs)
    _completer(action, completion.dead_letter_queues if dead_letter else completion.queues)


def _json_flag(parser: argparse.ArgumentParser, help: str = "print JSON") -> None:
    parser.add_argument("--json", action="store_true", help=help)


def _add_run(commands: Any, common: argparse.ArgumentParser) -> None:
    run = commands.add_parser(
        "run", parents=[common], help="run drivers, queues and consumers until SIGINT/SIGTERM"
    )
    run.add_argument("path", nargs="?", metavar="PATH", help="configuration file or directory (or -c PATH)")
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
    _json_flag(run, "print the final summary as JSON")
    run.add_argument(
        "--processes",
        type=_whole(1, MAX_PROCESSES),
        default=1,
        metavar="N",
        help=f"run N worker processes under one supervisor (1..{MAX_PROCESSES}, default: 1); "
        "needs queues that processes share (not the memory driver)",
    )
    run.add_argument(
        "--metrics-port",
        type=_whole(0, 65535),
        metavar="PORT",
        help="serve /metrics, /healthz and /readyz over HTTP on PORT (0: a free port, logged); "
        "with --processes the supervisor serves the sum of its workers",
    )
    run.add_argument(
        "--metrics-host",
        metavar="HOST",
        help="the address --metrics-port listens on (default: 127.0.0.1, this machine only)",
    )
    # Set by the supervisor of --processes on each worker it starts: slot and control socket.
    run.add_argument("--prefork-worker", type=_prefork_worker, metavar="I:FD", help=argparse.SUPPRESS)
    # Set with --metrics-port on each worker: the Unix socket it serves its metrics on.
    run.add_argument("--metrics-socket", metavar="PATH", help=argparse.SUPPRESS)
    run.set_defaults(handler=cmd_run, default_log_level="INFO")


def _add_publish(commands: Any, common: argparse.ArgumentParser) -> None:
    publish = commands.add_parser(
        "publish",
        parents=[common],
        help="publish one message (or many with --lines); print its ID",
        description="Publish PAYLOAD to QUEUE and print the new message's ID. PAYLOAD is JSON; "
        "- reads one JSON document from stdin, @FILE one from a file.",
    )
    _queue_arg(publish)
    publish.add_argument(
        "payload",
        metavar="PAYLOAD",
        help="the message as JSON, - for stdin, @FILE for a file (with --lines: - or @FILE)",
    )
    publish.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a header (repeatable); VALUE is a JSON scalar when it parses as one, else a string",
    )
    publish.add_argument(
        "--text", "--string", dest="text", action="store_true", help="send the payload as a string, not JSON"
    )
    publish.add_argument(
        "--lines",
        action="store_true",
        help="read NDJSON (one message per line) from stdin or @FILE; print one ID per line",
    )
    _json_flag(publish, 'print {"id": ...} (with --lines: {"ids": [...], "count": N})')
    publish.set_defaults(handler=cmd_publish)


def _add_info(commands: Any, common: argparse.ArgumentParser) -> None:
    info = commands.add_parser("info", parents=[common], help="show queue statistics")
    _queue_arg(info, nargs="?", help="one queue (default: every queue)")
    _json_flag(info)
    info.set_defaults(handler=cmd_info)


def _add_check(commands: Any, common: argparse.ArgumentParser) -> None:
    check = commands.add_parser("check", parents=[common], help="validate the configuration")
    check.add_argument("path", nargs="?", metavar="PATH", help="configuration file or directory (or -c PATH)")
    _json_flag(check)
    check.set_defaults(handler=cmd_check)


def _add_call(commands: Any, common: argparse.ArgumentParser) -> None:
    call = commands.add_parser("call", parents=[common], help="call a function entry, print its result")
    action = call.add_argument("func_id", metavar="FUNC_ID", help="e.g. app:add")
    _completer(action, completion.functions)
    call.add_argument(
        "args", nargs="*", metavar="JSON_ARG", help="arguments: JSON when they parse as JSON, else strings"
    )
    call.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="give up (TIMEOUT, exit 1) when the function has not returned by then",
    )
    call.set_defaults(handler=cmd_call)


def _page_flags(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument(
        "--limit",
        type=_whole(1, MAX_LIMIT),
        default=default,
        metavar="N",
        help=f"show at most N messages (1..{MAX_LIMIT}, default: {default})",
    )
    parser.add_argument("--after", metavar="ID", help="start after this message (the last one of a page)")


def _add_peek(commands: Any, common: argparse.ArgumentParser) -> None:
    peek = commands.add_parser(
        "peek", parents=[common], help="show the messages waiting in a queue, without taking them"
    )
    _queue_arg(peek)
    _page_flags(peek, 20)
    _json_flag(peek)
    peek.set_defaults(handler=cmd_peek)


def _selection(parser: argparse.ArgumentParser, verb: str) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help=f"{verb} every waiting message")
    which.add_argument(
        "--id",
        dest="ids",
        action="extend",
        nargs="+",
        metavar="ID",
        help=f"{verb} these messages (repeatable: --id A B or --id A --id B)",
    )


def _add_dlq(commands: Any, common: argparse.ArgumentParser) -> None:
    dlq = commands.add_parser(
        "dlq",
        parents=[common],
        help="dead-letter queues: list, show, replay, purge",
        description="Dead-letter tooling. Each command starts the app without its consumers.",
    )
    actions = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)

    listing = actions.add_parser(
        "list", parents=[common], help="the dead-letter queues with counts, or the messages of one"
    )
    _queue_arg(listing, dead_letter=True, nargs="?", help="one dead-letter queue (default: all, with counts)")
    _page_flags(listing, 20)
    _json_flag(listing)
    listing.set_defaults(handler=cmd_dlq_list)

    show = actions.add_parser("show", parents=[common], help="everything about one message")
    _queue_arg(show, dead_letter=True)
    show.add_argument("message_id", metavar="ID", help="the message ID (see dlq list)")
    _json_flag(show)
    show.set_defaults(handler=cmd_dlq_show)

    replay = actions.add_parser(
        "replay", parents=[common], help="move messages back to their original queue (or --to QUEUE)"
    )
    _queue_arg(replay, dead_letter=True)
    _selection(replay, "replay")
    to = replay.add_argument("--to", metavar="QUEUE", help="replay onto this queue instead")
    _completer(to, completion.queues)
    _json_flag(replay, 'print {"replayed": N, ...}')
    replay.set_defaults(handler=cmd_dlq_replay)

    purge = actions.add_parser("purge", parents=[common], help="delete messages (asks first)")
    _queue_arg(purge, dead_letter=True)
    _selection(purge, "purge")
    purge.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    _json_flag(purge, 'print {"purged": N, ...}')
    purge.set_defaults(handler=cmd_dlq_purge)


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
    for add in (_add_run, _add_publish, _add_info, _add_check, _add_call, _add_peek, _add_dlq):
        add(commands, common)
    return parser
