"""The pattern guard: the Lua matcher equals the native one, and its bound is an upper bound.

``string.find`` / ``match`` / ``gmatch`` / ``gsub`` run natively only on subjects short
enough for a bound on the native matcher's work; beyond it a matcher written in Lua runs
(see conveyor/lua/patterns.py). Hypothesis compares the two on generated patterns (well
and badly formed) and subjects, results and error messages alike, and checks the bound
against the steps the Lua matcher, which follows the native one step for step, counts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.lua.host import ModuleFiles
from conveyor.lua.state import LuaState

EXAMPLES = settings(max_examples=400, deadline=None, derandomize=True)

# Lua: run `fn` on the arguments and describe what it returned or raised, as one string.
RUN = r"""
local pack, concat = table.pack, table.concat
local function show(r)
    local out = {}
    for i = 1, r.n do out[i] = type(r[i]) .. ":" .. tostring(r[i]) end
    return concat(out, "|")
end
local REPLACEMENTS = {
    FN = function(...)
        local t = pack(...)
        if t[1] == "b" then return nil end
        if t[1] == "c" then return 7 end
        if t[1] == "(" then return {} end
        return "<" .. show(t) .. ">"
    end,
    TAB = {a = "A", b = false, [1] = "one", c = 2.5, ["("] = true},
}
return function(fn, kind, s, p, a3, a4)
    if kind == "gmatch" then
        local ok, iterate = pcall(fn, s, p, a3)
        if not ok then return "error:" .. tostring(iterate) end
        local out = {}
        for _ = 1, 60 do
            local r = pack(pcall(iterate))
            out[#out + 1] = show(r)
            if not r[1] or r[2] == nil then break end
        end
        return concat(out, " ; ")
    end
    if kind == "gsub" then a3 = REPLACEMENTS[a3] or a3 end
    return show(pack(pcall(fn, s, p, a3, a4)))
end
"""

ITEMS = [
    "a",
    "b",
    "c",
    ".",
    "%a",
    "%d",
    "%s",
    "%x",
    "%D",
    "%z",
    "%%",
    "%.",
    "%(",
    "x",
    "-",
    "^",
    "$",
    "[ab]",
    "[^a]",
    "[a-c]",
    "[%a_]",
    "[]]",
    "[^]]",
    "[a-]",
    "[%]]",
    "[^%d%s]",
    "%b()",
    "%bab",
    "%f[%w]",
    "%f[^a]",
    "%f[%a]",
    "(",
    ")",
    "()",
    "(a",
    "b)",
    "%0",
    "%1",
    "%2",
    "%3",
    "%",
    "[",
    "]",
    "[a",
    "%b",
    "%fa",
    "\0",  # badly formed, or odd
]
QUANTIFIERS = ["", "", "", "*", "+", "-", "?"]

item = st.tuples(st.sampled_from(ITEMS), st.sampled_from(QUANTIFIERS)).map("".join)
patterns = st.builds(
    lambda anchor, items, end: anchor + "".join(items) + end,
    st.sampled_from(["", "", "", "^"]),
    st.lists(item, max_size=8),
    st.sampled_from(["", "", "", "$"]),
)
subjects = st.lists(st.tuples(st.sampled_from(list("abc()1 x-%\0")), st.integers(1, 6)), max_size=10).map(
    lambda runs: "".join(char * count for char, count in runs)
)
inits = st.one_of(st.none(), st.integers(-20, 40))
replacements = st.sampled_from(["X", "%0%1", "[%2]", "%%", "%", "%x", "FN", "TAB", 5, ""])


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> LuaState:
    return LuaState(
        b"function main() end",
        "@probe.lua",
        None,
        ModuleFiles(tmp_path_factory.mktemp("lua")),
        logging.getLogger("t.patterns"),
    )


@pytest.fixture(scope="module")
def run(state: LuaState) -> Any:
    return state.lua.execute(RUN)


def compare(state: LuaState, run: Any, kind: str, args: tuple[Any, ...]) -> None:
    """The Lua implementation of `kind` gives what the native one gives for (s, p, a3, a4)."""
    native = state.lua.globals().string[kind.encode()]
    mine = state.lua_patterns[kind.encode()]
    s, p, a3, a4 = (*args, None, None)[:4]
    lua_args = [kind.encode(), s.encode(), p.encode(), a3.encode() if isinstance(a3, str) else a3, a4]
    assert run(mine, *lua_args) == run(native, *lua_args)


@EXAMPLES
@given(s=subjects, p=patterns, init=inits, plain=st.sampled_from([None, None, True]))
def test_lua_find_equals_native(state: LuaState, run: Any, *, s: str, p: str, init: Any, plain: Any) -> None:
    compare(state, run, "find", (s, p, init, plain))


@EXAMPLES
@given(s=subjects, p=patterns, init=inits)
def test_lua_match_equals_native(state: LuaState, run: Any, *, s: str, p: str, init: Any) -> None:
    compare(state, run, "match", (s, p, init))


@EXAMPLES
@given(s=subjects, p=patterns, init=inits)
def test_lua_gmatch_equals_native(state: LuaState, run: Any, *, s: str, p: str, init: Any) -> None:
    compare(state, run, "gmatch", (s, p, init))


@EXAMPLES
@given(s=subjects, p=patterns, repl=replacements, limit=st.one_of(st.none(), st.integers(-1, 4)))
def test_lua_gsub_equals_native(state: LuaState, run: Any, *, s: str, p: str, repl: Any, limit: Any) -> None:
    compare(state, run, "gsub", (s, p, repl, limit))


EDGES = [
    ("find", "a" * 300, "a?" * 300, None, None),  # pattern too complex, at the same depth
    ("match", "a" * 300, "(a)" * 33, None, None),  # too many captures
    ("match", "abc", "((((((((((((((((((((((((((((((((a", None, None),
    ("gmatch", "^a^a", "^a", None, None),  # no anchor in gmatch
    ("gsub", "hello world", "(o)", "%1%1", None),
    ("gsub", "hello", "", "-", None),
    ("gsub", "abc", "%w", "%0%0", 2),
    ("find", "a.b", ".", 1, True),
    ("find", "abc", "", 10, None),
    ("find", "abc", "", 4, None),
    ("find", "THE (quick) fox", "%((%a+)%)", None, None),
    ("match", "  trim  ", "^%s*(.-)%s*$", None, None),
    ("match", "key = value", "^(%w+)%s*=%s*(.-)%s*$", None, None),
    ("match", "f(a(b)c)d", "%b()", None, None),
    ("gsub", "THE (quick) fox", "%f[%a]%a+", "W", None),
    ("match", "2024-01-02", "(%d+)-(%d+)-(%d+)", "2", None),
    ("match", "abab", "(ab)%1", 1.0, None),
]


@pytest.mark.parametrize(("kind", "args"), [(kind, tuple(args)) for kind, *args in EDGES])
def test_lua_matcher_edge_cases(state: LuaState, run: Any, kind: str, args: tuple[Any, ...]) -> None:
    compare(state, run, kind, args)


# The bound: never below the steps of a real search.

adversarial_subjects = st.lists(
    st.tuples(st.sampled_from(list("ab() 1x_")), st.integers(1, 40)), max_size=6
).map(lambda runs: "".join(char * count for char, count in runs))
bound_items = st.tuples(
    st.sampled_from(
        ["a", "b", ".", "%a", "%d", "%s", "[ab]", "[^a]", "%b()", "%f[%w]", "(", ")", "()", "%1", "x"]
    ),
    st.sampled_from(QUANTIFIERS),
).map("".join)
bound_patterns = st.builds(
    lambda anchor, items, end: anchor + "".join(items) + end,
    st.sampled_from(["", "", "^"]),
    st.lists(bound_items, min_size=1, max_size=6),
    st.sampled_from(["", "", "$"]),
)


@EXAMPLES
@given(
    kind=st.sampled_from(["find", "gmatch", "gsub"]),
    s=adversarial_subjects,
    p=bound_patterns,
    init=st.integers(1, 5),
)
def test_the_bound_covers_every_step(state: LuaState, kind: str, s: str, p: str, init: int) -> None:
    steps, bound, _native = state.lua_patterns.cost(
        kind.encode(), s.encode(), p.encode(), min(init, len(s) + 1)
    )
    assert steps <= bound


def test_the_bound_grows_with_the_backtracking() -> None:
    """Exponential patterns never run natively; quadratic ones only on short subjects."""
    state = LuaState(b"function main() end", "@p.lua", None, ModuleFiles(Path(".")), logging.getLogger("t"))
    length = state.lua_patterns.native_length
    assert length(b"find", ("a?" * 40 + "a" * 40).encode()) < 0
    assert length(b"find", b"%d+x") < 5000
    assert length(b"find", b"%d+x") < length(b"find", b"^%d+x")


# Common patterns stay native (and cheap) on realistic subjects.
COMMON = [
    ("find", "^(%w+)%s*=%s*(.-)%s*$", 500),
    ("find", "^%s*(.-)%s*$", 1000),
    ("find", "(%w+)=(%w+)", 1000),
    ("find", "(.-)%.(.*)", 1000),
    ("find", "^[%w_]+$", 1_000_000),
    ("find", "^(%d+)-(%d+)-(%d+)T(%d+):(%d+):(%d+)", 100_000),
    ("gsub", "%s+", 1_000_000),
    ("gsub", '[<>&"]', 1_000_000),
    ("gsub", "%%(%x%x)", 1_000_000),
    ("gsub", "%$(%w+)", 100_000),
    ("gmatch", "[^,]+", 100_000),
    ("gmatch", "%S+", 1_000_000),
    ("gmatch", "(%w+)%s*:%s*([^;]+)", 500),
]


@pytest.mark.parametrize(("kind", "p", "at_least"), COMMON)
def test_common_patterns_run_natively(state: LuaState, kind: str, p: str, at_least: int) -> None:
    assert state.lua_patterns.native_length(kind.encode(), p.encode()) >= at_least


# Through the sandbox: both paths give the native results and the native errors, at the
# caller's position.

SANDBOX = r"""
local s = ...
local short, long = s, string.rep(" ", 100000) .. s
local function both(f)
    local a = table.pack(pcall(f, short))
    local b = table.pack(pcall(f, long))
    return {tostring(a[1]), tostring(a[2]), tostring(b[1]), tostring(b[2])}
end
return {
    both(function(x) local r = x:find("(%w+)=(%w+)(%w+)$x") return r end),
    both(function(x) local a, b = x:match("(%w+)=(%w+)") return a .. b end),
    both(function(x) local n = 0 for k, v in x:gmatch("(%w+)=(%w+)") do n = n + #k + #v end return n end),
    both(function(x) local r = x:gsub("(%w+)=(%w+)", "%2=%1") return #r end),
    both(function(x) local r = x:find("(%w+)=(%w+)(") return r end),
    both(function(x) local r = x:gsub("(%w+)=(%w+)", "%3") return r end),
    both(function(x) local r = x:gsub("(%w+)=(%w+)", function() return {} end) return r end),
}
"""


def test_both_paths_through_the_sandbox(tmp_path: Path) -> None:
    (tmp_path / "both.lua").write_text(f"function main(s)\n{SANDBOX.replace('local s = ...', '')}\nend\n")
    state = LuaState(
        (tmp_path / "both.lua").read_bytes(), "@both.lua", None, ModuleFiles(tmp_path), logging.getLogger("t")
    )
    results = state.call(("key=value a=b",), None)
    assert results == [
        ["true", "nil", "true", "nil"],
        ["true", "keyvalue", "true", "keyvalue"],
        ["true", "10", "true", "10"],
        ["true", "13", "true", "100013"],
        ["false", "both.lua:15: unfinished capture"] * 2,
        ["false", "both.lua:16: invalid capture index %3"] * 2,
        ["false", "both.lua:17: invalid replacement value (a table)"] * 2,
    ]
    length = state.lua_patterns.native_length
    assert all(
        length(kind, b"(%w+)=(%w+)") < 100_000 for kind in (b"find", b"gmatch", b"gsub")
    )  # both paths ran


def test_bad_arguments_are_reported_as_for_the_native_functions(tmp_path: Path) -> None:
    source = (
        "function main()\n"
        "  local out = {}\n"
        "  for _, f in ipairs({\n"
        "    function() local r = string.find({}, 'x') return r end,\n"
        "    function() local r = ('x'):find({}) return r end,\n"
        "    function() local r = ('x'):gsub('x', true) return r end,\n"
        "    function() local r = string.gmatch('x') return r end,\n"
        "    function() local r = ('x'):find('x', 1.5) return r end,\n"
        "  }) do local ok, e = pcall(f) out[#out + 1] = e end\n"
        "  return out\n"
        "end\n"
    )
    state = LuaState(source.encode(), "@args.lua", None, ModuleFiles(tmp_path), logging.getLogger("t"))
    assert state.call((), None) == [
        "args.lua:4: bad argument #1 to 'find' (string expected, got table)",
        "args.lua:5: bad argument #1 to 'find' (string expected, got table)",
        "args.lua:6: bad argument #2 to 'gsub' (string/function/table expected, got boolean)",
        "args.lua:7: bad argument #2 to 'gmatch' (string expected, got no value)",
        "args.lua:8: bad argument #2 to 'find' (number has no integer representation)",
    ]
