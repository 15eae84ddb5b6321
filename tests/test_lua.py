"""Lua functions (function.lua entries, app.call): documented examples, conversion, sandbox, limits.

The queue module's documented code blocks live verbatim in ``tests/lua/seed/``; the
tests below wrap them (a function header, an observing line after them) but never
change them. Apps use the memory driver. Those examples name queues ``app:...``, so their apps use the
namespace ``app``; every other app gets a unique namespace from the harness.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from textwrap import dedent, indent
from typing import Any

import pytest

import conveyor
from conveyor import errors, queue
from conveyor.lua import LuaFunction, load_function
from conveyor.registry.model import FunctionSpec
from tests.support.handlers import install
from tests.support.harness import Harness
from tests.support.waiting import wait_until

SEED = Path(__file__).parent / "lua" / "seed"
EMAIL_MODULE = Path(__file__).parent / "lua" / "email.lua"


def seed(name: str) -> str:
    return (SEED / name).read_text(encoding="utf-8")


class Sink:
    """A Python handler recording what it receives (payload and headers), thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[Any] = []
        self.headers: list[dict[str, Any]] = []

    def __call__(self, payload: Any) -> None:
        headers = queue.message().headers
        with self.lock:
            self.items.append(payload)
            self.headers.append(headers)

    def __len__(self) -> int:
        with self.lock:
            return len(self.items)


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def lua_entry(h: Harness, name: str, source: str, method: str | None = None) -> str:
    """A ``function.lua`` entry whose file ``<name>.lua`` (next to the YAML) holds ``source``."""
    write(h.tmp_path, f"{name}.lua", dedent(source))
    entry: dict[str, Any] = {"name": name, "kind": "function.lua", "source": f"file://{name}.lua"}
    if method is not None:
        entry["method"] = method
    h.add(**entry)
    return h.qid(name)


def sink_consumer(h: Harness, queue_name: str) -> Sink:
    sink = Sink()
    h.consumer(f"{queue_name}_reader", queue_name, sink)
    return sink


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


@pytest.fixture
def seed_app(tmp_path: Path) -> Harness:
    """A harness in the namespace ``app`` with the queues the documented snippets publish to."""
    harness = Harness(tmp_path, namespace="app")
    for name in ("tasks", "notifications", "sent"):
        harness.queue(name)
    return harness


Start = Callable[[Harness], conveyor.App]


@pytest.fixture
def started() -> Iterator[Start]:
    """``started(h)`` loads and starts the app with consumers; it is stopped after the test."""
    apps: list[conveyor.App] = []

    def start(harness: Harness) -> conveyor.App:
        app = harness.load()
        app.start(consumers=True)
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop(5)


# ====================================================== the documented snippets (tests/lua/seed), unchanged


def test_seed_load_snippet_gives_the_queue_module_that_is_also_a_global(seed_app: Harness) -> None:
    fid = lua_entry(
        seed_app,
        "loader",
        "function main()\n"
        + seed("load.lua")
        + "    return queue == _G.queue and type(queue.publish)\nend\n",
    )
    with seed_app.load() as app:
        assert app.call(fid) == "function"


def test_seed_publish_snippet_runs_unchanged(seed_app: Harness, started: Start) -> None:
    tasks = sink_consumer(seed_app, "tasks")
    fid = lua_entry(seed_app, "publisher", "function main()\n" + seed("publish.lua") + "    return ok\nend\n")
    app = started(seed_app)
    assert app.call(fid) is True
    wait_until(lambda: len(tasks) == 1)
    assert tasks.items == [{"action": "send_email", "user_id": 456, "template": "welcome"}]
    assert type(tasks.items[0]["user_id"]) is int


def test_seed_publish_snippet_returns_nil_err_on_failure(seed_app: Harness) -> None:
    # The same snippet against an app without app:tasks: `if err then return nil, err end`.
    seed_app.entries = [e for e in seed_app.entries if e.get("name") != "tasks"]
    fid = lua_entry(seed_app, "publisher", "function main()\n" + seed("publish.lua") + "    return ok\nend\n")
    with seed_app.load() as app, pytest.raises(errors.Error) as info:
        app.call(fid)
    assert (info.value.kind, info.value.retryable) == (errors.NOT_FOUND, False)
    assert "app:tasks" in info.value.message


def test_seed_publish_with_headers_snippet_runs_unchanged(seed_app: Harness, started: Start) -> None:
    notifications = sink_consumer(seed_app, "notifications")
    fid = lua_entry(
        seed_app, "notify", "function main(order, request_id)\n" + seed("publish_headers.lua") + "end\n"
    )
    app = started(seed_app)
    assert app.call(fid, {"id": 7}, "req-1") is None
    wait_until(lambda: len(notifications) == 1)
    assert notifications.items == [{"type": "order_shipped", "order_id": 7}]
    assert notifications.headers[0] == {"priority": "high", "correlation_id": "req-1"}


DELIVERY_HANDLER = (
    "function handle(payload)\n"
    + seed("delivery_context.lua")
    + '    queue.publish("app:sent", {id = msg_id, priority = priority, headers = all_headers})\nend\n'
)


def test_seed_delivery_context_snippet_runs_unchanged_in_a_consumer(
    seed_app: Harness, started: Start
) -> None:
    seed_app.queue("inbox")
    sent = sink_consumer(seed_app, "sent")
    lua_entry(seed_app, "handle", DELIVERY_HANDLER, method="handle")
    seed_app.add(name="worker", kind="queue.consumer", queue="inbox", func="handle")
    started(seed_app)
    headers = {"priority": "high", "n": 3, "ratio": 0.5, "urgent": True, "zero": 0.0}
    queue.publish("app:inbox", {"x": 1}, headers)
    wait_until(lambda: len(sent) == 1)
    seen = sent.items[0]
    assert seen["priority"] == "high"
    assert isinstance(seen["id"], str) and seen["id"]
    assert seen["headers"] == headers
    assert [type(seen["headers"][k]) for k in headers] == [str, int, float, bool, float]


