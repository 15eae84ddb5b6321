"""``conveyor peek`` and ``conveyor dlq list | show | replay | purge``.

Each starts the app without its consumers (drivers and queues only) and acts on
the messages waiting in a queue through the queue API (``queue.browse``,
``queue.replay``, ``queue.purge``): nothing is consumed, and replay and purge are
the security actions ``queue.replay`` / ``queue.purge`` on the queue, as in Python.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from typing import Any

from conveyor import errors, queue
from conveyor.app import App
from conveyor.cli.inputs import declared_queue, load_app
from conveyor.cli.output import (
    EXIT_FAILURE,
    EXIT_OK,
    UsageError,
    cell,
    err,
    format_table,
    json_text,
    out,
    plural,
    print_json,
)
from conveyor.cli.progress import is_terminal, progress
from conveyor.queue import QueuedMessage

__all__ = [
    "cmd_dlq_list",
    "cmd_dlq_purge",
    "cmd_dlq_replay",
    "cmd_dlq_show",
    "cmd_peek",
    "dead_letter_queues",
    "truncate",
]

SHOW_PAGE = 500  # messages read per browse call while looking for one ID
REASON_WIDTH = 60  # characters of a reason / body in a table row


def truncate(text: str, width: int) -> str:
    """``text`` on one line, at most ``width`` characters (an ellipsis marks a cut)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def dead_letter_queues(app: App) -> dict[str, list[str]]:
    """Every queue some queue names as its ``dead_letter`` queue, with the queues that do,
    in the order the queues are declared."""
    sources: dict[str, list[str]] = {}
    for qid, spec in app.registry.queues.items():
        if spec.dead_letter is not None:
            sources.setdefault(spec.dead_letter.queue, []).append(qid)
    return {qid: sources[qid] for qid in app.registry.queues if qid in sources}


def _message_count(qid: str) -> int | None:
    count = queue.info(qid).get("message_count")
    return count if isinstance(count, int) else None


def _footer(shown: int, limit: int, total: int | None) -> None:
    """On stderr, after a full page: that the queue holds more, and how to see it."""
    if shown == limit and total is not None and total > shown:
        err(f"({shown} shown, {total} in the queue; --limit N shows more, --after ID the next page)")


def _show_page(
    args: argparse.Namespace,
    app: App,
    qid: str,
    columns: list[str],
    row: Callable[[QueuedMessage], list[Any]],
) -> int:
    """One page of ``qid`` (``--limit``, ``--after``): JSON, or a table of ``row(m)`` under
    ``columns`` with the footer. What ``peek`` and ``dlq list QUEUE`` print."""
    with app:
        messages = queue.browse(qid, limit=args.limit, after=args.after)
        total = _message_count(qid)
    if args.json:
        print_json({"queue": qid, "total": total, "messages": [m.as_dict() for m in messages]})
        return EXIT_OK
    out(format_table(columns, [row(m) for m in messages]))
    _footer(len(messages), args.limit, total)
    return EXIT_OK


# --------------------------------------------------------------------------- peek


def _headers_cell(message: QueuedMessage) -> str:
    return truncate(",".join(f"{k}={v}" for k, v in message.headers.items()), 30) if message.headers else "-"


def _body_cell(message: QueuedMessage) -> str:
    if message.decode_error is not None:
        return "(undecodable)"
    return truncate(json_text(message.body, indent=None), REASON_WIDTH)


def cmd_peek(args: argparse.Namespace) -> int:
    """``conveyor peek QUEUE``: the first messages of any queue, without taking them."""
    app = load_app(args.config)
    qid = declared_queue(app, args.queue_id)
    return _show_page(args, app, qid, ["ID", "STATE", "ATTEMPTS", "HEADERS", "BODY"], _peek_row)


def _peek_row(m: QueuedMessage) -> list[Any]:
    return [m.id, m.state, m.attempts, _headers_cell(m), _body_cell(m)]


# --------------------------------------------------------------------------- dlq list


def _list_all(app: App, as_json: bool) -> int:
    found = dead_letter_queues(app)
    rows: list[dict[str, Any]] = []
    failed = False
    with app:
        for qid, sources in found.items():
            row: dict[str, Any] = {
                "queue": qid,
                "driver": app.registry.queues[qid].driver,
                "sources": sources,
            }
            try:
                row["message_count"] = _message_count(qid)
            except errors.Error as exc:
                failed = True
                err(f"conveyor: {exc.kind}: {qid}: {exc.message}")
                row["message_count"] = None
                row["error"] = exc.to_dict()
            rows.append(row)
    if as_json:
        print_json(rows)
    elif not rows:
        out("no dead-letter queues: no queue of this app names a dead_letter queue")
    else:
        table = [[r["queue"], r["message_count"], ", ".join(r["sources"])] for r in rows]
        out(format_table(["DEAD_LETTER_QUEUE", "MESSAGES", "FROM"], table))
    return EXIT_FAILURE if failed else EXIT_OK


def _letter_row(message: QueuedMessage) -> list[Any]:
    letter = message.dead_letter
    if letter is None:
        return [message.id, None, None, message.attempts, None]
    reason = truncate(letter.reason, REASON_WIDTH) if letter.reason is not None else None
    return [message.id, letter.time, letter.original_queue, message.attempts, reason]


def cmd_dlq_list(args: argparse.Namespace) -> int:
    """``conveyor dlq list [QUEUE]``: the dead-letter queues with counts, or one's messages."""
    app = load_app(args.config)
    if args.queue_id is None:
        return _list_all(app, args.json)
    qid = declared_queue(app, args.queue_id)
    return _show_page(args, app, qid, ["ID", "DEAD_LETTERED", "FROM", "ATTEMPTS", "REASON"], _letter_row)


