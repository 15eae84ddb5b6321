"""The driver contract (``conveyor/drivers/base.py``), checked on drivers directly.

Every test runs once per driver in ``conftest.DRIVERS`` through the ``kit`` fixture
(``tests/support/drivers.py``): no YAML, no App, no consumer runtime. Documented
differences between drivers are read from ``kit.capabilities`` (the driver class's
:class:`Capabilities` record), never from the driver's name; each capability is
checked both ways: what a driver claims, it does; without the claim, the weaker
behaviour holds.

Waits are bounded and poll with deadlines (the suite must hold on a loaded 2-core
machine); the only timing assertions are the generous ones on retry delays.
Destructive and slow cases come last.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import pytest

from conveyor import errors
from conveyor.drivers.base import Delivery, Driver, Headers, Outgoing, Subscription
from conveyor.registry.model import QueueSpec
from tests.support.drivers import DriverKit, run

BODY = bytes(range(256))  # every byte value, NUL and non-UTF-8 included
HEADERS: Headers = {
    "text": "héllo",
    "count": 42,
    "negative": -7,
    "big": 2**40,
    "ratio": 0.1,
    "whole_float": 2.0,
    "yes": True,
    "no": False,
}
WAIT = 10.0  # seconds a delivery or a count may take to show up, however loaded the machine
QUIET = 0.5  # seconds during which "nothing is delivered" is checked
TOLERANCE = 0.1  # seconds a delayed message may show up before its due time (clock granularity)


# -- helpers ---------------------------------------------------------------------------


def message(n: int, **headers: Any) -> Outgoing:
    return Outgoing(f"m{n}-{uuid.uuid4().hex[:8]}", f"body {n}".encode(), {"n": n, **headers})


def messages(count: int, start: int = 0) -> list[Outgoing]:
    return [message(n) for n in range(start, start + count)]


def ids_of(items: Iterable[Delivery | Outgoing]) -> list[str]:
    return [item.id for item in items]


async def subscribe(
    drv: Driver, queue: QueueSpec, prefetch: int = 10, auto_ack: bool = False
) -> Subscription:
    return await drv.subscribe(queue, prefetch=prefetch, auto_ack=auto_ack, options={})


async def take(sub: Subscription, count: int, timeout: float = WAIT) -> list[Delivery]:
    """``count`` deliveries from ``get()``; AssertionError naming what came if they do not."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    got: list[Delivery] = []
    while len(got) < count:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"got {len(got)} of {count} deliveries within {timeout}s: {ids_of(got)}")
        try:
            delivery = await asyncio.wait_for(sub.get(), remaining)
        except TimeoutError:
            continue
        assert delivery is not None, "get() returned None on an open subscription"
        got.append(delivery)
    return got


async def nothing_within(sub: Subscription, seconds: float, why: str = "") -> None:
    """No delivery comes out of ``get()`` for ``seconds``."""
    if seconds <= 0:
        return
    try:
        delivery = await asyncio.wait_for(sub.get(), seconds)
    except TimeoutError:
        return
    detail = "None" if delivery is None else f"{delivery.id} (attempts {delivery.attempts})"
    raise AssertionError(f"unexpected delivery {detail} {why}".rstrip())


async def expect_info(
    drv: Driver, queue: QueueSpec, timeout: float = WAIT, **expected: int
) -> dict[str, Any]:
    """Poll ``info`` until every ``expected`` key has its value; AssertionError with the last one."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        info = await drv.info(queue)
        if all(key in info and info[key] == value for key, value in expected.items()):
            return info
        if loop.time() > deadline:
            raise AssertionError(
                f"info({queue.queue_name}) never matched {expected} in {timeout}s; last: {info}"
            )
        await asyncio.sleep(0.02)


async def until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.01)


async def drain(drv: Driver, queue: QueueSpec, timeout: float = WAIT) -> list[str]:
    """Ack everything a new subscription receives until ``info`` counts nothing; the ids.

    A message that ``info`` counts but no new subscription ever receives (leased by a
    subscription that is gone, say) fails here: "present" means deliverable.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    got: list[str] = []
    sub: Subscription | None = None
    try:
        while True:
            info = await drv.info(queue)
            if info["message_count"] == 0:
                return got
            if loop.time() > deadline:
                raise AssertionError(
                    f"{queue.queue_name}: info counts {info['message_count']} message(s) that a new "
                    f"subscription never receives within {timeout}s (info {info}; received {got})"
                )
            if sub is None:
                sub = await subscribe(drv, queue)
            try:
                delivery = await asyncio.wait_for(sub.get(), 0.2)
            except TimeoutError:
                continue
            assert delivery is not None, "get() returned None on an open subscription"
            got.append(delivery.id)
            await sub.ack(delivery)
    finally:
        if sub is not None:
            await sub.close()


async def stop(tasks: Iterable[asyncio.Task[Any]]) -> None:
    pending = list(tasks)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def assert_invalid(exc: errors.Error, what: str) -> None:
    assert exc.kind == errors.INVALID, f"{what}: expected INVALID, got {exc.kind}: {exc}"


