"""Quick-start handlers: enqueue a batch of welcome emails and "send" them."""

from __future__ import annotations

import logging
import time

from conveyor import queue

log = logging.getLogger("quickstart")

USERS = [
    ("ada@example.com", "Ada"),
    ("grace@example.com", "Grace"),
    ("linus@example.com", "Linus"),
    ("bounce@invalid.example", "Nobody"),  # this mailbox never accepts mail
    ("margaret@example.com", "Margaret"),
    ("barbara@example.com", "Barbara"),
    ("edsger@example.com", "Edsger"),
    ("donald@example.com", "Donald"),
    ("frances@example.com", "Frances"),
    ("ken@example.com", "Ken"),
]


class MailboxUnavailable(Exception):
    """The recipient's mail server refused the message for good."""


def enqueue_welcome_emails() -> int:
    left = queue.info("app:emails")["message_count"]
    if left:  # an earlier run was stopped (Ctrl-C, kill -9): finish its work first
        log.info("%d emails left from an earlier run; not enqueuing a new batch", left)
        return 0
    batch = [{"to": to, "name": name, "template": "welcome"} for to, name in USERS]
    count = queue.publish_many("app:emails", batch, {"campaign": "welcome-2026"})
    log.info("enqueued %d welcome emails", count)
    return count


def send_email(payload: dict[str, str]) -> None:
    msg = queue.message()
    if payload["to"].endswith("@invalid.example"):
        raise MailboxUnavailable(f"550 mailbox unavailable: {payload['to']}")
    time.sleep(0.2)  # the SMTP round trip
    log.info(
        "sent %s email to %s (message %s, attempt %d)",
        payload["template"],
        payload["to"],
        msg.id,
        msg.attempts,
    )
