"""Declarations from configuration, delay queues, and the PRECONDITION_FAILED diagnosis."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor import errors
from conveyor.drivers.amqp._topology import (
    Declaration,
    apply_difference,
    delay_declaration,
    delay_name,
    mismatch_error,
    parse_difference,
    queue_declaration,
)
from conveyor.drivers.options.amqp import AmqpOptions, AmqpQueueOptions
from conveyor.registry.model import QueueSpec

NO_DEFAULTS = AmqpOptions()


def spec(**amqp: Any) -> QueueSpec:
    bags = {"amqp": AmqpQueueOptions(**amqp)}
    return QueueSpec(id="app:q", driver="app:b", queue_name="app.q", driver_options=bags)


def test_defaults_are_a_durable_classic_queue_without_arguments() -> None:
    decl = queue_declaration(spec(), NO_DEFAULTS)
    assert (decl.name, decl.durable, decl.auto_delete, decl.exclusive, decl.arguments) == (
        "app.q",
        True,
        False,
        False,
        {},
    )


def test_every_option_maps_to_its_argument() -> None:
    decl = queue_declaration(
        spec(
            durable=False,
            auto_delete=True,
            exclusive=True,
            message_ttl=1.5,
            queue_expiry=60.0,
            max_length=10,
            overflow="drop-head",
            queue_type="classic",
            max_priority=9,
        ),
        NO_DEFAULTS,
    )
    assert (decl.durable, decl.auto_delete, decl.exclusive) == (False, True, True)
    assert decl.arguments == {
        "x-message-ttl": 1500,
        "x-expires": 60000,
        "x-max-length": 10,
        "x-overflow": "drop-head",
        "x-queue-type": "classic",
        "x-max-priority": 9,
    }


def test_max_length_without_overflow_rejects_publishes_instead_of_dropping() -> None:
    assert queue_declaration(spec(max_length=3), NO_DEFAULTS).arguments == {
        "x-max-length": 3,
        "x-overflow": "reject-publish",
    }


def test_driver_defaults_apply_unless_the_queue_sets_its_own() -> None:
    defaults = AmqpOptions(default_message_ttl=2.0, default_queue_expiry=30.0)
    assert queue_declaration(spec(), defaults).arguments == {"x-message-ttl": 2000, "x-expires": 30000}
    assert queue_declaration(spec(message_ttl=0.5), defaults).arguments["x-message-ttl"] == 500


def test_delay_queue_dead_letters_back_to_its_source() -> None:
    decl = delay_declaration(queue_declaration(spec(), NO_DEFAULTS), 250)
    assert decl.name == delay_name("app.q", 250) == "app.q.conveyor-delay-250ms"
    assert decl.durable and not decl.exclusive
    assert decl.arguments == {
        "x-message-ttl": 250,
        "x-expires": 250 + 600_000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "app.q",
    }


def test_delay_queue_of_a_bounded_queue_never_drops_a_returning_retry() -> None:
    decl = delay_declaration(queue_declaration(spec(max_length=5, durable=False), NO_DEFAULTS), 1000)
    assert decl.durable
    assert decl.arguments["x-queue-type"] == "quorum"
    assert decl.arguments["x-dead-letter-strategy"] == "at-least-once"
    assert decl.arguments["x-overflow"] == "reject-publish"


REPLY = (
    "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'app.q' in vhost '/': "
    "received '5' but current is '3'"
)


def test_parse_difference() -> None:
    diff = parse_difference(REPLY)
    assert diff is not None
    assert (diff.argument, diff.declared, diff.current, diff.option) == (
        "x-max-length",
        "5",
        "3",
        "max_length",
    )
    typed = parse_difference(
        "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue 'q' in vhost '/': "
        "received the value '4' of type 'byte' but current is none"
    )
    assert typed is not None and (typed.declared, typed.current) == ("4", "none")
    reverse = parse_difference(
        "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': "
        "received none but current is the value 'quorum' of type 'longstr'"
    )
    assert reverse is not None and (reverse.declared, reverse.current) == ("none", "quorum")
    assert parse_difference("PRECONDITION_FAILED - something else") is None


@pytest.mark.parametrize(
    ("argument", "current", "check"),
    [
        ("durable", "false", lambda d: d.durable is False),
        ("x-max-length", "3", lambda d: d.arguments["x-max-length"] == 3),
        ("x-queue-type", "quorum", lambda d: d.arguments["x-queue-type"] == "quorum"),
        ("x-message-ttl", "none", lambda d: "x-message-ttl" not in d.arguments),
    ],
)
def test_apply_difference_adopts_the_brokers_value(argument: str, current: str, check: Any) -> None:
    decl = Declaration("q", arguments={"x-message-ttl": 5})
    diff = parse_difference(
        f"inequivalent arg '{argument}' for queue 'q' in vhost '/': received 'x' but current is "
        + ("none" if current == "none" else f"'{current}'")
    )
    assert diff is not None
    assert apply_difference(decl, diff)
    assert check(decl)


def test_mismatch_error_names_every_argument_and_the_fix() -> None:
    diffs = [d for d in (parse_difference(REPLY),) if d is not None]
    exc = mismatch_error(spec(max_length=5), diffs, REPLY)
    assert exc.kind == errors.INVALID and not exc.retryable
    assert "x-max-length (declared 5, broker has 3)" in exc.message
    assert "driver_options.amqp (max_length)" in exc.message
    assert "rabbitmqctl delete_queue app.q" in exc.message
    assert exc.details["differences"][0]["option"] == "max_length"