def settlements(
    sub: Subscription, delivery: Delivery, dlq: QueueSpec
) -> dict[str, Callable[[], Awaitable[None]]]:
    """Every way to settle ``delivery`` through ``sub``, as zero-argument coroutine factories."""
    return {
        "ack": lambda: sub.ack(delivery),
        "nack": lambda: sub.nack(delivery, 0),
        "release": lambda: sub.release(delivery),
        "dead_letter": lambda: sub.dead_letter(delivery, dlq, Outgoing(delivery.id, delivery.body, {})),
    }


async def refused(call: Awaitable[Any], what: str) -> errors.Error:
    """Await ``call``; it must raise ``errors.Error``; return that error."""
    try:
        await call
    except errors.Error as exc:
        return exc
    raise AssertionError(f"{what}: no error raised")


# -- 1. declare, publish, get, ack, info ------------------------------------------------


def test_declare_publish_get_ack_round_trip(kit: DriverKit) -> None:
    """declare is idempotent (and keeps what is stored); publish -> get -> ack round-trips
    the body bytes, the id and typed headers (str/int/float/bool keep their type), the
    first delivery has ``attempts == 1``; ``info`` has ``message_count``, ``ready``,
    ``in_flight`` and ``consumer_count`` right before, during and after."""

    async def main() -> None:
        async with kit.opened() as drv:
            q = kit.queue("q")
            await drv.declare(q)
            await drv.declare(q)
            await expect_info(drv, q, message_count=0, ready=0, in_flight=0, consumer_count=0)
            out = Outgoing("id-1", BODY, dict(HEADERS))
            await drv.publish(q, [out])
            await drv.declare(q)
            await expect_info(drv, q, message_count=1, ready=1, in_flight=0, consumer_count=0)
            sub = await subscribe(drv, q, prefetch=1)
            try:
                (got,) = await take(sub, 1)
                assert got.id == "id-1"
                assert got.body == BODY
                assert got.headers == HEADERS
                assert {k: type(v) for k, v in got.headers.items()} == {
                    k: type(v) for k, v in HEADERS.items()
                }
                assert got.attempts == 1
                await expect_info(drv, q, message_count=1, ready=0, in_flight=1, consumer_count=1)
                await sub.ack(got)
                await expect_info(drv, q, message_count=0, ready=0, in_flight=0, consumer_count=1)
            finally:
                await sub.close()
            await expect_info(drv, q, message_count=0, ready=0, in_flight=0, consumer_count=0)

    run(main())


# -- 2. FIFO, get_nowait, get ------------------------------------------------------------


def test_batches_are_fifo_and_get_waits(kit: DriverKit) -> None:
    """``get_nowait`` is None on an empty queue; ``get()`` waits and returns once something
    is published; a batch (and batches published one after another) come out in order."""

    async def main() -> None:
        async with kit.opened() as drv:
            q = kit.queue("q")
            await drv.declare(q)
            sub = await subscribe(drv, q, prefetch=20)
            try:
                await asyncio.sleep(0.2)  # let a driver with a background fetch find nothing
                assert sub.get_nowait() is None
                waiting = asyncio.create_task(sub.get())
                try:
                    await asyncio.sleep(0.2)
                    assert not waiting.done(), f"get() on an empty queue returned {waiting.result()!r}"
                    first, second = messages(10), messages(5, start=10)
                    await drv.publish(q, first)
                    await drv.publish(q, second)
                    head = await asyncio.wait_for(waiting, WAIT)
                except BaseException:
                    await stop([waiting])
                    raise
                assert head is not None
                rest = await take(sub, 14)
                assert ids_of([head, *rest]) == ids_of(first + second)
                assert [d.attempts for d in [head, *rest]] == [1] * 15
                for delivery in [head, *rest]:
                    await sub.ack(delivery)
                assert sub.get_nowait() is None
                await expect_info(drv, q, message_count=0)
            finally:
                await sub.close()

    run(main())


# -- 3. nack without delay ------------------------------------------------------------------


def test_nack_redelivers_and_counts_the_attempt(kit: DriverKit) -> None:
    """``nack(delay=0)`` makes the message available again at once, with ``attempts``
    one higher and the same id, body and headers."""

    async def main() -> None:
        async with kit.opened() as drv:
            q = kit.queue("q")
            await drv.declare(q)
            out = Outgoing("id-1", BODY, dict(HEADERS))
            await drv.publish(q, [out])
            sub = await subscribe(drv, q, prefetch=1)
            try:
                for attempt in (1, 2, 3):
                    (got,) = await take(sub, 1)
                    assert (got.id, got.body, got.headers, got.attempts) == (out.id, BODY, HEADERS, attempt)
                    if attempt < 3:
                        await sub.nack(got, 0)
                await expect_info(drv, q, message_count=1, in_flight=1)
                await sub.ack(got)
                await expect_info(drv, q, message_count=0, in_flight=0, ready=0)
            finally:
                await sub.close()

    run(main())


# -- 4. release --------------------------------------------------------------------------


