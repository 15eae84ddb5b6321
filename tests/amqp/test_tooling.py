"""Browse, purge and move on RabbitMQ: what the AMQP driver adds to the tooling contract.

The contract itself (tests/conformance/test_driver_tooling.py) runs on this driver too.
These tests cover what only RabbitMQ has: messages read with ``basic.get`` go back to
their places (classic and quorum queues), the documented side effect of reading
(``browse_counts_delivery``), the read limit, delay queues of another process, foreign
messages without an ID, targets that refuse the copy (full, deleted: RabbitMQ's
transaction would drop it) and moves cut by a lost connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiormq
import pytest
from aiormq.abc import ChannelFrame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from conveyor import errors
from conveyor.drivers.amqp import AmqpDriver, _reading
from conveyor.drivers.base import Driver, Outgoing, Stored
from conveyor.registry.model import DriverSpec, QueueSpec, RetrySpec
from tests.conformance.test_driver_contract import expect_info, messages, refused, subscribe, take
from tests.conftest import require_service
from tests.support.drivers import DriverKit, run
from tests.support.profiles import AMQP_URL
from tests.support.rabbit_node import delete_queues
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.broker

QUEUE_TYPES = ["classic", "quorum"]


@pytest.fixture
def kit(tmp_path: Path) -> Any:
    require_service("RabbitMQ", 5672)
    drivers = DriverKit("amqp", tmp_path)
    try:
        yield drivers
    finally:
        drivers.cleanup()


def typed(kit: DriverKit, name: str, queue_type: str = "classic", **options: Any) -> QueueSpec:
    """A queue of ``kit`` with ``driver_options.amqp`` (queue type, length limit, ...)."""
    spec = kit.queue(name)
    return dataclasses.replace(
        spec, driver_options={"amqp": kit.schema.queue(queue_type=queue_type, **options)}
    )


def ids_of(items: list[Stored] | list[Outgoing]) -> list[str]:
    return [item.id for item in items]


def kept(stored: Stored) -> Outgoing:
    return Outgoing(stored.id, stored.body, dict(stored.headers))


def in_thread(fn: Callable[[], Coroutine[Any, Any, Any]]) -> None:
    """Run ``fn()`` on a loop of its own in another thread and wait (callable from a loop)."""
    failures: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(fn())
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=main)
    thread.start()
    thread.join(30)
    if failures:
        raise failures[0]


async def raw_read(name: str) -> list[tuple[str, bool, int | None]]:
    """Take every message of broker queue ``name`` (for good): (id, redelivered, x-delivery-count)."""
    conn = await aiormq.connect(AMQP_URL)
    try:
        channel = await conn.channel()
        out = []
        while True:
            msg = await channel.basic_get(name, no_ack=True)
            if not isinstance(msg.delivery, Basic.GetOk):
                return out
            headers = msg.header.properties.headers or {}
            out.append(
                (
                    msg.header.properties.message_id,
                    bool(msg.delivery.redelivered),
                    headers.get("x-delivery-count"),
                )
            )
    finally:
        await conn.close()


async def raw_publish(name: str, body: bytes, message_id: str | None = None) -> None:
    """Publish as a foreign client would; without ``message_id`` the message has none
    (aiormq's ``basic_publish`` would make one up, so the frames are written directly)."""
    conn = await aiormq.connect(AMQP_URL)
    try:
        channel = await conn.channel(publisher_confirms=False)
        props = Basic.Properties(delivery_mode=2, message_id=message_id)
        frames = [Basic.Publish(routing_key=name), ContentHeader(properties=props, body_size=len(body))]
        frames.append(ContentBody(body))
        await channel.write_queue.put(ChannelFrame.marshall(channel_number=channel.number, frames=frames))
        for _ in range(500):
            if (await channel.queue_declare(name, passive=True)).message_count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"the raw publish to {name} never arrived")
    finally:
        await conn.close()


