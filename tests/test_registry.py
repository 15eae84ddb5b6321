"""The registry loader: YAML in, validated specs out, every problem reported at once."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from conveyor import errors
from conveyor.drivers.options.amqp import AmqpConsumerOptions, AmqpOptions, AmqpQueueOptions, AmqpTls
from conveyor.drivers.options.memory import MemoryOptions, MemoryQueueOptions
from conveyor.drivers.options.sqlite import SqliteOptions, SqliteQueueOptions
from conveyor.registry import (
    ConsumerSpec,
    DeadLetterSpec,
    DriverSpec,
    FunctionSpec,
    PolicySpec,
    QueueSpec,
    Registry,
    RetrySpec,
    SecurityBlock,
    load_registry,
    parse_duration,
)
from conveyor.registry import __all__ as registry_all
from conveyor.registry.conditions import NO_VALUE, Condition
from conveyor.registry.problems import Origin

# --------------------------------------------------------------------------- helpers

HEADER = "version: '1.0'\nnamespace: app\nentries:\n"

BASE = """
  - name: mem
    kind: queue.driver.memory
  - name: q
    kind: queue.queue
    driver: mem
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def entries(directory: Path, text: str, *, name: str = "app.yaml") -> Path:
    """A file in namespace ``app`` whose entries are ``text`` (indented as list items)."""
    return write(directory, name, HEADER + text.strip("\n") + "\n")


def load(directory: Path, text: str) -> Registry:
    return load_registry(entries(directory, text))


def base_with(fields: str = "", extra: str = "") -> str:
    """BASE with ``fields`` added to its queue ``app:q``, then the entries ``extra``."""
    text = item(BASE)
    if fields:
        text += "\n" + textwrap.indent(textwrap.dedent(fields).strip("\n"), "    ")
    if extra:
        text += "\n" + item(extra)
    return text


def problems_of(path: Path) -> list[dict[str, Any]]:
    with pytest.raises(errors.Error) as info:
        load_registry(path)
    assert info.value.kind == errors.INVALID
    problems: list[dict[str, Any]] = info.value.details["problems"]
    assert problems, "an INVALID load must list its problems"
    return problems


def problems(directory: Path, text: str) -> list[dict[str, Any]]:
    return problems_of(entries(directory, text))