def test_release_does_not_count_the_attempt(kit: DriverKit) -> None:
    """``release`` gives the message back without counting the attempt: the next delivery
    has the same ``attempts``, id, body and headers."""

    async def main() -> None:
        async with kit.opened() as drv:
            q = kit.queue("q")
            await drv.declare(q)
            out = Outgoing("id-1", BODY, dict(HEADERS))
            await drv.publish(q, [out])
            sub = await subscribe(drv, q, prefetch=1)
            try:
                (got,) = await take(sub, 1)
                assert got.attempts == 1
                await sub.release(got)
                await expect_info(drv, q, message_count=1)
                (again,) = await take(sub, 1)
                assert (again.id, again.body, again.headers, again.attempts) == (out.id, BODY, HEADERS, 1)
                await sub.nack(again, 0)
                (third,) = await take(sub, 1)
                assert third.attempts == 2
                await sub.release(third)
                (fourth,) = await take(sub, 1)
                assert fourth.attempts == 2, "release after a nack must keep the counted attempt"
                await sub.ack(fourth)
                await expect_info(drv, q, message_count=0)
            finally:
                await sub.close()

    run(main())


# -- 5. dead_letter ----------------------------------------------------------------------


def test_dead_letter_moves_the_copy(kit: DriverKit) -> None:
    """``dead_letter(delivery, target, copy)`` stores ``copy`` (id, body, headers) on the
    target and removes the original from its queue."""

    async def main() -> None:
        async with kit.opened() as drv:
            src, dlq = kit.queue("src"), kit.queue("dlq")
            await drv.declare(src)
            await drv.declare(dlq)
            await drv.publish(src, [Outgoing("id-1", BODY, dict(HEADERS))])
            sub = await subscribe(drv, src, prefetch=1)
            try:
                (got,) = await take(sub, 1)
                copy_headers: Headers = {**got.headers, "reason": "poison", "failures": 3}
                await sub.dead_letter(got, dlq, Outgoing(got.id, got.body, copy_headers))
                await expect_info(drv, src, message_count=0, ready=0, in_flight=0)
                await expect_info(drv, dlq, message_count=1, ready=1)
                await nothing_within(sub, QUIET, "on the source after dead_letter")
            finally:
                await sub.close()
            dead = await subscribe(drv, dlq, prefetch=1)
            try:
                (copy,) = await take(dead, 1)
                assert (copy.id, copy.body, copy.headers) == ("id-1", BODY, copy_headers)
                assert copy.attempts == 1
                await dead.ack(copy)
            finally:
                await dead.close()
            await expect_info(drv, dlq, message_count=0)

    run(main())


# -- 6. closing a subscription ----------------------------------------------------------


def test_subscription_close_returns_unsettled_and_buffered(kit: DriverKit) -> None:
    """``Subscription.close()`` returns every unsettled delivery (and whatever it buffered
    without handing out) to the queue: a new subscription gets them all, nothing is
    lost or duplicated. ``attempts`` counts hand-overs: one handed out and left
    unsettled has used its attempt (2 next time), one only buffered has not (1).

    Faults F02, F06.
    """

    async def main() -> None:
        async with kit.opened() as drv:
            q = kit.queue("q")
            await drv.declare(q)
            published = messages(6)
            await drv.publish(q, published)
            sub = await subscribe(drv, q, prefetch=4)
            try:
                handed = await take(sub, 2)
                await asyncio.sleep(0.3)  # let a driver that buffers fill its buffer
            finally:
                await sub.close()
            await expect_info(drv, q, message_count=6, ready=6, in_flight=0, consumer_count=0)
            again = await subscribe(drv, q, prefetch=10)
            try:
                got = await take(again, 6)
                assert sorted(ids_of(got)) == sorted(ids_of(published))
                attempts = {d.id: d.attempts for d in got}
                unhanded = set(ids_of(published)) - set(ids_of(handed))
                assert {i: attempts[i] for i in unhanded} == dict.fromkeys(unhanded, 1)
                assert {i: attempts[i] for i in ids_of(handed)} == dict.fromkeys(ids_of(handed), 2)
                await nothing_within(again, QUIET, "beyond the 6 published")
                for delivery in got:
                    await again.ack(delivery)
            finally:
                await again.close()
            await expect_info(drv, q, message_count=0)

    run(main())


# -- 7. prefetch ---------------------------------------------------------------------------


def test_prefetch_bounds_unsettled_deliveries(kit: DriverKit) -> None:
    """At most ``prefetch`` deliveries are unsettled at once: with prefetch=2 a third is
    not handed out until one of the two is settled (then it is)."""

    async def main() -> None:
        async with kit.opened() as drv:
            q = kit.queue("q")
            await drv.declare(q)
            await drv.publish(q, messages(3))
            sub = await subscribe(drv, q, prefetch=2)
            try:
                first, second = await take(sub, 2)
                await nothing_within(sub, QUIET, "beyond prefetch=2")
                assert sub.get_nowait() is None
                await expect_info(drv, q, message_count=3, ready=1, in_flight=2)
                await sub.ack(first)
                (third,) = await take(sub, 1)
                await nothing_within(sub, 0.2, "on a drained queue")
                await sub.ack(second)
                await sub.ack(third)
                await expect_info(drv, q, message_count=0)
            finally:
                await sub.close()

    run(main())


# -- 8. concurrent getters and cancellation ---------------------------------------------


async def _worker(sub: Subscription, seen: list[str]) -> None:
    while True:
        delivery = await sub.get()
        if delivery is None:
            return
        seen.append(delivery.id)
        await asyncio.sleep(0)
        await sub.ack(delivery)