# -- reading gives back ----------------------------------------------------------------------


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
def test_browse_gives_every_message_back_in_its_place(kit: DriverKit, queue_type: str) -> None:
    """A page after m1 lists m2..m4; every message is back in its place afterwards, and
    the ones the browse took (m0..m4) carry the broker's redelivery mark: the side
    effect ``browse_counts_delivery`` declares."""
    assert AmqpDriver.capabilities.browse_counts_delivery

    async def main() -> None:
        async with kit.opened() as drv:
            q = typed(kit, "q", queue_type)
            await drv.declare(q)
            published = messages(10)
            await drv.publish(q, published)
            page = await drv.browse(q, limit=3, after=published[1].id)
            assert ids_of(page) == ids_of(published[2:5])
            assert [s.seq for s in page] == [3, 4, 5]
            assert [s.state for s in page] == ["ready"] * 3
            assert [s.attempts for s in page] == [0, 0, 0]
            await expect_info(drv, q, message_count=10, ready=10)
        after = await raw_read(q.queue_name)
        assert [one[0] for one in after] == ids_of(published)
        if queue_type == "classic":
            assert [one[1] for one in after] == [True] * 5 + [False] * 5
        else:
            assert [one[2] for one in after] == [1] * 5 + [0] * 5

    run(main())


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
def test_a_browsed_message_counts_one_more_attempt(kit: DriverKit, queue_type: str) -> None:
    """Two browses, then a consumer: on a classic queue the message comes with attempts 2
    (the broker only flags a redelivery), on a quorum queue with attempts 3 (it counts
    each); browse itself reports what it has seen so far."""

    async def main() -> None:
        async with kit.opened() as drv:
            q = typed(kit, "q", queue_type)
            await drv.declare(q)
            (a,) = messages(1)
            await drv.publish(q, [a])
            assert [s.attempts for s in await drv.browse(q, limit=5)] == [0]
            assert [s.attempts for s in await drv.browse(q, limit=5)] == [1]
            sub = await subscribe(drv, q, prefetch=1)
            try:
                (got,) = await take(sub, 1)
                assert got.id == a.id
                assert got.attempts == (2 if queue_type == "classic" else 3)
                await sub.ack(got)
            finally:
                await sub.close()
            await expect_info(drv, q, message_count=0)

    run(main())


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
def test_move_and_purge_by_id_keep_the_others_in_order(kit: DriverKit, queue_type: str) -> None:
    async def main() -> None:
        async with kit.opened() as drv:
            src, dst = typed(kit, "src", queue_type), typed(kit, "dst", queue_type)
            for q in (src, dst):
                await drv.declare(q)
            m = messages(6)
            await drv.publish(src, m)
            assert await drv.move(src, dst, kept, ids=[m[3].id, m[1].id], limit=10) == 2
            assert await drv.purge(src, [m[4].id]) == 1
            assert ids_of(await drv.browse(src, limit=10)) == ids_of([m[0], m[2], m[5]])
            assert ids_of(await drv.browse(dst, limit=10)) == ids_of([m[1], m[3]])
            await expect_info(drv, src, message_count=3)
            await expect_info(drv, dst, message_count=2)

    run(main())


def test_a_browsed_message_delivered_while_its_consumer_closes_is_not_duplicated(kit: DriverKit) -> None:
    """A classic queue's redelivery is recorded by republishing the message and acking the
    original; a subscription closing meanwhile waits for that ack, else both copies
    stayed on the queue (browsing makes such redeliveries common). Here the ack of the
    first message lets the broker deliver the second just as the subscription closes."""

    async def main() -> None:
        async with kit.opened() as drv:
            q = kit.queue("q")
            await drv.declare(q)
            for round_ in range(5):
                a, b = messages(2, start=2 * round_)
                await drv.publish(q, [a, b])
                sub = await subscribe(drv, q, prefetch=1)
                (first,) = await take(sub, 1)
                assert first.id == a.id
                assert ids_of(await drv.browse(q, limit=2)) == [b.id]  # b's delivery: a redelivery
                await sub.ack(first)
                await sub.close()
                assert ids_of(await drv.browse(q, limit=10)) == [b.id], f"round {round_}"
                assert await drv.purge(q) == 1

    run(main())