def only(found: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(found) == 1, found
    return found[0]


def at(found: list[dict[str, Any]], field: str) -> dict[str, Any]:
    """The one problem on ``field``."""
    return only([p for p in found if p["field"] == field])


# The YAML fragments below are indented as items of `entries:`.
def item(text: str) -> str:
    return textwrap.indent(textwrap.dedent(text).strip("\n"), "  ")


# --------------------------------------------------------------------------- the reference example

REFERENCE_EXAMPLE = """
version: "1.0"
namespace: app
entries:
  - name: store                      # `id:` is accepted as a synonym of `name:`
    kind: queue.driver.sqlite
    path: ./data/app.db
  - name: emails
    kind: queue.queue
    driver: store                    # same-namespace short form, or app:store
    codec: json/plain
    dead_letter: {queue: app:emails_dlq, max_attempts: 5}
    retry: {delay: 1s, backoff: 2.0, max_delay: 5m}
  - name: emails_dlq
    kind: queue.queue
    driver: store
  - name: email_worker
    kind: queue.consumer
    queue: app:emails
    func: app:handle_email           # a function entry; see below for other forms
    concurrency: 4
    prefetch: 10
    lifecycle: {auto_start: true}
  - name: handle_email
    kind: function.python
    source: myapp.handlers:handle_email
"""


def test_spec_example_loads_into_typed_specs(tmp_path: Path) -> None:
    path = write(tmp_path, "app.yaml", REFERENCE_EXAMPLE)
    registry = load_registry(path)
    assert registry.drivers == {
        "app:store": DriverSpec(
            id="app:store",
            kind="queue.driver.sqlite",
            options=SqliteOptions(
                path=str(tmp_path.resolve() / "data" / "app.db"),
                busy_timeout=5.0,
                poll_interval=0.1,
                synchronous="full",
                lease_duration=30.0,
            ),
            origin=Origin(file=str(path), entry="app:store", line=4),
        )
    }
    assert registry.queues["app:emails"] == QueueSpec(
        id="app:emails",
        driver="app:store",
        queue_name="emails",
        codec="json/plain",
        dead_letter=DeadLetterSpec(queue="app:emails_dlq", max_attempts=5),
        retry=RetrySpec(delay=1.0, backoff=2.0, max_delay=300.0),
        driver_options={},
        origin=Origin(file=str(path), entry="app:emails", line=7),
    )
    consumer = registry.consumers["app:email_worker"]
    assert (consumer.queue, consumer.func, consumer.concurrency, consumer.prefetch) == (
        "app:emails",
        "app:handle_email",
        4,
        10,
    )
    assert consumer.handler is None and consumer.method is None and consumer.auto_start is True
    assert registry.functions["app:handle_email"] == FunctionSpec(
        id="app:handle_email",
        kind="function.python",
        source="myapp.handlers:handle_email",
        base_dir=tmp_path.resolve(),
        origin=Origin(file=str(path), entry="app:handle_email", line=23),
    )
    assert str(registry.functions["app:handle_email"].origin) == f"{path}: entry app:handle_email"
    assert list(registry.queues) == ["app:emails", "app:emails_dlq"]
    assert registry.files == (path,)
    assert registry.strict_security is False
    # The consumer's queue has a dead letter; prefetch >= concurrency; same codec/driver.
    assert registry.warnings == ()


def test_public_surface_is_sorted_and_complete() -> None:
    assert registry_all == sorted(registry_all)
    assert {"load_registry", "parse_duration", "Registry", "QueueSpec", "ConsumerSpec"} <= set(registry_all)


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (30, 30.0),
        (1.5, 1.5),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("2h30m", 9000.0),
        ("1m30s250ms", 90.25),
        ("30", 30.0),
        ("0", 0.0),
    ],
)
def test_parse_duration_accepts(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (-1, "negative"),
        ("-5s", "negative"),
        ("5x", "invalid duration"),
        ("5 s", "invalid duration"),
        ("s", "invalid duration"),
        ("", "invalid duration"),
        ("5s ", "invalid duration"),
        ("1e3", "invalid duration"),
        (True, "boolean"),
        (None, "expected a duration"),
        ([1], "expected a duration"),
        (float("inf"), "finite"),
        (float("nan"), "finite"),
    ],
)
def test_parse_duration_rejects(value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_duration(value)


def test_duration_fields_accept_numbers_and_strings(tmp_path: Path) -> None:
    registry = load(
        tmp_path,
        item("""
        - name: mem
          kind: queue.driver.memory
        - name: q
          kind: queue.queue
          driver: mem
          retry: {delay: 250ms, backoff: 1.5, max_delay: 90}
        """),
    )
    assert registry.queues["app:q"].retry == RetrySpec(delay=0.25, backoff=1.5, max_delay=90.0)


def test_bad_duration_is_a_problem_on_its_field(tmp_path: Path) -> None:
    found = problems(tmp_path, base_with("retry: {delay: soon}"))
    problem = at(found, "retry.delay")
    assert problem["entry"] == "app:q"
    assert "invalid duration 'soon'" in problem["message"]


# --------------------------------------------------------------------------- drivers


def test_memory_driver(tmp_path: Path) -> None:
    registry = load(tmp_path, item("- {name: mem, kind: queue.driver.memory}"))
    spec = registry.drivers["app:mem"]
    assert spec == DriverSpec(
        id="app:mem", kind="queue.driver.memory", options=MemoryOptions(), origin=spec.origin
    )
    assert str(spec.origin).endswith("app.yaml: entry app:mem")
    assert (spec.origin.file, spec.origin.entry, spec.origin.line) == (
        str(tmp_path / "app.yaml"),
        "app:mem",
        4,
    )


def test_sqlite_driver_fields_and_absolute_path(tmp_path: Path) -> None:
    db = tmp_path / "elsewhere" / "q.db"
    registry = load(
        tmp_path,
        item(f"""
        - name: store
          kind: queue.driver.sqlite
          path: {db}
          busy_timeout: 2s
          poll_interval: 50ms
          synchronous: normal
          lease_duration: 1m
        """),
    )
    assert registry.drivers["app:store"].options == SqliteOptions(
        path=str(db), busy_timeout=2.0, poll_interval=0.05, synchronous="normal", lease_duration=60.0
    )


def test_sqlite_relative_path_resolves_against_the_yaml_directory(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "conf/sub/app.yaml",
        HEADER + item("- {name: store, kind: queue.driver.sqlite, path: ../data/q.db}") + "\n",
    )
    options = load_registry(path).drivers["app:store"].options
    assert isinstance(options, SqliteOptions)
    assert options.path == str((tmp_path / "conf" / "data" / "q.db").resolve())


@pytest.mark.parametrize("interval", ["0", "0s", "61s", "2m"])
def test_sqlite_poll_interval_must_be_positive_and_at_most_60s(tmp_path: Path, interval: str) -> None:
    found = problems(
        tmp_path, item(f"- {{name: s, kind: queue.driver.sqlite, path: a.db, poll_interval: {interval}}}")
    )
    assert at(found, "poll_interval")["entry"] == "app:s"


def test_sqlite_path_is_required(tmp_path: Path) -> None:
    problem = only(problems(tmp_path, item("- {name: s, kind: queue.driver.sqlite}")))
    assert (problem["entry"], problem["field"], problem["message"]) == (
        "app:s",
        "path",
        "required field is missing",
    )


def test_amqp_driver_defaults_fill_every_field(tmp_path: Path) -> None:
    registry = load(tmp_path, item("- {name: rabbit, kind: queue.driver.amqp}"))
    assert registry.drivers["app:rabbit"].options == AmqpOptions(
        url="amqp://guest:guest@localhost:5672/",
        vhost=None,
        connection_name=None,
        auth_mechanism=None,
        heartbeat=None,
        connection_timeout=15.0,
        reconnect_delay=1.0,
        reconnect_max_delay=30.0,
        default_message_ttl=None,
        default_queue_expiry=None,
        prefetch_count=None,
        frame_size=None,
        channel_max=None,
        tls=None,
    )


def test_amqp_driver_all_fields(tmp_path: Path) -> None:
    registry = load(
        tmp_path,
        item("""
        - name: rabbit
          kind: queue.driver.amqp
          url: amqps://user:pw@broker:5671/
          vhost: /prod
          connection_name: worker-1
          auth_mechanism: EXTERNAL
          heartbeat: 30s
          connection_timeout: 5s
          reconnect_delay: 500ms
          reconnect_max_delay: 1m
          default_message_ttl: 1h
          default_queue_expiry: 2h
          prefetch_count: 50
          frame_size: 131072
          channel_max: 2047
          tls:
            enabled: true
            server_name: broker.internal
            cert: certs/client.pem
            ca_env: CA_PEM
            insecure_skip_verify: false
        """),
    )
    options = registry.drivers["app:rabbit"].options
    assert isinstance(options, AmqpOptions)
    assert options.url == "amqps://user:pw@broker:5671/"
    assert (options.vhost, options.connection_name, options.auth_mechanism) == (
        "/prod",
        "worker-1",
        "EXTERNAL",
    )
    assert (options.heartbeat, options.connection_timeout) == (30.0, 5.0)
    assert (options.reconnect_delay, options.reconnect_max_delay) == (0.5, 60.0)
    assert (options.default_message_ttl, options.default_queue_expiry) == (3600.0, 7200.0)
    assert (options.prefetch_count, options.frame_size, options.channel_max) == (50, 131072, 2047)
    assert options.tls == AmqpTls(
        enabled=True,
        server_name="broker.internal",
        cert=str(tmp_path.resolve() / "certs" / "client.pem"),
        key=None,
        ca=None,
        cert_env=None,
        key_env=None,
        ca_env="CA_PEM",
        insecure_skip_verify=False,
    )


def test_amqp_driver_problems(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        item("""
        - name: rabbit
          kind: queue.driver.amqp
          url: http://broker/
          auth_mechanism: KERBEROS
          reconnect_delay: 10s
          reconnect_max_delay: 5s
          prefetch_count: -1
          tls: {enabled: yes, client_cert: x.pem}
        """),
    )
    # Rules across fields (reconnect_max_delay >= reconnect_delay) are checked once every
    # field of the record reads well: see test_amqp_reconnect_max_delay_below_reconnect_delay.
    assert {p["field"] for p in found} == {
        "url",
        "auth_mechanism",
        "prefetch_count",
        "tls.client_cert",
    }
    assert "amqp://" in at(found, "url")["message"]
    assert "PLAIN, AMQPLAIN, EXTERNAL" in at(found, "auth_mechanism")["message"]
    assert at(found, "tls.client_cert")["message"].startswith("unknown field")
    assert all(p["entry"] == "app:rabbit" for p in found)


def test_amqp_reconnect_max_delay_below_reconnect_delay(tmp_path: Path) -> None:
    text = item("""
        - name: rabbit
          kind: queue.driver.amqp
          reconnect_delay: 10s
          reconnect_max_delay: 5s
        """)
    problem = only(problems(tmp_path, text))
    assert (problem["entry"], problem["field"], problem["line"]) == ("app:rabbit", "reconnect_max_delay", 7)
    assert problem["message"] == "must be >= reconnect_delay (10s), got 5s"


def test_driver_entry_with_a_bad_option_is_still_declared(tmp_path: Path) -> None:
    text = item("""
        - {name: store, kind: queue.driver.sqlite, path: q.db, synchronous: sometimes}
        - {name: q, kind: queue.queue, driver: store}
        """)
    problem = only(problems(tmp_path, text))
    assert (problem["entry"], problem["field"]) == ("app:store", "synchronous")
    assert problem["message"] == "must be one of full, normal, off; got 'sometimes'"


# --------------------------------------------------------------------------- queues


def test_queue_defaults(tmp_path: Path) -> None:
    spec = load(tmp_path, item(BASE)).queues["app:q"]
    assert spec == QueueSpec(id="app:q", driver="app:mem", queue_name="q", origin=spec.origin)
    assert (spec.origin.entry, spec.origin.line) == ("app:q", 6)
    assert (spec.codec, spec.dead_letter, spec.retry, spec.driver_options) == (
        "json/plain",
        None,
        RetrySpec(1.0, 2.0, 300.0),
        {},
    )


def test_queue_all_fields(tmp_path: Path) -> None:
    registry = load(
        tmp_path,
        item("""
        - name: mem
          kind: queue.driver.memory
        - name: q
          kind: queue.queue
          driver: app:mem
          queue_name: orders.v2
          codec: msgpack/plain
          dead_letter: {queue: dlq}
          retry: {delay: 0}
          driver_options:
            memory: {max_length: 100}
            sqlite: {max_length: 5}
            amqp:
              durable: true
              auto_delete: false
              exclusive: false
              message_ttl: 10s
              queue_expiry: 1h
              max_length: 1000
              overflow: reject-publish-dlx
              queue_type: quorum
              max_priority: 10
        - name: dlq
          kind: queue.queue
          driver: mem
          codec: msgpack/plain
        """),
    )
    spec = registry.queues["app:q"]
    assert (spec.queue_name, spec.codec) == ("orders.v2", "msgpack/plain")
    assert spec.dead_letter == DeadLetterSpec(queue="app:dlq", max_attempts=5)
    assert spec.retry == RetrySpec(delay=0.0, backoff=2.0, max_delay=300.0)
    assert spec.driver_options == {
        "memory": MemoryQueueOptions(max_length=100),
        "sqlite": SqliteQueueOptions(max_length=5),
        "amqp": AmqpQueueOptions(
            durable=True,
            auto_delete=False,
            exclusive=False,
            message_ttl=10.0,
            queue_expiry=3600.0,
            max_length=1000,
            overflow="reject-publish-dlx",
            queue_type="quorum",
            max_priority=10,
        ),
    }


def test_queue_driver_options_keep_only_given_bags(tmp_path: Path) -> None:
    text = base_with("driver_options: {amqp: {durable: false}}")
    assert load(tmp_path, text).queues["app:q"].driver_options == {"amqp": AmqpQueueOptions(durable=False)}


def test_queue_driver_options_problems(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        base_with("""
            driver_options:
              redis: {max_length: 1}
              memory: {max_length: 0, maxlen: 3}
              amqp: {overflow: drop-tail, queue_type: stream, max_priority: 256}
        """),
    )
    assert {p["field"] for p in found} == {
        "driver_options.redis",
        "driver_options.memory.max_length",
        "driver_options.memory.maxlen",
        "driver_options.amqp.overflow",
        "driver_options.amqp.queue_type",
        "driver_options.amqp.max_priority",
    }
    assert "between 1 and 255, got 256" in at(found, "driver_options.amqp.max_priority")["message"]


def test_quorum_queue_cannot_be_exclusive(tmp_path: Path) -> None:
    text = base_with("driver_options: {amqp: {queue_type: quorum, exclusive: true}}")
    assert "quorum" in at(problems(tmp_path, text), "driver_options.amqp.exclusive")["message"]


@pytest.mark.parametrize("codec", ["json", "xml/plain", "JSON/PLAIN"])
def test_bad_codec(tmp_path: Path, codec: str) -> None:
    problem = at(problems(tmp_path, base_with(f"codec: {codec}")), "codec")
    assert "json/plain, msgpack/plain, raw" in problem["message"]


def test_dead_letter_problems(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        item("""
        - {name: mem, kind: queue.driver.memory}
        - {name: a, kind: queue.queue, driver: mem, dead_letter: {queue: a}}
        - {name: b, kind: queue.queue, driver: mem, dead_letter: {max_attempts: 0}}
        - {name: c, kind: queue.queue, driver: mem, retry: {backoff: 0.5}}
        """),
    )
    assert [(p["entry"], p["field"]) for p in found] == [
        ("app:a", "dead_letter.queue"),
        ("app:b", "dead_letter.queue"),
        ("app:b", "dead_letter.max_attempts"),
        ("app:c", "retry.backoff"),
    ]
    assert "its own dead-letter queue" in found[0]["message"]
    assert found[1]["message"] == "required field is missing"
    assert "must be >= 1, got 0" in found[2]["message"]


# --------------------------------------------------------------------------- consumers


def test_consumer_defaults(tmp_path: Path) -> None:
    text = base_with(extra="- {name: w, kind: queue.consumer, queue: q, handler: 'pkg.mod:handle'}")
    spec = load(tmp_path, text).consumers["app:w"]
    assert spec == ConsumerSpec(
        id="app:w",
        queue="app:q",
        handler="pkg.mod:handle",
        base_dir=tmp_path.resolve(),
        origin=spec.origin,
    )
    assert (spec.concurrency, spec.prefetch, spec.auto_ack, spec.timeout, spec.security) == (
        1,
        10,
        False,
        None,
        None,
    )
    assert (spec.auto_start, spec.depends_on, spec.driver_options, spec.lua_source) == (True, (), {}, None)


def test_consumer_all_fields(tmp_path: Path) -> None:
    text = base_with(
        extra="""
        - name: readers
          kind: security.policy
          policy: {actions: "queue.*"}
          groups: [ops]
        - name: first
          kind: queue.consumer
          queue: q
          handler: pkg.mod:first
        - name: w
          kind: queue.consumer
          queue: app:q
          handler: pkg.mod:Worker.handle
          concurrency: 8
          prefetch: 16
          auto_ack: true
          timeout: 30s
          security:
            actor: {id: svc-worker, meta: {role: worker, level: 3}}
            policies: [readers, app:readers]
            groups: [ops]
          driver_options: {amqp: {consumer_tag: w1, exclusive: true, no_local: false, no_wait: true}}
          lifecycle: {auto_start: false, depends_on: [first]}
        """
    )
    spec = load(tmp_path, text).consumers["app:w"]
    assert (spec.handler, spec.concurrency, spec.prefetch, spec.auto_ack, spec.timeout) == (
        "pkg.mod:Worker.handle",
        8,
        16,
        True,
        30.0,
    )
    assert spec.security == SecurityBlock(
        actor="svc-worker",
        actor_meta={"role": "worker", "level": 3},
        policies=("app:readers", "app:readers"),
        groups=("ops",),
    )
    assert spec.driver_options == {
        "amqp": AmqpConsumerOptions(consumer_tag="w1", exclusive=True, no_local=False, no_wait=True)
    }
    assert (spec.auto_start, spec.depends_on) == (False, ("app:first",))


def test_consumer_actor_as_a_plain_string(tmp_path: Path) -> None:
    text = base_with(
        extra="- {name: w, kind: queue.consumer, queue: q, handler: 'a:b', security: {actor: bot}}"
    )
    assert load(tmp_path, text).consumers["app:w"].security == SecurityBlock(actor="bot")


def test_consumer_needs_exactly_one_handler_form(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        base_with(
            extra="""
        - {name: none, kind: queue.consumer, queue: q}
        - {name: two, kind: queue.consumer, queue: q, handler: 'a:b', method: m}
        """
        ),
    )
    assert [(p["entry"], p["field"]) for p in found] == [("app:none", "func"), ("app:two", "handler")]
    assert "one of func, method or handler is required" in found[0]["message"]
    assert "mutually exclusive" in found[1]["message"]


@pytest.mark.parametrize("handler", ["pkg.mod", "pkg.mod:", ":f", "pkg..mod:f", "pkg.mod:f-g", "1pkg:f"])
def test_handler_must_be_an_import_path(tmp_path: Path, handler: str) -> None:
    text = base_with(extra=f"- {{name: w, kind: queue.consumer, queue: q, handler: '{handler}'}}")
    assert "package.module:callable" in at(problems(tmp_path, text), "handler")["message"]


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("concurrency", 0, "between 1 and 1000, got 0"),
        ("concurrency", 1001, "between 1 and 1000, got 1001"),
        ("prefetch", 0, "between 1 and 10000, got 0"),
        ("prefetch", 10001, "between 1 and 10000, got 10001"),
        ("concurrency", "four", "expected an integer, got string 'four'"),
        ("concurrency", "'4'", "expected an integer, got string '4'"),
        ("concurrency", "true", "expected an integer, got boolean true"),
        ("auto_ack", "'yes'", "expected true or false"),
        ("timeout", 0, "greater than 0"),
    ],
)
def test_consumer_out_of_range_and_wrong_type(
    tmp_path: Path, field: str, value: object, fragment: str
) -> None:
    text = base_with(extra=f"- {{name: w, kind: queue.consumer, queue: q, handler: 'a:b', {field}: {value}}}")
    problem = at(problems(tmp_path, text), field)
    assert problem["entry"] == "app:w"
    assert problem["file"] == str(tmp_path / "app.yaml")
    assert fragment in problem["message"]