# --------------------------------------------------------------------------- dlq show


def _pages(qid: str) -> Iterator[QueuedMessage]:
    after: str | None = None
    while True:
        page = queue.browse(qid, limit=SHOW_PAGE, after=after)
        yield from page
        if len(page) < SHOW_PAGE:
            return
        after = page[-1].id


def _find(qid: str, message_id: str) -> QueuedMessage:
    for message in _pages(qid):
        if message.id == message_id:
            return message
    raise errors.not_found(f"message {message_id} is not in {qid}", queue=qid, message_id=message_id)


def _indented(text: str) -> list[str]:
    return [f"  {line}" for line in text.splitlines()] or ["  "]


def _show_lines(message: QueuedMessage) -> list[str]:
    letter = message.dead_letter
    fields: list[tuple[str, Any]] = [("id", message.id), ("queue", message.queue), ("state", message.state)]
    if letter is not None:
        fields += [("original queue", letter.original_queue), ("dead-lettered", letter.time)]
    fields.append(("attempts", message.attempts))
    if letter is not None:
        fields.append(("reason", letter.reason))
    width = max(len(name) for name, _ in fields) + 1
    lines = [f"{name + ':':<{width}} {cell(value)}" for name, value in fields]
    if message.headers:
        lines.append("headers:")
        lines += [f"  {key}: {json_text(value, indent=None)}" for key, value in message.headers.items()]
    else:
        lines.append("headers: -")
    if message.decode_error is not None:
        lines.append(f"body: {message.decode_error}")
        lines.append("raw:")
        lines += _indented(message.raw.decode(errors="replace"))
    else:
        lines.append("body:")
        lines += _indented(json_text(message.body))
    return lines


def cmd_dlq_show(args: argparse.Namespace) -> int:
    """``conveyor dlq show QUEUE ID``: everything about one waiting message."""
    app = load_app(args.config)
    qid = declared_queue(app, args.queue_id)
    with app:
        message = _find(qid, args.message_id)
    if args.json:
        print_json(message.as_dict())
    else:
        out("\n".join(_show_lines(message)))
    return EXIT_OK


# --------------------------------------------------------------------------- dlq replay / purge


def _wanted(args: argparse.Namespace) -> list[str] | None:
    """The IDs given with --id (duplicates dropped), or None for --all."""
    if args.all:
        return None
    return list(dict.fromkeys(args.ids))


def _unmatched(done: int, wanted: list[str] | None, verb: str) -> None:
    """A warning when fewer messages were acted on than IDs were given."""
    if wanted is not None and done < len(wanted):
        missing = len(wanted) - done
        was = "was" if missing == 1 else "were"
        err(
            f"conveyor: warning: {missing} of the {plural(len(wanted), 'ID')} given {was} not {verb}: "
            "not in the queue, or held by a consumer right now"
        )


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    """``conveyor dlq replay QUEUE (--all | --id ID ...) [--to QUEUE]``."""
    app = load_app(args.config)
    qid = declared_queue(app, args.queue_id)
    target = declared_queue(app, args.to) if args.to is not None else None
    wanted = _wanted(args)
    result: dict[str, Any] = {
        "queue": qid,
        "to": target,
        "requested": None if wanted is None else len(wanted),
    }
    with app, progress(f"replaying {qid}") as update:
        try:
            moved = queue.replay(qid, wanted, to=target, progress=update)
        except errors.Error as exc:
            replayed = exc.details.get("replayed")
            if args.json and isinstance(replayed, int):  # some moved before the rest could not
                print_json({**result, "replayed": replayed, "error": exc.to_dict()})
            if "replay them with to=QUEUE" in exc.message:  # the API's words; here it is an option
                message = exc.message.replace("with to=QUEUE", "with --to QUEUE")
                raise errors.Error(exc.kind, message, retryable=exc.retryable, details=exc.details) from None
            raise
    if args.json:
        print_json({**result, "replayed": moved})
    else:
        where = f" to {target}" if target is not None else " (each to its original queue)"
        out(f"replayed {plural(moved, 'message')} from {qid}{where}")
    _unmatched(moved, wanted, "replayed")
    return EXIT_OK


def _confirm(question: str) -> bool:
    """Ask on the terminal (the question on stderr, the answer from stdin)."""
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    if not answer.endswith("\n"):
        sys.stderr.write("\n")
    return answer.strip().lower() in ("y", "yes")


def _what(qid: str, wanted: list[str] | None) -> str:
    """The messages a purge is about to remove, in words."""
    if wanted is not None:
        return plural(len(wanted), "message")
    count = _message_count(qid)
    if count is None:
        return "every waiting message"
    return "the 1 waiting message" if count == 1 else f"all {count} waiting messages"


def cmd_dlq_purge(args: argparse.Namespace) -> int:
    """``conveyor dlq purge QUEUE (--all | --id ID ...) [--yes]``: asks first, unless --yes."""
    app = load_app(args.config)
    qid = declared_queue(app, args.queue_id)
    wanted = _wanted(args)
    ask = not args.yes
    if ask and not is_terminal(sys.stdin):
        raise UsageError(f"refusing to purge {qid} without confirmation: stdin is not a terminal; pass --yes")
    with app:
        if ask and not _confirm(f"Purge {_what(qid, wanted)} of {qid}? This cannot be undone."):
            err("conveyor: nothing purged")
            return EXIT_FAILURE
        with progress(f"purging {qid}") as update:
            removed = queue.purge(qid, wanted, progress=update)
    if args.json:
        print_json({"queue": qid, "purged": removed, "requested": None if wanted is None else len(wanted)})
    else:
        out(f"purged {plural(removed, 'message')} from {qid}")
    _unmatched(removed, wanted, "purged")
    return EXIT_OK
