"""Hostile input is INVALID, never a raw exception, a crash or a hang.

Payloads nested too deep, batches that are no batches, oversized messages, headers
outside the contract, YAML alias bombs and bad tagged values, and queue aliases that
would let a policy be bypassed. Every refused publish stores nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import errors, queue, security
from conveyor.drivers.kinds import KINDS, schema
from conveyor.drivers.memory import MemoryDriver
from conveyor.queue.codecs import DecodeError, get_codec
from conveyor.queue.headers import check_headers
from conveyor.registry.conditions import Condition
from conveyor.registry.loader import load_registry
from conveyor.registry.model import DriverSpec, PolicySpec
from conveyor.registry.problems import Problem
from conveyor.security import PolicyEngine, SecurityContext
from tests.support.harness import Harness
from tests.support.waiting import wait_until

MIB = 1024 * 1024


def nested(depth: int, leaf: Any = 1) -> Any:
    """``leaf`` inside ``depth`` lists: ``nested(2)`` is ``[[1]]``."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def invalid(call: Any, *args: Any, **kwargs: Any) -> errors.Error:
    """Call and return the INVALID error it must raise."""
    with pytest.raises(errors.Error) as info:
        call(*args, **kwargs)
    assert info.value.kind == errors.INVALID, info.value
    assert info.value.retryable is False
    return info.value


def load_problems(tmp_path: Path, text: str) -> list[Problem]:
    path = tmp_path / "app.yaml"
    path.write_text(text)
    with pytest.raises(errors.Error) as info:
        load_registry(path)
    assert info.value.kind == errors.INVALID
    return [Problem.from_dict(p) for p in info.value.details["problems"]]


def only_problem(tmp_path: Path, text: str) -> Problem:
    found = load_problems(tmp_path, text)
    assert len(found) == 1, found
    return found[0]


# -- payloads nested too deep ---------------------------------------------------------------


@pytest.mark.parametrize("codec", ["json/plain", "msgpack/plain"])
def test_nesting_limit_is_200_levels_both_ways(codec: str) -> None:
    c = get_codec(codec)
    assert c.decode(c.encode(nested(200))) == nested(200)
    for depth in (201, 1_000, 5_000):
        error = invalid(c.encode, nested(depth))
        assert "nested deeper than 200 levels" in error.message


@pytest.mark.parametrize("codec", ["json/plain", "msgpack/plain"])
def test_a_structure_that_holds_itself_is_invalid(codec: str) -> None:
    loop: list[Any] = []
    loop.append(loop)
    looped: dict[str, Any] = {}
    looped["self"] = looped
    invalid(get_codec(codec).encode, loop)
    invalid(get_codec(codec).encode, looped)


@pytest.mark.parametrize(
    ("codec", "body"),
    [
        ("json/plain", b"[" * 201 + b"]" * 201),
        ("json/plain", b"[" * 1_000 + b"]" * 1_000),
        ("json/plain", b'{"a":' * 5_000 + b"1" + b"}" * 5_000),
        ("json/plain", b"[" * 100_000 + b"]" * 100_000),
        ("msgpack/plain", b"\x91" * 201 + b"\x01"),
        ("msgpack/plain", b"\x91" * 5_000 + b"\x01"),
        ("msgpack/plain", b"\x81\xa1a" * 300 + b"\x01"),
    ],
)
def test_a_body_nested_too_deep_is_undecodable(codec: str, body: bytes) -> None:
    with pytest.raises(DecodeError, match="nested deeper than 200 levels"):
        get_codec(codec).decode(body)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    json_codec = get_codec("json/plain")
    data = {"text": "[" * 5_000, "list": nested(3)}
    assert json_codec.decode(json_codec.encode(data)) == data


def test_wide_shallow_data_is_not_too_deep() -> None:
    data = [{"n": i, "tags": ["a", "b"]} for i in range(5_000)]
    for name in ("json/plain", "msgpack/plain"):
        codec = get_codec(name)
        assert codec.decode(codec.encode(data)) == data