@pytest.mark.parametrize(("concurrency", "prefetch"), [(1, 1), (1000, 10000)])
def test_consumer_range_boundaries_are_accepted(tmp_path: Path, concurrency: int, prefetch: int) -> None:
    line = (
        "- {name: w, kind: queue.consumer, queue: q, handler: 'a:b', "
        f"concurrency: {concurrency}, prefetch: {prefetch}}}"
    )
    spec = load(tmp_path, base_with(extra=line)).consumers["app:w"]
    assert (spec.concurrency, spec.prefetch) == (concurrency, prefetch)


def test_method_resolves_to_a_function_entry_of_the_namespace(tmp_path: Path) -> None:
    (tmp_path / "handlers.lua").write_text("function handle_lua(p) end\n")
    text = base_with(
        extra="""
        - {name: handle_email, kind: function.python, source: 'myapp.handlers:handle_email'}
        - {name: handle_lua, kind: function.lua, source: 'file://handlers.lua', method: handle_lua}
        - {name: w1, kind: queue.consumer, queue: q, method: handle_email}
        - {name: w2, kind: queue.consumer, queue: q, method: handle_lua}
        """
    )
    registry = load(tmp_path, text)
    assert (registry.consumers["app:w1"].func, registry.consumers["app:w1"].method) == (
        "app:handle_email",
        "handle_email",
    )
    assert registry.consumers["app:w2"].func == "app:handle_lua"


