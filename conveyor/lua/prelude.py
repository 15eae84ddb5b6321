"""The trusted Lua code that builds the sandbox (kept as a string so it ships with the package).

``PRELUDE`` runs once per Lua state, *before* any user code, with the full standard
library. It receives the Python host callables as its chunk arguments, keeps them and
every library function it needs in local upvalues (the sandbox has no ``debug``, so
upvalues are unreachable), builds the sandbox environment and returns a table of
trusted entry points for Python:

- ``env``: the sandbox's global table (user chunks and modules run with it),
- ``compile(source, chunkname)``: compile a user chunk (text only) in the sandbox,
- ``invoke(fn, deadline, ...)``: call user code, translate how it ended,
- ``new_array()``: an empty table that converts back to a Python list,
- ``meta_kind(t)``: what an empty table really is (array, error object, message),
- ``lua_patterns``: the pattern matcher written in Lua (see :mod:`conveyor.lua.patterns`),
  for tests that compare it with the native one.

The sandbox's C library functions that could run for long without the deadline hook
firing (pattern matching, loops over table ranges) and ``__gc`` finalizers (which run
with hooks off) are guarded or refused; see "What runs in C" in docs/lua.md.

Every host callable returns ``true, value`` or ``false, kind, message, retryable``;
``settle`` turns the latter into ``nil, err`` for the Lua caller.

Size: over 500 lines because most of it is the Lua source of the prelude, one string
that must be read as a whole (the sandbox, the error objects, the guards and
``invoke``).
"""

from __future__ import annotations

__all__ = ["HOOK_INSTRUCTIONS", "PRELUDE"]

# A deadline check runs every this many VM instructions. At ~100-300 M instructions/s
# that is every 0.05-0.2 ms: timeouts are precise and the Python call stays cheap.
# (Most of an armed hook's cost is Lua 5.4 testing for it on every instruction,
# whatever this count: see "Limits" in docs/lua.md.)
HOOK_INSTRUCTIONS = 20_000