@pytest.mark.parametrize("driver", ["memory", "sqlite"])
@pytest.mark.parametrize("codec", ["json/plain", "msgpack/plain"])
def test_publishing_data_nested_too_deep_is_invalid_and_stores_nothing(
    tmp_path: Path, driver: str, codec: str
) -> None:
    h = Harness(tmp_path, driver=driver)
    q = h.queue("deep", codec=codec)
    with h.load():
        invalid(queue.publish, q, nested(1_000))
        error = invalid(queue.publish_many, q, [1, nested(1_000)])
        assert error.message.startswith("item 1: ")
        assert queue.info(q)["message_count"] == 0
        assert queue.publish(q, nested(200))


def test_a_consumer_dead_letters_a_body_nested_too_deep_and_keeps_working(tmp_path: Path) -> None:
    """A raw alias of a JSON queue stores a body no JSON consumer can decode (RecursionError
    before); it is dead-lettered and the worker goes on with the next message."""
    h = Harness(tmp_path)
    jobs = h.queue("jobs", dead_letter={"queue": "dlq", "max_attempts": 3})
    raw = h.queue("jobs_raw", codec="raw", alias_of="jobs", queue_name=f"{h.namespace}.jobs")
    dlq = h.queue("dlq", codec="raw")
    handled: list[Any] = []
    h.consumer("worker", "jobs", handled.append)
    app = h.load()
    app.start(consumers=True)
    try:
        queue.publish(raw, b"[" * 5_000 + b"]" * 5_000)
        wait_until(lambda: queue.info(dlq)["message_count"] == 1)
        queue.publish(jobs, {"after": True})
        wait_until(lambda: handled == [{"after": True}])
    finally:
        app.stop()


def test_msgpack_tuple_keys_come_back_as_tuples() -> None:
    """A map with a tuple key was published, then undecodable ("unhashable type: 'list'"):
    every delivery went to the dead-letter queue (tests/fuzz finds it on the old code)."""
    codec = get_codec("msgpack/plain")
    data = {(1, "a"): [1, {((False,), b""): None}], 2: "two"}
    assert codec.decode(codec.encode(data)) == data


# -- publish_many takes a batch ---------------------------------------------------------------


@pytest.mark.parametrize("items", [None, 42, 1.5, "abc", b"ab", bytearray(b"ab"), {"a": 1}, object()])
def test_publish_many_refuses_what_is_no_batch(tmp_path: Path, items: Any) -> None:
    h = Harness(tmp_path)
    q = h.queue("batch")
    with h.load():
        error = invalid(queue.publish_many, q, items)
        assert "publish_many takes an iterable of items" in error.message
        assert queue.info(q)["message_count"] == 0