def test_method_falls_back_to_a_lua_function_in_source(tmp_path: Path) -> None:
    write(tmp_path, "lua/worker.lua", "function handle_email(payload) end\n")
    text = base_with(
        extra="- {name: w, kind: queue.consumer, queue: q, method: handle_email, source: 'file://lua/worker.lua'}"
    )
    spec = load(tmp_path, text).consumers["app:w"]
    assert (spec.func, spec.method, spec.lua_source) == (
        None,
        "handle_email",
        (tmp_path / "lua" / "worker.lua").resolve(),
    )
    assert spec.lua_source is not None and spec.lua_source.is_absolute()


def test_method_without_function_entry_or_source_is_a_problem(tmp_path: Path) -> None:
    text = base_with(extra="- {name: w, kind: queue.consumer, queue: q, method: handle_email}")
    problem = at(problems(tmp_path, text), "method")
    assert problem["message"] == "method handle_email: no function entry app:handle_email and no source: file"


def test_consumer_source_problems(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        base_with(
            extra="""
        - {name: a, kind: queue.consumer, queue: q, handler: 'x:y', source: 'file://a.lua'}
        - {name: b, kind: queue.consumer, queue: q, method: m, source: 'b.lua'}
        """
        ),
    )
    assert [(p["entry"], p["field"]) for p in found] == [
        ("app:a", "source"),
        ("app:a", "source"),
        ("app:b", "source"),
    ]
    assert "only used with method" in found[0]["message"]
    assert "does not exist" in found[1]["message"]
    assert "expected file://path.lua" in found[2]["message"]


def test_depends_on_cycle_is_a_problem(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        base_with(
            extra="""
        - {name: a, kind: queue.consumer, queue: q, handler: 'x:y', lifecycle: {depends_on: [b]}}
        - {name: b, kind: queue.consumer, queue: q, handler: 'x:y', lifecycle: {depends_on: [c]}}
        - {name: c, kind: queue.consumer, queue: q, handler: 'x:y', lifecycle: {depends_on: [app:a]}}
        """
        ),
    )
    problem = only([p for p in found if "cycle" in p["message"]])
    assert problem["field"] == "lifecycle.depends_on"
    assert "app:a -> app:b -> app:c -> app:a" in problem["message"]


def test_self_dependency_is_a_cycle(tmp_path: Path) -> None:
    text = base_with(
        extra="- {name: a, kind: queue.consumer, queue: q, handler: 'x:y', lifecycle: {depends_on: [a]}}"
    )
    assert "app:a -> app:a" in at(problems(tmp_path, text), "lifecycle.depends_on")["message"]


# --------------------------------------------------------------------------- functions


def test_python_function_on_start(tmp_path: Path) -> None:
    text = item(
        "- {name: boot, kind: function.python, source: 'app.setup:boot', lifecycle: {on_start: true}}"
    )
    spec = load(tmp_path, text).functions["app:boot"]
    assert (spec.kind, spec.source, spec.on_start, spec.base_dir, spec.method) == (
        "function.python",
        "app.setup:boot",
        True,
        tmp_path.resolve(),
        None,
    )


