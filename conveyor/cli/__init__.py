# PYTHON_ARGCOMPLETE_OK (argcomplete's global completion looks for this marker here)
"""The ``conveyor`` command line: ``run``, ``publish``, ``info``, ``check``, ``call``,
``peek`` and ``dlq list | show | replay | purge``.

Every command finds its configuration the same way: ``-c/--config PATH`` (``run`` and
``check`` also take it as their positional PATH), else ``$CONVEYOR_CONFIG``, else
``./conveyor.yaml`` (or ``./conveyor.yml``).

Exit codes (docs/cli.md#exit-codes): 0 ok; 1 runtime failure; 2 usage or configuration error
(bad arguments, missing configuration, INVALID / NOT_FOUND errors); 130 when
interrupted outside ``run``; 141 when stdout was closed early (``| head``). Errors are
one line on stderr (a configuration error adds one indented line per problem);
``--debug`` prints the full traceback too.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import traceback
from collections.abc import Sequence

from conveyor import errors
from conveyor.cli.completion import complete
from conveyor.cli.inputs import parse_header, parse_headers, parse_value
from conveyor.cli.output import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    USAGE_KINDS,
    CommandFailed,
    UsageError,
    configure_logging,
    err,
    error_lines,
    format_table,
)
from conveyor.cli.parser import build_parser

__all__ = [
    "UsageError",
    "build_parser",
    "entry",
    "format_table",
    "main",
    "parse_header",
    "parse_headers",
    "parse_value",
]


def _log_level(args: argparse.Namespace) -> str:
    if args.log_level:
        return str(args.log_level)
    if args.debug:
        return "DEBUG"
    return str(getattr(args, "default_log_level", "WARNING"))


def _one_config(args: argparse.Namespace) -> None:
    """``run PATH`` / ``check PATH`` and ``-c PATH`` name the same thing: keep one in ``config``."""
    path = getattr(args, "path", None)
    if path is not None and args.config is not None and path != args.config:
        raise UsageError(f"two configurations given: PATH {path!r} and -c {args.config!r}; give one")
    args.config = path if path is not None else args.config


def _stdout_gone() -> int:
    """stdout was closed by its reader: point it at /dev/null (so that the flush at exit
    cannot fail again) and exit quietly with 128 + SIGPIPE, as a killed Unix tool would."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_BROKEN_PIPE


def _run_command(args: argparse.Namespace) -> int:
    """Run the command; turn every failure into its exit code and one line on stderr."""
    try:
        _one_config(args)
        code: int = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        return _stdout_gone()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except UsageError as exc:
        err(f"conveyor: error: {exc}")
        return EXIT_USAGE
    except errors.Error as exc:
        if args.debug:
            traceback.print_exc()
        for line in error_lines(exc):
            err(line)
        return EXIT_USAGE if exc.kind in USAGE_KINDS else EXIT_FAILURE
    except CommandFailed as exc:
        if args.debug:
            traceback.print_exc()
        err(f"conveyor: {exc}")
        return EXIT_FAILURE
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        err(f"conveyor: unexpected error: {type(exc).__name__}: {exc} (--debug shows the traceback)")
        return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``conveyor`` command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    if argv is None:
        complete(parser)  # the shell asking for completions: answer and exit
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    configure_logging(_log_level(args), args.log_format)
    return _run_command(args)


def entry() -> None:
    """The console script: :func:`main`, then exit even if handlers left threads behind.

    A non-daemon thread started by a handler would keep the interpreter alive after
    the command is done (Python joins such threads at exit). The command's work is
    over at this point, so the process exits with its code regardless, after naming
    the threads.
    """
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # output printed before an error, its reader gone
        code = _stdout_gone()
    stray = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if stray:
        logging.getLogger("conveyor.cli").warning(
            "exiting although %d non-daemon thread(s) still run: %s",
            len(stray),
            ", ".join(t.name for t in stray),
        )
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)