def test_apublish_many_refuses_what_is_no_batch(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    q = h.queue("batch")

    async def main() -> None:
        async with h.load():
            for items in (None, "abc", {"a": 1}):
                with pytest.raises(errors.Error) as info:
                    await queue.apublish_many(q, items)  # type: ignore[arg-type]
                assert info.value.kind == errors.INVALID
            assert (await queue.ainfo(q))["message_count"] == 0

    asyncio.run(main())


def test_publish_many_takes_any_other_iterable(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    q = h.queue("batch")

    def generate() -> Iterator[str]:
        yield "a"
        yield "b"

    with h.load():
        assert queue.publish_many(q, generate()) == 2
        assert queue.publish_many(q, ("c", "d", "e")) == 3
        assert queue.publish_many(q, range(1, 3)) == 2
        assert queue.publish_many(q, {"k": 1}.values()) == 1
        assert queue.info(q)["message_count"] == 8


# -- max_message_size -----------------------------------------------------------------------


def test_every_driver_declares_max_message_size_with_the_shared_helper() -> None:
    from conveyor.drivers.options import DEFAULT_MAX_MESSAGE_SIZE

    for row in KINDS:
        fields = {f.name: f for f in dataclasses.fields(schema(row.kind).driver)}
        assert "max_message_size" in fields, row.kind
        assert fields["max_message_size"].default == DEFAULT_MAX_MESSAGE_SIZE == 16 * MIB


def test_a_driver_exposes_its_limit_and_a_spec_built_in_python_gets_the_default() -> None:
    from conveyor.drivers.options.memory import MemoryOptions

    assert MemoryDriver(DriverSpec("app:m", "queue.driver.memory")).max_message_size == 16 * MIB
    spec = DriverSpec("app:m", "queue.driver.memory", MemoryOptions(max_message_size=1000))
    assert MemoryDriver(spec).max_message_size == 1000


@pytest.mark.parametrize(
    ("written", "size"),
    [
        ("1024", 1024),
        (2048, 2048),
        ("256KiB", 256 * 1024),
        ("16MiB", 16 * MIB),
        ("1MB", 10**6),
        ("3 kb", 3000),
    ],
)
def test_max_message_size_spellings(tmp_path: Path, written: Any, size: int) -> None:
    path = tmp_path / "app.yaml"
    entry = f"{{name: m, kind: queue.driver.memory, max_message_size: {written!r}}}"
    path.write_text(f"namespace: app\nentries:\n  - {entry}\n")
    options = load_registry(path).drivers["app:m"].options
    assert getattr(options, "max_message_size", None) == size


@pytest.mark.parametrize(
    ("kind", "extra", "written", "message"),
    [
        ("memory", "", "0", "must be at least 1 byte, got 0"),
        ("memory", "", "-1", "must be at least 1 byte, got -1"),
        ("memory", "", "1.5MiB", "expected a size such as"),
        ("memory", "", "12 parsecs", "expected a size such as"),
        ("memory", "", "true", "expected a size in bytes"),
        ("memory", "", "'" + "9" * 5000 + "'", "expected a size such as"),
        ("sqlite", "path: q.db, ", "2GiB", "must be at most 1000000000 bytes"),
        ("amqp", "", "513MiB", "must be at most 512 MiB"),
    ],
)
def test_bad_max_message_size_is_a_load_problem(
    tmp_path: Path, kind: str, extra: str, written: str, message: str
) -> None:
    entry = f"{{name: d, kind: queue.driver.{kind}, {extra}max_message_size: {written}}}"
    problem = only_problem(tmp_path, f"namespace: app\nentries:\n  - {entry}\n")
    assert problem.field == "max_message_size"
    assert message in problem.message, problem


@pytest.mark.parametrize("driver", ["memory", "sqlite"])
def test_a_message_over_the_limit_is_invalid_and_stores_nothing(tmp_path: Path, driver: str) -> None:
    h = Harness(tmp_path, driver=driver)
    h.entries[0]["max_message_size"] = 1000
    q = h.queue("small", codec="raw")
    with h.load():
        assert queue.publish(q, b"x" * 1000)  # exactly the limit
        error = invalid(queue.publish, q, b"x" * 1001)
        assert error.message == (
            f"message too large for queue {q}: at least 1001 bytes of data, over the max_message_size "
            f"of driver {h.qid('drv')}, 1000 bytes; nothing was stored"
        )
        assert error.details == {"queue": q, "size": 1001, "max_message_size": 1000}
        # headers count: 996 + len("ab") + len("cd") = 1000 fits, one more byte does not
        assert queue.publish(q, b"x" * 996, {"ab": "cd"})
        error = invalid(queue.publish, q, b"x" * 997, {"ab": "cd"})
        assert "1001 bytes (body 997 + headers 4)" in error.message
        error = invalid(queue.publish, q, b"x" * 993, {"n": 1})  # a number counts 8 bytes
        assert "1002 bytes (body 993 + headers 9)" in error.message
        error = invalid(queue.publish_many, q, [b"ok", b"y" * 2000])
        assert error.message.startswith("item 1: message too large")
        assert error.details["index"] == 1
        assert queue.info(q)["message_count"] == 2


def test_the_limit_is_on_the_encoded_body(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.entries[0]["max_message_size"] = "1KiB"
    q = h.queue("json")
    with h.load():
        # 1020 characters of data, 1022 bytes once JSON-quoted: over 1024 with "é" (2 bytes)
        assert queue.publish(q, "a" * 1022)
        error = invalid(queue.publish, q, "é" + "a" * 1021)
        assert "1025 bytes of encoded body" in error.message
        assert "1024 bytes (1 KiB)" in error.message
        invalid(queue.publish, q, ["a"] * 300)  # 1201 bytes of JSON
        assert queue.info(q)["message_count"] == 1


def test_the_default_limit_is_16_mib(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    q = h.queue("big", codec="raw")
    with h.load():
        assert queue.publish(q, b"x" * (16 * MIB))
        error = invalid(queue.publish, q, b"x" * (16 * MIB + 1))
        assert "16777216 bytes (16 MiB)" in error.message
        assert queue.info(q)["message_count"] == 1


# -- headers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"h": 2**63}, "outside the signed 64-bit integer range"),
        ({"h": -(2**63) - 1}, "outside the signed 64-bit integer range"),
        ({"h": 2**70}, "outside the signed 64-bit integer range"),
        ({"h": float("nan")}, "is NaN"),
        ({"h": "\ud800"}, "is not valid Unicode text"),
        ({"\udfff": 1}, "is not valid Unicode text"),
        ({"k" * 129: 1}, "at most 128 bytes"),
        ({"é" * 65: 1}, "is 130 bytes long"),
        ({("a", "b"): 1}, "header key must be a string"),
        ({"h": ["a"]}, "must be str, int, float or bool"),
        ({"h": {"a": 1}}, "must be str, int, float or bool"),
        ({"h": b"x"}, "must be str, int, float or bool"),
    ],
)
def test_headers_outside_the_contract_are_invalid(headers: dict[Any, Any], message: str) -> None:
    assert message in invalid(check_headers, headers).message


def test_headers_at_the_edges_of_the_contract_are_valid() -> None:
    edges = {
        "min": -(2**63),
        "max": 2**63 - 1,
        "inf": float("inf"),
        "-inf": float("-inf"),
        "k" * 128: "v",
        "long": "x" * 100_000,
        "t": True,
    }
    assert check_headers(edges) == edges


class Key(str):
    pass


def test_a_str_subclass_key_is_stored_as_a_plain_str() -> None:
    out = check_headers({Key("k"): 1})
    assert [type(k) for k in out] == [str]


@pytest.mark.parametrize("driver", ["memory", "sqlite"])
def test_a_header_outside_64_bits_is_invalid_on_every_driver(tmp_path: Path, driver: str) -> None:
    """SQLite used to fail with INTERNAL "OverflowError('Integer value out of range')"."""
    h = Harness(tmp_path, driver=driver)
    q = h.queue("h")
    with h.load():
        for bad in ({"big": 2**70}, {"s": "\ud800"}, {"\ud800": "k"}):
            invalid(queue.publish, q, "x", bad)
        assert queue.info(q)["message_count"] == 0


# -- raw codec -------------------------------------------------------------------------------


def test_raw_codec_refuses_text_that_is_not_unicode() -> None:
    """It raised UnicodeEncodeError (tests/fuzz finds it on the old code)."""
    assert "cannot encode the text" in invalid(get_codec("raw").encode, "a\ud800").message


# -- YAML ------------------------------------------------------------------------------------

BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
"""


def timed_problems(tmp_path: Path, text: str) -> list[Problem]:
    started = time.perf_counter()
    found = load_problems(tmp_path, text)
    assert time.perf_counter() - started < 1.0  # milliseconds in practice; 30 s and more before
    return found


def test_billion_laughs_is_refused_at_once(tmp_path: Path) -> None:
    assert len(BILLION_LAUGHS) < 300
    (problem,) = timed_problems(tmp_path, BILLION_LAUGHS)
    assert problem.message.startswith("YAML document refused: aliases repeat 6053427 nodes")
    assert "more than the 10000 allowed" in problem.message


def test_billion_laughs_inside_an_entry_is_refused_at_once(tmp_path: Path) -> None:
    body = "".join("    " + line + "\n" for line in BILLION_LAUGHS.splitlines())
    text = f"namespace: app\nentries:\n  - name: m\n    kind: queue.driver.memory\n    meta:\n{body}"
    (problem,) = timed_problems(tmp_path, text)
    assert "aliases repeat" in problem.message


def test_merge_key_bomb_is_refused_at_once(tmp_path: Path) -> None:
    lines = ["m0: &m0 {a: 1, b: 2}"]
    lines += [f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: 1}}" for i in range(1, 25)]
    (problem,) = timed_problems(tmp_path, "\n".join(lines) + "\n")
    assert "aliases repeat" in problem.message


@pytest.mark.parametrize(
    "text",
    [
        "x: &a [*a]\n",
        "x: &a {k: *a}\n",
        "namespace: app\nentries:\n  - &e {name: q, kind: queue.queue, meta: {x: *e}}\n",
    ],
)
def test_a_recursive_alias_is_refused(tmp_path: Path, text: str) -> None:
    """It raised RecursionError."""
    (problem,) = timed_problems(tmp_path, text)
    assert "an alias refers to a node that contains it" in problem.message


@pytest.mark.parametrize("depth", [100, 500, 990])
@pytest.mark.parametrize("style", ["flow", "block"])
def test_a_document_nested_too_deep_is_refused(tmp_path: Path, depth: int, style: str) -> None:
    """Nested 500 deep, it raised RecursionError."""
    if style == "flow":
        inner = "[" * depth + "]" * depth
    else:
        inner = "\n" + "".join("  " * (i + 1) + "-\n" for i in range(depth))
    (problem,) = timed_problems(tmp_path, f"namespace: app\nx: {inner}\n")
    assert "the document nests deeper than 64 levels" in problem.message
    assert problem.line is not None and problem.line >= 2


def test_nesting_through_an_alias_counts(tmp_path: Path) -> None:
    deep = "{a: " * 40 + "1" + "}" * 40
    text = f"anchor: &d {deep}\nx: {'[' * 30}*d{']' * 30}\n"
    (problem,) = timed_problems(tmp_path, text)
    assert "nests deeper than 64 levels (through an alias)" in problem.message


def test_ordinary_aliases_and_merge_keys_still_load(tmp_path: Path) -> None:
    text = """\
namespace: app
entries:
  - {name: m, kind: queue.driver.memory, meta: {retry: &retry {delay: 1s, max_delay: 10s}}}
  - &q {name: a, kind: queue.queue, driver: m, retry: *retry}
  - {<<: *q, name: b}
"""
    path = tmp_path / "app.yaml"
    path.write_text(text)
    queues = load_registry(path).queues
    assert [(q.retry.delay, q.retry.max_delay) for q in queues.values()] == [(1.0, 10.0), (1.0, 10.0)]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("!!int abc", "cannot read the value as tag:yaml.org,2002:int"),
        ("!!float abc", "cannot read the value as tag:yaml.org,2002:float"),
        ("!!bool maybe", "cannot read the value as tag:yaml.org,2002:bool: unknown value 'maybe'"),
        ("2001-02-29", "day is out of range for month"),
        ("2001-12-14 21:59:43.10 +25:00", "cannot read the value as tag:yaml.org,2002:timestamp"),
        ("1" * 5000, "cannot read the value as tag:yaml.org,2002:int"),
        ("!!timestamp ''", "cannot read the value as tag:yaml.org,2002:timestamp"),  # found by tests/fuzz
    ],
)
def test_a_value_yaml_cannot_construct_is_a_located_problem(tmp_path: Path, value: str, message: str) -> None:
    """Each raised a bare ValueError, KeyError or AttributeError out of load_registry."""
    text = f"namespace: app\nentries:\n  - name: m\n    kind: queue.driver.memory\n    meta: {{x: {value}}}\n"
    problem = only_problem(tmp_path, text)
    assert message in problem.message
    assert problem.line == 5


# -- queue aliases and policies ------------------------------------------------------------------

SHARED = """\
namespace: app
entries:
  - {name: mem, kind: queue.driver.memory}
  - {name: payroll, kind: queue.queue, driver: mem}
  - {name: payroll_v1, kind: queue.queue, driver: mem, queue_name: payroll%s}
"""


def test_two_ids_for_one_physical_queue_are_a_problem(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, SHARED % "")
    assert (problem.entry, problem.field) == ("app:payroll_v1", "queue_name")
    assert problem.message.startswith(
        "queue_name 'payroll' on driver app:mem is also used by app:payroll: two entries would share "
        "one physical queue"
    )
    assert "write alias_of: app:payroll on this entry" in problem.message


def test_a_declared_alias_loads(tmp_path: Path) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(SHARED % ", alias_of: payroll")
    registry = load_registry(path)
    assert registry.queues["app:payroll_v1"].alias_of == "app:payroll"
    assert registry.queues["app:payroll"].alias_of is None
    assert registry.warnings == ()


@pytest.mark.parametrize(
    ("extra", "field", "message"),
    [
        (
            "  - {name: q, kind: queue.queue, driver: mem, alias_of: q}\n",
            "alias_of",
            "cannot be an alias of itself",
        ),
        (
            "  - {name: q, kind: queue.queue, driver: mem, alias_of: mem}\n",
            "alias_of",
            "is a queue.driver.memory",
        ),
        ("  - {name: q, kind: queue.queue, driver: mem, alias_of: nope}\n", "alias_of", "dangling reference"),
        (
            "  - {name: q, kind: queue.queue, driver: mem, alias_of: a}\n",
            "alias_of",
            "an alias uses the same driver and queue_name as the queue it aliases (app:a is queue_name "
            "'a' on driver app:mem; this entry is queue_name 'q' on driver app:mem)",
        ),
        (
            "  - {name: q, kind: queue.queue, driver: mem2, queue_name: a, alias_of: a}\n",
            "alias_of",
            "queue_name 'a' on driver app:mem; this entry is queue_name 'a' on driver app:mem2",
        ),
        (
            "  - {name: b, kind: queue.queue, driver: mem, queue_name: a, alias_of: a}\n"
            "  - {name: c, kind: queue.queue, driver: mem, queue_name: a, alias_of: b}\n",
            "alias_of",
            "alias_of app:b: that entry is itself an alias; name the queue it aliases (alias_of: app:a)",
        ),
        (
            "  - {name: b, kind: queue.queue, driver: mem, queue_name: a, alias_of: a,"
            " dead_letter: {queue: a}}\n",
            "dead_letter.queue",
            "dead-letter queue app:a is the same physical queue as this one (an alias)",
        ),
    ],
)
def test_alias_mistakes_are_problems(tmp_path: Path, extra: str, field: str, message: str) -> None:
    text = (
        "namespace: app\nentries:\n  - {name: mem, kind: queue.driver.memory}\n"
        "  - {name: mem2, kind: queue.driver.memory}\n  - {name: a, kind: queue.queue, driver: mem}\n" + extra
    )
    found = load_problems(tmp_path, text)
    assert any(p.field == field and message in p.message for p in found), found


def test_an_alias_with_another_codec_warns(tmp_path: Path) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(SHARED % ", alias_of: payroll, codec: raw")
    (warning,) = load_registry(path).warnings
    assert warning.endswith(
        "entry app:payroll_v1: alias of app:payroll with codec raw, not json/plain: consumers of one ID "
        "may not decode messages published through the other"
    )


def _pol(pid: str, actions: str, resources: str = "*", effect: str = "allow") -> PolicySpec:
    return PolicySpec(pid, (actions,), (resources,), effect)


def test_engine_judges_every_alias_of_a_queue_together() -> None:
    specs = [
        _pol("app:all", "*"),
        _pol("app:no-payroll", "queue.publish.queue", "app:payroll", "deny"),
    ]
    aliases = {
        "app:payroll": ("app:payroll", "app:payroll_v1"),
        "app:payroll_v1": ("app:payroll", "app:payroll_v1"),
    }
    engine = PolicyEngine({s.id: s for s in specs}, aliases=aliases)
    ctx = SecurityContext("mallory", ["app:all", "app:no-payroll"])
    for qid in ("app:payroll", "app:payroll_v1"):
        with pytest.raises(errors.Error) as info:
            engine.check_publish(ctx, qid)
        assert info.value.kind == errors.PERMISSION_DENIED
        assert engine.is_allowed(ctx, "queue.publish.queue", qid) is False
    engine.check_publish(ctx, "app:other")
    # without the aliases, the second ID is a way around the deny
    plain = PolicyEngine({s.id: s for s in specs})
    plain.check_publish(ctx, "app:payroll_v1")


def test_an_allow_for_one_alias_allows_the_queue_through_every_id() -> None:
    specs = [_pol("app:general", "queue.publish"), _pol("app:payroll", "queue.publish.queue", "app:payroll")]
    engine = PolicyEngine({s.id: s for s in specs}, aliases={"app:payroll_v1": ["app:payroll"]})
    ctx = SecurityContext("svc", ["app:general", "app:payroll"])
    engine.check_publish(ctx, "app:payroll_v1")
    with pytest.raises(errors.Error):
        engine.check_publish(ctx, "app:other")


def test_a_resource_condition_sees_each_alias() -> None:
    deny = PolicySpec(
        "app:deny",
        ("*",),
        ("*",),
        "deny",
        conditions=(Condition("resource", "eq", "app:a"),),
    )
    engine = PolicyEngine({"app:deny": deny, "app:all": _pol("app:all", "*")}, aliases={"app:b": ["app:a"]})
    ctx = SecurityContext("svc", ["app:deny", "app:all"])
    assert engine.is_allowed(ctx, "anything", "app:b") is False
    assert engine.is_allowed(ctx, "anything", "app:c") is True


def test_engine_aliases_must_be_strings() -> None:
    with pytest.raises(errors.Error) as info:
        PolicyEngine({}, aliases={"app:a": [1]})  # type: ignore[list-item]
    assert info.value.kind == errors.INVALID


def test_a_deny_cannot_be_bypassed_through_an_alias(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    payroll = h.queue("payroll")
    alias = h.queue("payroll_v1", queue_name=f"{h.namespace}.payroll", alias_of="payroll")
    h.add(name="all", kind="security.policy", policy={"actions": "*"})
    deny = {"actions": "queue.publish.queue", "resources": payroll, "effect": "deny"}
    h.add(name="no-payroll", kind="security.policy", policy=deny)
    with h.load():
        with security.context("mallory", policies=[h.qid("all"), h.qid("no-payroll")]):
            for qid in (payroll, alias):
                with pytest.raises(errors.Error) as info:
                    queue.publish(qid, {"amount": 10**6})
                assert info.value.kind == errors.PERMISSION_DENIED
            assert str(info.value).endswith(f"on {alias} (the same queue as {payroll})")
            assert security.is_allowed("queue.publish.queue", alias) is False
        assert queue.info(payroll)["message_count"] == 0