def test_lua_function_source_is_resolved_and_must_exist(tmp_path: Path) -> None:
    write(tmp_path, "lua/h.lua", "return {main = function() end}\n")
    registry = load(
        tmp_path, item("- {name: h, kind: function.lua, source: 'file://lua/h.lua', method: main}")
    )
    spec = registry.functions["app:h"]
    assert (spec.source, spec.method, spec.base_dir) == (
        str((tmp_path / "lua" / "h.lua").resolve()),
        "main",
        tmp_path.resolve(),
    )
    found = problems(
        tmp_path,
        item("""
        - {name: gone, kind: function.lua, source: 'file://missing.lua'}
        - {name: bare, kind: function.lua, source: 'lua/h.lua'}
        - {name: none, kind: function.lua}
        - {name: py, kind: function.python, source: 'not a path'}
        """),
    )
    assert [(p["entry"], p["field"]) for p in found] == [
        ("app:gone", "source"),
        ("app:bare", "source"),
        ("app:none", "source"),
        ("app:py", "source"),
    ]
    assert "does not exist" in found[0]["message"]
    assert found[2]["message"] == "required field is missing"


# --------------------------------------------------------------------------- policies


def test_policy_fields_and_defaults(tmp_path: Path) -> None:
    registry = load(
        tmp_path,
        item("""
        - name: minimal
          kind: security.policy
          policy: {actions: queue.publish}
        - name: full
          kind: security.policy
          groups: [writers, ops]
          policy:
            actions: [queue.publish, queue.publish.queue]
            resources: "app:*"
            effect: deny
            conditions:
              - {field: actor.meta.role, operator: eq, value: admin}
              - {field: meta.tenant, operator: eq, value_from: actor.meta.tenant}
              - {field: actor.id, operator: in, value: [a, b]}
              - {field: resource, operator: matches, value: "^app:"}
              - {field: action, operator: exists}
              - {field: meta.x, operator: exists, value: false}
              - {field: meta.y, operator: eq, value: null}
        """),
    )
    assert registry.policies["app:minimal"] == PolicySpec(
        id="app:minimal",
        actions=("queue.publish",),
        resources=("*",),
        effect="allow",
        origin=registry.policies["app:minimal"].origin,
    )
    full = registry.policies["app:full"]
    assert (full.actions, full.resources, full.effect, full.groups) == (
        ("queue.publish", "queue.publish.queue"),
        ("app:*",),
        "deny",
        ("writers", "ops"),
    )
    assert full.conditions == (
        Condition("actor.meta.role", "eq", "admin"),
        Condition("meta.tenant", "eq", value_from="actor.meta.tenant"),
        Condition("actor.id", "in", ["a", "b"]),
        Condition("resource", "matches", "^app:"),
        Condition("action", "exists", NO_VALUE),
        Condition("meta.x", "exists", False),
        Condition("meta.y", "eq", None),  # `value: null` is a value: compare with null
    )
    # exists without a value: the field must exist; with false: it must not.
    assert (full.conditions[4].must_exist, full.conditions[5].must_exist) == (True, False)


def test_policy_problems(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        item("""
        - name: p
          kind: security.policy
          policy:
            actions: []
            effect: permit
            conditions:
              - {field: user.id, operator: eq, value: x}
              - {field: actor.id, operator: like, value: x}
              - {field: actor.id, operator: eq, value: x, value_from: actor.meta.y}
              - {field: actor.id, operator: eq}
              - {field: actor.id, operator: matches, value: "("}
              - {field: actor.id, operator: in, value: x}
              - {field: actor.id, operator: eq, value_from: nowhere}
              - {field: actor.id, operator: exists, value: maybe}
              - not-a-mapping
              - {field: meta.n, operator: lt, value: [1]}
        - name: empty
          kind: security.policy
        """),
    )
    assert [(p["entry"], p["field"]) for p in found] == [
        ("app:p", "policy.actions"),
        ("app:p", "policy.effect"),
        ("app:p", "policy.conditions[0].field"),
        ("app:p", "policy.conditions[1].operator"),
        ("app:p", "policy.conditions[2].value"),
        ("app:p", "policy.conditions[3].value"),
        ("app:p", "policy.conditions[4].value"),
        ("app:p", "policy.conditions[5].value"),
        ("app:p", "policy.conditions[6].value_from"),
        ("app:p", "policy.conditions[7].value"),
        ("app:p", "policy.conditions[8]"),
        ("app:p", "policy.conditions[9].value"),
        ("app:empty", "policy"),
    ]
    assert "regular expression" in found[6]["message"]
    assert "needs a list" in found[7]["message"]
    assert [p["message"] for p in found[2:6]] == [
        "unknown condition field 'user.id': expected "
        "actor.id, actor.meta.<key>, meta.<key>, action or resource",
        "must be one of eq, ne, lt, gt, in, exists, contains, matches; got 'like'",
        "give exactly one of value and value_from",
        "give exactly one of value and value_from",
    ]
    assert found[7]["message"] == "operator 'in' needs a list value, got string 'x'"
    assert found[8]["message"].startswith("value_from 'nowhere' is not a field")
    assert found[9]["message"] == "exists takes true, false or no value, got string 'maybe'"
    assert found[10]["message"] == "expected a mapping, got string 'not-a-mapping'"
    assert found[11]["message"] == "operator 'lt' needs a number or string value, got a list"


# --------------------------------------------------------------------------- IDs and references


def test_id_is_a_synonym_of_name(tmp_path: Path) -> None:
    registry = load(
        tmp_path,
        item("""
        - {id: mem, kind: queue.driver.memory}
        - {name: q, id: q, kind: queue.queue, driver: mem}
        """),
    )
    assert set(registry.drivers) == {"app:mem"} and set(registry.queues) == {"app:q"}


def test_entry_identity_problems(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        item("""
        - {name: a, id: b, kind: queue.driver.memory}
        - {kind: queue.driver.memory}
        - {name: 'other:c', kind: queue.driver.memory}
        - {name: 'bad name', kind: queue.driver.memory}
        - {name: d}
        - {name: e, kind: queue.drivr.memory}
        - just a string
        """),
    )
    assert [(p["entry"], p["field"]) for p in found] == [
        ("entries[0]", "id"),
        ("entries[1]", "name"),
        ("entries[2]", "name"),
        ("entries[3]", "name"),
        ("app:d", "kind"),
        ("app:e", "kind"),
        ("entries[6]", ""),
    ]
    assert "must not contain ':'" in found[2]["message"]
    assert "did you mean 'queue.driver.memory'" in found[5]["message"]
    assert "must be a mapping" in found[6]["message"]


def test_short_and_full_references_across_namespaces(tmp_path: Path) -> None:
    write(
        tmp_path,
        "shared.yaml",
        """
        namespace: infra.queues
        entries:
          - {name: mem, kind: queue.driver.memory}
        """,
    )
    write(
        tmp_path,
        "app.yaml",
        """
        namespace: app
        entries:
          - {name: q, kind: queue.queue, driver: 'infra.queues:mem', dead_letter: {queue: dlq}}
          - {name: dlq, kind: queue.queue, driver: 'infra.queues:mem'}
        """,
    )
    registry = load_registry(tmp_path)
    assert registry.queues["app:q"].driver == "infra.queues:mem"
    assert registry.queues["app:q"].dead_letter == DeadLetterSpec(queue="app:dlq")


