"""Publishes the example's batch of welcome emails when the consumers start (on_start)."""

from __future__ import annotations

import logging

from conveyor import queue

log = logging.getLogger("lua_example")

USERS = [
    ("ada@example.com", "Ada"),
    ("grace@example.com", "Grace"),
    ("bounce@invalid.example", "Nobody"),  # this mailbox never accepts mail
    ("margaret@example.com", "Margaret"),
]


def enqueue() -> int:
    batch = [{"to": to, "template": "welcome", "data": {"name": name}} for to, name in USERS]
    count = queue.publish_many("app:emails", batch, {"campaign": "welcome-2026"})
    log.info("enqueued %d welcome emails", count)
    return count
