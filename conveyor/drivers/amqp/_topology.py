"""Queue declarations: arguments from the configuration, delay queues, mismatch diagnosis.

Topology (everything goes through the default exchange, routed by queue name):

- ``<queue_name>``: the source queue, declared from ``driver_options.amqp`` and the
  driver's defaults. ``max_length`` without ``overflow`` means ``reject-publish``: a
  full queue refuses publishes (the publisher gets an error) instead of silently
  dropping its oldest messages, which is RabbitMQ's default.
- ``<queue_name>.conveyor-delay-<ms>ms``: one delay queue per distinct retry delay.
  It has a queue-wide TTL of ``<ms>`` and dead-letters expired messages back to the
  source queue. One TTL per queue keeps expiry in FIFO order (RabbitMQ only expires
  messages at the head of a queue, so mixing delays in one queue would hold a short
  delay behind a long one). Delay queues expire when unused (``x-expires`` = the
  delay plus ten minutes); the driver re-declares one before publishing to it
  whenever its last declaration is older than a minute, so a queue can never expire
  while a message it holds is still waiting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from conveyor import errors
from conveyor.drivers.options.amqp import SCHEMA, AmqpOptions
from conveyor.registry.model import QueueSpec

__all__ = [
    "Declaration",
    "Difference",
    "apply_difference",
    "delay_declaration",
    "mismatch_error",
    "parse_difference",
    "queue_declaration",
]

DELAY_EXPIRY_MARGIN_MS = 600_000
REDECLARE_AFTER = 60.0  # seconds; far below DELAY_EXPIRY_MARGIN_MS

# broker argument -> the driver_options.amqp key that sets it
_OPTION_OF = {
    "durable": "durable",
    "auto_delete": "auto_delete",
    "exclusive": "exclusive",
    "x-message-ttl": "message_ttl",
    "x-expires": "queue_expiry",
    "x-max-length": "max_length",
    "x-overflow": "overflow",
    "x-queue-type": "queue_type",
    "x-max-priority": "max_priority",
}
# RabbitMQ prints a value as 'x', as "the value 'x' of type 't'", or as none (not set).
_VALUE = r"(none|the value '[^']*' of type '[^']*'|'[^']*')"
_INEQUIVALENT = re.compile(rf"inequivalent arg '([^']+)'.*?received {_VALUE}\s+but current is {_VALUE}")


@dataclass(slots=True)
class Declaration:
    """Everything ``queue.declare`` needs for one queue."""

    name: str
    durable: bool = True
    auto_delete: bool = False
    exclusive: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)


def _ms(seconds: float) -> int:
    return max(round(seconds * 1000), 0)


def queue_declaration(queue: QueueSpec, driver: AmqpOptions) -> Declaration:
    """The declaration of a source queue (``driver`` = the driver entry's options)."""
    opts = SCHEMA.queue_options(queue.driver_options)
    args: dict[str, Any] = {}
    ttl = opts.message_ttl if opts.message_ttl is not None else driver.default_message_ttl
    if ttl is not None:
        args["x-message-ttl"] = _ms(ttl)
    expiry = opts.queue_expiry if opts.queue_expiry is not None else driver.default_queue_expiry
    if expiry is not None:
        args["x-expires"] = max(_ms(expiry), 1)
    if opts.max_length is not None:
        args["x-max-length"] = opts.max_length
        args["x-overflow"] = opts.overflow or "reject-publish"
    elif opts.overflow is not None:
        args["x-overflow"] = opts.overflow
    if opts.queue_type is not None:
        args["x-queue-type"] = opts.queue_type
    if opts.max_priority is not None:
        args["x-max-priority"] = opts.max_priority
    return Declaration(
        name=queue.queue_name,
        durable=opts.durable,
        auto_delete=opts.auto_delete,
        exclusive=opts.exclusive,
        arguments=args,
    )


def delay_name(source: str, delay_ms: int) -> str:
    return f"{source}.conveyor-delay-{delay_ms}ms"


def delay_declaration(source: Declaration, delay_ms: int) -> Declaration:
    """The delay queue that holds retries of ``source`` for ``delay_ms`` milliseconds.

    It is durable when the source is (a retry survives a broker restart), never
    exclusive (another connection may have to drain it) and always expires when
    unused.

    When the source has a length limit, RabbitMQ's ordinary dead-lettering would
    drop a retry that comes back while the source is full. Those delay queues are
    quorum queues with ``x-dead-letter-strategy: at-least-once`` instead: the broker
    keeps the message and tries again (RabbitMQ retries such a transfer about every
    three minutes) until the source has room.
    """
    args: dict[str, Any] = {
        "x-message-ttl": delay_ms,
        "x-expires": delay_ms + DELAY_EXPIRY_MARGIN_MS,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": source.name,
    }
    bounded = "x-max-length" in source.arguments
    if bounded:
        args.update(
            {
                "x-queue-type": "quorum",
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            }
        )
    return Declaration(
        name=delay_name(source.name, delay_ms), durable=source.durable or bounded, arguments=args
    )


# -- PRECONDITION_FAILED: which arguments differ ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Difference:
    """One argument whose declared value differs from the existing queue's."""

    argument: str
    declared: str  # as the broker printed it; "none" = not set
    current: str

    @property
    def option(self) -> str | None:
        return _OPTION_OF.get(self.argument)


def parse_difference(reply_text: str) -> Difference | None:
    """Read RabbitMQ's ``inequivalent arg 'x' ... received 'a' but current is 'b'``."""
    match = _INEQUIVALENT.search(reply_text)
    if match is None:
        return None
    argument, declared, current = match.groups()
    return Difference(argument, _printed(declared), _printed(current))


def _printed(value: str) -> str:
    if value == "none":
        return value
    return value.split("'")[1]


def apply_difference(decl: Declaration, diff: Difference) -> bool:
    """Make ``decl`` take the broker's current value, to find the next difference.

    False when the value cannot be adopted (the search stops there).
    """
    if diff.argument in ("durable", "auto_delete", "exclusive"):
        setattr(decl, diff.argument, diff.current == "true")
        return True
    if diff.current == "none":
        decl.arguments.pop(diff.argument, None)
        return True
    if diff.current.lstrip("-").isdigit():
        decl.arguments[diff.argument] = int(diff.current)
        return True
    if diff.argument.startswith("x-"):
        decl.arguments[diff.argument] = diff.current
        return True
    return False


def mismatch_error(queue: QueueSpec, differences: list[Difference], reply_text: str) -> errors.Error:
    """INVALID naming every differing argument and the two ways to fix it."""
    if not differences:
        return errors.invalid(
            f"queue {queue.id}: the broker refused to declare {queue.queue_name!r} ({reply_text}); "
            "it exists with different settings. Fix: match driver_options.amqp to the existing queue, "
            f"or delete it (rabbitmqctl delete_queue {queue.queue_name}) so conveyor can declare it",
            queue=queue.id,
            queue_name=queue.queue_name,
            broker_reply=reply_text,
        )
    parts = [f"{d.argument} (declared {d.declared}, broker has {d.current})" for d in differences]
    options = [f"{d.option}" for d in differences if d.option]
    match_hint = f" ({', '.join(options)})" if options else ""
    return errors.invalid(
        f"queue {queue.id}: {queue.queue_name!r} already exists on the broker with different "
        f"arguments: {'; '.join(parts)}. Fix: change driver_options.amqp{match_hint} to match the "
        f"existing queue, or delete the queue so conveyor can declare it anew "
        f"(rabbitmqctl delete_queue {queue.queue_name}; its messages are lost)",
        queue=queue.id,
        queue_name=queue.queue_name,
        differences=[
            {"argument": d.argument, "option": d.option, "declared": d.declared, "current": d.current}
            for d in differences
        ],
    )
