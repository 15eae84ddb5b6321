"""``conveyor publish``: one message (PAYLOAD, ``-``, ``@FILE``) or many (``--lines``).

The app starts without its consumers (drivers and queues only), the message is
stored, and the command prints its ID (``--json``: ``{"id", "queue", "headers"}``).
With ``--lines`` the messages are sent in batches of :data:`BATCH` with
``publish_many`` and their IDs printed as each batch is stored
(``--json``: ``{"ids", "count", "queue", "complete"}``). A line that cannot be sent
stops the command (exit 2): every message before it has been published, none from
it on, and the error says so.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from conveyor import errors, queue
from conveyor.app import App
from conveyor.cli.inputs import declared_queue, load_app, parse_headers
from conveyor.cli.output import EXIT_OK, UsageError, out, print_json
from conveyor.cli.payloads import BadLine, Line, Source, count_lines, open_lines, read_payload, source_of
from conveyor.cli.progress import Update, progress
from conveyor.queue.headers import check_headers

__all__ = ["BATCH", "cmd_publish"]

BATCH = 500  # messages per publish_many call of --lines


def cmd_publish(args: argparse.Namespace) -> int:
    """``conveyor publish``: start the app without consumers, publish, print the ID(s), stop."""
    headers = check_headers(parse_headers(args.header))
    payload = args.payload
    source = source_of(payload)
    if args.lines and source.kind == "argument":
        raise UsageError("--lines reads stdin (-) or a file (@FILE), not a PAYLOAD argument")
    app = load_app(args.config)
    qid = declared_queue(app, args.queue_id)
    if args.lines:
        return _Lines(app, qid, source, headers, args).run()
    data = read_payload(payload, text=args.text)  # before anything starts: bad JSON sends nothing
    with app:
        message_id = queue.publish(qid, data, headers or None)
    if args.json:
        print_json({"id": message_id, "queue": qid, "headers": headers})
    else:
        out(message_id)
    return EXIT_OK


class _Lines:
    """One ``publish --lines`` run: batches, the IDs sent so far, and what to say on failure."""

    def __init__(
        self, app: App, qid: str, source: Source, headers: dict[str, Any], args: argparse.Namespace
    ) -> None:
        self.app = app
        self.qid = qid
        self.source = source
        self.headers = headers or None
        self.text = bool(args.text)
        self.json = bool(args.json)
        self.sent: list[str] = []
        self.last_line = 0  # the line of the last message published

    def run(self) -> int:
        total = count_lines(self.source)
        batch: list[Line] = []
        with self.app, progress(f"publishing to {self.qid}", total) as update:
            try:
                for line in open_lines(self.source, text=self.text):
                    batch.append(line)
                    if len(batch) >= BATCH:
                        self._send(batch, update, total)
                        batch = []
                if batch:
                    self._send(batch, update, total)
            except BadLine as exc:
                if batch:
                    self._send(batch, update, total)  # every line before the bad one
                self._report(complete=False)
                raise UsageError(f"{exc}; {self._so_far(exc.number)}") from None
            except KeyboardInterrupt:
                self._report(complete=False)
                sys.stderr.write(f"conveyor: interrupted: {self._so_far(None)}\n")
                raise
        self._report(complete=True)
        return EXIT_OK

    def _send(self, batch: list[Line], update: Update, total: int | None) -> None:
        try:
            ids = queue.publish_many(self.qid, [line.data for line in batch], self.headers, return_ids=True)
        except errors.Error as exc:
            index = exc.details.get("index")
            if isinstance(index, int) and 0 <= index < len(batch):  # refused before anything was sent
                if index:
                    self._send(batch[:index], update, total)
                number = batch[index].number
                message = exc.message.removeprefix(f"item {index}: ")
                self._report(complete=False)
                raise errors.Error(
                    exc.kind,
                    f"line {number} of {self.source.describe()}: {message}; {self._so_far(number)}",
                    retryable=exc.retryable,
                    details={**exc.details, "line": number, "published": len(self.sent)},
                ) from None
            self._report(complete=False)
            raise errors.Error(
                exc.kind,
                f"{exc.message}; {self._so_far(batch[0].number)} (lines {batch[0].number}-"
                f"{batch[-1].number} may be partly stored)",
                retryable=exc.retryable,
                details={**exc.details, "published": len(self.sent)},
            ) from None
        self.sent.extend(ids)
        self.last_line = batch[-1].number
        if not self.json:
            out("\n".join(ids))
            sys.stdout.flush()
        update(self.last_line, total)

    def _so_far(self, stopped_at: int | None) -> str:
        """What was published before the line the command stopped at."""
        if not self.sent:
            return "nothing was published"
        count = len(self.sent)
        noun, verb = ("message", "was") if count == 1 else ("messages", "were")
        published = f"the {count} {noun} up to line {self.last_line} {verb} published"
        return published if stopped_at is None else f"{published}, nothing from line {stopped_at} on"

    def _report(self, *, complete: bool) -> None:
        if self.json:
            print_json({"ids": self.sent, "count": len(self.sent), "queue": self.qid, "complete": complete})
