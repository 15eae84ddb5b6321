"""The driver contract: what the core needs from a storage/broker backend.

A driver is opened once per app, declares the queues bound to it, stores batches of
already-encoded messages, and hands out deliveries through a :class:`Subscription`
(one per consumer). Settlement goes back through that subscription. Everything a
driver raises is an :class:`conveyor.errors.Error`: native client exceptions are
translated here, at the edge, and never leak.

Drivers never see Python payloads, codecs, security or retry policy; the core
computes the redelivery delay and builds the dead-letter copy, and the driver only
has to make those operations durable (and, where the backend allows, atomic).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from conveyor import errors
from conveyor.drivers.options import max_message_size
from conveyor.registry.model import DriverSpec, QueueSpec
from conveyor.registry.options import Options

__all__ = [
    "Capabilities",
    "Delivery",
    "Driver",
    "HeaderValue",
    "Headers",
    "Outgoing",
    "Subscription",
    "queue_full",
]

HeaderValue = str | int | float | bool
Headers = dict[str, HeaderValue]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Documented differences between drivers.

    The driver-level suite (``tests/conformance/test_driver_contract.py``) checks each
    one both ways: what a driver claims, it does; what it does not claim is the
    weaker behaviour the docs describe.
    """

    # Messages survive closing the driver and opening a new one on the same configuration.
    durable: bool = False
    # A batch the driver refuses (a full queue) stores nothing. Without it, the error's
    # details["stored"] lists the indexes that were stored.
    atomic_batches: bool = False
    # A dead-letter move interrupted at any point leaves the message on exactly one of
    # the two queues. Without it, it can be on both (a duplicate), never on neither.
    atomic_dead_letter: bool = False
    # driver_options.<name>.max_length is enforced: a publish beyond it is refused.
    max_length: bool = False
    # A second driver on the same configuration (another process) shares the queues.
    cross_process: bool = False
    # A retry delay is kept by the backend: it survives the driver being closed and
    # reopened, and the message still waits it out.
    native_delay: bool = False


@dataclass(slots=True)
class Outgoing:
    """One encoded message on its way into a driver."""

    id: str
    body: bytes
    headers: Headers


class Delivery:
    """One hand-over of a stored message to a consumer.

    ``attempts`` counts deliveries from this queue, this one included (1 on the first).
    ``token`` is private to the driver that produced it.
    """

    __slots__ = ("attempts", "body", "headers", "id", "token")

    def __init__(self, id: str, body: bytes, headers: Headers, attempts: int, token: Any) -> None:
        self.id = id
        self.body = body
        self.headers = headers
        self.attempts = attempts
        self.token = token


class Subscription(abc.ABC):
    """A consumer's attachment to one queue.

    At most ``prefetch`` deliveries are unsettled at once; :meth:`get` waits while the
    limit is reached (backpressure). Every delivery handed out must be settled exactly
    once through :meth:`ack`, :meth:`nack`, :meth:`dead_letter` or :meth:`release`;
    whatever is still unsettled when the subscription is closed is returned to the
    queue by :meth:`close`.
    """

    @abc.abstractmethod
    def get_nowait(self) -> Delivery | None:
        """A delivery if one can be handed out without waiting, else ``None``."""

    @abc.abstractmethod
    async def get(self) -> Delivery | None:
        """Wait for the next delivery; ``None`` once the subscription is closing."""

    @abc.abstractmethod
    async def ack(self, delivery: Delivery) -> None:
        """The message was processed: remove it for good."""

    @abc.abstractmethod
    async def nack(self, delivery: Delivery, delay: float) -> None:
        """The attempt failed: make the message available again after ``delay`` s."""

    @abc.abstractmethod
    async def dead_letter(self, delivery: Delivery, target: QueueSpec, copy: Outgoing) -> None:
        """Store ``copy`` on ``target`` (a queue of the same driver), then remove the original.

        The copy must be stored before the original disappears; on failure the
        original stays (unsettled) and the error is raised.
        """

    @abc.abstractmethod
    async def release(self, delivery: Delivery) -> None:
        """Give an unprocessed delivery back without counting the attempt."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop handing out deliveries and return every unsettled one to the queue.

        Waiting :meth:`get` calls return None. A delivery handed out and not settled
        comes back with its attempt counted; one the subscription fetched ahead but
        never handed out (also with ``auto_ack``) comes back as if never delivered.
        Idempotent.
        """


class Driver(abc.ABC):
    """A backend. One instance per driver entry per running app.

    ``max_message_size`` is the largest message (encoded body plus headers, in bytes)
    the core hands to :meth:`publish`: the entry's ``max_message_size`` option (every
    driver declares it with ``conveyor.drivers.options.message_size_option``), or the
    default. The core refuses bigger messages before the driver is called.
    """

    kind: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def __init__(self, spec: DriverSpec) -> None:
        self.spec = spec
        self.max_message_size: int = max_message_size(spec.options)

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect / open storage. Raises ``Error`` (INTERNAL, retryable) on failure."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every subscription still open (see :meth:`Subscription.close`), then
        release every resource. Idempotent."""

    @abc.abstractmethod
    async def declare(self, queue: QueueSpec) -> None:
        """Make sure ``queue`` exists with its options (idempotent)."""

    @abc.abstractmethod
    async def publish(self, queue: QueueSpec, batch: list[Outgoing]) -> None:
        """Store every message of ``batch``; return only once they are stored."""

    @abc.abstractmethod
    async def subscribe(
        self, queue: QueueSpec, *, prefetch: int, auto_ack: bool, options: Mapping[str, Options]
    ) -> Subscription:
        """Attach a consumer. With ``auto_ack`` a delivery is settled when handed out.

        ``options`` is the consumer's ``driver_options``: every bag written, validated;
        the driver reads its own (``SCHEMA.consumer_options(options)``).
        """

    @abc.abstractmethod
    async def info(self, queue: QueueSpec) -> dict[str, Any]:
        """At least ``message_count``, ``consumer_count``, ``ready``, ``in_flight`` and
        ``delayed`` (waiting out a retry delay); ``message_count`` counts them all."""


def queue_full(queue: QueueSpec, limit: int) -> errors.Error:
    """The error every driver raises when ``max_length`` refuses a publish (nothing stored)."""
    return errors.internal(
        f"queue {queue.id} is full (max_length {limit}); nothing was stored",
        queue=queue.id,
        reason="queue_full",
        max_length=limit,
        retryable=True,
    )