def test_concurrent_getters_on_one_subscription(kit: DriverKit) -> None:
    """Several tasks blocked in ``get()`` on one subscription (more than its prefetch):
    every published message is delivered exactly once; closing the subscription makes
    every waiting ``get()`` return None."""

    async def main() -> None:
        async with kit.opened() as drv:
            q = kit.queue("q")
            await drv.declare(q)
            sub = await subscribe(drv, q, prefetch=3)
            seen: list[str] = []
            workers = [asyncio.create_task(_worker(sub, seen)) for _ in range(5)]
            try:
                await asyncio.sleep(0.1)
                published: list[Outgoing] = []
                for start in range(0, 40, 8):
                    batch = messages(8, start)
                    published += batch
                    await drv.publish(q, batch)
                await until(lambda: len(seen) >= 40, f"40 deliveries (have {len(seen)})", timeout=20)
                await nothing_within_workers(seen, 40)
                await sub.close()
                await asyncio.wait_for(asyncio.gather(*workers), WAIT)
            finally:
                await stop(workers)
                await sub.close()
            duplicates = [i for i, n in Counter(seen).items() if n > 1]
            assert not duplicates, f"delivered more than once: {duplicates}"
            assert sorted(seen) == sorted(ids_of(published))
            await expect_info(drv, q, message_count=0)

    run(main())


async def nothing_within_workers(seen: list[str], expected: int) -> None:
    await asyncio.sleep(QUIET)
    assert len(seen) == expected, f"{len(seen) - expected} extra deliveries: {Counter(seen).most_common(3)}"


def test_concurrent_getters_on_several_subscriptions(kit: DriverKit) -> None:
    """Several subscriptions of one queue, each with several tasks in ``get()``: every
    published message is delivered exactly once across all of them."""

    async def main() -> None:
        async with kit.opened() as drv:
            q = kit.queue("q")
            await drv.declare(q)
            subs = [await subscribe(drv, q, prefetch=2) for _ in range(3)]
            seen: list[str] = []
            workers = [asyncio.create_task(_worker(sub, seen)) for sub in subs for _ in range(2)]
            try:
                await asyncio.sleep(0.1)
                published: list[Outgoing] = []
                for start in range(0, 30, 5):
                    batch = messages(5, start)
                    published += batch
                    await drv.publish(q, batch)
                await until(lambda: len(seen) >= 30, f"30 deliveries (have {len(seen)})", timeout=20)
                await nothing_within_workers(seen, 30)
                for sub in subs:
                    await sub.close()
                await asyncio.wait_for(asyncio.gather(*workers), WAIT)
            finally:
                await stop(workers)
                for sub in subs:
                    await sub.close()
            duplicates = [i for i, n in Counter(seen).items() if n > 1]
            assert not duplicates, f"delivered more than once: {duplicates}"
            assert sorted(seen) == sorted(ids_of(published))
            await expect_info(drv, q, message_count=0, consumer_count=0)

    run(main())


def test_cancelled_get_loses_nothing(kit: DriverKit) -> None:
    """``get()`` is cancellation-safe: a cancelled wait takes nothing, and a waiter woken
    for a delivery, then cancelled, passes it on; no message is lost or duplicated.

    Fault C2 (nothing lost on cancellation).
    """

    async def main() -> None:
        async with kit.opened() as drv:
            q = kit.queue("q")
            await drv.declare(q)
            sub = await subscribe(drv, q, prefetch=5)
            tasks: list[asyncio.Task[Any]] = []
            try:
                # Waits cancelled before anything is published took nothing.
                parked = [asyncio.create_task(sub.get()) for _ in range(3)]
                tasks += parked
                await asyncio.sleep(0.1)
                await stop(parked)
                assert all(t.cancelled() for t in parked), [t.result() for t in parked if not t.cancelled()]
                first = messages(3)
                await drv.publish(q, first)
                got = await take(sub, 3)
                assert sorted(ids_of(got)) == sorted(ids_of(first))
                for delivery in got:
                    await sub.ack(delivery)

                # Two waiters; one is cancelled at various points around the hand-over.
                for round_no, ticks in enumerate([0, 0, 1, 1, 2, 3, 4, 6, 8, 12, 20, 40]):
                    a = asyncio.create_task(sub.get())
                    b = asyncio.create_task(sub.get())
                    tasks += [a, b]
                    await asyncio.sleep(0.01)
                    out = message(100 + round_no)
                    await drv.publish(q, [out])
                    for _ in range(ticks):
                        await asyncio.sleep(0)
                    a.cancel()
                    results = await asyncio.gather(a, return_exceptions=True)
                    winner = results[0] if isinstance(results[0], Delivery) else None
                    if winner is None:
                        assert isinstance(results[0], asyncio.CancelledError), results
                        winner = await asyncio.wait_for(b, WAIT)
                    else:
                        await stop([b])
                        assert b.cancelled(), f"second delivery in round {round_no}: {b.result()!r}"
                    assert winner is not None and winner.id == out.id, (round_no, ticks, winner)
                    assert winner.attempts == 1, f"round {round_no}: a cancelled get() counted an attempt"
                    await sub.ack(winner)
                await nothing_within(sub, QUIET, "after every round was settled")
            finally:
                await stop(tasks)
                await sub.close()
            await expect_info(drv, q, message_count=0)

    run(main())


# -- 9. auto_ack --------------------------------------------------------------------------


