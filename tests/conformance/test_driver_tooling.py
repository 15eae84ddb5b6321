"""The queue-tooling part of the driver contract: ``browse``, ``purge`` and ``move``.

Runs once per driver through the ``kit`` fixture, like ``test_driver_contract.py``
(whose helpers it uses). Documented differences come from ``kit.capabilities``:
``browse_in_flight`` (browse lists what consumers hold) and ``browse_counts_delivery``
(browse takes and gives back, so the next delivery counts one more attempt). Every
other rule holds on every driver: browse lists in delivery order, ready and delayed
messages, pages after a message it listed and says NOT_FOUND when that message has
left; purge and move never touch a message a consumer holds; a moved message is on
the target with its delivery count started over, as the rewrite made it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Protocol

from conveyor import errors
from conveyor.drivers.base import Driver, Outgoing, Stored
from conveyor.registry.model import QueueSpec
from tests.conformance.test_driver_contract import (
    BODY,
    HEADERS,
    QUIET,
    drain,
    expect_info,
    messages,
    nothing_within,
    refused,
    subscribe,
    take,
)
from tests.support.drivers import DriverKit, run


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


def ids_of(items: Iterable[_HasId]) -> list[str]:
    return [item.id for item in items]


DELAY = 30.0  # a retry delay no test waits out: the message stays "delayed" throughout


async def declared(drv: Driver, kit: DriverKit, *names: str) -> list[QueueSpec]:
    queues = [kit.queue(name) for name in names]
    for q in queues:
        await drv.declare(q)
    return queues


async def listed(drv: Driver, q: QueueSpec, limit: int = 100) -> list[Stored]:
    return await drv.browse(q, limit=limit)


def states(page: list[Stored]) -> list[tuple[str, str]]:
    return [(s.id, s.state) for s in page]


def assert_ordered(page: list[Stored]) -> None:
    seqs = [s.seq for s in page]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"seq does not follow the listing: {seqs}"


def marked(stored: Stored) -> Outgoing:
    """A rewrite that shows it ran: drops ``drop``, adds ``moved``."""
    headers = {k: v for k, v in stored.headers.items() if k != "drop"}
    return Outgoing(stored.id, stored.body, {**headers, "moved": True})


# -- browse ----------------------------------------------------------------------------


def test_browse_lists_in_delivery_order_without_taking(kit: DriverKit) -> None:
    """browse returns id, body, typed headers, attempts 0 and state "ready", in the order
    a consumer gets them; browsing again gives the same; ``info`` is unchanged; a
    consumer then receives every message once, in that order, with attempts 1 (with
    ``browse_counts_delivery``: every message once, attempts at most 1 + browses)."""

    async def main() -> None:
        async with kit.opened() as drv:
            (q,) = await declared(drv, kit, "q")
            published = [Outgoing(f"b{n}", BODY + bytes([n]), {**HEADERS, "n": n}) for n in range(5)]
            await drv.publish(q, published)
            first = await listed(drv, q)
            second = await listed(drv, q)
            assert ids_of(first) == ids_of(published)
            assert ids_of(second) == ids_of(published)
            assert_ordered(first)
            for stored, out in zip(first, published, strict=True):
                assert (stored.body, stored.headers, stored.state) == (out.body, out.headers, "ready")
                assert {k: type(v) for k, v in stored.headers.items()} == {
                    k: type(v) for k, v in out.headers.items()
                }
                if not kit.capabilities.browse_counts_delivery:
                    assert stored.attempts == 0
            await expect_info(drv, q, message_count=5, ready=5, in_flight=0)
            sub = await subscribe(drv, q, prefetch=10)
            try:
                got = await take(sub, 5)
                await nothing_within(sub, QUIET, "after the 5 published")
                if kit.capabilities.browse_counts_delivery:
                    assert sorted(ids_of(got)) == sorted(ids_of(published))
                    assert all(1 <= d.attempts <= 3 for d in got), [d.attempts for d in got]
                else:
                    assert ids_of(got) == ids_of(published)
                    assert [d.attempts for d in got] == [1] * 5
                for delivery in got:
                    await sub.ack(delivery)
            finally:
                await sub.close()
            await expect_info(drv, q, message_count=0)
            assert await listed(drv, q) == []

    run(main())


def test_browse_while_a_consumer_waits_loses_nothing(kit: DriverKit) -> None:
    """A consumer waiting in ``get()`` while the queue is browsed receives every message."""

    async def main() -> None:
        async with kit.opened() as drv:
            (q,) = await declared(drv, kit, "q")
            sub = await subscribe(drv, q, prefetch=50)
            try:
                getter = asyncio.create_task(take(sub, 20))
                published = messages(20)
                for start in range(0, 20, 5):
                    await drv.publish(q, published[start : start + 5])
                    await drv.browse(q, limit=100)
                got = await getter
                assert sorted(ids_of(got)) == sorted(ids_of(published))
                for delivery in got:
                    await sub.ack(delivery)
                await nothing_within(sub, QUIET, "after the 20 published")
            finally:
                await sub.close()
            await expect_info(drv, q, message_count=0)

    run(main())


def test_browse_pages_after_a_listed_message(kit: DriverKit) -> None:
    """``after`` = the last ID of a page: the next page continues from there; pages
    joined are the whole queue in order; after the last message the page is empty."""

    async def main() -> None:
        async with kit.opened() as drv:
            (q,) = await declared(drv, kit, "q")
            published = messages(7)
            await drv.publish(q, published)
            pages: list[list[Stored]] = []
            after: str | None = None
            while True:
                page = await drv.browse(q, limit=3, after=after)
                if not page:
                    break
                assert len(page) <= 3
                pages.append(page)
                after = page[-1].id
                assert len(pages) <= 3, f"more pages than 7 messages make: {[ids_of(p) for p in pages]}"
            assert [len(p) for p in pages] == [3, 3, 1]
            joined = [s for p in pages for s in p]
            assert ids_of(joined) == ids_of(published)
            assert_ordered(joined)
            assert ids_of(await drv.browse(q, limit=1)) == ids_of(published[:1])
            await expect_info(drv, q, message_count=7)

    run(main())


def test_browse_after_a_message_that_left_is_not_found(kit: DriverKit) -> None:
    """A page after a listed message that has left the queue since (acked) is NOT_FOUND,
    as is one after an ID the queue never had."""

    async def main() -> None:
        async with kit.opened() as drv:
            (q,) = await declared(drv, kit, "q")
            published = messages(3)
            await drv.publish(q, published)
            assert ids_of(await listed(drv, q)) == ids_of(published)
            sub = await subscribe(drv, q, prefetch=1)
            try:
                (got,) = await take(sub, 1)
                await sub.ack(got)
            finally:
                await sub.close()
            for after in (got.id, "no-such-message"):
                exc = await refused(drv.browse(q, limit=10, after=after), f"browse after {after}")
                assert exc.kind == errors.NOT_FOUND, exc
            left = [m for m in published if m.id != got.id]
            assert sorted(ids_of(await listed(drv, q))) == sorted(ids_of(left))

    run(main())


def test_browse_lists_delayed_and_held_messages(kit: DriverKit) -> None:
    """Ready messages first, then those waiting out a retry delay ("delayed", their
    attempt counted), then, with ``browse_in_flight``, those a consumer holds
    ("in_flight"); without it, a held message is not listed at all."""

    async def main() -> None:
        async with kit.opened() as drv:
            (q,) = await declared(drv, kit, "q")
            a, b, c = messages(3)
            await drv.publish(q, [a, b, c])
            sub = await subscribe(drv, q, prefetch=1)
            try:
                (first,) = await take(sub, 1)
                assert first.id == a.id
                await sub.nack(first, kit.used_delay(DELAY))
                (held,) = await take(sub, 1)
                assert held.id == b.id
                page = await listed(drv, q)
                expected = [(c.id, "ready"), (a.id, "delayed")]
                if kit.capabilities.browse_in_flight:
                    expected.append((b.id, "in_flight"))
                assert states(page) == expected
                assert_ordered(page)
                if not kit.capabilities.browse_counts_delivery:
                    assert [s.attempts for s in page] == [0, 1, 1][: len(page)]
                await sub.ack(held)
            finally:
                await sub.close()
            assert states(await listed(drv, q)) == [(c.id, "ready"), (a.id, "delayed")]

    run(main())


def test_browse_from_another_driver_instance(kit: DriverKit) -> None:
    """With ``cross_process``, a second driver on the same configuration lists what the
    first stored and (with ``browse_in_flight``) what its consumer holds, and its purge
    leaves that held message alone."""
    if not kit.capabilities.cross_process:
        return  # nothing is shared between instances; the other tests cover one instance

    async def main() -> None:
        async with kit.opened() as drv, kit.opened() as other:
            (q,) = await declared(drv, kit, "q")
            await other.declare(q)
            a, b = messages(2)
            await drv.publish(q, [a, b])
            sub = await subscribe(drv, q, prefetch=1)
            try:
                (held,) = await take(sub, 1)
                expected = [(b.id, "ready")]
                if kit.capabilities.browse_in_flight:
                    expected.append((a.id, "in_flight"))
                assert states(await listed(other, q)) == expected
                assert await other.purge(q) == 1
                await sub.ack(held)
            finally:
                await sub.close()
            await expect_info(other, q, message_count=0)

    run(main())


# -- purge -----------------------------------------------------------------------------


def test_purge_leaves_held_messages_alone(kit: DriverKit) -> None:
    """purge removes every waiting message and returns how many; the one a consumer
    holds stays, and its consumer settles it as usual."""

    async def main() -> None:
        async with kit.opened() as drv:
            (q,) = await declared(drv, kit, "q")
            published = messages(4)
            await drv.publish(q, published)
            sub = await subscribe(drv, q, prefetch=1)
            try:
                (held,) = await take(sub, 1)
                assert await drv.purge(q) == 3
                await expect_info(drv, q, message_count=1, ready=0, in_flight=1)
                if kit.capabilities.browse_in_flight:
                    assert states(await listed(drv, q)) == [(held.id, "in_flight")]
                await sub.ack(held)
                await nothing_within(sub, QUIET, "after a purge")
            finally:
                await sub.close()
            await expect_info(drv, q, message_count=0)
            assert await drv.purge(q) == 0

    run(main())


def test_purge_by_id(kit: DriverKit) -> None:
    """purge(ids) removes those messages only; IDs not on the queue are skipped."""

    async def main() -> None:
        async with kit.opened() as drv:
            (q,) = await declared(drv, kit, "q")
            m = messages(5)
            await drv.publish(q, m)
            assert await drv.purge(q, [m[1].id, m[3].id, "no-such-message"]) == 2
            assert ids_of(await listed(drv, q)) == ids_of([m[0], m[2], m[4]])
            assert await drv.purge(q, []) == 0
            assert await drv.purge(q, [m[1].id]) == 0
            assert await drv.purge(q) == 3
            assert await drv.purge(q) == 0
            await expect_info(drv, q, message_count=0)

    run(main())


def test_purge_removes_delayed_messages(kit: DriverKit) -> None:
    """A message waiting out a retry delay is waiting: purge removes it (by ID too)."""

    async def main() -> None:
        async with kit.opened() as drv:
            (q,) = await declared(drv, kit, "q")
            a, b = messages(2)
            await drv.publish(q, [a, b])
            sub = await subscribe(drv, q, prefetch=2)
            try:
                got = await take(sub, 2)
                for delivery in got:
                    await sub.nack(delivery, kit.used_delay(DELAY))
                await expect_info(drv, q, message_count=2, delayed=2)
                assert await drv.purge(q, [a.id]) == 1
                await expect_info(drv, q, message_count=1, delayed=1)
                assert await drv.purge(q) == 1
                await expect_info(drv, q, message_count=0)
            finally:
                await sub.close()

    run(main())


# -- move ------------------------------------------------------------------------------


def test_move_rewrites_resets_attempts_and_leaves_held_messages(kit: DriverKit) -> None:
    """move takes every waiting message in queue order, stores ``rewrite(stored)`` on the
    target (delivered there with attempts 1, whatever it had) and removes it from the
    source; the message a consumer holds stays, and settles as usual."""

    async def main() -> None:
        async with kit.opened() as drv:
            src, dst = await declared(drv, kit, "src", "dst")
            a, b, c = (Outgoing(f"mv{n}", f"body {n}".encode(), {"n": n, "drop": "me"}) for n in range(3))
            await drv.publish(src, [a, b, c])
            seen: list[Stored] = []

            def rewrite(stored: Stored) -> Outgoing:
                seen.append(stored)
                return marked(stored)

            sub = await subscribe(drv, src, prefetch=1)
            try:
                (first,) = await take(sub, 1)
                await sub.nack(first, 0)  # a: back at the end, its attempt counted
                (held,) = await take(sub, 1)
                assert held.id == b.id
                assert await drv.move(src, dst, rewrite, limit=10) == 2
                assert ids_of(seen) == [c.id, a.id]
                assert [s.state for s in seen] == ["ready", "ready"]
                if not kit.capabilities.browse_counts_delivery:
                    assert [s.attempts for s in seen] == [0, 1]
                await expect_info(drv, src, message_count=1, in_flight=1)
                await expect_info(drv, dst, message_count=2, ready=2)
                if not kit.capabilities.browse_counts_delivery:  # else browsing would count
                    on_target = await listed(drv, dst)
                    assert ids_of(on_target) == [c.id, a.id]
                    assert [s.attempts for s in on_target] == [0, 0]
                await sub.ack(held)
            finally:
                await sub.close()
            await expect_info(drv, src, message_count=0)
            moved = await subscribe(drv, dst, prefetch=10)
            try:
                got = await take(moved, 2)
                assert ids_of(got) == [c.id, a.id]
                assert [d.attempts for d in got] == [1, 1], "the delivery count starts over on the target"
                assert [d.body for d in got] == [c.body, a.body]
                assert [d.headers for d in got] == [{"n": 2, "moved": True}, {"n": 0, "moved": True}]
                for delivery in got:
                    await moved.ack(delivery)
            finally:
                await moved.close()

    run(main())


def test_move_by_id_and_limit(kit: DriverKit) -> None:
    """move(ids=...) takes those messages only (unknown IDs skipped), in queue order, at
    most ``limit``; move without ids takes the first ``limit`` waiting messages."""

    async def main() -> None:
        async with kit.opened() as drv:
            src, dst = await declared(drv, kit, "src", "dst")
            m = messages(7)
            await drv.publish(src, m)
            wanted = [m[5].id, m[1].id, m[3].id, "no-such-message"]
            assert await drv.move(src, dst, marked, ids=wanted, limit=10) == 3
            assert ids_of(await listed(drv, dst)) == ids_of([m[1], m[3], m[5]])
            assert ids_of(await listed(drv, src)) == ids_of([m[0], m[2], m[4], m[6]])
            assert await drv.move(src, dst, marked, ids=[m[6].id, m[2].id], limit=1) == 1
            assert ids_of(await listed(drv, src)) == ids_of([m[0], m[4], m[6]])
            assert await drv.move(src, dst, marked, limit=2) == 2
            assert ids_of(await listed(drv, src)) == ids_of([m[6]])
            assert ids_of(await listed(drv, dst)) == ids_of([m[1], m[3], m[5], m[2], m[0], m[4]])
            assert await drv.move(src, dst, marked, ids=["no-such-message"], limit=5) == 0
            assert await drv.move(src, dst, marked, limit=5) == 1
            assert await drv.move(src, dst, marked, limit=5) == 0
            await expect_info(drv, src, message_count=0)
            assert sorted(await drain(drv, dst)) == sorted(ids_of(m))

    run(main())


def test_move_takes_delayed_messages(kit: DriverKit) -> None:
    """A message waiting out a retry delay is waiting: move takes it, and on the target
    it is ready at once."""

    async def main() -> None:
        async with kit.opened() as drv:
            src, dst = await declared(drv, kit, "src", "dst")
            (a,) = messages(1)
            await drv.publish(src, [a])
            sub = await subscribe(drv, src, prefetch=1)
            try:
                (got,) = await take(sub, 1)
                await sub.nack(got, kit.used_delay(DELAY))
                await expect_info(drv, src, message_count=1, delayed=1)
                assert await drv.move(src, dst, marked, ids=[a.id], limit=1) == 1
            finally:
                await sub.close()
            await expect_info(drv, src, message_count=0)
            moved = await subscribe(drv, dst, prefetch=1)
            try:
                (again,) = await take(moved, 1)
                assert (again.id, again.attempts) == (a.id, 1)
                await moved.ack(again)
            finally:
                await moved.close()

    run(main())


def test_move_wakes_a_consumer_waiting_on_the_target(kit: DriverKit) -> None:
    """A consumer already waiting on the target receives what a move brings."""

    async def main() -> None:
        async with kit.opened() as drv:
            src, dst = await declared(drv, kit, "src", "dst")
            published = messages(3)
            await drv.publish(src, published)
            sub = await subscribe(drv, dst, prefetch=10)
            try:
                getter = asyncio.create_task(take(sub, 3))
                await asyncio.sleep(0.1)
                assert await drv.move(src, dst, marked, limit=10) == 3
                got = await getter
                assert sorted(ids_of(got)) == sorted(ids_of(published))
                for delivery in got:
                    await sub.ack(delivery)
            finally:
                await sub.close()

    run(main())