def test_seed_delivery_context_snippet_outside_a_delivery_returns_invalid(seed_app: Harness) -> None:
    fid = lua_entry(seed_app, "handle", DELIVERY_HANDLER, method="handle")
    with seed_app.load() as app, pytest.raises(errors.Error) as info:
        app.call(fid, {})
    assert (info.value.kind, info.value.retryable) == (errors.INVALID, False)
    assert "no delivery context" in info.value.message


def seed_consumer_app(tmp_path: Path, dead: Sink, sent: Sink) -> Path:
    """The documented consumer entry verbatim, plus what it needs: queues, the function entry."""
    write(tmp_path, "handlers.lua", 'local email = require("email")\n\n' + seed("handle_email.lua"))
    write(tmp_path, "email.lua", EMAIL_MODULE.read_text(encoding="utf-8"))
    rest = dedent(
        f"""\
        - {{name: mem, kind: queue.driver.memory}}
        - name: emails
          kind: queue.queue
          driver: mem
          retry: {{delay: 0}}
          dead_letter: {{queue: app:emails_dlq, max_attempts: 2}}
        - {{name: emails_dlq, kind: queue.queue, driver: mem}}
        - {{name: sent, kind: queue.queue, driver: mem}}
        - {{name: handle_email, kind: function.lua, source: "file://handlers.lua", method: handle_email}}
        - {{name: dlq_reader, kind: queue.consumer, queue: emails_dlq, handler: "{install(dead)}"}}
        - {{name: sent_reader, kind: queue.consumer, queue: sent, handler: "{install(sent)}"}}
        """
    )
    text = 'version: "1.0"\nnamespace: app\n' + seed("consumer.yaml") + indent(rest, "  ")
    return write(tmp_path, "app.yaml", text)


def test_seed_consumer_pattern_acks_and_dead_letters(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="conveyor.lua")
    dead, sent = Sink(), Sink()
    app = conveyor.load(seed_consumer_app(tmp_path, dead, sent))
    assert app.registry.consumers["app:email_worker"].func == "app:handle_email"
    with app:
        app.start_consumers()
        for to in ("ada@example.com", "nobody@bounce.example", "grace@example.com"):
            queue.publish("app:emails", {"to": to, "template": "welcome", "data": {"name": to[:3]}})
        assert app.wait_idle(timeout=10)
        stats = app.stats()["app:email_worker"]
    assert (stats["acked"], stats["failed"], stats["dead_lettered"]) == (2, 2, 1)
    assert sorted(item["to"] for item in sent.items) == ["ada@example.com", "grace@example.com"]
    assert all(item["data"] == {"name": item["to"][:3]} for item in sent.items)
    assert dead.items == [{"to": "nobody@bounce.example", "template": "welcome", "data": {"name": "nob"}}]
    assert dead.headers[0]["x_original_queue"] == "app:emails"
    reason = "UNAVAILABLE: 550 mailbox unavailable: nobody@bounce.example"
    assert (dead.headers[0]["x_dead_letter_reason"], dead.headers[0]["attempts"]) == (reason, 2)
    records = [r for r in caplog.records if r.name == "conveyor.lua.app:handle_email"]
    assert [r.getMessage() for r in records] == ["Processing"] * 4  # 2 good + 2 attempts of the bounce
    assert {vars(r)["to"] for r in records} == {
        "ada@example.com",
        "grace@example.com",
        "nobody@bounce.example",
    }
    assert all(isinstance(vars(r)["message_id"], str) and vars(r)["message_id"] for r in records)


# ===================================================================== the documented error table

ERROR_TABLE = """\
function main(q, forbidden, full)
    local results = {}
    local function record(name, value, err)
        results[name] = {value = value, kind = err:kind(), retryable = err:retryable(),
                         text = tostring(err), same = err:kind() == errors[err:kind()]}
    end
    record("empty_queue_id", queue.publish("", {x = 1}))
    record("empty_table", queue.publish(q, {}))
    record("empty_string", queue.publish(q, ""))
    record("nil_data", queue.publish(q, nil))
    record("no_delivery_context", queue.message())
    record("permission_denied", queue.publish(forbidden, {x = 1}))
    record("publish_failed", queue.publish(full, {x = 1}))
    return results
end
"""


def _policy(h: Harness, name: str, actions: str, resources: Any = "*") -> str:
    h.add(name=name, kind="security.policy", policy={"actions": actions, "resources": resources})
    return h.qid(name)


def test_seed_error_table(h: Harness) -> None:
    from conveyor import security

    h.top["security"] = {"strict": True}
    q = h.queue("tasks")
    forbidden = h.queue("forbidden")
    full = h.queue("full", driver_options={"memory": {"max_length": 1}})
    general = _policy(h, "general", "queue.publish")
    specific = _policy(h, "specific", "queue.publish.queue", [q, full])
    fid = lua_entry(h, "errs", ERROR_TABLE)
    with h.load() as app, security.context("svc", policies=[general, specific]):
        queue.publish(full, {"fill": 1})
        results = app.call(fid, q, forbidden, full)
    expected = {
        "empty_queue_id": (errors.INVALID, False),
        "empty_table": (errors.INVALID, False),
        "empty_string": (errors.INVALID, False),
        "nil_data": (errors.INVALID, False),
        "no_delivery_context": (errors.INVALID, False),
        "permission_denied": (errors.PERMISSION_DENIED, False),
        "publish_failed": (errors.INTERNAL, True),
    }
    assert {name: (r["kind"], r["retryable"]) for name, r in results.items()} == expected
    assert all("value" not in r and r["same"] is True for r in results.values())
    assert results["permission_denied"]["text"].startswith("PERMISSION_DENIED: ")
    assert "no delivery context" in results["no_delivery_context"]["text"]


