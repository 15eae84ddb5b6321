"""Progress bars for long commands (``publish --lines``, ``dlq replay``, ``dlq purge``).

A bar is drawn only when stderr is a terminal; then, and only then, ``rich`` is
imported (it costs about 30 ms, which a command whose output goes to a pipe or a
log file never pays). Without a terminal, or without ``rich`` installed, the
commands run the same and print the same result, just without a bar.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

__all__ = ["Update", "is_terminal", "progress"]

# update(done, total): total None when it is not known (a bar without an end).
Update = Callable[[int, "int | None"], None]


def is_terminal(stream: TextIO | Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # replaced, closed or detached streams
        return False


def _nothing(done: int, total: int | None = None) -> None:
    """The update of a bar that is not drawn."""


@contextlib.contextmanager
def progress(description: str, total: int | None = None) -> Iterator[Update]:
    """A bar on stderr while the block runs (removed at its end); yields ``update(done, total)``.

    ``update`` may be called from any thread (the queue API calls it on the app's loop).
    """
    if not is_terminal(sys.stderr):
        yield _nothing
        return
    try:
        from rich.console import Console  # noqa: PLC0415 - only on a terminal: it costs ~30 ms
        from rich.progress import (  # noqa: PLC0415
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )
    except ImportError:  # installed without its dependencies (pip --no-deps)
        yield _nothing
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(file=sys.stderr),
        transient=True,
        # print() to a terminal stdout goes above the bar; to a pipe it stays untouched
        redirect_stdout=is_terminal(sys.stdout),
        redirect_stderr=False,
    )
    task = bar.add_task(description, total=total)

    def update(done: int, total: int | None = None) -> None:
        if total is None:
            bar.update(task, completed=done)
        else:
            bar.update(task, completed=done, total=total)

    with bar:
        yield update
