"""The pattern guard: ``string.find`` / ``match`` / ``gmatch`` / ``gsub`` that respect deadlines.

Lua's pattern matcher runs in C, where the deadline hook never fires, and it backtracks:
``string.find(string.rep('a', 40), string.rep('a?', 40) .. string.rep('a', 40))`` takes
longer than the age of the universe. ``PATTERNS`` is trusted Lua code, run by the prelude,
that returns the sandbox's versions of the four functions. Each one first bounds the work
the native matcher could do for this pattern on this subject:

- every item costs one step per attempt (a ``[...]`` set costs its length);
- ``*``, ``+`` and ``-`` try the rest of the pattern at up to n + 1 positions (n = the
  subject length from ``init``), so each one multiplies the cost of what follows by
  n + 1, unless the characters the rest can start with are disjoint from the repeated
  class (then only one of those attempts gets past the rest's first items), the rest is
  decided by its first item (what follows that item cannot fail), or the rest cannot
  fail at all: then the costs add up;
- ``?`` doubles the cost of the rest (adds, likewise, when disjoint); ``%b`` and
  back-references scan up to n characters;
- an unanchored search tries n + 1 start positions; a pattern made of fixed items
  followed only by items that cannot fail (``x*``, ``x-``, ``x?``, captures) costs at
  most a few steps per subject character in total, however often it is tried.

The result is an upper bound of the form ``K * (n + 1) ^ d``, computed once per pattern
(and checked against real searches by tests/lua/test_patterns.py): each pattern gets the
longest subject it may run natively on within ``BUDGET`` steps (at most some tens of
milliseconds of C). Within that length the native function runs, after a deadline check
when the bound exceeds ``CHECK`` (so that a loop of costly calls cannot outrun the
deadline between two hook calls). Beyond it, a matcher written in Lua runs instead: it
follows the native matcher step for step (same results, same errors, including
"pattern too complex" at the same depth), and the instruction hook stops it at the
deadline. Plain searches (``find`` with ``plain`` or without special characters) are
bounded the same way by n times the pattern length.

Errors keep the native wording and the caller's position: the native function is
tail-called when the pattern is well formed (it cannot fail then), else called
protected and its error raised again from the caller's level.

Size: over 500 lines because most of it is one Lua chunk: a pattern matcher that
follows the native algorithm step for step, and the cost bound that decides when it
runs; splitting the chunk would split one algorithm.
"""

from __future__ import annotations

__all__ = ["BUDGET", "CHECK", "PATTERNS"]

# Steps (a few nanoseconds each in C) that a native pattern call may take: above this
# bound the Lua matcher runs instead. Below CHECK the deadline is not checked before the
# call (the instruction hook covers loops of cheap calls).
BUDGET = 20_000_000
CHECK = 100_000

