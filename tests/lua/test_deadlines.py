"""Lua code never outruns its deadline, not even inside C: patterns, finalizers, table loops.

Faults H02 (a handler that hangs is timed out and its worker slot freed) and P01 (a poison
message does not block the ones behind it), for Lua handlers whose runaway part runs in C
library code, where the instruction-count hook never fires.

Each runaway runs in a helper thread joined with a generous bound, so that a regression
fails the test instead of hanging the run (the runaway thread would keep spinning, but
the assertion names it).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest

import conveyor
from conveyor import errors, queue
from conveyor.lua.host import ModuleFiles
from conveyor.lua.state import LuaState
from tests.support.harness import Harness
from tests.support.waiting import wait_until

DEADLINE = 0.3  # seconds given to each runaway
SLACK = 1.0  # how late after its deadline a runaway may stop

# A backtracking pattern: 2^40 ways to match `a?` forty times, in C.
BACKTRACK = "string.rep('a', 40), string.rep('a?', 40) .. string.rep('a', 40)"

# Lua code that, without its guard, runs in C for far longer than any deadline.
RUNAWAYS = {
    "find backtracking": f"return string.find({BACKTRACK})",
    "match backtracking": f"return string.match({BACKTRACK})",
    "gsub backtracking": f"return string.gsub({BACKTRACK}, 'x')",
    "gmatch backtracking": f"for m in string.gmatch({BACKTRACK}) do end",
    "method call": "local s = string.rep('a', 40) return s:find(string.rep('a?', 40) .. s)",
    "quadratic find": "return string.find(string.rep('1', 2000000), '%d+x')",
    "plain find": (
        "local s = string.rep('a', 10000000) return string.find(s, s:sub(1, 5000000) .. 'b', 1, true)"
    ),
    # each call is a few milliseconds of C: thousands of them run between two hook calls
    "costly patterns in a loop": "local s = string.rep('1', 1500) while true do s:find('%d+x') end",
    "table.move over nils": "return #table.move({}, 1, 1 << 50, 2)",
    "table.insert with __len": (
        "local t = setmetatable({}, {__len = function() return 1 << 50 end}) table.insert(t, 1, 'x')"
    ),
    "table.remove with __len": (
        "local t = setmetatable({}, {__len = function() return 1 << 50 end}) table.remove(t, 1)"
    ),
    "table.sort with C metamethods": (
        "local t = setmetatable({}, {__len = function() return (1 << 31) - 2 end,"
        " __index = rawlen, __newindex = rawlen}) table.sort(t)"
    ),
    "table.concat with a C __index": (
        "local t = setmetatable({}, {__index = type}) return #table.concat(t, '', 1, 1 << 40)"
    ),
    "load with a reader": "while true do load(function() return ' ' end) end",
}


@dataclass
class Outcome:
    value: Any
    error: errors.Error | None
    elapsed: float  # seconds, wall clock
    cpu: float  # seconds of CPU of the calling thread


def lua_state(tmp_path: Path, source: str) -> LuaState:
    return LuaState(
        dedent(source).encode(), "@probe.lua", None, ModuleFiles(tmp_path), logging.getLogger("t.lua")
    )


def call(state: LuaState, args: tuple[Any, ...] = (), deadline: float | None = DEADLINE) -> Outcome:
    """Call the state's entry point in a helper thread; fail if it is still running long after."""
    done: dict[str, Any] = {}

    def target() -> None:
        began, cpu = time.monotonic(), time.thread_time()
        try:
            done["value"] = state.call(args, None if deadline is None else began + deadline)
        except errors.Error as exc:
            done["error"] = exc
        done["elapsed"], done["cpu"] = time.monotonic() - began, time.thread_time() - cpu

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join((deadline or 0) + 15)
    assert not thread.is_alive(), "the Lua call is still running long after its deadline"
    return Outcome(done.get("value"), done.get("error"), done["elapsed"], done["cpu"])


def assert_quiet(window: float = 0.3) -> None:
    """Nothing in this process burns CPU any more (a runaway left behind would)."""
    before = time.process_time()
    time.sleep(window)
    assert time.process_time() - before < window / 2


def assert_timed_out(outcome: Outcome) -> None:
    assert outcome.error is not None, f"returned {outcome.value!r} instead of timing out"
    assert (outcome.error.kind, outcome.error.message) == (errors.TIMEOUT, "Lua code exceeded its deadline")
    assert outcome.elapsed < DEADLINE + SLACK
    assert outcome.cpu < DEADLINE + SLACK