def test_bad_arguments_return_nil_err_instead_of_raising(h: Harness) -> None:
    q = h.queue("q")
    fid = lua_entry(
        h,
        "bad",
        """\
        function main(q)
            local out = {}
            for name, call in pairs({
                id_number = function() return queue.publish(123, {x = 1}) end,
                headers_string = function() return queue.publish(q, {x = 1}, "priority=high") end,
                headers_list = function() return queue.publish(q, {x = 1}, {"a", "b"}) end,
                reserved_header = function() return queue.publish(q, {x = 1}, {attempts = 3}) end,
                data_function = function() return queue.publish(q, {f = print}) end,
                info_nil = function() return queue.info(nil) end,
            }) do
                local ok, value, err = pcall(call)
                out[name] = {ok = ok, value = value, kind = err and err:kind(), text = err and err:message()}
            end
            return out
        end
        """,
    )
    with h.load() as app:
        out = app.call(fid, q)
    assert {name: (r["ok"], r.get("value"), r["kind"]) for name, r in out.items()} == {
        name: (True, None, errors.INVALID) for name in out
    }
    assert len(out) == 6
    assert out["id_number"]["text"] == "queue ID must be a string"
    assert out["data_function"]["text"] == "data.f: a Lua function value cannot be converted"


def test_errors_global_holds_every_kind_and_builds_errors(h: Harness) -> None:
    fid = lua_entry(
        h,
        "kinds",
        """\
        function main()
            local kinds = {}
            for k, v in pairs(errors) do
                if type(v) == "string" then kinds[k] = v end
            end
            local a = errors.new("plain text")
            local b = errors.new(errors.CONFLICT, "taken", true)
            local c = errors.new({kind = errors.NOT_FOUND, message = "gone"})
            local bad_kind = pcall(errors.new, "NOPE", "x")
            return {kinds = kinds, a = tostring(a), a_kind = a:kind(),
                    b = {b:kind(), b:message(), b:retryable()},
                    c = tostring(c), c_retryable = c:retryable(), bad_kind = bad_kind,
                    is = {errors.is_error(b), errors.is_error("x"), errors.is_error({})},
                    read_only = pcall(function() b.kind = 1 end), meta = getmetatable(b)}
        end
        """,
    )
    with h.load() as app:
        out = app.call(fid)
    assert out["kinds"] == {kind: kind for kind in errors.KINDS}
    assert (out["a"], out["a_kind"]) == ("UNKNOWN: plain text", "UNKNOWN")
    assert out["b"] == ["CONFLICT", "taken", True]
    assert (out["c"], out["c_retryable"]) == ("NOT_FOUND: gone", False)
    assert (out["bad_kind"], out["is"], out["read_only"], out["meta"]) == (
        False,
        [True, False, False],
        False,
        "conveyor.error",
    )


# ===================================================================== app.call and errors


def test_app_call_converts_json_arguments_and_the_first_result(h: Harness) -> None:
    fid = lua_entry(
        h,
        "calc",
        """\
        local M = {}
        function M.main(a, b, opts)
            return {sum = a + b, types = {math.type(a), math.type(b)}, scale = opts.scale * 2,
                    tags = opts.tags, n_tags = #opts.tags}, "second value is dropped"
        end
        return M
        """,
    )
    with h.load() as app:
        out = app.call(fid, 2, 3.5, {"scale": 2, "tags": ["x", "y"]})
        assert asyncio.run(app.acall(fid, 1, 1, {"scale": 0.5, "tags": []})) == {
            "sum": 2,
            "types": ["integer", "integer"],
            "scale": 1.0,
            "tags": [],
            "n_tags": 0,
        }
    assert out == {"sum": 5.5, "types": ["integer", "float"], "scale": 4, "tags": ["x", "y"], "n_tags": 2}
    assert type(out["scale"]) is int


@pytest.mark.parametrize(
    ("body", "kind", "retryable", "message"),
    [
        ('return nil, errors.new(errors.NOT_FOUND, "no such user", true)', "NOT_FOUND", True, "no such user"),
        ('return nil, "just a string"', "UNKNOWN", False, "just a string"),
        ("return nil, 42", "UNKNOWN", False, "42"),
        ('error("exploded")', "INTERNAL", False, "fail.lua:2: exploded"),
        (
            'error(errors.new(errors.CONFLICT, "raised error object"))',
            "CONFLICT",
            False,
            "raised error object",
        ),
        ("local t = nil; return t.field", "INTERNAL", False, "fail.lua:2: attempt to index a nil value"),
        ("return function() end", "INVALID", False, "return value: a Lua function value cannot be converted"),
    ],
)
def test_failures_surface_as_errors_error(
    h: Harness, body: str, kind: str, retryable: bool, message: str
) -> None:
    fid = lua_entry(h, "fail", f"function main()\n    {body}\nend\n")
    with h.load() as app, pytest.raises(errors.Error) as info:
        app.call(fid)
    assert (info.value.kind, info.value.retryable) == (kind, retryable)
    assert info.value.message.startswith(message)


def test_raised_lua_error_carries_the_lua_traceback(h: Harness) -> None:
    fid = lua_entry(h, "deep", "local function inner() error('deep down') end\nfunction main() inner() end\n")
    with h.load() as app, pytest.raises(errors.Error) as info:
        app.call(fid)
    trace = info.value.details["lua_traceback"]
    assert "deep.lua:1: in" in trace and "deep.lua:2: in" in trace
    assert "conveyor:" not in trace  # the prelude's own frames are cut


def test_returning_nothing_or_false_is_not_an_error(h: Harness) -> None:
    fid = lua_entry(h, "ok", "function main(x) if x == 1 then return end return false, nil end\n")
    with h.load() as app:
        assert app.call(fid, 1) is None
        assert app.call(fid, 2) is False


def test_conveyor_call_runs_a_lua_function(tmp_path: Path) -> None:
    write(
        tmp_path,
        "math.lua",
        "function add(a, b) return {sum = a + b} end\nfunction bad() return nil, 'no' end\n",
    )
    write(
        tmp_path,
        "conveyor.yaml",
        dedent(
            """\
            version: "1.0"
            namespace: app
            entries:
              - {name: mem, kind: queue.driver.memory}
              - {name: add, kind: function.lua, source: "file://math.lua", method: add}
              - {name: bad, kind: function.lua, source: "file://math.lua", method: bad}
            """
        ),
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "conveyor", *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False)

    ok = cli("call", "app:add", "2", "40.5")
    assert (ok.returncode, json.loads(ok.stdout)) == (0, {"sum": 42.5}), ok.stderr
    failed = cli("call", "app:bad")
    assert failed.returncode == 1
    assert "UNKNOWN: no" in failed.stderr