def test_dangling_references(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        item("""
        - {name: mem, kind: queue.driver.memory}
        - {name: q, kind: queue.queue, driver: nodriver, dead_letter: {queue: other:nodlq}}
        - name: w
          kind: queue.consumer
          queue: noqueue
          func: nofunc
          security: {policies: [nopolicy]}
          lifecycle: {depends_on: [noconsumer]}
        """),
    )
    assert [(p["entry"], p["field"]) for p in found] == [
        ("app:q", "driver"),
        ("app:q", "dead_letter.queue"),
        ("app:w", "queue"),
        ("app:w", "func"),
        ("app:w", "security.policies[0]"),
        ("app:w", "lifecycle.depends_on[0]"),
    ]
    assert (
        found[0]["message"]
        == "dangling reference app:nodriver: no entry has this ID (expected a queue.driver.* entry)"
    )
    assert "other:nodlq" in found[1]["message"]


def test_references_to_the_wrong_kind(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        item("""
        - {name: mem, kind: queue.driver.memory}
        - {name: q, kind: queue.queue, driver: mem, dead_letter: {queue: mem}}
        - {name: r, kind: queue.queue, driver: q}
        - name: w
          kind: queue.consumer
          queue: mem
          func: q
          security: {policies: [q]}
          lifecycle: {depends_on: [q]}
        """),
    )
    assert [(p["entry"], p["field"]) for p in found] == [
        ("app:q", "dead_letter.queue"),
        ("app:r", "driver"),
        ("app:w", "queue"),
        ("app:w", "func"),
        ("app:w", "security.policies[0]"),
        ("app:w", "lifecycle.depends_on[0]"),
    ]
    assert found[2]["message"] == "app:mem is a queue.driver.memory entry, expected a queue.queue entry"


def test_malformed_reference(tmp_path: Path) -> None:
    problem = at(problems(tmp_path, item("- {name: q, kind: queue.queue, driver: 'a:b:c'}")), "driver")
    assert "malformed" in problem["message"]


def test_duplicate_id_across_files_names_both_places(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", HEADER + item("- {name: mem, kind: queue.driver.memory}") + "\n")
    write(
        tmp_path,
        "b.yaml",
        HEADER
        + item("- {name: other, kind: queue.driver.memory}\n- {id: mem, kind: queue.driver.memory}")
        + "\n",
    )
    problem = only(problems_of(tmp_path))
    assert (problem["file"], problem["entry"], problem["line"]) == (str(tmp_path / "b.yaml"), "app:mem", 5)
    assert problem["message"] == f"duplicate ID app:mem: also declared at {tmp_path / 'a.yaml'} line 4"


# --------------------------------------------------------------------------- generic field problems


def test_missing_required_fields(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        item("""
        - {name: q, kind: queue.queue}
        - {name: w, kind: queue.consumer, handler: 'a:b'}
        - {name: f, kind: function.python}
        - {name: p, kind: security.policy, policy: {effect: allow}}
        """),
    )
    assert [(p["entry"], p["field"], p["message"]) for p in found] == [
        ("app:q", "driver", "required field is missing"),
        ("app:w", "queue", "required field is missing"),
        ("app:f", "source", "required field is missing"),
        ("app:p", "policy.actions", "required field is missing"),
    ]


def test_unknown_fields_are_problems_with_suggestions(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        base_with(
            "retry: {dealy: 1s}\ndead_leter: {queue: q}",
            "- {name: w, kind: queue.consumer, queue: q, handler: 'a:b', "
            "concurency: 2, lifecycle: {autostart: false}}",
        ),
    )
    assert {(p["entry"], p["field"]): p["message"] for p in found} == {
        ("app:q", "dead_leter"): "unknown field (did you mean 'dead_letter'?)",
        ("app:q", "retry.dealy"): "unknown field (did you mean 'delay'?)",
        ("app:w", "concurency"): "unknown field (did you mean 'concurrency'?)",
        ("app:w", "lifecycle.autostart"): "unknown field (did you mean 'auto_start'?)",
    }


def test_wrong_types_of_nested_blocks(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        base_with("""
            retry: 5s
            driver_options: [amqp]
            queue_name: 42
        """),
    )
    assert {(p["field"], p["message"]) for p in found} == {
        ("retry", "expected a mapping, got string '5s'"),
        ("driver_options", "expected a mapping, got a list"),
        ("queue_name", "expected a string, got number 42"),
    }


def test_meta_is_accepted_on_every_entry_but_must_be_a_mapping(tmp_path: Path) -> None:
    text = base_with("meta: {owner: team-a, tags: [x]}")
    assert "app:q" in load(tmp_path, text).queues
    problem = only(problems(tmp_path, item("- {name: mem, kind: queue.driver.memory, meta: [x]}")))
    assert (problem["field"], problem["message"]) == ("meta", "expected a mapping, got a list")


# --------------------------------------------------------------------------- environment


def test_env_substitution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_URL", "amqp://u:p@rabbit:5672/")
    monkeypatch.setenv("EMPTY", "")
    monkeypatch.setenv("GROUP", "ops")
    monkeypatch.delenv("UNSET_T", raising=False)
    monkeypatch.delenv("UNSET_N", raising=False)
    registry = load(
        tmp_path,
        item("""
        - name: rabbit
          kind: queue.driver.amqp
          url: ${AMQP_URL}
          vhost: "${EMPTY:-/}"
          connection_name: "conveyor-${GROUP}-$${NOT_A_VAR}"
          heartbeat: ${UNSET_T:-5s}
        - {name: q, kind: queue.queue, driver: rabbit}
        - {name: ops_policy, kind: security.policy, policy: {actions: "*"}, groups: [ops]}
        - name: w
          kind: queue.consumer
          queue: q
          handler: 'a:b'
          concurrency: ${UNSET_N:-4}
          auto_ack: ${UNSET_N:-true}
          security: {actor: {id: bot, meta: {group: "${GROUP}"}}, groups: ["${GROUP}"]}
        """),
    )
    options = registry.drivers["app:rabbit"].options
    assert isinstance(options, AmqpOptions)
    assert options.url == "amqp://u:p@rabbit:5672/"
    assert options.vhost == "/"  # like the shell, the default also covers an empty value
    assert options.connection_name == "conveyor-ops-${NOT_A_VAR}"
    assert options.heartbeat == 5.0
    consumer = registry.consumers["app:w"]
    assert (consumer.concurrency, consumer.auto_ack) == (4, True)
    assert consumer.security == SecurityBlock(actor="bot", actor_meta={"group": "ops"}, groups=("ops",))
    assert type(consumer.security.actor_meta["group"]) is str
    assert type(options.url) is str


def test_missing_env_variable_is_one_problem_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NO_SUCH_URL", raising=False)
    found = problems(
        tmp_path, item("- {name: r, kind: queue.driver.amqp, url: '${NO_SUCH_URL}', heartbeat: '${'}")
    )
    assert [(p["entry"], p["field"]) for p in found] == [("app:r", "url"), ("app:r", "heartbeat")]
    assert "environment variable NO_SUCH_URL is not set" in found[0]["message"]
    assert "malformed variable reference" in found[1]["message"]


def test_env_in_namespace_and_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NS", "tenant1")
    path = write(
        tmp_path,
        "app.yaml",
        "namespace: ${NS}\nentries:\n  - {name: '${NS}_mem', kind: queue.driver.memory}\n",
    )
    assert set(load_registry(path).drivers) == {"tenant1:tenant1_mem"}


# --------------------------------------------------------------------------- files and directories


def test_directory_loading_is_recursive_and_sorted(tmp_path: Path) -> None:
    write(tmp_path, "b.yaml", "namespace: b\nentries:\n  - {name: mem, kind: queue.driver.memory}\n")
    write(tmp_path, "a/z.yaml", "namespace: a\nentries:\n  - {name: mem, kind: queue.driver.memory}\n")
    write(tmp_path, "a/deeper/c.yaml", "namespace: c\nentries:\n  - {name: mem, kind: queue.driver.memory}\n")
    write(tmp_path, "notes.txt", "not: [yaml")
    registry = load_registry(tmp_path)
    assert registry.files == (
        tmp_path / "a" / "deeper" / "c.yaml",
        tmp_path / "a" / "z.yaml",
        tmp_path / "b.yaml",
    )
    assert list(registry.drivers) == ["c:mem", "a:mem", "b:mem"]


def test_missing_path_and_empty_directory_are_invalid(tmp_path: Path) -> None:
    missing = only(problems_of(tmp_path / "nope.yaml"))
    assert (missing["file"], missing["message"]) == (str(tmp_path / "nope.yaml"), "no such file")
    (tmp_path / "empty").mkdir()
    assert "no *.yaml" in only(problems_of(tmp_path / "empty"))["message"]


def test_top_level_problems(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "version: '2.0'\nnamespace: app\nentris: []\nsecurity: {strict: 1, mode: x}\n")
    write(tmp_path, "b.yaml", "entries: []\n")
    write(tmp_path, "c.yaml", "namespace: 'bad ns'\n")
    write(tmp_path, "d.yaml", "")
    write(tmp_path, "e.yaml", "- just\n- a list\n")
    write(tmp_path, "f.yaml", "namespace: f\nentries: {name: x}\n")
    found = problems_of(tmp_path)
    assert [(Path(p["file"]).name, p["entry"], p["field"]) for p in found] == [
        ("a.yaml", "", "version"),
        ("a.yaml", "", "security.strict"),
        ("a.yaml", "", "entris"),
        ("a.yaml", "", "security.mode"),
        ("b.yaml", "", "namespace"),
        ("c.yaml", "", "namespace"),
        ("d.yaml", "", ""),
        ("e.yaml", "", ""),
        ("f.yaml", "", "entries"),
    ]
    assert "did you mean 'entries'" in found[2]["message"]


def test_version_spellings(tmp_path: Path) -> None:
    for version in ('"1.0"', "1.0"):
        path = write(tmp_path, "app.yaml", f"version: {version}\nnamespace: app\nentries: []\n")
        assert load_registry(path).drivers == {}


def test_strict_security_from_any_file(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "namespace: a\nentries: []\n")
    write(tmp_path, "b.yaml", "namespace: b\nsecurity: {strict: true}\n")
    assert load_registry(tmp_path).strict_security is True
    assert load_registry(tmp_path / "a.yaml").strict_security is False


def test_yaml_syntax_error_reports_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "app.yaml", "namespace: app\nentries:\n  - name: q\n    kind: [unclosed\n")
    write(tmp_path, "ok.yaml", "namespace: ok\nentries:\n  - {name: q, kind: queue.queue, driver: nowhere}\n")
    found = problems_of(tmp_path)
    syntax = found[0]
    assert (syntax["file"], syntax["entry"], syntax["field"]) == (str(path), "", "")
    assert syntax["message"].startswith("YAML syntax error: line ")
    assert isinstance(syntax["line"], int) and syntax["line"] >= 4
    # Other files are still checked: problems are collected, not stopped at.
    assert found[1]["entry"] == "ok:q" and found[1]["field"] == "driver"