def test_auto_ack_settles_on_hand_out(kit: DriverKit) -> None:
    """With ``auto_ack`` a delivery is settled when handed out: it is not counted
    afterwards, closing the subscription does not return it, and settling it again is
    INVALID."""

    async def main() -> None:
        async with kit.opened() as drv:
            q = kit.queue("q")
            await drv.declare(q)
            published = messages(3)
            await drv.publish(q, published)
            sub = await subscribe(drv, q, prefetch=3, auto_ack=True)
            try:
                got = await take(sub, 3)
                assert ids_of(got) == ids_of(published)
                assert [d.attempts for d in got] == [1, 1, 1]
                await expect_info(drv, q, message_count=0, in_flight=0, ready=0)
                exc = await refused(sub.ack(got[0]), "ack of an auto-acked delivery")
                assert_invalid(exc, "ack of an auto-acked delivery")
            finally:
                await sub.close()
            await expect_info(drv, q, message_count=0, consumer_count=0)
            again = await subscribe(drv, q)
            try:
                await nothing_within(again, QUIET, "after auto_ack deliveries were handed out")
            finally:
                await again.close()

    run(main())


def test_auto_ack_close_returns_what_was_not_handed_out(kit: DriverKit) -> None:
    """With ``auto_ack`` only a delivery *handed out* is settled: messages a subscription
    fetched ahead (up to its prefetch) but never handed out go back to the queue when
    it closes, like any unsettled delivery.

    Faults F02, C2; regression: SQLite lost them.
    """

    async def main() -> None:
        async with kit.opened() as drv:
            q = kit.queue("q")
            await drv.declare(q)
            published = messages(5)
            await drv.publish(q, published)
            sub = await subscribe(drv, q, prefetch=5, auto_ack=True)
            try:
                (handed,) = await take(sub, 1)
                await asyncio.sleep(0.3)  # let a driver that buffers fetch the rest
            finally:
                await sub.close()
            rest = [m for m in published if m.id != handed.id]
            await expect_info(drv, q, message_count=4)
            again = await subscribe(drv, q)
            try:
                got = await take(again, 4)
                assert sorted(ids_of(got)) == sorted(ids_of(rest))
                assert [d.attempts for d in got] == [1] * 4
                for delivery in got:
                    await again.ack(delivery)
            finally:
                await again.close()

    run(main())


# -- 10. invalid settlements ----------------------------------------------------------------


def test_settling_twice_is_invalid(kit: DriverKit) -> None:
    """A delivery is settled exactly once: ack/nack/release/dead_letter of a delivery that
    was already settled raises ``Error`` INVALID and changes nothing (in particular no
    dead-letter copy is stored).

    Faults D02, C4; regression: memory stored the dead-letter copy anyway.
    """

    async def main() -> None:
        async with kit.opened() as drv:
            q, dlq = kit.queue("q"), kit.queue("dlq")
            await drv.declare(q)
            await drv.declare(dlq)
            published = messages(4)
            await drv.publish(q, published)
            sub = await subscribe(drv, q, prefetch=4)
            try:
                acked, released, dead, nacked = await take(sub, 4)
                await sub.ack(acked)
                for name, call in settlements(sub, acked, dlq).items():
                    assert_invalid(await refused(call(), f"{name} after ack"), f"{name} after ack")
                await expect_info(drv, dlq, message_count=0)

                await sub.release(released)
                assert_invalid(await refused(sub.release(released), "release twice"), "release twice")

                await sub.dead_letter(dead, dlq, Outgoing(dead.id, dead.body, {}))
                exc = await refused(sub.ack(dead), "ack after dead_letter")
                assert_invalid(exc, "ack after dead_letter")
                await expect_info(drv, dlq, message_count=1)

                await sub.nack(nacked, 0)
                assert_invalid(await refused(sub.nack(nacked, 0), "nack twice"), "nack twice")

                back = await take(sub, 2)
                assert sorted(ids_of(back)) == sorted([released.id, nacked.id])
                for delivery in back:
                    await sub.ack(delivery)
                await expect_info(drv, q, message_count=0)
            finally:
                await sub.close()

    run(main())


def test_settling_a_stale_delivery_is_invalid(kit: DriverKit) -> None:
    """A settled delivery stays settled when its message is handed out again: settling the
    old delivery (after a nack or release, once the message was redelivered to the same
    subscription) raises ``Error`` INVALID and leaves the new delivery unsettled, so
    its holder can still settle it.

    Faults D03, D04, C4; regression: memory and SQLite settled the new delivery.
    """

    async def main() -> None:
        async with kit.opened() as drv:
            q = kit.queue("q")
            await drv.declare(q)
            await drv.publish(q, messages(2))
            sub = await subscribe(drv, q, prefetch=2)
            try:
                nacked, released = await take(sub, 2)
                await sub.nack(nacked, 0)
                await sub.release(released)
                back = {d.id: d for d in await take(sub, 2)}
                assert set(back) == {nacked.id, released.id}
                for stale, how in ((nacked, "nack"), (released, "release")):
                    what = f"ack of a delivery settled by {how}, its message redelivered since"
                    assert_invalid(await refused(sub.ack(stale), what), what)
                await expect_info(drv, q, message_count=2, in_flight=2)
                for delivery in back.values():
                    await sub.ack(delivery)  # the current deliveries are still unsettled
                await expect_info(drv, q, message_count=0)
            finally:
                await sub.close()

    run(main())