def test_info_counts_browsed_messages_while_their_redelivery_is_recorded(kit: DriverKit) -> None:
    """Recording a classic queue's redelivery (republish, then ack the original) takes a
    confirm's time per message; meanwhile the message is neither ready on the broker nor
    buffered, yet ``info`` must still count it (a drain loop must not stop early)."""

    async def main() -> None:
        async with kit.opened() as drv:
            q = kit.queue("q")
            await drv.declare(q)
            await drv.publish(q, messages(30))
            assert len(await drv.browse(q, limit=30)) == 30  # every delivery is now a redelivery
            sub = await subscribe(drv, q, prefetch=30)
            try:
                lowest, taken = 30, []
                while len(taken) < 30:  # taken ones are in flight: still counted
                    lowest = min(lowest, (await drv.info(q))["message_count"])
                    delivery = sub.get_nowait()
                    if delivery is not None:
                        taken.append(delivery)
                    else:
                        await asyncio.sleep(0)
                assert lowest == 30, f"info counted {lowest} of 30 messages while they were received"
            finally:
                await sub.close()
            await expect_info(drv, q, message_count=30)

    run(main())


# -- limits and errors -----------------------------------------------------------------------


def test_reading_beyond_the_scan_limit_is_invalid_and_removes_nothing(
    kit: DriverKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_reading, "SCAN_LIMIT", 20)

    async def main() -> None:
        async with kit.opened() as drv:
            src, dst = kit.queue("src"), kit.queue("dst")
            for q in (src, dst):
                await drv.declare(q)
            m = messages(25)
            await drv.publish(src, m)
            assert ids_of(await drv.browse(src, limit=5, after=m[14].id)) == ids_of(m[15:20])
            calls = {
                "browse": drv.browse(src, limit=5, after=m[19].id),
                "purge": drv.purge(src, [m[24].id]),
                "move": drv.move(src, dst, kept, ids=[m[24].id], limit=1),
            }
            for what, call in calls.items():
                exc = await refused(call, what)
                assert exc.kind == errors.INVALID and exc.details["reason"] == "scan_limit", exc
                assert "first 20 messages" in exc.message, exc
            exc = await refused(drv.move(src, dst, kept, ids=[m[0].id, m[24].id], limit=5), "move")
            assert exc.details["moved"] == 1, exc  # m0 moved (in its own transaction) before the limit
            await expect_info(drv, src, message_count=24)
            assert ids_of(await drv.browse(src, limit=20)) == ids_of(m[1:21])

    run(main())


def test_a_queue_deleted_on_the_broker_is_an_error_not_a_client_exception(kit: DriverKit) -> None:
    async def main() -> None:
        async with kit.opened() as drv:
            src, dst = kit.queue("src"), kit.queue("dst")
            for q in (src, dst):
                await drv.declare(q)
            await drv.publish(src, messages(2))
            await asyncio.to_thread(delete_queues, AMQP_URL, [src.queue_name])
            for what, call in {
                "browse": drv.browse(src, limit=5),
                "purge by id": drv.purge(src, ["x"]),
                "purge": drv.purge(src),
                "move": drv.move(src, dst, kept, limit=5),
                "move to it": drv.move(dst, src, kept, limit=5),
            }.items():
                exc = await refused(call, what)
                assert exc.kind == errors.INTERNAL and exc.retryable, exc
                assert "does not exist on the broker" in exc.message, exc

    run(main())


def test_purge_empties_the_delay_queues_another_process_used(kit: DriverKit) -> None:
    """A fresh driver (another process: the CLI) has never used the queue's delay queues,
    yet purging everything also removes what waits there (found from the retry policy)."""

    async def main() -> None:
        q = dataclasses.replace(kit.queue("q"), retry=RetrySpec(delay=30, backoff=2, max_delay=300))
        async with kit.opened() as worker, kit.opened() as cli:
            for drv in (worker, cli):
                await drv.declare(q)
            a, b = messages(2)
            await worker.publish(q, [a, b])
            sub = await subscribe(worker, q, prefetch=1)
            try:
                (got,) = await take(sub, 1)
                await sub.nack(got, kit.used_delay(q.retry.delay_for(got.attempts)))
                await expect_info(worker, q, delayed=1)
            finally:
                await sub.close()
            assert ids_of(await cli.browse(q, limit=10)) == [b.id]  # only what it can see
            assert ids_of(await worker.browse(q, limit=10)) == [b.id, a.id]
            assert await cli.purge(q) == 2
            await expect_info(worker, q, message_count=0, delayed=0)

    run(main())


