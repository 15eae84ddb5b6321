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
from collections.abc import Callable, Collection, Mapping
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
    "Rewrite",
    "Stored",
    "Subscription",
    "browse_gone",
    "check_limit",
    "queue_full",
    "same_queue",
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
    # browse lists the messages consumers hold right now (state "in_flight"). Without
    # it, browse lists only the waiting ones (ready and delayed).
    browse_in_flight: bool = False
    # browse cannot read without taking: it takes each message it lists and gives it
    # back, so that message's next delivery counts one more attempt for each browse
    # that listed it (it still reaches a consumer; nothing is lost or duplicated).
    # Without it, browsing leaves attempts and delivery order unchanged.
    browse_counts_delivery: bool = False


@dataclass(slots=True)
class Outgoing:
    """One encoded message on its way into a driver."""

    id: str
    body: bytes
    headers: Headers


STATES = ("ready", "delayed", "in_flight")


@dataclass(frozen=True, slots=True)
class Stored:
    """A message as it sits in a queue, read without taking it (:meth:`Driver.browse`).

    ``attempts`` counts the deliveries of this copy so far (0: never delivered; a
    driver that cannot tell reports what it knows, see docs/drivers.md). ``state`` is
    ``"ready"``, ``"delayed"`` (waiting out a retry delay) or ``"in_flight"`` (held by
    a consumer right now). ``seq`` orders the messages of one queue as the driver
    hands them out; it means nothing across queues or drivers.
    """

    id: str
    body: bytes
    headers: Headers
    attempts: int
    state: str
    seq: int = 0


# What a move stores on the target for each message it takes from the source.
Rewrite = Callable[[Stored], Outgoing]


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

    @property
    def connected(self) -> bool:
        """False while an open driver has lost its backend and is reconnecting (``/readyz``
        reports it). A driver without a connection to lose keeps the default, True."""
        return True

    @abc.abstractmethod
    async def info(self, queue: QueueSpec) -> dict[str, Any]:
        """At least ``message_count``, ``consumer_count``, ``ready``, ``in_flight`` and
        ``delayed`` (waiting out a retry delay); ``message_count`` counts them all."""

    # -- queue tooling: browse, purge, move (dead-letter replay) -------------------------

    @abc.abstractmethod
    async def browse(self, queue: QueueSpec, *, limit: int, after: str | None = None) -> list[Stored]:
        """Up to ``limit`` (>= 1) messages of ``queue``, in the order they are handed out,
        without taking them: no consumer misses one and no attempt is counted (a
        driver that cannot avoid a side effect documents it, see docs/drivers.md).

        ``after`` is the ID of a message a previous call returned: the page starts
        after it; NOT_FOUND if that message has left the queue since. Messages a
        consumer holds are listed (``state="in_flight"``) where the backend can see
        them; messages waiting out a retry delay are listed as ``"delayed"``.
        """

    @abc.abstractmethod
    async def purge(self, queue: QueueSpec, ids: Collection[str] | None = None) -> int:
        """Remove the waiting (ready or delayed) messages of ``queue``: all of them with
        ``ids=None``, else those whose ID is in ``ids`` (IDs not found are skipped).

        Messages a consumer holds right now are left alone: their consumer settles
        them. Returns how many messages were removed.
        """

    @abc.abstractmethod
    async def move(
        self,
        source: QueueSpec,
        target: QueueSpec,
        rewrite: Rewrite,
        *,
        ids: Collection[str] | None = None,
        limit: int,
    ) -> int:
        """Move up to ``limit`` waiting messages from ``source`` to ``target`` (a queue of
        this driver), in queue order: all of them with ``ids=None``, else those whose
        ID is in ``ids`` (IDs not found are skipped). Each is stored on ``target`` as
        ``rewrite(stored)`` (its delivery count starts over) and removed from
        ``source`` in one step: an interrupted move leaves every message on exactly
        one of the two queues, never on both and never on neither.

        ``max_length`` of ``target`` is not enforced (nothing is added to the
        system). Messages a consumer holds are left alone. Returns how many moved.
        """


def check_limit(limit: object) -> int:
    """``limit`` of ``browse`` / ``move``; INVALID unless an integer of 1 or more."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise errors.invalid(f"limit must be an integer of 1 or more, not {limit!r}")
    return limit


def browse_gone(queue: QueueSpec, after: str) -> errors.Error:
    """The error every driver raises when ``browse(after=...)`` names a message that has left."""
    return errors.not_found(
        f"message {after} is not on {queue.id} (any more): browse again from the start",
        queue=queue.id,
        id=after,
    )


def same_queue(source: QueueSpec) -> errors.Error:
    """The error every driver raises for a ``move`` of a queue onto itself."""
    return errors.invalid(f"cannot move messages of {source.id} onto the same queue")


def queue_full(queue: QueueSpec, limit: int) -> errors.Error:
    """The error every driver raises when ``max_length`` refuses a publish (nothing stored)."""
    return errors.internal(
        f"queue {queue.id} is full (max_length {limit}); nothing was stored",
        queue=queue.id,
        reason="queue_full",
        max_length=limit,
        retryable=True,
    )