@pytest.mark.parametrize("body", RUNAWAYS.values(), ids=RUNAWAYS.keys())
def test_native_work_stops_at_the_deadline(tmp_path: Path, body: str) -> None:
    state = lua_state(tmp_path, f"function main()\n{body}\nend\n")
    assert_timed_out(call(state))
    assert_quiet()


def test_a_state_keeps_working_after_a_native_timeout(tmp_path: Path) -> None:
    state = lua_state(
        tmp_path,
        f"""\
        function main(spin)
            if spin then return string.find({BACKTRACK}) end
            return ('key=value'):match('(%w+)=(%w+)')
        end
        """,
    )
    assert_timed_out(call(state, (True,)))
    assert call(state, (False,)).value == "key"


# ====================================================================== finalizers


GC_FORMS = {
    "a function": "setmetatable({}, {__gc = function() while true do end end})",
    "false, replaced later": (
        "local mt = {__gc = false} local t = setmetatable({}, mt) mt.__gc = function() while true do end end"
    ),
    "a table": "setmetatable({}, {__gc = {}})",
}


@pytest.mark.parametrize("code", GC_FORMS.values(), ids=GC_FORMS.keys())
def test_gc_finalizers_are_refused(tmp_path: Path, code: str) -> None:
    state = lua_state(
        tmp_path,
        f"""\
        function main()
            local ok, err = pcall(function() {code} end)
            collectgarbage()
            collectgarbage()
            return {{ok = ok, err = err}}
        end
        """,
    )
    outcome = call(state)
    assert outcome.error is None
    assert outcome.value["ok"] is False
    assert outcome.value["err"].endswith("__gc finalizers are not allowed in conveyor functions")


# Other ways to a metatable with `__gc`: none is there (each of these fails).
NO_ROUTES = {
    "debug library": "debug.setmetatable({}, {__gc = print})",
    "string metatable": "getmetatable('').__gc = print",
    "an error object's metatable": "rawset(getmetatable(errors.new('x')), '__gc', print)",
    "an error object": "setmetatable(errors.new('x'), {})",
    "a loaded chunk's own environment": (
        "load('setmetatable({}, {__gc = function() end})', 'x', 't', {setmetatable = setmetatable})()"
    ),
}


@pytest.mark.parametrize("code", NO_ROUTES.values(), ids=NO_ROUTES.keys())
def test_there_is_no_other_route_to_a_finalizer(tmp_path: Path, code: str) -> None:
    state = lua_state(tmp_path, f"function main() return (pcall(function() {code} end)) end\n")
    assert call(state).value is False


def test_a_gc_field_added_after_setmetatable_never_runs(tmp_path: Path) -> None:
    state = lua_state(
        tmp_path,
        """\
        function main()
            local mt = {}
            setmetatable({}, mt)
            mt.__gc = function() ran = true end
            collectgarbage()
            collectgarbage()
            return ran == nil
        end
        """,
    )
    assert call(state).value is True


def test_the_gc_refusal_names_the_callers_line(tmp_path: Path) -> None:
    state = lua_state(tmp_path, "function main()\n  setmetatable({}, {__gc = print})\nend\n")
    outcome = call(state)
    assert outcome.error is not None
    assert outcome.error.message == "probe.lua:2: __gc finalizers are not allowed in conveyor functions"


# ====================================================================== other native loops


def test_string_rep_of_empty_strings_returns_at_once(tmp_path: Path) -> None:
    state = lua_state(
        tmp_path,
        "function main() return {string.rep('', math.maxinteger), ('').rep('', 1 << 40, ''), "
        "string.rep('ab', 3, ','), string.rep('x', 0)} end\n",
    )
    outcome = call(state)
    assert outcome.value == ["", "", "ab,ab,ab", ""]
    assert outcome.elapsed < 1


def test_closing_a_coroutine_runs_its_close_handlers_under_the_deadline(tmp_path: Path) -> None:
    # The coroutine is created and suspended in a call without a deadline, so no hook was
    # ever set in it; closing it later runs its pending __close handler in it.
    state = lua_state(
        tmp_path,
        """\
        function main(setup)
            if setup then
                held = coroutine.create(function()
                    local guard <close> = setmetatable({}, {__close = function() while true do end end})
                    coroutine.yield()
                end)
                coroutine.resume(held)
                return "suspended"
            end
            return coroutine.close(held)
        end
        """,
    )
    assert call(state, (True,), deadline=None).value == "suspended"
    assert_timed_out(call(state, (False,)))