def test_settling_another_subscriptions_delivery_is_invalid(kit: DriverKit) -> None:
    """Settlement goes back through the subscription that handed the delivery out: any
    settlement through another one raises ``Error`` INVALID and changes nothing; the
    holder can still settle it.

    Faults D02, C4.
    """

    async def main() -> None:
        async with kit.opened() as drv:
            q, other_q, dlq = kit.queue("q"), kit.queue("other"), kit.queue("dlq")
            for spec in (q, other_q, dlq):
                await drv.declare(spec)
            await drv.publish(q, messages(1))
            holder = await subscribe(drv, q, prefetch=1)
            same_queue = await subscribe(drv, q, prefetch=1)
            other_queue = await subscribe(drv, other_q, prefetch=1)
            try:
                (got,) = await take(holder, 1)
                for sub, where in ((same_queue, "same queue"), (other_queue, "other queue")):
                    for name, call in settlements(sub, got, dlq).items():
                        what = f"{name} through another subscription ({where})"
                        assert_invalid(await refused(call(), what), what)
                await expect_info(drv, dlq, message_count=0)
                await expect_info(drv, q, message_count=1, in_flight=1)
                await nothing_within(same_queue, 0.2, "on the second subscription")
                await holder.ack(got)
                await expect_info(drv, q, message_count=0)
            finally:
                for sub in (holder, same_queue, other_queue):
                    await sub.close()

    run(main())


# -- 12. Driver.close ---------------------------------------------------------------------------


def test_driver_close_is_idempotent(kit: DriverKit) -> None:
    """``Driver.close()`` is idempotent: a second (and third) call returns quietly, with
    or without subscriptions left open."""

    async def main() -> None:
        drv = kit.driver()
        await drv.open()
        try:
            q = kit.queue("q")
            await drv.declare(q)
            await drv.publish(q, messages(2))
            sub = await subscribe(drv, q, prefetch=2)
            await take(sub, 1)
        finally:
            await drv.close()
        await drv.close()
        await drv.close()
        plain = kit.driver()
        await plain.open()
        await plain.close()
        await plain.close()

    run(main())


def test_driver_close_ends_open_subscriptions(kit: DriverKit) -> None:
    """``Driver.close()`` releases every resource, its subscriptions included: a ``get()``
    blocked on a subscription left open returns None instead of waiting forever.

    Regression: memory left getters waiting.
    """

    async def main() -> None:
        drv = kit.driver()
        await drv.open()
        waiting: asyncio.Task[Any] | None = None
        try:
            q = kit.queue("q")
            await drv.declare(q)
            sub = await subscribe(drv, q)
            waiting = asyncio.create_task(sub.get())
            await asyncio.sleep(0.1)
            assert not waiting.done()
        finally:
            await drv.close()
        try:
            result = await asyncio.wait_for(asyncio.shield(waiting), WAIT)
        except TimeoutError:
            raise AssertionError("get() still waits after Driver.close()") from None
        finally:
            await stop([waiting])
        assert result is None

    run(main())


# -- 11. capabilities -------------------------------------------------------------------------


def test_capability_durable(kit: DriverKit) -> None:
    """``durable``: published, nacked and handed-but-unsettled messages (and whatever an
    open subscription buffered) survive ``Driver.close()`` with that subscription still
    open, and a new instance on the same spec delivers each of them. Without it a new
    instance starts empty.

    Faults F01, C2.
    """

    async def main() -> None:
        q = kit.queue("q")
        published = messages(6)
        first = kit.driver()
        await first.open()
        try:
            await first.declare(q)
            await first.publish(q, published)
            sub = await subscribe(first, q, prefetch=3)
            nacked, _unsettled = await take(sub, 2)
            await sub.nack(nacked, 0)
            await asyncio.sleep(0.2)  # let a driver that buffers fetch ahead
        finally:
            await first.close()  # the subscription is left open on purpose
        async with kit.opened() as second:
            await second.declare(q)
            sub = await subscribe(second, q, prefetch=10)
            try:
                if kit.capabilities.durable:
                    await expect_info(second, q, message_count=6)
                    got = await take(sub, 6)
                    assert sorted(ids_of(got)) == sorted(ids_of(published))
                    await nothing_within(sub, QUIET, "beyond the 6 published")
                    for delivery in got:
                        await sub.ack(delivery)
                else:
                    await expect_info(second, q, message_count=0)
                    await nothing_within(sub, QUIET, "on a new instance of a driver that is not durable")
            finally:
                await sub.close()

    run(main())


def test_capability_cross_process(kit: DriverKit) -> None:
    """``cross_process``: a second instance open at the same time on the same spec shares
    the queues (it counts and receives what the first published, and the first sees
    the second's ack). Without it the second instance does not see them."""

    async def main() -> None:
        q = kit.queue("q")
        async with kit.opened() as one, kit.opened() as two:
            await one.declare(q)
            await two.declare(q)
            out = message(1)
            await one.publish(q, [out])
            sub = await subscribe(two, q)
            try:
                if kit.capabilities.cross_process:
                    await expect_info(two, q, message_count=1)
                    (got,) = await take(sub, 1)
                    assert got.id == out.id and got.body == out.body
                    await sub.ack(got)
                    await expect_info(one, q, message_count=0)
                else:
                    await nothing_within(sub, QUIET, "on an instance that does not share queues")
                    await expect_info(two, q, message_count=0)
                    await expect_info(one, q, message_count=1)
            finally:
                await sub.close()

    run(main())