def test_the_lua_example_runs_until_idle() -> None:
    example = Path(__file__).parent.parent / "examples" / "lua"
    command = [
        sys.executable,
        "-m",
        "conveyor",
        "run",
        str(example),
        "--until-idle",
        "--timeout",
        "20",
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    worker = summary["consumers"]["app:email_worker"]
    assert (worker["acked"], worker["dead_lettered"]) == (3, 1)
    assert summary["consumers"]["app:dead_letter_reader"]["acked"] == 1
    assert "gave up on an email" in done.stderr
    assert 'reason="UNAVAILABLE: 550 mailbox unavailable: bounce@invalid.example"' in done.stderr


# ===================================================================== loading and require


def test_entry_point_forms(h: Harness) -> None:
    returned_function = lua_entry(h, "f1", "return function(x) return 'returned ' .. x end\n")
    returned_main = lua_entry(h, "f2", "return {main = function(x) return 'main ' .. x end}\n")
    global_main = lua_entry(h, "f3", "function main(x) return 'global ' .. x end\n")
    field = lua_entry(
        h, "f4", "function go(x) return 'global go' end\nreturn {go = function(x) return 'field' end}\n", "go"
    )
    global_named = lua_entry(h, "f5", "function go(x) return 'global go ' .. x end\nreturn {}\n", "go")
    with h.load() as app:
        results = [
            app.call(f, "x") for f in (returned_function, returned_main, global_main, field, global_named)
        ]
    assert results == ["returned x", "main x", "global x", "field", "global go x"]


def test_consumer_method_with_a_lua_source_file(h: Harness, started: Start) -> None:
    q = h.queue("jobs")
    h.queue("done")
    done = sink_consumer(h, "done")
    write(
        h.tmp_path,
        "lua/worker.lua",
        f'function work(p) queue.publish("{h.qid("done")}", {{n = p.n + 1}}) end\n',
    )
    h.add(name="worker", kind="queue.consumer", queue="jobs", method="work", source="file://lua/worker.lua")
    started(h)
    queue.publish(q, {"n": 1})
    wait_until(lambda: len(done) == 1)
    assert done.items == [{"n": 2}]


@pytest.mark.parametrize(
    ("source", "method", "problem"),
    [
        ("function main( end", None, "syntax.lua:1:"),
        ("return 1", None, "no entry point"),
        ("function other() end", "missing", "no function 'missing'"),
        ("error('top level fails')", None, "running the file failed: syntax.lua:1: top level fails"),
        ("local x = require('nowhere')", None, "module 'nowhere' not found"),
    ],
)
def test_load_problems_are_invalid_before_anything_starts(
    h: Harness, source: str, method: str | None, problem: str
) -> None:
    h.queue("q")
    lua_entry(h, "syntax", source, method)
    h.add(name="worker", kind="queue.consumer", queue="q", func="syntax")
    app = h.load()
    with pytest.raises(errors.Error) as info:
        app.start(consumers=True)
    assert info.value.kind == errors.INVALID
    assert problem in info.value.message
    assert not app.running


def test_top_level_code_is_stopped_by_the_load_timeout(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    from conveyor.lua import state

    monkeypatch.setattr(state, "LOAD_TIMEOUT", 0.2)
    fid = lua_entry(h, "spin", "while true do end\n")
    app = h.load()
    with app, pytest.raises(errors.Error) as info:
        app.call(fid)
    assert info.value.kind == errors.INVALID
    assert "exceeded its deadline" in info.value.message


def test_require_finds_modules_next_to_the_yaml_file_only(h: Harness, tmp_path: Path) -> None:
    write(tmp_path, "helpers.lua", "local M = {loads = 0}\nM.loads = M.loads + 1\nreturn M\n")
    write(tmp_path, "lib/text.lua", "return {shout = function(s) return string.upper(s) .. '!' end}\n")
    write(tmp_path, "lib/init_pkg/init.lua", "return 'package init'\n")
    outside = write(tmp_path.parent / f"{tmp_path.name}-outside", "secret.lua", "return 'leaked'\n")
    (tmp_path / "escape.lua").symlink_to(outside)
    fid = lua_entry(
        h,
        "req",
        """\
        function main()
            local a, b = require("helpers"), require("helpers")
            local function fails(name)
                local ok, err = pcall(require, name)
                return not ok and type(err) == "string" and err or "loaded!"
            end
            return {same = a == b, loads = a.loads, shout = require("lib.text").shout("hi"),
                    pkg = require("lib.init_pkg"), queue = require("queue") == queue,
                    logger = require("logger") == logger, errors = require("errors") == errors,
                    escape = fails("escape"), parent = fails("../secret"), slash = fails("lib/text"),
                    os = fails("os"), io = fails("io"), debug = fails("debug")}
        end
        """,
    )
    with h.load() as app:
        out = app.call(fid)
    assert {k: out[k] for k in ("same", "loads", "shout", "pkg", "queue", "logger", "errors")} == {
        "same": True,
        "loads": 1,
        "shout": "HI!",
        "pkg": "package init",
        "queue": True,
        "logger": True,
        "errors": True,
    }
    assert "module 'escape' not found" in out["escape"]
    for name in ("parent", "slash"):
        assert "names are identifiers joined by dots" in out[name]
    for name in ("os", "io", "debug"):
        assert f"module '{name}' not found" in out[name]


# ===================================================================== conversion


def test_python_values_arrive_in_lua_with_their_types(h: Harness) -> None:
    fid = lua_entry(
        h,
        "types",
        """\
        function main(v)
            local out = {}
            for k, x in pairs(v) do
                out[k] = type(x) == "number" and math.type(x) or type(x)
            end
            out.len_bytes, out.len_chars = #v.unicode, utf8.len(v.unicode)
            out.list_n, out.empty_list_n = #v.list, #v.empty_list
            out.missing = v.none == nil
            return out
        end
        """,
    )
    value = {
        "int": 1,
        "float": 1.0,
        "big": 2**63 - 1,
        "true": True,
        "unicode": "héllo ✓",
        "list": [1, 2, 3],
        "empty_list": [],
        "map": {"a": 1},
        "none": None,
    }
    with h.load() as app:
        out = app.call(fid, value)
    assert out == {
        "int": "integer",
        "float": "float",
        "big": "integer",
        "true": "boolean",
        "unicode": "string",
        "list": "table",
        "empty_list": "table",
        "map": "table",
        "len_bytes": 10,
        "len_chars": 7,
        "list_n": 3,
        "empty_list_n": 0,
        "missing": True,
    }


def test_round_trip_keeps_json_data_as_it_was(h: Harness) -> None:
    fid = lua_entry(h, "echo", "function main(...) return ... end\n")
    samples: list[Any] = [
        {
            "a": 1,
            "b": 1.0,
            "c": -0.5,
            "d": True,
            "e": False,
            "f": "x",
            "g": [1, [2, [3, {}]]],
            "h": {"i": []},
        },
        [],
        {},
        ["mixed", 1, 2.5, False, {"k": "v"}],
        [1, None, 3],
        "ünïcødé ✓ 😀",
        2**63 - 1,
        -(2**63),
        1e300,
        0.1,
    ]
    with h.load() as app:
        for sample in samples:
            back = app.call(fid, sample)
            assert back == sample
            # ints stay ints and floats stay floats; Lua tables keep no key order
            assert json.dumps(back, sort_keys=True) == json.dumps(sample, sort_keys=True)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("{}", {}),
        ("{1, 2, 3}", [1, 2, 3]),
        ("{[1] = 'a', [3] = 'c'}", ["a", None, "c"]),
        ("{[100] = 'far'}", {"100": "far"}),
        ("{1, 2, x = 3}", {"1": 1, "2": 2, "x": 3}),
        ("{[0] = 'zero', [1] = 'one'}", {"0": "zero", "1": "one"}),
        ("{[-1] = 'neg'}", {"-1": "neg"}),
        (
            "{7 // 2, 7 / 2, 2^53, math.maxinteger, math.mininteger, 3.0}",
            [3, 3.5, 2.0**53, 2**63 - 1, -(2**63), 3.0],
        ),
        ("{a = {b = {c = {true, false}}}}", {"a": {"b": {"c": [True, False]}}}),
        (
            "errors.new(errors.TIMEOUT, 'slow', true)",
            {"kind": "TIMEOUT", "message": "slow", "retryable": True},
        ),
        ("'\\u{2713}'", "✓"),
        ("nil", None),
    ],
)
def test_lua_values_convert_to_python(h: Harness, expression: str, expected: Any) -> None:
    fid = lua_entry(h, "value", f"function main() return {expression} end\n")
    with h.load() as app:
        out = app.call(fid)
    assert out == expected
    assert json.dumps(out, sort_keys=True) == json.dumps(expected, sort_keys=True)


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ("{f = print}", "return value.f: a Lua function value cannot be converted"),
        (
            "{co = coroutine.create(function() end)}",
            "return value.co: a Lua thread value cannot be converted",
        ),
        ("{s = '\\255'}", "return value.s: string is not valid UTF-8"),
        ("{0/0}", "return value[1]: nan is not a finite number"),
        ("{list = {1, math.huge}}", "return value.list[2]: inf is not a finite number"),
        ("{[1.5] = 'x'}", "table keys must be strings or integers, not a float"),
        ("{[true] = 'x'}", "table keys must be strings or integers, not a boolean"),
        ("{[1] = 'a', ['1'] = 'b'}", "collide"),
        ("(function() local t = {} t.self = t return t end)()", "nested deeper than 200 levels"),
    ],
)
def test_unconvertible_lua_values_are_invalid(h: Harness, expression: str, problem: str) -> None:
    fid = lua_entry(h, "value", f"function main() return {expression} end\n")
    with h.load() as app, pytest.raises(errors.Error) as info:
        app.call(fid)
    assert info.value.kind == errors.INVALID
    assert problem in info.value.message