def test_an_endless_coroutine_wrap_times_out(tmp_path: Path) -> None:
    state = lua_state(tmp_path, "function main() coroutine.wrap(function() while true do end end)() end\n")
    assert_timed_out(call(state))


GUARDED_RESULTS = {
    # the guarded table functions give the native results
    "move forward": (
        "local t = {} for i = 1, 10000 do t[i] = i end table.move(t, 1, 10000, 3) "
        "return {t[1], t[3], t[10002]}",
        [1, 1, 10000],
    ),
    "move backward overlap": (
        "local t = {} for i = 1, 10000 do t[i] = i end table.move(t, 1, 9000, 2) "
        "return {t[2], t[5000], t[9001]}",
        [1, 4999, 9000],
    ),
    "move down overlap": (
        "local t = {} for i = 1, 10000 do t[i] = i end table.move(t, 2, 10000, 1) "
        "return {t[1], t[9999], t[10000]}",
        [2, 10000, 10000],
    ),
    "move to another table": (
        "local a, b = {}, {} for i = 1, 9000 do a[i] = i end "
        "return {#table.move(a, 1, 9000, 5, b), b[5], b[9004], b[4] == nil}",
        [9004, 1, 9000, True],
    ),
    "insert with __len": (
        "local t = setmetatable({}, {__len = function(t) return rawlen(t) end}) "
        "for i = 1, 5000 do t[i] = i end table.insert(t, 2, 'x') table.insert(t, 'y') "
        "return {t[1], t[2], t[3], t[5001], t[5002], #t}",
        [1, "x", 2, 5000, "y", 5002],
    ),
    "remove with __len": (
        "local t = setmetatable({}, {__len = function(t) return rawlen(t) end}) "
        "for i = 1, 5000 do t[i] = i end local a = table.remove(t, 1) local b = table.remove(t) "
        "return {a, b, t[1], t[4998], t[4999] == nil, #t}",
        [1, 5000, 2, 4999, True, 4998],
    ),
    "sort a long array": (
        "local t = {} for i = 1, 60000 do t[i] = (i * 7919) % 60000 end table.sort(t) "
        "return {t[1], t[2], t[60000]}",
        [0, 1, 59999],
    ),
    "sort with a comparator and a metatable": (
        "local t = setmetatable({3, 1, 2}, {}) table.sort(t, function(a, b) return a > b end) return t",
        [3, 2, 1],
    ),
    "concat with a metatable": (
        "local t = setmetatable({}, {__index = function(_, i) return i % 10 end}) "
        "local s = table.concat(t, ',', 1, 10000) return {#s, s:sub(1, 7), s:sub(-3)}",
        [19999, "1,2,3,4", "9,0"],
    ),
    "load a long chunk": (
        "local f = assert(load(string.rep('x = (x or 0) + 1\\n', 200000))) f() return x",
        200000,
    ),
}


@pytest.mark.parametrize(("code", "expected"), GUARDED_RESULTS.values(), ids=GUARDED_RESULTS.keys())
def test_guarded_table_functions_keep_their_results(tmp_path: Path, code: str, expected: Any) -> None:
    state = lua_state(tmp_path, f"function main()\n{code}\nend\n")
    outcome = call(state, deadline=30)
    assert outcome.error is None, outcome.error
    assert outcome.value == expected


GUARDED_ERRORS = {
    "sort of mixed values": (
        "local t = {} for i = 1, 60001 do t[i] = i end t[5] = {} table.sort(t)",
        "attempt to compare",
    ),
    "an invalid order function": (
        "local t = setmetatable({}, {}) for i = 1, 100 do t[i] = i end "
        "table.sort(t, function() return true end)",
        "probe.lua:3: invalid order function for sorting",
    ),
    "concat of a bad value": (
        "local t = setmetatable({}, {__index = function(_, i) if i == 9000 then return {} end "
        "return 'x' end}) "
        "local s = table.concat(t, '', 1, 10000) return s",
        "probe.lua:3: invalid value (table) at index 9000 in table for 'concat'",
    ),
    "a __len that is not an integer": (
        "local t = setmetatable({}, {__len = function() return 1.5 end}) table.insert(t, 1, 'x')",
        "probe.lua:3: object length is not an integer",
    ),
}