def test_capability_max_length(kit: DriverKit) -> None:
    """``max_length``: a publish beyond the queue's limit raises INTERNAL, retryable,
    ``details["reason"] == "queue_full"`` and stores nothing; once there is room a
    publish fits again. A ``dead_letter`` into a full queue raises and leaves the
    original unsettled with its holder. Without the claim the limit is not enforced.

    Faults Q01, Q03, P04; regression: SQLite forgot a delivery whose move was refused.
    """
    if not kit.capabilities.max_length and not kit.has_max_length_option():
        pytest.skip(f"the {kit.name} driver neither claims max_length nor has a max_length option")

    async def main() -> None:
        async with kit.opened() as drv:
            q = kit.queue("q", max_length=3)
            await drv.declare(q)
            await drv.publish(q, messages(2))
            await drv.publish(q, messages(1, start=2))
            if not kit.capabilities.max_length:
                await drv.publish(q, messages(2, start=3))
                await expect_info(drv, q, message_count=5)
                return
            exc = await refused(drv.publish(q, [message(9)]), "publish beyond max_length")
            assert exc.kind == errors.INTERNAL, exc
            assert exc.retryable, exc
            assert exc.details.get("reason") == "queue_full", exc.details
            await asyncio.sleep(0.2)
            await expect_info(drv, q, message_count=3)

            full = kit.queue("full", max_length=1)
            await drv.declare(full)
            await drv.publish(full, [message(20)])
            sub = await subscribe(drv, q, prefetch=1)
            try:
                (got,) = await take(sub, 1)
                copy = Outgoing(got.id, got.body, got.headers)
                exc = await refused(sub.dead_letter(got, full, copy), "dead_letter into a full queue")
                assert exc.details.get("reason") == "queue_full", exc.details
                await expect_info(drv, full, message_count=1)
                try:
                    await sub.ack(got)
                except errors.Error as exc:
                    raise AssertionError(
                        f"after a refused dead_letter the original must stay unsettled with its holder; "
                        f"ack raised {exc.kind}: {exc}"
                    ) from None
                await expect_info(drv, q, message_count=2, in_flight=0)
            finally:
                await sub.close()
            await expect_info(drv, q, message_count=2)
            await drv.publish(q, [message(10)])
            await expect_info(drv, q, message_count=3)

    run(main())


def test_capability_atomic_batches(kit: DriverKit) -> None:
    """``atomic_batches``: a batch that does not fit (room for 2, a batch of 3) stores
    nothing. Without it the error's ``details["stored"]`` lists the indexes of the batch
    that were stored, and exactly those (in order) are in the queue.

    Faults F04, Q01.
    """
    if not kit.capabilities.max_length:
        pytest.skip(f"the {kit.name} driver does not enforce max_length: no batch can be refused")

    async def main() -> None:
        async with kit.opened() as drv:
            q = kit.queue("q", max_length=3)
            await drv.declare(q)
            head = message(0)
            await drv.publish(q, [head])
            batch = messages(3, start=1)
            exc = await refused(drv.publish(q, batch), "a batch beyond max_length")
            assert exc.details.get("reason") == "queue_full", exc.details
            if kit.capabilities.atomic_batches:
                expected = [head.id]
            else:
                stored = exc.details.get("stored")
                assert isinstance(stored, list), (
                    f"no details['stored'] on a non-atomic refusal: {exc.details}"
                )
                assert len(stored) < len(batch), stored
                expected = [head.id] + [batch[i].id for i in stored]
            await asyncio.sleep(0.2)
            await expect_info(drv, q, message_count=len(expected))
            sub = await subscribe(drv, q)
            try:
                got = await take(sub, len(expected))
                assert ids_of(got) == expected
                await nothing_within(sub, QUIET, "beyond what the refused batch stored")
                for delivery in got:
                    await sub.ack(delivery)
            finally:
                await sub.close()

    run(main())


# -- slow and destructive ------------------------------------------------------------------


def test_nack_with_delay_waits_it_out(kit: DriverKit) -> None:
    """``nack(delay=d)``: the message is not delivered before ``d`` (small tolerance) and is
    delivered after it with ``attempts`` + 1; meanwhile ``info`` counts it in
    ``message_count`` and ``delayed`` (not ``ready``/``in_flight``), and afterwards no
    longer as delayed.

    Fault P05 (the delay is kept).
    """
    delay = kit.used_delay(0.8)

    async def main() -> None:
        async with kit.opened() as drv:
            q = kit.queue("q")
            await drv.declare(q)
            await drv.publish(q, [message(1)])
            sub = await subscribe(drv, q, prefetch=1)
            try:
                (got,) = await take(sub, 1)
                started = time.monotonic()
                await sub.nack(got, delay)
                info = await drv.info(q)
                assert "delayed" in info, f"info has no 'delayed' count: {info}"
                if time.monotonic() < started + delay - TOLERANCE:  # else too loaded to tell
                    assert (info["message_count"], info["ready"], info["in_flight"], info["delayed"]) == (
                        1,
                        0,
                        0,
                        1,
                    ), info
                await nothing_within(sub, started + delay - TOLERANCE - time.monotonic(), "before its delay")
                (again,) = await take(sub, 1)
                waited = time.monotonic() - started
                assert waited >= delay - TOLERANCE, f"delivered after {waited:.3f}s of a {delay}s delay"
                assert again.id == got.id and again.attempts == 2
                await expect_info(drv, q, message_count=1, in_flight=1, delayed=0)
                await sub.ack(again)
                await expect_info(drv, q, message_count=0, delayed=0)
            finally:
                await sub.close()

    run(main())


