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
import contextlib
import logging
import os
import sys
import threading
import traceback
from collections.abc import Sequence

from conveyor import errors
from conveyor.cli.inputs import parse_header, parse_headers, parse_value
from conveyor.cli.output import (
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


def _run_command(args: argparse.Namespace) -> int:
    """Run the command; turn every failure into its exit code and one line on stderr."""
    try:
        code: int = args.handler(args)
        return code
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
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    configure_logging(_log_level(args))
    return _run_command(args)


def entry() -> None:
    """The console script: :func:`main`, then exit even if handlers left threads behind.

    A non-daemon thread started by a handler would keep the interpreter alive after
    the command is done (Python joins such threads at exit). The command's work is
    over at this point, so the process exits with its code regardless, after naming
    the threads.
    """
    code = main()
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
