"""Fuzzing publish: any payload and any headers are either refused with INVALID (and
nothing is stored) or delivered back exactly, types included, on the memory and the
SQLite driver. No other exception, ever."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import conveyor
from conveyor import errors, queue
from conveyor.drivers.base import Delivery
from tests.fuzz import FUZZ
from tests.support.harness import Harness

LIMIT = 4096  # the drivers' max_message_size here, so that some examples are too large

CODECS = ("json/plain", "msgpack/plain", "raw")


class Reader:
    """One started app and its queues of every codec; reads a message back through the
    driver (a short-lived subscription, so that counting sees every stored message)."""

    def __init__(self, app: conveyor.App, ids: dict[str, str]) -> None:
        self.app = app
        self.ids = ids  # codec -> queue ID

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.app.loop).result(20)

    def take(self, qid: str, count: int = 1) -> list[Delivery]:
        """The next ``count`` messages of ``qid``, acked."""
        return self.run(self._take(qid, count))  # type: ignore[no-any-return]

    async def _take(self, qid: str, count: int) -> list[Delivery]:
        bound = self.app.runtime.queue(qid)
        sub = await bound.driver.subscribe(bound.spec, prefetch=count, auto_ack=False, options={})
        taken: list[Delivery] = []
        try:
            while len(taken) < count:
                delivery = await asyncio.wait_for(sub.get(), 10)
                assert delivery is not None
                await sub.ack(delivery)
                taken.append(delivery)
            return taken
        finally:
            await sub.close()

    def count(self, qid: str) -> int:
        return int(queue.info(qid)["message_count"])


@pytest.fixture(scope="module", params=["memory", "sqlite"])
def reader(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reader]:
    h = Harness(tmp_path_factory.mktemp("fuzz"), driver=request.param)
    h.entries[0]["max_message_size"] = LIMIT
    if request.param == "sqlite":
        h.entries[0]["synchronous"] = "off"  # nothing here needs to survive a power loss
    ids = {codec: h.queue(codec.replace("/", "_"), codec=codec) for codec in CODECS}
    app = h.load()
    app.start()
    try:
        yield Reader(app, ids)
    finally:
        app.stop()


def same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down (1 is not 1.0 nor True; NaN is NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        keys_a, keys_b = list(a), list(b)  # in order: the codecs keep it
        return same_keys(keys_a, keys_b) and all(same(a[k], b[k]) for k in keys_a)
    return bool(a == b)


def same_keys(a: list[Any], b: list[Any]) -> bool:
    """Map keys alike: equal, of the same types (a tuple key stays a tuple)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if type(x) is not type(y):
            return False
        if isinstance(x, tuple) and not same_keys(list(x), list(y)):
            return False
        if not isinstance(x, tuple) and not same(x, y):
            return False
    return True


def depth(data: Any) -> int:
    """How many lists, tuples and dicts deep ``data`` nests (without recursion)."""
    deepest, level = 0, [data]
    while True:
        containers = [node for node in level if isinstance(node, (list, tuple, dict))]
        if not containers:
            return deepest
        deepest += 1
        level = [member for node in containers for member in _members(node)]


def _members(node: Any) -> list[Any]:
    return [*node.keys(), *node.values()] if isinstance(node, dict) else list(node)


def nest(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


# Text includes lone surrogates, which no codec can encode.
text = st.one_of(
    st.text(st.characters(codec=None), max_size=40),
    st.lists(st.sampled_from(["a", "é", "\ud800", "\udfff", "\x00", " ", "[", "{"]), max_size=6).map("".join),
)
big_text = st.builds(lambda s, n: s * n, st.text(max_size=8), st.integers(0, 900))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(),
    text,
    big_text,
    st.binary(max_size=40),
)
structured = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(text, inner, max_size=5),
        st.tuples(inner, inner),
    ),
    max_leaves=30,
)
payloads = st.one_of(
    structured,
    st.builds(nest, st.one_of(st.integers(150, 260), st.sampled_from([1_000, 3_000])), scalars),  # nesting
    st.builds(lambda n, item: [item] * n, st.integers(200, 1500), scalars),  # around the size limit
)


def expected(codec: str, data: Any) -> Any:
    """What a consumer gets for ``data``: JSON and msgpack carry tuples as lists, raw
    delivers bytes."""
    if codec == "raw":
        return data.encode() if isinstance(data, str) else bytes(data)
    if isinstance(data, tuple):
        return [expected(codec, item) for item in data]
    if isinstance(data, list):
        return [expected(codec, item) for item in data]
    if isinstance(data, dict):
        return {key: expected(codec, value) for key, value in data.items()}
    return data