def test_a_foreign_message_without_an_id_gets_a_stable_one(kit: DriverKit) -> None:
    async def main() -> None:
        async with kit.opened() as drv:
            src, dst = kit.queue("src"), kit.queue("dst")
            for q in (src, dst):
                await drv.declare(q)
            in_thread(lambda: raw_publish(src.queue_name, b'{"foreign": true}'))
            (first,) = await drv.browse(src, limit=5)
            (second,) = await drv.browse(src, limit=5)
            assert first.id == second.id and first.id.startswith("amqp-")
            assert await drv.move(src, dst, kept, ids=[first.id], limit=1) == 1
            (moved,) = await drv.browse(dst, limit=5)
            assert (moved.id, moved.body) == (first.id, b'{"foreign": true}')

    run(main())


# -- targets that refuse the copy ------------------------------------------------------------


def test_move_to_a_full_target_stops_and_leaves_the_rest(kit: DriverKit) -> None:
    async def main() -> None:
        async with kit.opened() as drv:
            src, dst = kit.queue("src"), kit.queue("dst", max_length=2)
            for q in (src, dst):
                await drv.declare(q)
            m = messages(3)
            await drv.publish(src, m)
            exc = await refused(drv.move(src, dst, kept, limit=10), "move to a full queue")
            assert exc.kind == errors.INTERNAL and exc.retryable, exc
            assert exc.details["reason"] == "queue_full" and exc.details["moved"] == 2, exc
            assert ids_of(await drv.browse(src, limit=10)) == [m[2].id]
            assert ids_of(await drv.browse(dst, limit=10)) == ids_of(m[:2])

    run(main())


def test_a_target_that_fills_up_during_the_move_gets_the_message_put_back(kit: DriverKit) -> None:
    """The target had room when checked, then another publisher filled it: RabbitMQ
    refuses the copy yet applies the ack of the transaction ("partial tx completion"),
    so the driver publishes the original to the source again: never on neither queue."""

    async def main() -> None:
        async with kit.opened() as drv:
            src, dst = kit.queue("src"), kit.queue("dst", max_length=1)
            for q in (src, dst):
                await drv.declare(q)
            (a,) = (Outgoing("a-1", b"payload", {"n": 1, "x_original_queue": "elsewhere"}),)
            await drv.publish(src, [a])

            def filling(stored: Stored) -> Outgoing:
                in_thread(lambda: raw_publish(dst.queue_name, b"filler", "filler"))
                return kept(stored)

            exc = await refused(drv.move(src, dst, filling, limit=5), "move into a queue filled meanwhile")
            assert exc.kind == errors.INTERNAL and exc.details["reason"] == "target_refused", exc
            assert exc.details["moved"] == 0 and exc.details["id"] == "a-1", exc
            (back,) = await drv.browse(src, limit=5)
            assert (back.id, back.body, back.headers) == (a.id, a.body, a.headers)
            assert ids_of(await drv.browse(dst, limit=5)) == ["filler"]

    run(main())


def test_a_target_deleted_during_the_move_gets_the_message_put_back(kit: DriverKit) -> None:
    """The copy comes back unroutable (``basic.return``) after the commit applied the ack:
    the original is published to the source again."""

    async def main() -> None:
        async with kit.opened() as drv:
            src, dst = kit.queue("src"), kit.queue("dst")
            for q in (src, dst):
                await drv.declare(q)
            m = messages(2)
            await drv.publish(src, m)

            def deleting(stored: Stored) -> Outgoing:
                if stored.id == m[1].id:
                    delete_queues(AMQP_URL, [dst.queue_name])  # blocks the loop a moment: a test
                return kept(stored)

            exc = await refused(drv.move(src, dst, deleting, limit=5), "move into a deleted queue")
            assert exc.details["reason"] == "target_refused" and exc.details["moved"] == 1, exc
            assert "does not exist" in exc.message, exc
            assert ids_of(await drv.browse(src, limit=5)) == [m[1].id]

    run(main())