PRELUDE = r"""
local host_publish, host_message, host_info, host_msg, host_log, host_module, host_now, hook_count,
      patterns_chunk, pattern_budget, pattern_check = ...

local type, select, error, tostring = type, select, error, tostring
local pairs, ipairs, rawequal, rawget, rawlen = pairs, ipairs, rawequal, rawget, rawlen
local setmetatable, pcall, xpcall, raw_load = setmetatable, pcall, xpcall, load
local pack, unpack, concat = table.pack, table.unpack, table.concat
local sethook, traceback, raw_getmetatable = debug.sethook, debug.traceback, debug.getmetatable
local co_create, co_resume, co_close = coroutine.create, coroutine.resume, coroutine.close
local tointeger, maxinteger, min, ult = math.tointeger, math.maxinteger, math.min, math.ult
local string_metatable = raw_getmetatable("")

-- errors ---------------------------------------------------------------------------

local KINDS = {"INVALID", "NOT_FOUND", "PERMISSION_DENIED", "INTERNAL", "UNAVAILABLE", "TIMEOUT",
               "CANCELED", "CONFLICT", "ALREADY_EXISTS", "RATE_LIMITED", "UNKNOWN"}
local KNOWN_KIND = {}
for _, kind in ipairs(KINDS) do KNOWN_KIND[kind] = true end

-- Error fields live outside the objects so that `err.kind` cannot shadow `err:kind()`
-- and user code cannot forge or alter them.
local error_fields = setmetatable({}, {__mode = "k"})
local Error = {}
local function read_only() error("conveyor objects are read-only", 2) end
local ErrorMT = {__index = Error, __newindex = read_only, __metatable = "conveyor.error"}

local function new_error(kind, message, retryable)
    local err = setmetatable({}, ErrorMT)
    -- hint: retryable as given (nil when not said); a consumer retries unless it is false
    local hint = nil
    if retryable ~= nil then hint = retryable == true end
    error_fields[err] = {kind = kind, message = message, retryable = retryable == true, hint = hint}
    return err
end

local function fields_of(err, method)
    local fields = error_fields[err]
    if fields == nil then
        error("bad self for error method '" .. method .. "' (call it as err:" .. method .. "())", 3)
    end
    return fields
end

function Error.kind(err) return fields_of(err, "kind").kind end
function Error.message(err) return fields_of(err, "message").message end
function Error.retryable(err) return fields_of(err, "retryable").retryable end
ErrorMT.__tostring = function(err)
    local fields = error_fields[err]
    return fields.kind .. ": " .. fields.message
end

local errors = {}
for _, kind in ipairs(KINDS) do errors[kind] = kind end

-- errors.new(message) | errors.new(kind, message [, retryable]) | errors.new{kind=, message=, retryable=}
function errors.new(kind, message, retryable)
    if type(kind) == "table" then
        kind, message, retryable = kind.kind, kind.message, kind.retryable
    elseif message == nil then
        kind, message = "UNKNOWN", kind
    end
    if kind == nil then kind = "UNKNOWN" end
    if not KNOWN_KIND[kind] then error("errors.new: unknown error kind " .. tostring(kind), 2) end
    if type(message) ~= "string" then error("errors.new: message must be a string", 2) end
    return new_error(kind, message, retryable)
end

function errors.is_error(value)
    return error_fields[value] ~= nil
end

local function settle(ok, a, b, c)
    if ok then return a end
    return nil, new_error(a, b, c)
end

-- queue and Message ----------------------------------------------------------------

local message_handles = setmetatable({}, {__mode = "k"})
local Message = {}
local MessageMT = {__index = Message, __newindex = read_only, __metatable = "conveyor.message",
                   __tostring = function() return "conveyor.Message" end}
-- Tables converted from Python lists carry this, so that an emptied one stays a list.
local ArrayMT = {__name = "conveyor.array"}

local function message_call(msg, op, key)
    local handle = message_handles[msg]
    if handle == nil then
        return nil, new_error("INVALID", "not a Message: call it as msg:" .. op .. "()", false)
    end
    return settle(host_msg(handle, op, key))
end

function Message.id(msg) return message_call(msg, "id") end
function Message.header(msg, key) return message_call(msg, "header", key) end
function Message.headers(msg) return message_call(msg, "headers") end
function Message.attempts(msg) return message_call(msg, "attempts") end
function Message.body(msg) return message_call(msg, "body") end
function Message.ack(msg) return message_call(msg, "ack") end
function Message.nack(msg) return message_call(msg, "nack") end

local queue = {}
function queue.publish(queue_id, data, headers) return settle(host_publish(queue_id, data, headers)) end
function queue.info(queue_id) return settle(host_info(queue_id)) end
function queue.message()
    local ok, a, b, c = host_message()
    if not ok then return nil, new_error(a, b, c) end
    local msg = setmetatable({}, MessageMT)
    message_handles[msg] = a
    return msg
end

-- logger ---------------------------------------------------------------------------

local logger = {}
for _, level in ipairs({"debug", "info", "warn", "error"}) do
    logger[level] = function(self, msg, fields)
        if not rawequal(self, logger) then msg, fields = self, msg end  -- logger.info(msg) too
        host_log(level, tostring(msg), fields)
    end
end

local function print(...)
    local parts = {}
    for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
    host_log("info", concat(parts, "\t"), nil)
end

-- deadlines ------------------------------------------------------------------------

local TIMEOUT = setmetatable({}, {__tostring = function() return "deadline exceeded" end})
local deadline = nil   -- time.monotonic() seconds while a call with a deadline runs
local expired = false  -- sticky once the deadline has passed, until the call returns
local trusted = {}     -- prelude functions the hook must never interrupt
local getinfo = debug.getinfo

local function hook()
    if deadline == nil or trusted[getinfo(2, "f").func] then return end
    if expired or host_now() >= deadline then
        expired = true
        error(TIMEOUT, 0)
    end
end

-- The same check, called by the guards below before native work the hook cannot see.
local function check_deadline()
    if deadline ~= nil and (expired or host_now() >= deadline) then
        expired = true
        error(TIMEOUT, 0)
    end
end

-- Once expired, any error caught by user code becomes the timeout again, so neither a
-- loop around pcall nor a message handler that fails can swallow it.
local function rethrow_timeout(ok, ...)
    if not ok and expired then error(TIMEOUT, 0) end
    return ok, ...
end

local function safe_pcall(f, ...) return rethrow_timeout(pcall(f, ...)) end
local function safe_xpcall(f, handler, ...)
    if type(handler) ~= "function" then error("bad argument #2 to 'xpcall' (function expected)", 2) end
    local function guarded_handler(err)
        if expired then return TIMEOUT end  -- do not run user code once the time is up
        return handler(err)
    end
    return rethrow_timeout(xpcall(f, guarded_handler, ...))
end

-- Hooks are per coroutine: arm every coroutine the user resumes while a deadline runs.
local function resume(co, ...)
    if deadline ~= nil then sethook(co, hook, "", hook_count) end
    return rethrow_timeout(co_resume(co, ...))
end

local function wrap(f)
    local co = co_create(f)
    return function(...)
        local results = pack(resume(co, ...))
        if results[1] then return unpack(results, 2, results.n) end
        error(results[2], 0)
    end
end

-- Closing runs the coroutine's pending __close handlers in the coroutine itself.
local function close(co)
    if deadline ~= nil and type(co) == "thread" then sethook(co, hook, "", hook_count) end
    return rethrow_timeout(co_close(co))
end

-- the sandbox ------------------------------------------------------------------------

local function copy(t, without)
    local out = {}
    for k, v in pairs(t) do
        if k ~= without then out[k] = v end
    end
    return out
end

local env = {}
for _, name in ipairs({"assert", "error", "getmetatable", "ipairs", "next", "pairs", "rawequal",
                       "rawget", "rawlen", "rawset", "select", "setmetatable", "tonumber",
                       "tostring", "type", "_VERSION"}) do
    env[name] = _G[name]
end
env.string = copy(string, "dump")
env.table = copy(table)
env.math = copy(math)
env.utf8 = copy(utf8)
env.os = {time = os.time, clock = os.clock, date = os.date, difftime = os.difftime}
env.coroutine = copy(coroutine)
env.coroutine.resume = resume
env.coroutine.wrap = wrap
env.coroutine.close = close
env.pcall = safe_pcall
env.xpcall = safe_xpcall
env.print = print
env.queue, env.errors, env.logger = queue, errors, logger
env._G = env

local raw_collect = collectgarbage
local COLLECT_OPTIONS = {collect = true, count = true, step = true, isrunning = true}
env.collectgarbage = function(opt, ...)
    opt = opt or "collect"
    if not COLLECT_OPTIONS[opt] then
        error("collectgarbage: option '" .. tostring(opt) .. "' is not allowed", 2)
    end
    return raw_collect(opt, ...)
end

-- Text chunks only (no bytecode), and the sandbox unless another table is given. The
-- parser runs without hooks: a long chunk is fed in pieces, with a deadline check
-- before each; and the timeout, raised in a reader function, is not returned as an error.
local LOAD_PIECE = 1 << 20
local raw_sub, raw_find = string.sub, string.find
env.load = function(chunk, chunkname, _mode, chunk_env)
    local reader = chunk
    local named = chunkname == nil or type(chunkname) == "string"
    if type(chunk) == "string" and #chunk > LOAD_PIECE and named then
        local at = 1
        reader = function()
            check_deadline()
            local piece = raw_sub(chunk, at, at + LOAD_PIECE - 1)
            at = at + LOAD_PIECE
            return piece
        end
        chunkname = chunkname or chunk
    end
    local fn, err = raw_load(reader, chunkname, "t", chunk_env or env)
    if fn == nil and expired then error(TIMEOUT, 0) end
    return fn, err
end

-- native work the hook cannot see ------------------------------------------------------
-- The deadline hook runs between VM instructions; C library functions run unobserved.
-- Those whose work is not bounded by the memory limit are guarded here. A guard calls
-- the native function in a tail call when it cannot fail; otherwise protected, so that
-- its errors can be raised as the user's own call would have raised them (a native
-- function called from a guard would name the guard's line and local names).

local raw_match = string.match

-- Raises `err`, from a native function called protected by the guard described by
-- `info` (debug.getinfo "n" of the guard, or nil when it was tail-called), with the
-- position of the guard's caller when the native function raised it itself: argument
-- errors (numbered and named as for the caller), and the messages `own` recognises.
-- Must be tail-called by the guard.
local function native_error(info, public, own, err)
    if type(err) == "string" then
        local number, why = raw_match(err, "^bad argument #(%d+) to '[^']*' %((.*)%)$")
        if number ~= nil then
            local name, arg = info and info.name or public, tointeger(number)
            if info and info.namewhat == "method" then
                arg = arg - 1
                if arg == 0 then error("calling '" .. name .. "' on bad self (" .. why .. ")", 2) end
            end
            error("bad argument #" .. arg .. " to '" .. name .. "' (" .. why .. ")", 2)
        end
        if own ~= nil and own(err) then error(err, 2) end
    end
    error(err, 0)
end

-- Lua 5.4 marks a table for finalization when its metatable has `__gc` at this point
-- (even `false`, replaced later). Finalizers run with hooks off, so none may exist.
local function protected_metatable(t)
    local mt = raw_getmetatable(t)
    return mt ~= nil and rawget(mt, "__metatable") ~= nil
end

local function own_setmetatable(err) return err == "cannot change a protected metatable" end

env.setmetatable = function(...)
    local t, mt = ...
    local mt_type = type(mt)
    if mt_type == "table" and rawget(mt, "__gc") ~= nil then
        error("__gc finalizers are not allowed in conveyor functions", 2)
    end
    if type(t) ~= "table" or (mt_type ~= "table" and mt_type ~= "nil") or select("#", ...) < 2
            or protected_metatable(t) then
        local ok, err = pcall(setmetatable, ...)
        if ok then return err end
        return native_error(getinfo(1, "n"), "setmetatable", own_setmetatable, err)
    end
    return setmetatable(t, mt)
end

local guard = raw_load(patterns_chunk, "=conveyor.patterns", "b")(
    string, check_deadline, native_error, getinfo, pattern_budget, pattern_check)
env.string.find, env.string.match = guard.find, guard.match
env.string.gmatch, env.string.gsub = guard.gmatch, guard.gsub

local function int_arg(v)
    local t = type(v)
    if t == "number" or t == "string" then return tointeger(v) end
    return nil
end

local function text_arg(v)
    local t = type(v)
    if t == "string" then return v end
    if t == "number" then return tostring(v) end
    return nil
end

-- string.rep of empty strings loops `n` times producing nothing (2^63 times at most).
local raw_rep = string.rep
local BIG_STRING = 1 << 20
env.string.rep = function(...)
    local s, n, sep = ...
    local a, count, b = text_arg(s), int_arg(n), sep == nil and "" or text_arg(sep)
    if a == nil or count == nil or b == nil then
        local ok, err = pcall(raw_rep, ...)
        if ok then return err end
        return native_error(getinfo(1, "n"), "string.rep", nil, err)
    end
    if count > 0 then
        local unit = #a + #b
        if unit == 0 then return "" end
        if unit * count > BIG_STRING then check_deadline() end
    end
    return raw_rep(s, n, sep)  -- only "resulting string too large" and memory errors: no position
end

local raw_move, raw_insert, raw_remove = table.move, table.insert, table.remove
local raw_sort, raw_concat = table.sort, table.concat
local CHUNK = 4096

local function own_table(err)
    return err == "wrong number of arguments to 'insert'" or err == "invalid order function for sorting"
        or err == "object length is not an integer"
        or raw_find(err, "^invalid value [^\n]* in table for 'concat'$") ~= nil
end

-- table.move loops over the whole range even where there are only nils (no memory is
-- used): large ranges run in pieces, in the native order, with a deadline check each.
local function chunked_move(a1, f, e, t, dest)
    local last = e - f  -- offsets 0..last
    if t > e or t <= f or not rawequal(a1, dest) and a1 ~= dest then
        for from = 0, last, CHUNK do
            check_deadline()
            raw_move(a1, f + from, f + min(from + CHUNK - 1, last), t + from, dest)
        end
    else  -- overlapping, moving up: last piece first
        for to = last, 0, -CHUNK do
            check_deadline()
            local from = to - CHUNK + 1
            if from < 0 then from = 0 end
            raw_move(a1, f + from, f + to, t + from, dest)
        end
    end
    return dest
end

env.table.move = function(...)
    local a1, f, e, t, a2 = ...
    local fi, ei, ti = int_arg(f), int_arg(e), int_arg(t)
    if type(a1) == "table" and (a2 == nil or type(a2) == "table") and fi ~= nil and ei ~= nil
            and ti ~= nil then
        if ei < fi then return a2 == nil and a1 or a2 end  -- nothing to move
        if (fi > 0 or ei < maxinteger + fi) and ti <= maxinteger - (ei - fi) then
            if ei - fi < CHUNK then return (raw_move(a1, fi, ei, ti, a2)) end
            return chunked_move(a1, fi, ei, ti, a2 == nil and a1 or a2)
        end
    end
    local ok, result = pcall(raw_move, ...)
    if ok then return result end
    return native_error(getinfo(1, "n"), "table.move", own_table, result)
end

-- Positional insert and remove shift every element up to #t: with a `__len` metamethod
-- that length is anything. Same accesses, in the same order, through the move above.
local function has_len(t)
    local mt = raw_getmetatable(t)
    return mt ~= nil and rawget(mt, "__len") ~= nil
end

local function length(t)  -- luaL_len
    local n = int_arg(#t)
    if n == nil then error("object length is not an integer", 3) end
    return n
end

env.table.insert = function(t, ...)
    local count = select("#", ...)
    if type(t) == "table" and (count == 1 or count == 2) then
        if count == 1 then return raw_insert(t, ...) end
        local pos, value = ...
        local p = int_arg(pos)
        if p ~= nil then
            if not has_len(t) then
                if ult(p - 1, rawlen(t) + 1) then return raw_insert(t, pos, value) end
            else
                local e = length(t) + 1
                if ult(p - 1, e) then
                    if p < e then chunked_move(t, p, e - 1, p + 1, t) end
                    t[p] = value
                    return
                end
            end
        end
    end
    local ok, err = pcall(raw_insert, t, ...)
    if ok then return end
    return native_error(getinfo(1, "n"), "table.insert", own_table, err)
end

env.table.remove = function(t, ...)
    if type(t) == "table" then
        local size = has_len(t) and length(t) or rawlen(t)
        local pos = size
        if select("#", ...) > 0 and (...) ~= nil then pos = int_arg((...)) end
        if pos ~= nil and (pos == size or ult(pos - 1, size) or pos - 1 == size) then
            if not has_len(t) then return raw_remove(t, pos) end
            local result = t[pos]
            if pos < size then
                chunked_move(t, pos + 1, size, pos, t)
                pos = size
            end
            t[pos] = nil
            return result
        end
    end
    local ok, err = pcall(raw_remove, t, ...)
    if ok then return err end
    return native_error(getinfo(1, "n"), "table.remove", own_table, err)
end

-- Sorting compares in C; with a metatable (any length) or a long array, every
-- comparison goes through a Lua function so that the hook sees it.
local SORT_NATIVE = 50000
local function less(a, b) return a < b end
local LESS_WHERE = "conveyor:" .. getinfo(less, "S").linedefined .. ": "

env.table.sort = function(...)
    local t, comp = ...
    local order = comp
    if type(t) == "table" and (comp == nil or type(comp) == "function")
            and (raw_getmetatable(t) ~= nil or rawlen(t) > SORT_NATIVE) then
        order = less
        if comp ~= nil then order = function(a, b) return comp(a, b) end end
    end
    local ok, err
    if order == comp then ok, err = pcall(raw_sort, ...) else ok, err = pcall(raw_sort, t, order) end
    if ok then return end
    if type(err) == "string" and raw_sub(err, 1, #LESS_WHERE) == LESS_WHERE then
        err = raw_sub(err, #LESS_WHERE + 1)  -- raised by `less`: no position, as in C
    end
    return native_error(getinfo(1, "n"), "table.sort", own_table, err)
end

-- table.concat over a table with a metatable: elements may come from a C `__index`
-- (endless, like `tostring`): large ranges are joined in pieces.
local function concat_pieces(t, s, first, last)
    local parts, n = {}, 0
    for from = first, last, CHUNK do
        check_deadline()
        local ok, part = pcall(raw_concat, t, s, from, min(from + CHUNK - 1, last))
        if not ok then error(part, 0) end  -- as raised in C: no position
        n = n + 1
        parts[n] = part
    end
    return raw_concat(parts, s, 1, n)
end

env.table.concat = function(...)
    local t, sep, i, j = ...
    local ok, result
    local s, first = sep == nil and "" or text_arg(sep), i == nil and 1 or int_arg(i)
    if type(t) == "table" and raw_getmetatable(t) ~= nil and s ~= nil and first ~= nil
            and (j == nil or int_arg(j) ~= nil) then
        local last = j == nil and length(t) or int_arg(j)  -- __len runs once
        if last >= first and last - first >= CHUNK then
            ok, result = pcall(concat_pieces, t, s, first, last)
        else
            ok, result = pcall(raw_concat, t, s, first, last)
        end
    else
        ok, result = pcall(raw_concat, ...)
    end
    if ok then return result end
    return native_error(getinfo(1, "n"), "table.concat", own_table, result)
end

-- Strings index the sandbox's own `string` table, and their metatable is hidden.
string_metatable.__index = env.string
string_metatable.__metatable = false

local builtin = {queue = queue, errors = errors, logger = logger}
local loaded = {}
local LOADING = {}

env.require = function(name)
    if type(name) ~= "string" then error("bad argument #1 to 'require' (string expected)", 2) end
    local found = builtin[name] or loaded[name]
    if rawequal(found, LOADING) then error("loop in require: module '" .. name .. "'", 2) end
    if found ~= nil then return found end
    local ok, source, chunkname_or_message = host_module(name)
    if not ok then error(chunkname_or_message, 2) end
    local chunk, err = raw_load(source, chunkname_or_message, "t", env)
    if chunk == nil then error(err, 2) end
    loaded[name] = LOADING
    local call_ok, result = pcall(chunk, name)
    if not call_ok then loaded[name] = nil; error(result, 0) end
    if result == nil then result = true end
    loaded[name] = result
    return result
end

-- entry points for Python ------------------------------------------------------------

local FailureMT = {}
local function on_error(err)
    if expired or rawequal(err, TIMEOUT) then return TIMEOUT end
    return setmetatable({err, traceback(nil, 2)}, FailureMT)
end

local function describe_value(value)
    if type(value) == "string" then return value end
    local ok, text = pcall(tostring, value)  -- may run a user __tostring: still under the deadline
    if ok and type(text) == "string" then return text end
    return "(a " .. type(value) .. " value)"
end

-- How a call ended, as (status, kind, message, retryable hint, traceback); the hint is
-- nil when nobody said whether the failure is worth retrying.
local function describe(err, raised)
    local trace = nil
    if raw_getmetatable(err) == FailureMT then err, trace = err[1], err[2] end
    local fields = error_fields[err]
    if fields ~= nil then
        return "error", fields.kind, fields.message, fields.hint, trace
    end
    return "error", raised and "INTERNAL" or "UNKNOWN", describe_value(err), nil, trace
end

local function outcome(results)
    if not results[1] then return describe(results[2], true) end
    if results[2] == nil and results[3] ~= nil then return describe(results[3], false) end
    return "ok", results[2]
end

local function invoke(fn, call_deadline, ...)
    deadline, expired = call_deadline, false
    if call_deadline ~= nil then sethook(hook, "", hook_count) end
    local results = pack(xpcall(fn, on_error, ...))
    local described = pack(pcall(outcome, results))
    local timed_out = expired
    deadline, expired = nil, false
    if call_deadline ~= nil then sethook() end
    if timed_out then return "error", "TIMEOUT", "Lua code exceeded its deadline", true, nil end
    if described[1] then return unpack(described, 2, described.n) end
    local why = "could not describe the Lua error: " .. describe_value(described[2])
    return "error", "INTERNAL", why, nil, nil
end

for _, fn in ipairs({invoke, on_error, outcome, describe, describe_value, rethrow_timeout}) do
    trusted[fn] = true
end

local function compile(source, chunkname)
    return raw_load(source, chunkname, "t", env)
end

local function new_array() return setmetatable({}, ArrayMT) end

-- Always four values (lupa then always hands Python a tuple): kind and error fields.
local function meta_kind(t)
    local mt = raw_getmetatable(t)
    if mt == ArrayMT then return "array", nil, nil, nil end
    if mt == MessageMT then return "message", nil, nil, nil end
    local fields = error_fields[t]
    if fields ~= nil then return "error", fields.kind, fields.message, fields.retryable end
    return "table", nil, nil, nil
end

return {env = env, invoke = invoke, compile = compile, new_array = new_array, meta_kind = meta_kind,
        lua_patterns = guard.lua}
"""