@pytest.mark.parametrize(
    ("argument", "problem"),
    [
        (2**63, "argument 1: integer 9223372036854775808 does not fit"),
        ({"a": [1, {2: "x"}]}, "argument 1.a[2]: map keys must be strings"),
        ({"s": {1, 2}}, "argument 1.s: a Python set has no Lua form"),
    ],
)
def test_python_values_without_a_lua_form_are_invalid(h: Harness, argument: Any, problem: str) -> None:
    fid = lua_entry(h, "echo", "function main(x) return x end\n")
    with h.load() as app, pytest.raises(errors.Error) as info:
        app.call(fid, argument)
    assert info.value.kind == errors.INVALID
    assert problem in info.value.message


def test_header_values_keep_their_types_from_lua_to_python(h: Harness, started: Start) -> None:
    q = h.queue("typed")
    sink = sink_consumer(h, "typed")
    fid = lua_entry(
        h,
        "pub",
        f"""\
        function main()
            local headers = {{s = "text", i = 42, f = 4.0, b = false, priority = 9}}
            return queue.publish("{q}", {{ok = true}}, headers)
        end
        """,
    )
    app = started(h)
    assert app.call(fid) is True
    wait_until(lambda: len(sink) == 1)
    headers = sink.headers[0]
    assert headers == {"s": "text", "i": 42, "f": 4.0, "b": False, "priority": 9}
    assert {k: type(v) for k, v in headers.items()} == {
        "s": str,
        "i": int,
        "f": float,
        "b": bool,
        "priority": int,
    }