PATTERNS = r"""
local native, check_deadline, native_error, getinfo, BUDGET, CHECK = ...

local type, tostring, error, pcall, setmetatable = type, tostring, error, pcall, setmetatable
local raw_getmetatable = getmetatable
local tointeger, floor, huge, min = math.tointeger, math.floor, math.huge, math.min
local concat, unpack = table.concat, table.unpack
local n_find, n_match, n_gmatch, n_gsub = native.find, native.match, native.gmatch, native.gsub
local byte, sub, char = native.byte, native.sub, native.char

local MAXCCALLS = 200      -- the native matcher's recursion limit ("pattern too complex")
local MAXCAPTURES = 32     -- LUA_MAXCAPTURES
local CAP_UNFINISHED, CAP_POSITION = -1, -2
local SPECIALS = "[%^%$%*%+%?%.%(%[%%%-]"  -- without them, find does a plain search
local PLAIN_SCALE = 16     -- a byte compared by memchr/memcmp costs 1/16 of a matcher step
local BIG_NEEDLE = 65536   -- plain search in Lua: check the deadline per candidate above this

-- items of a compiled pattern
local SINGLE, OPEN, POSITION, CLOSE, END, BALANCE, FRONTIER, BACKREF, FAIL = 1, 2, 3, 4, 5, 6, 7, 8, 9
local STAR, PLUS, MINUS, QUEST = 42, 43, 45, 63

-- Errors of the Lua matcher: raised as this object and re-raised by the public function
-- with the caller's position, as luaL_error does for the native one.
local PatternError = {}
local function fail(message) error(setmetatable({message}, PatternError), 0) end

-- character sets ----------------------------------------------------------------------

local ALL_BYTES = {}
for c = 0, 255 do ALL_BYTES[c + 1] = char(c) end
ALL_BYTES = concat(ALL_BYTES)

local ANY = {}
for c = 0, 255 do ANY[c] = true end

-- The set of bytes a class matches, asked from the native matcher itself, so that `%a`,
-- `[%w_]` and friends mean exactly what they mean in C (locale included).
local set_cache, set_count = {}, 0
local function class_set(cls)
    local set = set_cache[cls]
    if set ~= nil then return set end
    local b = byte(cls, 1)
    if #cls == 1 then
        if b == 46 then set = ANY else set = {[b] = true} end
    else
        set = {}
        for pos in n_gmatch(ALL_BYTES, "()" .. cls) do set[pos - 1] = true end
    end
    if set_count >= 512 then set_cache, set_count = {}, 0 end
    set_cache[cls], set_count = set, set_count + 1
    return set
end

local function disjoint(a, b)
    for c = 0, 255 do
        if a[c] and b[c] then return false end
    end
    return true
end

-- compiling ----------------------------------------------------------------------------

-- Where the class starting at `i` ends (the index after it), or nil and the error the
-- native matcher raises on reaching it.
local function class_end(p, i, lp)
    local c = byte(p, i)
    i = i + 1
    if c == 37 then  -- '%'
        if i > lp then return nil, "malformed pattern (ends with '%')" end
        return i + 1
    elseif c == 91 then  -- '['
        if byte(p, i) == 94 then i = i + 1 end
        repeat
            if i > lp then return nil, "malformed pattern (missing ']')" end
            local cc = byte(p, i)
            i = i + 1
            if cc == 37 and i <= lp then i = i + 1 end
        until byte(p, i) == 93
        return i + 1
    end
    return i
end

-- The pattern as a list of items; an item the native matcher would reject when it
-- reaches it becomes a FAIL item carrying that error (nothing after it matters).
local function compile(p, from)
    local items, n = {}, 0
    local i, lp = from, #p
    while i <= lp do
        local c = byte(p, i)
        local item
        if c == 40 then  -- '('
            if byte(p, i + 1) == 41 then item, i = {k = POSITION}, i + 2 else item, i = {k = OPEN}, i + 1 end
        elseif c == 41 then  -- ')'
            item, i = {k = CLOSE}, i + 1
        elseif c == 36 and i == lp then  -- '$' as the last character
            item, i = {k = END}, i + 1
        else
            local d = c == 37 and byte(p, i + 1) or nil
            if d == 98 then  -- %b
                if i + 3 > lp then
                    item = {k = FAIL, message = "malformed pattern (missing arguments to '%b')"}
                else
                    item = {k = BALANCE, open = byte(p, i + 2), close = byte(p, i + 3)}
                end
                i = i + 4
            elseif d == 102 then  -- %f
                if byte(p, i + 2) ~= 91 then
                    item = {k = FAIL, message = "missing '[' after '%f' in pattern"}
                else
                    local ep, err = class_end(p, i + 2, lp)
                    if ep == nil then
                        item = {k = FAIL, message = err}
                    else
                        local cls = sub(p, i + 2, ep - 1)
                        item, i = {k = FRONTIER, set = class_set(cls), w = #cls}, ep
                    end
                end
            elseif d ~= nil and d >= 48 and d <= 57 then  -- %0 - %9
                item, i = {k = BACKREF, l = d - 48}, i + 2
            else
                local ep, err = class_end(p, i, lp)
                if ep == nil then
                    item = {k = FAIL, message = err}
                else
                    local cls = sub(p, i, ep - 1)
                    local q = byte(p, ep)
                    if q == STAR or q == PLUS or q == MINUS or q == QUEST then ep = ep + 1 else q = nil end
                    item, i = {k = SINGLE, set = class_set(cls), w = c == 91 and #cls or 1, q = q}, ep
                end
            end
        end
        n = n + 1
        items[n] = item
        if item.k == FAIL then break end
    end
    return items
end

-- the cost bound -----------------------------------------------------------------------

-- Bounds are pairs (k, d) meaning k * (n + 1) ^ d steps.
local function plus(k1, d1, k2, d2) return k1 + k2, d1 > d2 and d1 or d2 end

local function union(a, b)
    if a == nil then return b end
    local set = {}
    for c = 0, 255 do set[c] = a[c] or b[c] end
    return set
end

-- What can start the rest (from item i): the union of the sets of its items up to the
-- first one that must match a character (`$` too: it fails wherever a character
-- follows), and the steps an attempt takes to fail on any other character (one path:
-- every optional item matches nothing). nil when the rest may succeed without it. Third
-- result: the rest is decided by that item (none optional before it, and what follows
-- it cannot fail), so an attempt that gets past it succeeds.
local function first_set(items, i, cf_at)
    local set, steps, optional = nil, 0, false
    while true do
        local item = items[i]
        if item == nil then return nil end
        local k = item.k
        if k == SINGLE then
            set, steps = union(set, item.set), steps + item.w + 1
            if item.q == nil or item.q == PLUS then return set, steps, not optional and cf_at[i + 1] end
            optional = true
        elseif k == END then
            return set or {}, steps + 1, false
        elseif k == BALANCE then
            return union(set, {[item.open] = true}), steps + 1, false
        elseif k == OPEN or k == POSITION or k == CLOSE or k == FRONTIER then
            steps = steps + 1 + (item.w or 0)
        else
            return nil
        end
        i = i + 1
    end
end

-- Steps of one match attempt from item 1, as (k, d), and whether it can fail at all.
-- A step is a call of the matching function or one test of a character against a class
-- (a `[...]` set weighs its length). Going backwards, (k, d) bounds the steps from the
-- current item on within one call, `cf` says the rest cannot fail and `at_end` that it
-- succeeds at the end of the subject.
local function attempt_cost(items)
    local k, d, cf, at_end = 0, 0, true, true  -- the end of the pattern
    local cf_at = {[#items + 1] = true}
    for i = #items, 1, -1 do
        local item = items[i]
        local kind = item.k
        if kind == OPEN or kind == POSITION or kind == CLOSE then  -- a nested call
            k = k + 1
        elseif kind == END or kind == FAIL then
            k, d, cf, at_end = 0, 0, false, kind == END
        elseif kind == BALANCE or kind == BACKREF then  -- a scan of up to n characters
            k, d = plus(1, 1, k, d)
            cf, at_end = false, false
        elseif kind == FRONTIER then
            k, cf, at_end = k + item.w, false, false
        elseif item.q == nil then
            k, cf, at_end = k + item.w, false, false
        else
            local w, q = item.w, item.q
            local first, to_fail, decisive = first_set(items, i + 1, cf_at)
            local atomic = first ~= nil and (decisive or disjoint(item.set, first))
            if q == QUEST then  -- one test, then the rest after it and (if that fails) here
                if cf then k = w + 1 + k elseif atomic then k = w + 1 + k + to_fail else k = w + 1 + 2 * k end
            elseif cf then  -- the first attempt of the rest succeeds
                if q == MINUS then k = k + w + 1 else k, d = plus(2 * w, 1, k + 1, d) end
            elseif atomic then  -- at most one attempt of the rest gets past its first item, or
                                -- the first one that does succeeds
                k, d = plus(2 * w + 2 + to_fail, 1, k, d)
            else  -- up to n + 1 attempts of the rest
                k, d = plus(2 * w + 1, 1, k, d + 1)
            end
            if q == PLUS then
                cf, at_end = false, false
            elseif q ~= QUEST and item.set == ANY and at_end then  -- `.*`, `.-`: on to the end if need be
                cf = true
            end
        end
        cf_at[i] = cf
    end
    return k + 1, d, cf
end

-- Fixed items, then (after at most one `+`) only items that cannot fail: every attempt
-- fails within a few steps or succeeds consuming what it scanned, so a whole search
-- costs a few steps per character. Returns the steps per character, or nil.
local function linear_cost(items)
    local steps, widest, tail = 4, 1, false
    for i = 1, #items do
        local item = items[i]
        local k, q, w = item.k, item.q, item.w or 1
        if k == FAIL then break end
        if k == SINGLE and q ~= nil then
            if tail and q == PLUS then return nil end
            tail = true
        elseif k == SINGLE or k == FRONTIER or k == BACKREF then
            if tail then return nil end
        elseif k ~= OPEN and k ~= POSITION and k ~= CLOSE then
            return nil
        end
        steps = steps + 2 * w + 4
        if w > widest then widest = w end
    end
    return steps + widest
end

-- The longest n with k * (n + 1) ^ d <= budget (math.huge when n does not matter).
local function longest(k, d, budget)
    if d == 0 then return k <= budget and huge or -1 end
    local n = floor((budget / k) ^ (1 / d)) - 1
    while n >= 0 and k * (n + 1) ^ d > budget do n = n - 1 end
    return n
end

-- Whether the native matcher can raise no error of its own for this pattern (then it is
-- tail-called): every item well formed, captures closed in order and at most
-- MAXCAPTURES, back-references to closed captures, and too few items to nest
-- MAXCCALLS calls (each nested call starts at a later item). Also the capture count.
local function clean(items)
    if #items >= MAXCCALLS - 10 then return false, 0 end
    local level, open, closed = 0, {}, {}
    for i = 1, #items do
        local item = items[i]
        local k = item.k
        if k == FAIL then
            return false, level
        elseif k == OPEN or k == POSITION then
            level = level + 1
            if level > MAXCAPTURES then return false, level end
            if k == OPEN then open[#open + 1] = level else closed[level] = true end
        elseif k == CLOSE then
            local l = open[#open]
            if l == nil then return false, level end
            open[#open], closed[l] = nil, true
        elseif k == BACKREF and not closed[item.l] then
            return false, level
        end
    end
    return #open == 0, level
end

-- Whether a replacement string only refers to captures that exist.
local function clean_replacement(repl, captures)
    local at = n_find(repl, "%", 1, true)
    while at ~= nil do
        local c = byte(repl, at + 1)
        if c == nil or (c ~= 37 and (c < 48 or c > 57)) or c - 48 > (captures == 0 and 1 or captures) then
            return false
        end
        at = n_find(repl, "%", at + 2, true)
    end
    return true
end

-- What is known of a pattern for one kind of call: its items, the bound of the call as
-- (k, d), and the longest subjects it may run on natively. Kinds: "find" (find and
-- match: the search stops at the first match), "gmatch" (one call of the iterator; no
-- anchor), "gsub" (every start position).
local analysis_cache = {find = {}, gmatch = {}, gsub = {}}
local analysis_count = 0
local function analyse(p, kind)
    local cache = analysis_cache[kind]
    local info = cache[p]
    if info ~= nil then return info end
    local anchored = kind ~= "gmatch" and byte(p, 1) == 94
    local items = compile(p, anchored and 2 or 1)
    local k, d, cf = attempt_cost(items)
    if anchored then  -- one attempt
    elseif cf and kind == "find" then  -- the first attempt succeeds
    elseif cf and kind == "gmatch" then  -- the first or second one (not an empty match again)
        k = 2 * k
    elseif kind == "gsub" then  -- n + 1 start positions, each tried again after an empty match
        k, d = 2 * k, d + 1
    else  -- n + 1 start positions
        d = d + 1
    end
    local native_len, check_len = longest(k, d, BUDGET), longest(k, d, CHECK)
    local per_char = linear_cost(items)
    if per_char ~= nil then
        local n1, n2 = longest(per_char, 1, BUDGET), longest(per_char, 1, CHECK)
        if n1 > native_len then native_len = n1 end
        if n2 > check_len then check_len = n2 end
    end
    local is_clean, captures = clean(items)
    info = {items = items, anchored = anchored, k = k, d = d, per_char = per_char, native_len = native_len,
            check_len = check_len, clean = is_clean, captures = captures}
    if analysis_count >= 256 then  -- patterns built at run time: keep the cache small
        analysis_cache, analysis_count = {find = {}, gmatch = {}, gsub = {}}, 0
        cache = analysis_cache[kind]
    end
    cache[p], analysis_count = info, analysis_count + 1
    return info
end

-- the matcher in Lua -------------------------------------------------------------------
-- A step-for-step twin of the native one (positions are 1-based; an end position is the
-- index after the match). Being Lua, it is stopped by the deadline hook. It counts its
-- steps as the bound counts them, so tests can check the bound against real searches.

local do_match

local function new_state(src, items)
    return {src = src, len = #src, items = items, level = 0, depth = MAXCCALLS, init = {}, size = {},
            steps = 0}
end

local function single(ms, s, set)
    ms.steps = ms.steps + 1
    local c = byte(ms.src, s)
    return c ~= nil and set[c] == true
end

local function max_expand(ms, s, item, i)
    local set = item.set
    local count = 0
    while single(ms, s + count, set) do count = count + 1 end
    while count >= 0 do
        local e = do_match(ms, s + count, i + 1)
        if e ~= nil then return e end
        count = count - 1
    end
    return nil
end

local function min_expand(ms, s, item, i)
    local set = item.set
    while true do
        local e = do_match(ms, s, i + 1)
        if e ~= nil then return e end
        if single(ms, s, set) then s = s + 1 else return nil end
    end
end

local function start_capture(ms, s, i, what)
    local level = ms.level
    if level >= MAXCAPTURES then fail("too many captures") end
    level = level + 1
    ms.init[level], ms.size[level], ms.level = s, what, level
    local e = do_match(ms, s, i)
    if e == nil then ms.level = ms.level - 1 end
    return e
end

local function end_capture(ms, s, i)
    local size = ms.size
    local l = ms.level
    while l >= 1 and size[l] ~= CAP_UNFINISHED do l = l - 1 end
    if l < 1 then fail("invalid pattern capture") end
    size[l] = s - ms.init[l]
    local e = do_match(ms, s, i)
    if e == nil then size[l] = CAP_UNFINISHED end
    return e
end

local function match_balance(ms, s, item)
    local src, open, close = ms.src, item.open, item.close
    if (byte(src, s) or 0) ~= open then return nil end
    local depth, len = 1, ms.len
    for j = s + 1, len do
        ms.steps = ms.steps + 1
        local c = byte(src, j)
        if c == close then
            depth = depth - 1
            if depth == 0 then return j + 1 end
        elseif c == open then
            depth = depth + 1
        end
    end
    return nil
end

local function match_capture(ms, s, l)
    local size = ms.size[l]
    if l < 1 or l > ms.level or size == CAP_UNFINISHED then
        fail("invalid capture index %" .. l)
    end
    if size == CAP_POSITION or ms.len - s + 1 < size then return nil end
    local init, src = ms.init[l], ms.src
    ms.steps = ms.steps + size
    if sub(src, s, s + size - 1) == sub(src, init, init + size - 1) then return s + size end
    return nil
end

do_match = function(ms, s, i)
    local depth = ms.depth
    if depth == 0 then fail("pattern too complex") end
    ms.depth, ms.steps = depth - 1, ms.steps + 1
    local items = ms.items
    while true do
        local item = items[i]
        if item == nil then break end
        local k = item.k
        if k == SINGLE then
            local q = item.q
            if not single(ms, s, item.set) then
                if q == STAR or q == QUEST or q == MINUS then
                    i = i + 1
                else
                    s = nil
                    break
                end
            elseif q == nil then
                s, i = s + 1, i + 1
            elseif q == QUEST then
                local e = do_match(ms, s + 1, i + 1)
                if e ~= nil then s = e; break end
                i = i + 1
            elseif q == PLUS then
                s = max_expand(ms, s + 1, item, i)
                break
            elseif q == STAR then
                s = max_expand(ms, s, item, i)
                break
            else
                s = min_expand(ms, s, item, i)
                break
            end
        elseif k == OPEN then
            s = start_capture(ms, s, i + 1, CAP_UNFINISHED)
            break
        elseif k == POSITION then
            s = start_capture(ms, s, i + 1, CAP_POSITION)
            break
        elseif k == CLOSE then
            s = end_capture(ms, s, i + 1)
            break
        elseif k == END then
            if s ~= ms.len + 1 then s = nil end
            break
        elseif k == BALANCE then
            s = match_balance(ms, s, item)
            if s == nil then break end
            i = i + 1
        elseif k == FRONTIER then
            local set, src = item.set, ms.src
            local previous = s == 1 and 0 or byte(src, s - 1)
            if not set[previous] and set[byte(src, s) or 0] then
                i = i + 1
            else
                s = nil
                break
            end
        elseif k == BACKREF then
            s = match_capture(ms, s, item.l)
            if s == nil then break end
            i = i + 1
        else  -- FAIL
            fail(item.message)
        end
    end
    ms.depth = ms.depth + 1
    return s
end

local function attempt(ms, s)
    ms.level, ms.depth = 0, MAXCCALLS
    return do_match(ms, s, 1)
end

-- Capture `l` (1-based) of a match from s to e: a string, or a position.
local function capture(ms, l, s, e)
    if l > ms.level then
        if l ~= 1 then fail("invalid capture index %" .. l) end
        return sub(ms.src, s, e - 1)
    end
    local size, init = ms.size[l], ms.init[l]
    if size == CAP_UNFINISHED then fail("unfinished capture") end
    if size == CAP_POSITION then return init end
    return sub(ms.src, init, init + size - 1)
end

-- The captures of a match (the whole match when there are none, unless s is nil).
local function captures(ms, s, e)
    local n = ms.level
    if n == 0 then
        if s == nil then return end
        return sub(ms.src, s, e - 1)
    end
    local values = {}
    for l = 1, n do values[l] = capture(ms, l, s, e) end
    return unpack(values, 1, n)
end

-- Plain search in Lua: candidates found by the first byte, compared in one piece.
local function plain_find(s, p, init)
    local lp, len = #p, #s
    if lp == 0 then return init, init - 1 end
    local last = len - lp + 1
    local first, big = sub(p, 1, 1), lp > BIG_NEEDLE
    while init <= last do
        local j = n_find(s, first, init, true)
        if j == nil or j > last then return nil end
        if big then check_deadline() end
        if sub(s, j, j + lp - 1) == p then return j, j + lp - 1 end
        init = j + 1
    end
    return nil
end

local function lua_find(ms, anchored, init, find)
    local len = ms.len
    repeat
        local e = attempt(ms, init)
        if e ~= nil then
            if find then return init, e - 1, captures(ms, nil) end
            return captures(ms, init, e)
        end
        init = init + 1
    until init > len + 1 or anchored
    return nil
end

local function lua_gmatch(ms, init)
    local len, last = ms.len, nil
    return function()
        for src = init, len + 1 do
            local e = attempt(ms, src)
            if e ~= nil and e ~= last then
                init, last = e, e
                return captures(ms, src, e)
            end
        end
    end
end

-- The replacement string with its %0-%9 and %% resolved.
local function expand(ms, s, e, repl)
    local parts, n, from = {}, 0, 1
    while true do
        local at = n_find(repl, "%", from, true)
        if at == nil then break end
        n = n + 1
        parts[n] = sub(repl, from, at - 1)
        local c = byte(repl, at + 1)
        n = n + 1
        if c == 37 then
            parts[n] = "%"
        elseif c == 48 then
            parts[n] = sub(ms.src, s, e - 1)
        elseif c ~= nil and c >= 49 and c <= 57 then
            parts[n] = tostring(capture(ms, c - 48, s, e))
        else
            fail("invalid use of '%' in replacement string")
        end
        from = at + 2
    end
    n = n + 1
    parts[n] = sub(repl, from)
    return concat(parts, "", 1, n)
end

-- What replaces the match from s to e, and whether it is a replacement at all.
local function replacement(ms, s, e, repl, kind)
    local value
    if kind == "function" then
        value = repl(captures(ms, s, e))
    elseif kind == "table" then
        value = repl[capture(ms, 1, s, e)]
    else
        return expand(ms, s, e, repl), true
    end
    if not value then return sub(ms.src, s, e - 1), false end
    local t = type(value)
    if t ~= "string" and t ~= "number" then fail("invalid replacement value (a " .. t .. ")") end
    return tostring(value), true
end

local function lua_gsub(ms, anchored, repl, max)
    local kind = type(repl)
    if kind == "number" then repl, kind = tostring(repl), "string" end
    local s, len = ms.src, ms.len
    local parts, np, copied = {}, 0, 1
    local src, last, count, changed = 1, nil, 0, false
    while count < max do
        local e = attempt(ms, src)
        if e ~= nil and e ~= last then
            count = count + 1
            local value, replaced = replacement(ms, src, e, repl, kind)
            parts[np + 1], parts[np + 2], np = sub(s, copied, src - 1), value, np + 2
            changed = changed or replaced
            src, last, copied = e, e, e
        elseif src <= len then
            src = src + 1
        else
            break
        end
        if anchored then break end
    end
    if not changed then return s, count end
    parts[np + 1] = sub(s, copied)
    return concat(parts, "", 1, np + 1), count
end

-- the public functions -------------------------------------------------------------------

-- Results of the Lua implementation; its pattern errors get the caller's position.
local function settled(ok, ...)
    if ok then return ... end
    local err = ...
    if raw_getmetatable(err) == PatternError then error(err[1], 2) end  -- tail-called: 2 is our caller
    error(err, 0)
end

-- The native matcher's own errors (raised by luaL_error, at the caller's position).
local function own_error(err)
    return n_find(err, "^malformed pattern %(") ~= nil or n_find(err, "^invalid capture index %%%d+$") ~= nil
        or n_find(err, "^invalid replacement value %(a %a+%)$") ~= nil
        or err == "missing '[' after '%f' in pattern" or err == "invalid pattern capture"
        or err == "unfinished capture" or err == "too many captures" or err == "pattern too complex"
        or err == "invalid use of '%' in replacement string"
end

-- A native call that may fail: protected, its errors raised as from the caller.
local function finish(info, public, ok, ...)
    if ok then return ... end
    return native_error(info, public, own_error, (...))
end

local function protected(info, public, fn, ...)
    return finish(info, public, pcall(fn, ...))
end

local function text(v)
    local t = type(v)
    if t == "string" then return v end
    if t == "number" then return tostring(v) end
    return nil
end

local function position(v, len)  -- posrelatI(luaL_optinteger(v, 1)) or nil for bad values
    local i = 1
    if v ~= nil then
        local t = type(v)
        if t ~= "number" and t ~= "string" then return nil end
        i = tointeger(v)
        if i == nil then return nil end
    end
    if i > 0 then return i end
    if i == 0 or i < -len then return 1 end
    return len + i + 1
end

local function find_or_match(find, native_fn, public)
    return function(...)
        local s, p, init, plain = ...
        local subject, pattern = text(s), text(p)
        local i = subject ~= nil and pattern ~= nil and position(init, #subject) or nil
        if i == nil then return protected(getinfo(1, "n"), public, native_fn, ...) end
        local len = #subject
        if i > len + 1 then return native_fn(s, p, init, plain) end  -- nothing to search
        local n = len - i + 1
        if find and (plain or n_find(pattern, SPECIALS) == nil) then  -- memchr and memcmp
            local cost = n * #pattern / PLAIN_SCALE
            if cost <= BUDGET then
                if cost > CHECK then check_deadline() end
                return native_fn(s, p, init, plain)
            end
            return plain_find(subject, pattern, i)
        end
        local info = analyse(pattern, "find")
        if n <= info.native_len then
            if n > info.check_len then check_deadline() end
            if info.clean then return native_fn(s, p, init, plain) end
            return protected(getinfo(1, "n"), public, native_fn, s, p, init, plain)
        end
        return settled(pcall(lua_find, new_state(subject, info.items), info.anchored, i, find))
    end
end

local function gmatch(...)
    local s, p, init = ...
    local subject, pattern = text(s), text(p)
    local i = subject ~= nil and pattern ~= nil and position(init, #subject) or nil
    if i == nil then return protected(getinfo(1, "n"), "string.gmatch", n_gmatch, ...) end
    local len = #subject
    if i > len + 1 then i = len + 2 end
    local info = analyse(pattern, "gmatch")
    local n = len - i + 1
    if n <= info.native_len then
        local iterate = n_gmatch(s, p, init)
        if n <= info.check_len and info.clean then return iterate end
        return function()
            if n > info.check_len then check_deadline() end
            if info.clean then return iterate() end
            return protected(nil, "string.gmatch", iterate)
        end
    end
    local iterate = lua_gmatch(new_state(subject, info.items), i)
    return function() return settled(pcall(iterate)) end
end

local function gsub(...)
    local s, p, repl, max = ...
    local subject, pattern = text(s), text(p)
    local kind = type(repl)
    local limit = nil
    if max == nil then
        limit = subject ~= nil and #subject + 1 or nil
    elseif type(max) == "number" or type(max) == "string" then
        limit = tointeger(max)
    end
    if subject == nil or pattern == nil or limit == nil or (kind ~= "string" and kind ~= "number"
            and kind ~= "table" and kind ~= "function") then
        return protected(getinfo(1, "n"), "string.gsub", n_gsub, ...)
    end
    local len = #subject
    local info = analyse(pattern, "gsub")
    if len <= info.native_len then
        if len > info.check_len then check_deadline() end
        local plain_repl = kind == "number" or kind == "string" and clean_replacement(repl, info.captures)
        if info.clean and plain_repl then return n_gsub(s, p, repl, max) end
        return protected(getinfo(1, "n"), "string.gsub", n_gsub, s, p, repl, max)
    end
    return settled(pcall(lua_gsub, new_state(subject, info.items), info.anchored, repl, limit))
end

return {
    find = find_or_match(true, n_find, "string.find"),
    match = find_or_match(false, n_match, "string.match"),
    gmatch = gmatch,
    gsub = gsub,
    -- for tests: the Lua implementations, to compare with the native ones, and the steps a
    -- search takes against the bound the guard allows for it
    lua = {
        find = function(s, p, init, plain)
            local i = position(init, #s)
            if i > #s + 1 then return nil end
            if plain or n_find(p, SPECIALS) == nil then return plain_find(s, p, i) end
            local info = analyse(p, "find")
            return settled(pcall(lua_find, new_state(s, info.items), info.anchored, i, true))
        end,
        match = function(s, p, init)
            local i = position(init, #s)
            if i > #s + 1 then return nil end
            local info = analyse(p, "find")
            return settled(pcall(lua_find, new_state(s, info.items), info.anchored, i, false))
        end,
        gmatch = function(s, p, init)
            local i = position(init, #s)
            if i > #s + 1 then i = #s + 2 end
            local iterate = lua_gmatch(new_state(s, analyse(p, "gmatch").items), i)
            return function() return settled(pcall(iterate)) end
        end,
        gsub = function(s, p, repl, max)
            local info = analyse(p, "gsub")
            return settled(pcall(lua_gsub, new_state(s, info.items), info.anchored, repl, max or #s + 1))
        end,
        native_length = function(kind, p)  -- the longest subject (from init) run natively
            return analyse(p, kind).native_len
        end,
        cost = function(kind, s, p, init)
            local info = analyse(p, kind)
            local ms = new_state(s, info.items)
            local i = position(init, #s)
            local steps = 0
            if kind == "find" then
                pcall(lua_find, ms, info.anchored, i, true)
                steps = ms.steps
            elseif kind == "gsub" then
                i = 1
                pcall(lua_gsub, ms, info.anchored, "", #s + 1)
                steps = ms.steps
            else  -- the costliest call of the iterator
                local iterate = lua_gmatch(ms, i)
                repeat
                    local before = ms.steps
                    local ok, found = pcall(iterate)
                    if ms.steps - before > steps then steps = ms.steps - before end
                until not ok or found == nil
            end
            local n = #s - i + 1
            local bound = info.k * (n + 1) ^ info.d
            if info.per_char ~= nil then bound = min(bound, info.per_char * (n + 1)) end
            return steps, bound, n <= info.native_len
        end,
    },
}
"""
