"""Publishes the broker refuses: reported as refused (nothing stored), never as "may be stored".

A message over the broker's ``max_message_size`` is tested on a private node of this
module whose rabbitmq.conf sets ``max_message_size = 4096`` (the shared broker on
5672 is never reconfigured); the message goes straight through the driver, below the
core's own size check. RabbitMQ refuses it by closing the publishing channel with
406 PRECONDITION_FAILED, which also drops every publish written after it on that
channel. A foreign ``amqp.user_id`` is refused the same way by any broker; access
refused needs a user without write permission, made on the private node.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import errors, queue
from conveyor.drivers.amqp import AmqpDriver
from conveyor.drivers.base import Outgoing
from tests.amqp.helpers import broker, on, on_loop, start_node
from tests.support.harness import Harness
from tests.support.rabbit_node import RabbitNode
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(240)]

LIMIT = 4096
CTL_TIMEOUT = 120.0  # rabbitmqctl boots an Erlang VM: slow on a loaded machine


@pytest.fixture(scope="module")
def small_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A private node that refuses message bodies over 4096 bytes."""
    yield from start_node(tmp_path_factory, "conveyor-small", config=[f"max_message_size = {LIMIT}"])


def message(size: int) -> Outgoing:
    return Outgoing(uuid.uuid4().hex, b"x" * size, {})


def publish_raw(app: Any, qid: str, *sizes: int) -> errors.Error | None:
    """Publish bodies of ``sizes`` through the driver itself (no size check of the core)."""
    bound = app.runtime.queue(qid)

    async def run() -> errors.Error | None:
        try:
            await bound.driver.publish(bound.spec, [message(size) for size in sizes])
        except errors.Error as exc:
            return exc
        return None

    return on_loop(app, run())


def together(app: Any, *calls: tuple[str, int]) -> list[errors.Error | None]:
    """Separate publishes made in the same turn of the loop: one socket write, in this order."""

    async def one(qid: str, size: int) -> errors.Error | None:
        bound = app.runtime.queue(qid)
        try:
            await bound.driver.publish(bound.spec, [message(size)])
        except errors.Error as exc:
            return exc
        return None

    async def run() -> list[errors.Error | None]:
        return list(await asyncio.gather(*(one(qid, size) for qid, size in calls)))

    return on_loop(app, run())


def ready(url: str, name: str) -> int:
    async def count(ch: Any) -> int:
        return int((await ch.queue_declare(name, passive=True)).message_count)

    return broker(count, url)


def test_a_message_over_the_brokers_max_message_size_is_invalid_and_not_stored(
    small_node: RabbitNode, amqp: Harness
) -> None:
    on(amqp, small_node.url)
    q = amqp.queue("big")
    with amqp.load() as app:
        exc = publish_raw(app, q, LIMIT + 1000)
        assert exc is not None
        assert exc.kind == errors.INVALID and not exc.retryable, exc
        assert exc.details["reason"] == "too_large"
        assert exc.details["size"] == LIMIT + 1000 and exc.details["limit"] == LIMIT
        assert exc.details["stored"] == [] and exc.details["not_stored"] == [0]
        assert f"{LIMIT + 1000} bytes" in exc.message and f"{LIMIT} bytes" in exc.message
        assert "nothing was stored" in exc.message and "may or may not" not in exc.message
        # the driver opens a new publishing channel: publishing goes on
        assert publish_raw(app, q, LIMIT) is None
        assert queue.info(q)["message_count"] == 1


def test_a_batch_reports_which_message_was_refused_and_what_became_of_the_others(
    small_node: RabbitNode, amqp: Harness
) -> None:
    on(amqp, small_node.url)
    q = amqp.queue("batch")
    with amqp.load() as app:
        exc = publish_raw(app, q, 10, LIMIT + 1, 10)
        assert exc is not None
        assert exc.kind == errors.INVALID and exc.details["reason"] == "too_large", exc
        assert exc.details["index"] == 1 and exc.details["size"] == LIMIT + 1
        # The first was handled by the broker before the refusal (stored, but its confirm
        # may have been lost with the channel); the third was dropped with the channel.
        assert exc.details["not_stored"] == [1, 2]
        assert exc.details["stored"] in ([], [0])
        assert ready(small_node.url, f"{amqp.namespace}.batch") == 1