# -- a connection cut mid-move ---------------------------------------------------------------


@asynccontextmanager
async def through(kit: DriverKit, proxy: TcpProxy) -> AsyncIterator[Driver]:
    """A driver of ``kit``'s queues connected through ``proxy``."""
    options = kit.schema.driver(
        url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/",
        connection_timeout=10,
        reconnect_delay=0.1,
        reconnect_max_delay=0.5,
    )
    drv = AmqpDriver(DriverSpec(id=f"{kit.prefix}:proxied", kind=kit.kind, options=options))
    await drv.open()
    try:
        yield drv
    finally:
        await drv.close()


async def placed(checker: Driver, src: QueueSpec, dst: QueueSpec, total: int) -> tuple[set[str], set[str]]:
    """The IDs on each queue once the broker has requeued what the cut connection held."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        on_src = ids_of(await checker.browse(src, limit=10_000))
        on_dst = ids_of(await checker.browse(dst, limit=10_000))
        if len(on_src) + len(on_dst) >= total or loop.time() > deadline:
            assert len(set(on_src)) == len(on_src) and len(set(on_dst)) == len(on_dst), "a duplicate"
            return set(on_src), set(on_dst)
        await asyncio.sleep(0.05)


async def moved_since(checker: Driver, dst: QueueSpec, before: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while (await checker.info(dst))["message_count"] <= before:
        assert loop.time() < deadline, "the move never started"
        await asyncio.sleep(0.002)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
def test_a_move_cut_by_a_lost_connection_leaves_each_message_on_exactly_one_queue(
    kit: DriverKit, queue_type: str
) -> None:
    """N01 (TCP reset) during moves, at random points of the get/publish/ack/commit cycle:
    after each cut every message is on the source or on the target, never on both and
    never on neither; the interrupted move says so (INTERNAL, retryable)."""
    rng = random.Random(1234)
    total = 300

    async def main() -> None:
        src, dst = typed(kit, "src", queue_type), typed(kit, "dst", queue_type)
        published = messages(total)
        everything = set(ids_of(published))
        with TcpProxy(5672) as proxy:
            async with kit.opened() as checker, through(kit, proxy) as drv:
                for q in (src, dst):
                    await checker.declare(q)
                    await drv.declare(q)
                await checker.publish(src, published)
                interrupted = 0
                proxy.delay(0.003)  # every chunk late: the frames of one move arrive apart
                for _cut in range(8):
                    before = (await checker.info(dst))["message_count"]
                    moving = asyncio.create_task(drv.move(src, dst, kept, limit=total))
                    await moved_since(checker, dst, before)  # the move is under way (reconnected)
                    await asyncio.sleep(rng.uniform(0, 0.015))
                    proxy.reset()
                    try:
                        await moving
                    except errors.Error as exc:
                        assert exc.kind == errors.INTERNAL and exc.retryable, exc
                        assert isinstance(exc.details.get("moved"), int), exc
                        interrupted += 1
                    on_src, on_dst = await placed(checker, src, dst, total)
                    assert not on_src & on_dst, f"on both queues: {sorted(on_src & on_dst)[:5]}"
                    assert on_src | on_dst == everything, f"lost: {sorted(everything - on_src - on_dst)[:5]}"
                    if not on_src:
                        break
                assert interrupted >= 4, f"only {interrupted} cuts landed during a move"
                proxy.forward()
                await drv.move(src, dst, kept, limit=total)  # the rest, without a cut
            async with kit.opened() as checker:
                for q in (src, dst):
                    await checker.declare(q)
                on_src, on_dst = await placed(checker, src, dst, total)
                assert on_src == set() and on_dst == everything

    run(main(), timeout=110)