def test_info_returns_a_table(h: Harness) -> None:
    q = h.queue("counted")
    fid = lua_entry(
        h,
        "inf",
        "function main(q)\n local n = queue.info(q).message_count\n return {n, math.type(n)}\nend\n",
    )
    missing = lua_entry(
        h,
        "inf2",
        "function main() local i, err = queue.info('nope:nothing') return {i == nil, err:kind()} end\n",
    )
    with h.load() as app:
        queue.publish(q, "one")
        queue.publish(q, "two")
        assert app.call(fid, q) == [2, "integer"]
        assert app.call(missing) == [True, "NOT_FOUND"]


# ===================================================================== handlers and messages


def test_handler_outcomes_ack_or_nack(h: Harness, started: Start) -> None:
    q = h.queue("outcomes", dead_letter={"queue": "outcomes_dlq", "max_attempts": 1})
    h.queue("outcomes_dlq")
    dead = sink_consumer(h, "outcomes_dlq")
    lua_entry(
        h,
        "outcome",
        """\
        local results = {
            none = function() end,
            ["true"] = function() return true end,
            ["false"] = function() return false end,
            data = function() return {done = 1} end,
            nil_err = function() return nil, "refused" end,
            nil_error_object = function() return nil, errors.new(errors.CONFLICT, "busy") end,
            raise = function() error("broken") end,
            unconvertible = function() return print end,
            message = function() return queue.message() end,
        }
        function main(p) return results[p.mode]() end
        """,
    )
    h.add(name="worker", kind="queue.consumer", queue="outcomes", func="outcome")
    app = started(h)
    modes = [
        "none",
        "true",
        "false",
        "data",
        "nil_err",
        "nil_error_object",
        "raise",
        "unconvertible",
        "message",
    ]
    for mode in modes:
        queue.publish(q, {"mode": mode})
    wait_until(lambda: len(dead) == 5)
    assert app.wait_idle(timeout=10)
    stats = app.stats()[h.qid("worker")]
    assert (stats["acked"], stats["dead_lettered"]) == (4, 5)
    reasons = {
        item["mode"]: head["x_dead_letter_reason"]
        for item, head in zip(dead.items, dead.headers, strict=True)
    }
    assert reasons["nil_err"] == "UNKNOWN: refused"
    assert reasons["nil_error_object"] == "CONFLICT: busy"
    assert reasons["raise"] == "INTERNAL: outcome.lua:8: broken"
    assert reasons["unconvertible"] == "INVALID: return value: a Lua function value cannot be converted"
    assert reasons["message"].startswith("INVALID: return value: a Message cannot be converted")


def test_a_lua_error_that_says_not_retryable_is_dead_lettered_at_once(h: Harness, started: Start) -> None:
    """Only an error object that says retryable=false skips the remaining attempts; plain
    errors and errors that say nothing keep being retried (up to max_attempts)."""
    q = h.queue("hints", dead_letter={"queue": "hints_dlq", "max_attempts": 3})
    h.queue("hints_dlq")
    dead = sink_consumer(h, "hints_dlq")
    lua_entry(
        h,
        "hinted",
        """\
        local results = {
            says_no = function() return nil, errors.new(errors.INVALID, "bad address", false) end,
            says_nothing = function() return nil, errors.new(errors.INVALID, "bad address") end,
            raises = function() error("broken") end,
        }
        function main(p) return results[p.mode]() end
        """,
    )
    h.add(name="worker", kind="queue.consumer", queue="hints", func="hinted")
    app = started(h)
    for mode in ("says_no", "says_nothing", "raises"):
        queue.publish(q, {"mode": mode})
    wait_until(lambda: len(dead) == 3)
    assert app.wait_idle(timeout=10)
    attempts = {item["mode"]: head["attempts"] for item, head in zip(dead.items, dead.headers, strict=True)}
    assert attempts == {"says_no": 1, "says_nothing": 3, "raises": 3}


def test_message_methods_follow_the_settlement_rules(h: Harness, started: Start) -> None:
    q = h.queue("msgs")
    h.queue("report")
    report = sink_consumer(h, "report")
    lua_entry(
        h,
        "methods",
        f"""\
        local kept
        local function kinds(value, err) return {{value = value, kind = err and err:kind()}} end
        function main(p)
            local msg = queue.message()
            local r = {{mode = p.mode, id = msg:id(), attempts = msg:attempts(), body = msg:body(),
                        header = msg:header("tag"), missing = kinds(msg:header("missing"))}}
            if p.mode == "ack" then
                r.first = kinds(msg:ack())
                r.again = kinds(msg:ack())
                r.nack_after = kinds(msg:nack())
                r.wrong_self = kinds(msg.id({{}}))
                r.opaque = {{next(msg) == nil, getmetatable(msg), tostring(msg)}}
                kept = msg
            elseif p.mode == "nack" and msg:attempts() == 1 then
                r.first = kinds(msg:nack())
            elseif p.mode == "released" then
                r.released = kinds(kept:id())
                r.released_text = tostring(select(2, kept:headers()))
            end
            queue.publish("{h.qid("report")}", r)
        end
        """,
        "main",
    )
    h.add(name="worker", kind="queue.consumer", queue="msgs", func="methods")
    app = started(h)
    queue.publish(q, {"mode": "ack"}, {"tag": "t1"})
    wait_until(lambda: len(report) == 1)
    queue.publish(q, {"mode": "nack"})
    wait_until(lambda: len(report) == 3)
    queue.publish(q, {"mode": "released"})
    wait_until(lambda: len(report) == 4)
    assert app.wait_idle(timeout=10)
    ack, nack1, nack2, released = report.items
    assert (ack["attempts"], ack["body"], ack["header"], ack["missing"]) == (1, {"mode": "ack"}, "t1", {})
    assert ack["first"] == {"value": True}
    assert ack["again"] == {"kind": "INVALID"} and ack["nack_after"] == {"kind": "INVALID"}
    assert ack["wrong_self"] == {"kind": "INVALID"}
    assert ack["opaque"] == [True, "conveyor.message", "conveyor.Message"]
    assert (nack1["attempts"], nack1["first"], nack2["attempts"]) == (1, {"value": True}, 2)
    assert nack1["id"] == nack2["id"] != ack["id"]
    assert released["released"] == {"kind": "INVALID"}
    assert "released" in released["released_text"]
    stats = app.stats()[h.qid("worker")]
    assert (stats["acked"], stats["failed"]) == (3, 1)  # the explicit ack counted once