def test_other_publishes_dropped_with_the_refused_ones_channel_are_not_stored_and_retryable(
    small_node: RabbitNode, amqp: Harness
) -> None:
    """Publishers share one channel: the broker closes it for everyone."""
    on(amqp, small_node.url)
    big, small = amqp.queue("big"), amqp.queue("small")
    with amqp.load() as app:
        refused, dropped = together(app, (big, LIMIT * 2), (small, 10))
        assert refused is not None and refused.kind == errors.INVALID, refused
        assert dropped is not None, "written after the refused publish: the broker drops it"
        assert dropped.kind == errors.INTERNAL and dropped.retryable, dropped
        assert dropped.details["reason"] == "channel_closed"
        assert dropped.details["not_stored"] == [0] and dropped.details["stored"] == []
        assert "another message" in dropped.message and "may or may not" not in dropped.message
        assert queue.info(small)["message_count"] == 0
        # Once refused, such a message is refused before it is sent: it no longer takes
        # the channel, and the other publishes of the same turn down with it.
        refused, kept = together(app, (big, LIMIT * 2), (small, 10))
        assert refused is not None and refused.kind == errors.INVALID, refused
        assert "not sent" in refused.message
        assert kept is None
        assert queue.info(small)["message_count"] == 1
        assert queue.info(big)["message_count"] == 0


def test_the_learned_limit_is_forgotten_when_the_connection_is_new(
    small_node: RabbitNode, amqp: Harness
) -> None:
    """A broker restarted with a larger limit must not be held to the old one."""
    on(amqp, small_node.url, reconnect_delay="100ms", reconnect_max_delay="500ms")
    q = amqp.queue("relearn")
    with amqp.load() as app:
        first = publish_raw(app, q, LIMIT + 1)
        assert first is not None and first.details["reason"] == "too_large"
        driver = app.runtime.queue(q).driver
        assert isinstance(driver, AmqpDriver)
        generation = driver.link.generation
        small_node.ctl("close_all_connections", "conveyor refusal test", timeout=CTL_TIMEOUT)
        wait_until(lambda: driver.link.generation > generation and driver.link.is_up, timeout=30)
        again = publish_raw(app, q, LIMIT + 1)
        assert again is not None and again.details["reason"] == "too_large"
        assert "not sent" not in again.message, "sent to the broker again, which refused it itself"


def test_a_foreign_user_id_is_refused_as_invalid(amqp: Harness) -> None:
    """The shared broker checks ``user_id`` against the connection's user (guest)."""
    q = amqp.queue("impostor")
    with amqp.load():
        with pytest.raises(errors.Error) as info:
            queue.publish(q, "x", {"amqp.user_id": "someone-else"})
        exc = info.value
        assert exc.kind == errors.INVALID and not exc.retryable, exc
        assert exc.details["reason"] == "user_id" and exc.details["not_stored"] == [0]
        assert "someone-else" in exc.message and "nothing was stored" in exc.message
        assert queue.publish(q, "y", {"amqp.user_id": "guest"})
        assert queue.info(q)["message_count"] == 1


def test_a_publish_without_write_permission_is_permission_denied(
    small_node: RabbitNode, amqp: Harness, tmp_path: Path
) -> None:
    user = f"reader-{uuid.uuid4().hex[:8]}"
    small_node.ctl("add_user", user, "reader-password", timeout=CTL_TIMEOUT)
    # may declare and read its queues, may not write to any exchange (the default one included)
    small_node.ctl("set_permissions", "-p", "/", user, ".*", "^$", ".*", timeout=CTL_TIMEOUT)
    on(amqp, small_node.url.replace("guest:guest", f"{user}:reader-password"))
    q = amqp.queue("readonly")
    with amqp.load():
        with pytest.raises(errors.Error) as info:
            queue.publish(q, "x")
        exc = info.value
        assert exc.kind == errors.PERMISSION_DENIED and not exc.retryable, exc
        assert exc.details["reason"] == "access_refused" and exc.details["not_stored"] == [0]
        assert "ACCESS_REFUSED" in exc.message and "nothing was stored" in exc.message
        assert queue.info(q)["message_count"] == 0