def publish_or_invalid(reader: Reader, qid: str, data: Any, headers: Any) -> bool:
    """Publish; True when stored, False when refused with INVALID (nothing stored)."""
    before = reader.count(qid)
    try:
        stored = queue.publish(qid, data, headers)
    except errors.Error as exc:
        assert exc.kind == errors.INVALID, exc
        assert not exc.retryable
        assert reader.count(qid) == before
        return False
    assert isinstance(stored, str) and stored  # the message ID
    return True


@pytest.mark.parametrize("codec", CODECS)
@FUZZ
@given(data=st.one_of(payloads, text, st.binary(max_size=LIMIT + 10)))
def test_any_payload_is_invalid_or_comes_back_exactly(reader: Reader, codec: str, data: Any) -> None:
    qid = reader.ids[codec]
    if publish_or_invalid(reader, qid, data, None):
        assert depth(data) <= 200, "data nested deeper than the limit was accepted"
        (delivery,) = reader.take(qid)
        body = delivery.body
        payload = reader.app.runtime.queue(qid).codec.decode(body)
        assert same(payload, expected(codec, data)), (payload, data)


map_keys = st.one_of(
    text,
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.booleans(),
    st.none(),
    st.binary(max_size=4),
    st.floats(allow_nan=False),
    st.tuples(st.integers(-5, 5), text),
    st.tuples(st.tuples(st.booleans()), st.binary(max_size=2)),
)
msgpack_maps = st.recursive(
    scalars,
    lambda inner: st.one_of(st.dictionaries(map_keys, inner, max_size=4), st.lists(inner, max_size=3)),
    max_leaves=12,
)


@FUZZ
@given(data=msgpack_maps)
def test_msgpack_maps_with_keys_of_any_hashable_type(reader: Reader, data: Any) -> None:
    """msgpack carries int, float, bool, None, bytes and tuple keys; they come back as
    they went (a tuple key stays a tuple) or the publish is INVALID."""
    qid = reader.ids["msgpack/plain"]
    if publish_or_invalid(reader, qid, data, None):
        (delivery,) = reader.take(qid)
        payload = reader.app.runtime.queue(qid).codec.decode(delivery.body)
        assert same(payload, expected("msgpack/plain", data)), (payload, data)


keys = st.one_of(
    text,
    st.sampled_from(["priority", "attempts", "x_original_queue", " k", "", "amqp.mandatory", "k" * 129]),
    st.integers(),
    st.none(),
)
header_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 0, 255, 256]),
    st.floats(),
    text,
    big_text,
    st.sampled_from(["low", "normal", "high"]),
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=2),
)
good_keys = st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=12)
headers = st.one_of(
    st.dictionaries(good_keys, header_values, max_size=4),
    st.dictionaries(keys, header_values, max_size=6),
    st.none(),
    st.lists(text, max_size=2),
)


@FUZZ
@given(headers=headers)
def test_any_headers_are_invalid_or_come_back_exactly(reader: Reader, headers: Any) -> None:
    qid = reader.ids["json/plain"]
    if publish_or_invalid(reader, qid, "payload", headers):
        (delivery,) = reader.take(qid)
        got = delivery.headers
        assert same(got, dict(headers or {})), (got, headers)


@FUZZ
@given(
    queue_id=st.one_of(
        text, st.from_regex(r"[a-z]{1,3}[:.\- ]{0,2}[a-z]{0,3}", fullmatch=True), st.integers()
    )
)
def test_any_queue_id_is_invalid_or_not_found(reader: Reader, queue_id: Any) -> None:
    with pytest.raises(errors.Error) as info:
        queue.publish(queue_id, {"x": 1})
    assert info.value.kind in (errors.INVALID, errors.NOT_FOUND)


@FUZZ
@given(items=st.one_of(st.lists(payloads, max_size=4), payloads))
def test_any_batch_is_invalid_or_stored_whole(reader: Reader, items: Any) -> None:
    qid = reader.ids["msgpack/plain"]
    before = reader.count(qid)
    try:
        count = queue.publish_many(qid, items)
    except errors.Error as exc:
        assert exc.kind == errors.INVALID, exc
        assert reader.count(qid) == before
        return
    assert reader.count(qid) == before + count
    reader.take(qid, count)