@pytest.mark.parametrize(("code", "message"), GUARDED_ERRORS.values(), ids=GUARDED_ERRORS.keys())
def test_guarded_table_functions_keep_their_errors(tmp_path: Path, code: str, message: str) -> None:
    state = lua_state(tmp_path, f"function main()\n\n{code}\nend\n")
    outcome = call(state, deadline=30)
    assert outcome.error is not None
    if message.startswith("probe.lua"):
        assert outcome.error.message == message
    else:
        assert outcome.error.message.startswith(message)  # no position: raised inside sort, in C


# ====================================================================== through a consumer


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


@pytest.fixture
def started() -> Iterator[list[conveyor.App]]:
    apps: list[conveyor.App] = []
    yield apps
    for app in apps:
        app.stop(5)


class Sink:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[Any] = []
        self.reasons: list[str] = []

    def __call__(self, payload: Any) -> None:
        reason = queue.message().headers.get("x_dead_letter_reason", "")
        with self.lock:
            self.items.append(payload)
            self.reasons.append(reason)

    def __len__(self) -> int:
        with self.lock:
            return len(self.items)


POISONS = {
    "backtracking pattern": f"string.find({BACKTRACK})",
    "gc finalizer": "setmetatable({}, {__gc = function() while true do end end}) collectgarbage()",
}


@pytest.mark.parametrize("poison", POISONS.values(), ids=POISONS.keys())
def test_a_poison_message_times_out_and_the_same_worker_takes_the_next(
    h: Harness, started: list[conveyor.App], poison: str
) -> None:
    """Faults H02, P01."""
    work = h.queue("work", dead_letter={"queue": "work_dlq", "max_attempts": 1})
    h.queue("work_dlq")
    h.queue("done")
    dead, done = Sink(), Sink()
    h.consumer("dlq_reader", "work_dlq", dead)
    h.consumer("done_reader", "done", done)
    (h.tmp_path / "worker.lua").write_text(
        dedent(
            f"""\
            function main(p)
                handled = (handled or 0) + 1  -- a global: per Lua state, that is per thread
                if p.poison then {poison} end
                queue.publish("{h.qid("done")}", {{n = p.n, handled = handled}})
            end
            """
        )
    )
    h.add(name="handle", kind="function.lua", source="file://worker.lua")
    h.add(name="worker", kind="queue.consumer", queue="work", func="handle", timeout="1s", concurrency=1)
    app = h.load()
    app.start(consumers=True)
    started.append(app)
    queue.publish(work, {"n": 1, "poison": True})
    queue.publish(work, {"n": 2, "poison": False})  # needs the only worker back
    wait_until(lambda: len(dead) == 1 and len(done) == 1, timeout=20)
    assert dead.items == [{"n": 1, "poison": True}]
    assert done.items[0] == {"n": 2, "handled": 2}  # the poison's thread and Lua state, free again
    reason = dead.reasons[0]
    assert "TIMEOUT" in reason or "__gc finalizers are not allowed" in reason, reason
    assert_quiet(0.5)  # the runaway really stopped
    queue.publish(work, {"n": 3, "poison": False})
    wait_until(lambda: len(done) == 2, timeout=20)
    assert done.items[1] == {"n": 3, "handled": 3}


# ====================================================================== conveyor call


def test_conveyor_call_exits_when_loading_runs_away(tmp_path: Path) -> None:
    """The file's top-level code has the load limit as its deadline: `call` reports it and exits."""
    (tmp_path / "spin.lua").write_text(
        f"local found = string.find({BACKTRACK})\nfunction main() return 1 end\n"
    )
    (tmp_path / "conveyor.yaml").write_text(
        dedent(
            """\
            version: "1.0"
            namespace: app
            entries:
              - {name: mem, kind: queue.driver.memory}
              - {name: spin, kind: function.lua, source: "file://spin.lua"}
            """
        )
    )
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "conveyor", "call", "app:spin"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert time.monotonic() - began < 30
    assert done.returncode != 0
    assert "running the file failed: Lua code exceeded its deadline" in done.stderr, done.stderr
    assert done.stdout == ""