def test_duplicate_yaml_keys_are_problems_with_lines(tmp_path: Path) -> None:
    text = base_with(
        extra="- name: w\n  kind: queue.consumer\n  queue: q\n  handler: 'a:b'\n  handler: 'c:d'"
    )
    problem = only(problems(tmp_path, text))
    assert (problem["entry"], problem["field"], problem["line"]) == ("app:w", "handler", 13)
    assert "duplicate key 'handler' (first at line 12" in problem["message"]


def test_problems_carry_lines_and_the_message_lists_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOPE", raising=False)
    path = entries(
        tmp_path,
        item("""
        - name: mem
          kind: queue.driver.memory
        - name: emails
          kind: queue.queue
          driver: mem
          retry:
            delay: forever
        - name: w
          kind: queue.consumer
          queue: emails
          handler: 'a:b'
          concurrency: 0
          timeout: ${NOPE}
        """),
    )
    with pytest.raises(errors.Error) as info:
        load_registry(path)
    found = info.value.details["problems"]
    assert [(p["entry"], p["field"], p["line"]) for p in found] == [
        ("app:emails", "retry.delay", 10),
        ("app:w", "timeout", 16),
        ("app:w", "concurrency", 15),
    ]
    assert set(found[0]) == {"file", "entry", "field", "message", "line"}
    lines = str(info.value.message).splitlines()
    assert lines[0] == "3 problems in configuration:"
    assert lines[1].startswith(f"  {path}: entry app:emails: field retry.delay: invalid duration 'forever'")
    assert lines[1].endswith("(line 10)")
    assert (
        lines[3] == f"  {path}: entry app:w: field concurrency: must be between 1 and 1000, got 0 (line 15)"
    )


def test_problems_from_several_files_are_reported_together(tmp_path: Path) -> None:
    write(tmp_path, "one.yaml", HEADER + item("- {name: q1, kind: queue.queue}") + "\n")
    write(
        tmp_path,
        "two/two.yaml",
        HEADER + item("- {name: q2, kind: queue.queue, driver: q1, codec: xml}") + "\n",
    )
    found = problems_of(tmp_path)
    assert [(Path(p["file"]).name, p["entry"], p["field"]) for p in found] == [
        ("one.yaml", "app:q1", "driver"),
        ("two.yaml", "app:q2", "codec"),
        ("two.yaml", "app:q2", "driver"),
    ]


# --------------------------------------------------------------------------- warnings