def test_capability_atomic_dead_letter(kit: DriverKit) -> None:
    """``atomic_dead_letter``: a ``dead_letter`` cancelled at any point, then the
    subscription closed, never loses the message (a new subscription receives it from the
    source or the target); with the claim it is never on both; without it a duplicate is
    allowed. A ``dead_letter`` that completed leaves it on the target only.

    Faults P04, C2.
    """
    atomic = kit.capabilities.atomic_dead_letter
    cancel_after_ticks = [0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 17, 22, 30, 45]
    timeouts = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.03]

    async def once(drv: Driver, n: int, ticks: int | None, timeout: float | None) -> str:
        src, dlq = kit.queue(f"src{n}"), kit.queue(f"dlq{n}")
        await drv.declare(src)
        await drv.declare(dlq)
        out = message(n)
        await drv.publish(src, [out])
        sub = await subscribe(drv, src, prefetch=1)
        try:
            (got,) = await take(sub, 1)
            copy = Outgoing(got.id, got.body, {**got.headers, "reason": "test"})
            if timeout is None:
                task = asyncio.create_task(sub.dead_letter(got, dlq, copy))
                for _ in range(ticks or 0):
                    await asyncio.sleep(0)
                task.cancel()
            else:
                task = asyncio.create_task(asyncio.wait_for(sub.dead_letter(got, dlq, copy), timeout))
            (outcome,) = await asyncio.gather(task, return_exceptions=True)
        finally:
            await sub.close()
        point = f"cancelled after {ticks} loop iterations" if timeout is None else f"wait_for({timeout})"
        assert outcome is None or isinstance(outcome, asyncio.CancelledError | TimeoutError), (
            f"{point}: dead_letter raised {outcome!r}"
        )
        on_source = await drain(drv, src)
        on_target = await drain(drv, dlq)
        where = f"{point}: source {on_source}, target {on_target}"
        assert on_source + on_target, f"message lost: {where}"
        assert len(on_source) <= 1 and len(on_target) <= 1, f"duplicated on one queue: {where}"
        if atomic:
            assert not (on_source and on_target), f"on both queues despite atomic_dead_letter: {where}"
        if outcome is None:
            assert on_target == [out.id] and not on_source, f"completed, yet {where}"
        return "target" if not on_source else "source" if not on_target else "both"

    async def main() -> Counter[str]:
        outcomes: Counter[str] = Counter()
        async with kit.opened() as drv:
            n = 0
            for ticks in cancel_after_ticks:
                outcomes[await once(drv, n, ticks, None)] += 1
                n += 1
            for timeout in timeouts:
                outcomes[await once(drv, n, None, timeout)] += 1
                n += 1
        return outcomes

    outcomes = run(main())
    print(f"{kit.name}: dead_letter cancelled -> {dict(outcomes)}")


def test_capability_native_delay(kit: DriverKit) -> None:
    """``native_delay``: a message nacked with a ~1.5 s delay, then the driver closed and a
    new instance opened, is not delivered before its due time and is delivered after.
    Only meaningful with ``durable`` (claiming native_delay without it is an error);
    durable without native_delay: the message survives, its delay may not; neither: the
    delayed message lives in the process only, and a new instance never delivers it."""
    caps = kit.capabilities
    assert caps.durable or not caps.native_delay, "native_delay is claimed without durable"
    delay = kit.used_delay(1.5)

    async def main() -> None:
        q = kit.queue("q")
        out = message(1)
        async with kit.opened() as first:
            await first.declare(q)
            await first.publish(q, [out])
            sub = await subscribe(first, q, prefetch=1)
            try:
                (got,) = await take(sub, 1)
                started = time.monotonic()
                await sub.nack(got, delay)
            finally:
                await sub.close()
        async with kit.opened() as second:
            await second.declare(q)
            sub = await subscribe(second, q, prefetch=1)
            try:
                if not caps.durable:
                    await nothing_within(
                        sub, delay + TOLERANCE, "from a new instance of a non-durable driver"
                    )
                    return
                if caps.native_delay:
                    due = started + delay - TOLERANCE
                    await nothing_within(sub, due - time.monotonic(), "before its delay, after a reopen")
                (again,) = await take(sub, 1, timeout=delay + WAIT)
                waited = time.monotonic() - started
                if caps.native_delay:
                    assert waited >= delay - TOLERANCE, f"delivered after {waited:.3f}s of a {delay}s delay"
                assert again.id == out.id and again.attempts == 2
                await sub.ack(again)
            finally:
                await sub.close()

    run(main())