def test_lua_handler_runs_with_the_consumer_security_context(h: Harness, started: Start) -> None:
    from conveyor import security

    h.top["security"] = {"strict": True}
    inbox = h.queue("inbox")
    allowed = h.queue("allowed")
    forbidden = h.queue("forbidden")
    sink = sink_consumer(h, "allowed")
    _policy(h, "general", "queue.publish")
    h.entries[-1]["groups"] = ["relay"]
    _policy(h, "specific", "queue.publish.queue", allowed)
    h.entries[-1]["groups"] = ["relay"]
    admin = _policy(h, "admin", "*")
    lua_entry(
        h,
        "relay",
        f"""\
        function main(p)
            local _, err = queue.publish("{forbidden}", p)
            assert(queue.publish("{allowed}", {{forbidden = err:kind(), retryable = err:retryable()}}))
        end
        """,
    )
    h.add(
        name="relay_worker",
        kind="queue.consumer",
        queue="inbox",
        func="relay",
        security={"groups": ["relay"]},
    )
    started(h)
    with security.context("admin", policies=[admin]):
        queue.publish(inbox, {"x": 1})
    wait_until(lambda: len(sink) == 1)
    assert sink.items == [{"forbidden": errors.PERMISSION_DENIED, "retryable": False}]


def test_logger_writes_structured_records(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    fid = lua_entry(
        h,
        "logs",
        """\
        function main()
            logger:info("hello", {user = "ada", n = 3, nested = {a = {1, 2}}, message = "clash", fn = print})
            logger:warn("careful")
            logger:error("bad", {code = 7})
            logger:debug("details")
            logger.info("dot form", {x = 1})
            require("logger"):info("required")
            logger:info({}, "not a table")
            print("printed", 1, true, nil)
        end
        """,
    )
    caplog.set_level(logging.DEBUG, logger="conveyor.lua")
    with h.load() as app:
        app.call(fid)
    records = [r for r in caplog.records if r.name == f"conveyor.lua.{fid}"]
    messages = [(r.levelname, r.getMessage()) for r in records]
    assert messages[:6] == [
        ("INFO", "hello"),
        ("WARNING", "careful"),
        ("ERROR", "bad"),
        ("DEBUG", "details"),
        ("INFO", "dot form"),
        ("INFO", "required"),
    ]
    assert messages[6][1].startswith("table: ")
    assert messages[7] == ("INFO", "printed\t1\ttrue\tnil")
    hello = vars(records[0])
    assert (hello["user"], hello["n"], hello["nested"], hello["lua_message"]) == (
        "ada",
        3,
        {"a": [1, 2]},
        "clash",
    )
    assert "function" in hello["fn"]
    assert vars(records[2])["code"] == 7 and vars(records[4])["x"] == 1
    assert vars(records[6])["lua_fields"] == "not a table"


# ===================================================================== sandbox

GLOBALS = [
    "_G",
    "_VERSION",
    "assert",
    "collectgarbage",
    "coroutine",
    "error",
    "errors",
    "getmetatable",
    "ipairs",
    "load",
    "logger",
    "math",
    "next",
    "os",
    "pairs",
    "pcall",
    "print",
    "queue",
    "rawequal",
    "rawget",
    "rawlen",
    "rawset",
    "require",
    "select",
    "setmetatable",
    "string",
    "table",
    "tonumber",
    "tostring",
    "type",
    "utf8",
    "xpcall",
]


def test_sandbox_globals_are_exactly_the_documented_ones(h: Harness) -> None:
    fid = lua_entry(
        h,
        "globals",
        """\
        function main()
            local names, os_names = {}, {}
            for k in pairs(_G) do names[#names + 1] = k end
            for k in pairs(os) do os_names[#os_names + 1] = k end
            table.sort(names)
            table.sort(os_names)
            return {names = names, os = os_names}
        end
        """,
    )
    with h.load() as app:
        out = app.call(fid)
    assert sorted(set(out["names"]) - {"main"}) == GLOBALS
    assert out["os"] == ["clock", "date", "difftime", "time"]


ESCAPES = [
    ("return python", "nil"),
    ("return rawget(_G, 'python')", "nil"),
    ("return python.eval('1')", "error"),
    ("return os.execute", "nil"),
    ("return os.execute('true')", "error"),
    ("return os.getenv('PATH')", "error"),
    ("return os.remove, os.rename, os.exit, os.tmpname", "nil"),
    ("return io", "nil"),
    ("return io.open('/etc/passwd')", "error"),
    ("return debug", "nil"),
    ("return debug.getregistry()", "error"),
    ("return package", "nil"),
    ("return dofile", "nil"),
    ("return loadfile", "nil"),
    ("return string.dump", "nil"),
    ("return ('x').dump", "nil"),
    ("return getmetatable('')", "boolean"),
    ("return getmetatable('').__index", "error"),
    ("return getmetatable(queue), getmetatable(queue.publish)", "nil"),
    ("return queue.publish.__globals__", "error"),
    ("return require('os')", "error"),
    ("return require('../x')", "error"),
    ("return collectgarbage('stop')", "error"),
    ("return select(2, load(string.char(27) .. 'Lua' .. string.char(0x54, 0, 0x19, 0x93)))", "binary"),
    ("return select(2, load(string.char(27) .. 'Lua', 'x', 'b'))", "binary"),
    ("return type(select(2, queue.publish(nil, {})))", "errtable"),
    ("local ok, msg, err = pcall(queue.message) return type(err)", "errtable"),
    (
        "local ok, e = pcall(error, setmetatable({}, {__index = function() return 1 end}))\n"
        "return rawget(e, 1)",
        "nil",
    ),
    ("return string.rep('x', 1 << 30)", "memory"),
]


@pytest.mark.parametrize(("code", "outcome"), ESCAPES)
def test_sandbox_escapes_fail(h: Harness, code: str, outcome: str) -> None:
    fid = lua_entry(
        h,
        "probe",
        """\
        function main(code)
            local chunk = assert(load(code, "probe"))
            local ok, value = pcall(chunk)
            if not ok then return {outcome = "error", text = tostring(value)} end
            return {outcome = type(value), text = tostring(value)}
        end
        """,
    )
    with h.load() as app:
        out = app.call(fid, code)
    if outcome == "binary":
        assert out == {"outcome": "string", "text": "attempt to load a binary chunk (mode is 't')"}
    elif outcome == "errtable":
        assert out["text"] == "table"
    elif outcome == "memory":
        assert out == {"outcome": "error", "text": "not enough memory"}
    else:
        assert out["outcome"] == outcome, out


def test_each_function_has_its_own_sandbox(h: Harness) -> None:
    a = lua_entry(h, "a", "function main() string.upper = nil; shared = 'a'; return shared end\n")
    b = lua_entry(h, "b", "function main() return {string.upper('x'), ('y'):upper(), shared == nil} end\n")
    with h.load() as app:
        assert app.call(a) == "a"
        assert app.call(b) == ["X", "Y", True]


# ===================================================================== limits and concurrency

RUNAWAYS = {
    "plain loop": "while true do end",
    "pcall loop": "while true do pcall(function() while true do end end) end",
    "xpcall handler": "while true do xpcall(function() error('x') end, function() while true do end end) end",
    "coroutine": "coroutine.wrap(function() while true do end end)()",
    "resume loop": "while true do coroutine.resume(coroutine.create(function() while true do end end)) end",
    "tostring of the error": ("error(setmetatable({}, {__tostring = function() while true do end end}))"),
}


@pytest.mark.parametrize("body", RUNAWAYS.values(), ids=RUNAWAYS.keys())
def test_runaway_handler_is_stopped_by_the_consumer_timeout(h: Harness, started: Start, body: str) -> None:
    q = h.queue("spin", dead_letter={"queue": "spin_dlq", "max_attempts": 1})
    h.queue("spin_dlq")
    h.queue("done")
    dead = sink_consumer(h, "spin_dlq")
    done = sink_consumer(h, "done")
    lua_entry(
        h,
        "spinner",
        f'function main(p)\n if p.spin then {body} end\n queue.publish("{h.qid("done")}", p)\nend\n',
    )
    h.add(name="worker", kind="queue.consumer", queue="spin", func="spinner", timeout="300ms")
    started(h)
    began = time.monotonic()
    queue.publish(q, {"spin": True})
    queue.publish(q, {"spin": False})  # only runs once the runaway's thread is free again
    wait_until(lambda: len(done) == 1 and len(dead) == 1)
    assert time.monotonic() - began < 3
    assert "TIMEOUT: " in dead.headers[0]["x_dead_letter_reason"]
    assert done.items == [{"spin": False}]


def test_a_timed_out_state_keeps_working(h: Harness) -> None:
    from conveyor.queue.context import deadline_var

    fid = lua_entry(
        h, "sometimes", "function main(spin) if spin then while true do end end return 'fine' end\n"
    )
    with h.load() as app:
        token = deadline_var.set(time.monotonic() + 0.1)
        try:
            with pytest.raises(errors.Error) as info:
                app.call(fid, True)
        finally:
            deadline_var.reset(token)
        assert (info.value.kind, info.value.message) == (errors.TIMEOUT, "Lua code exceeded its deadline")
        assert app.call(fid, False) == "fine"
        assert app.call(fid, False) == "fine"


def test_memory_is_limited_per_state(h: Harness) -> None:
    fid = lua_entry(h, "hog", "function main(n) local s = string.rep('x', n) return #s end\n")
    with h.load() as app:
        with pytest.raises(errors.Error) as info:
            app.call(fid, 1 << 30)
        assert (info.value.kind, info.value.message) == (errors.INTERNAL, "not enough memory")
        assert app.call(fid, 1000) == 1000


def test_concurrent_handlers_never_share_a_lua_state(h: Harness, started: Start) -> None:
    q = h.queue("work")
    h.queue("done")
    done = sink_consumer(h, "done")
    lua_entry(
        h,
        "worker_fn",
        f"""\
        local state_id = string.format("%s", {{}})
        local handled = 0
        function main(p)
            current = p.n                       -- a global: per Lua state
            handled = handled + 1
            local mine = handled
            local x = 0
            for i = 1, 20000 do x = x + i end   -- let the other workers interleave
            queue.publish("{h.qid("done")}", {{n = p.n, seen = current, state = state_id,
                                               handled = mine, now = handled}})
        end
        """,
    )
    h.add(name="pool", kind="queue.consumer", queue="work", func="worker_fn", concurrency=4, prefetch=20)
    started(h)
    total = 300
    queue.publish_many(q, [{"n": i} for i in range(total)])
    wait_until(lambda: len(done) == total, timeout=30)
    items = done.items
    assert sorted(item["n"] for item in items) == list(range(total))
    assert all(item["seen"] == item["n"] and item["handled"] == item["now"] for item in items)
    states: dict[str, list[int]] = {}
    for item in items:
        states.setdefault(item["state"], []).append(item["handled"])
    assert 2 <= len(states) <= 4
    assert all(sorted(counts) == list(range(1, len(counts) + 1)) for counts in states.values())


def test_one_lua_state_per_thread() -> None:
    base = Path(__file__).parent / "lua"
    spec = FunctionSpec(
        id="t:probe", kind="function.lua", source=str(base / "state_probe.lua"), base_dir=base
    )
    fn = load_function(spec)
    assert isinstance(fn, LuaFunction)
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append([fn(), fn()])) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    main_thread = [fn(), fn()]
    ids = [pair[0]["state"] for pair in [*results, main_thread]]
    assert len(set(ids)) == 4  # three threads and this one
    assert all(
        pair[0]["state"] == pair[1]["state"] and pair[1]["calls"] == 2 for pair in [*results, main_thread]
    )