def test_warnings(tmp_path: Path) -> None:
    registry = load(
        tmp_path,
        item("""
        - {name: mem, kind: queue.driver.memory}
        - {name: other, kind: queue.driver.memory}
        - {name: q, kind: queue.queue, driver: mem, dead_letter: {queue: dlq}}
        - {name: dlq, kind: queue.queue, driver: other, codec: raw}
        - {name: w, kind: queue.consumer, queue: q, handler: 'a:b', concurrency: 8, prefetch: 4}
        - {name: d, kind: queue.consumer, queue: dlq, handler: 'a:b'}
        """),
    )
    assert len(registry.warnings) == 4, registry.warnings
    text = "\n".join(registry.warnings)
    assert "entry app:w: prefetch 4 < concurrency 8: workers will idle" in text
    assert "entry app:d: queue app:dlq has no dead_letter: failing messages are retried forever" in text
    assert "entry app:q: dead-letter queue app:dlq uses codec raw, not json/plain" in text
    assert "entry app:q: dead-letter queue app:dlq is on driver app:other, not app:mem" in text
    assert "not atomic" in text


def test_consumer_security_group_must_exist(tmp_path: Path) -> None:
    text = base_with(
        extra="""
        - name: w
          kind: queue.consumer
          queue: q
          handler: pkg.mod:handle
          security: {actor: svc, groups: [publisher]}
        """
    )
    with pytest.raises(errors.Error) as info:
        load(tmp_path, text)
    problem = info.value.details["problems"][0]
    assert problem["field"] == "security.groups[0]"
    assert "unknown policy group 'publisher'" in problem["message"]


def test_condition_field_with_empty_segment_is_a_load_problem(tmp_path: Path) -> None:
    text = base_with(
        extra="""
        - name: p
          kind: security.policy
          policy:
            actions: "*"
            conditions: [{field: meta.a..b, operator: eq, value: 1}]
        """
    )
    with pytest.raises(errors.Error) as info:
        load(tmp_path, text)
    problems = info.value.details["problems"]
    assert len(problems) == 1 and problems[0]["field"].endswith("field")


def test_exists_with_value_from_is_reported_once(tmp_path: Path) -> None:
    text = base_with(
        extra="""
        - name: p
          kind: security.policy
          policy:
            actions: "*"
            conditions: [{field: meta.a, operator: exists, value_from: actor.id}]
        """
    )
    with pytest.raises(errors.Error) as info:
        load(tmp_path, text)
    assert [p["message"] for p in info.value.details["problems"]] == ["exists takes no value_from"]


def test_condition_type_problems_are_reported_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE", raising=False)
    text = base_with(
        extra="""
        - name: p
          kind: security.policy
          policy:
            actions: "*"
            conditions:
              - {field: 1, operator: eq, value: 1}
              - {operator: eq, value: 1}
              - {field: meta.a, value: 1}
              - {field: meta.a, operator: [eq], value: 1}
              - {field: meta.a, operator: eq, value_from: 5}
              - {field: meta.a, operator: in, value: "${NOPE}"}
              - {field: "", operator: eq, value: 1}
        """
    )
    found = problems(tmp_path, text)
    # ${VAR} problems come first: they are reported as soon as the entry is identified.
    assert [(p["field"], p["message"]) for p in found] == [
        (
            "policy.conditions[5].value",
            "environment variable NOPE is not set (write ${NOPE:-default} for a default)",
        ),
        ("policy.conditions[0].field", "expected a string, got number 1"),
        ("policy.conditions[1].field", "required field is missing"),
        ("policy.conditions[2].operator", "required field is missing"),
        ("policy.conditions[3].operator", "expected a string, got a list"),
        ("policy.conditions[4].value_from", "expected a string, got number 5"),
        ("policy.conditions[6].field", "must not be empty"),
    ]
    assert [p["line"] for p in found] == [19, 14, 15, 16, 17, 18, 20]


def test_exists_value_null_means_no_value_and_env_may_spell_a_boolean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MUST", "false")
    monkeypatch.delenv("UNSET_FLAG", raising=False)
    text = base_with(
        extra="""
        - name: p
          kind: security.policy
          policy:
            actions: "*"
            conditions:
              - {field: meta.a, operator: exists, value: null}
              - {field: meta.a, operator: exists, value: "${MUST}"}
              - {field: meta.a, operator: exists, value: "${UNSET_FLAG:-true}"}
        """
    )
    assert load(tmp_path, text).policies["app:p"].conditions == (
        Condition("meta.a", "exists", NO_VALUE),
        Condition("meta.a", "exists", False),
        Condition("meta.a", "exists", True),
    )


def test_consumer_driver_options_only_for_drivers_with_consumer_options(tmp_path: Path) -> None:
    text = base_with(
        extra="""
        - name: w
          kind: queue.consumer
          queue: q
          handler: 'a:b'
          driver_options: {memory: {}, sqlite: {}, amqp: {consumer_tag: 3}}
        """
    )
    found = problems(tmp_path, text)
    assert [(p["field"], p["message"]) for p in found] == [
        ("driver_options.amqp.consumer_tag", "expected a string, got number 3"),
        ("driver_options.memory", "unknown field"),
        ("driver_options.sqlite", "unknown field"),
    ]
    spec = load(
        tmp_path,
        base_with(
            extra="- {name: w, kind: queue.consumer, queue: q, handler: 'a:b', driver_options: {amqp: {}}}"
        ),
    ).consumers["app:w"]
    assert spec.driver_options == {"amqp": AmqpConsumerOptions()}


@pytest.mark.parametrize("text", ["1s1s", "30m1h", "5ms1s"])
def test_duration_units_run_from_large_to_small_once(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_directory_loads_yaml_and_yml_and_skips_hidden_directories(tmp_path: Path) -> None:
    """Issue 10: a directory's *.yml files load like its *.yaml files (they used to be ignored)."""
    (tmp_path / "app.yaml").write_text("namespace: app\nentries:\n  - {name: m, kind: queue.driver.memory}\n")
    (tmp_path / "other.yml").write_text("namespace: ot\nentries:\n  - {name: n, kind: queue.driver.memory}\n")
    (tmp_path / "notes.txt").write_text("this: [is not conveyor\n")
    hidden = tmp_path / ".github"
    hidden.mkdir()
    (hidden / "ci.yaml").write_text("on: push\n")
    (hidden / "ci.yml").write_text("on: push\n")
    registry = load_registry(tmp_path)
    assert list(registry.drivers) == ["app:m", "ot:n"]
    assert [p.name for p in registry.files] == ["app.yaml", "other.yml"]


def test_small_max_delay_warns_and_a_declared_alias_does_not(tmp_path: Path) -> None:
    text = base_with(
        extra="""
        - name: alias
          kind: queue.queue
          driver: mem
          queue_name: q
          alias_of: q
          retry: {delay: 10s, max_delay: 1s}
        """
    )
    warnings = " ".join(load(tmp_path, text).warnings)
    assert "also used by" not in warnings  # shared on purpose (tests/test_hostile_input.py)
    assert "below retry.delay" in warnings
