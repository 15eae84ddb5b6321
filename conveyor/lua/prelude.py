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
- ``meta_kind(t)``: what an empty table really is (array, error object, message).

Every host callable returns ``true, value`` or ``false, kind, message, retryable``;
``settle`` turns the latter into ``nil, err`` for the Lua caller.
"""

from __future__ import annotations

__all__ = ["HOOK_INSTRUCTIONS", "PRELUDE"]

# A deadline check runs every this many VM instructions. At ~100-300 M instructions/s
# that is every 0.05-0.2 ms: timeouts are precise and the Python call stays cheap.
# (Most of an armed hook's cost is Lua 5.4 testing for it on every instruction,
# whatever this count: see "Limits" in docs/lua.md.)
HOOK_INSTRUCTIONS = 20_000

PRELUDE = r"""
local host_publish, host_message, host_info, host_msg, host_log, host_module, host_now, hook_count = ...

local type, select, error, tostring = type, select, error, tostring
local pairs, ipairs, rawequal = pairs, ipairs, rawequal
local setmetatable, pcall, xpcall, raw_load = setmetatable, pcall, xpcall, load
local pack, unpack, concat = table.pack, table.unpack, table.concat
local sethook, traceback, raw_getmetatable = debug.sethook, debug.traceback, debug.getmetatable
local co_create, co_resume = coroutine.create, coroutine.resume
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
    error_fields[err] = {kind = kind, message = message, retryable = retryable == true}
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

-- Text chunks only (no bytecode), and the sandbox unless another table is given.
env.load = function(chunk, chunkname, _mode, chunk_env)
    return raw_load(chunk, chunkname, "t", chunk_env or env)
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

-- How a call ended, as (status, kind, message, retryable, traceback).
local function describe(err, raised)
    local trace = nil
    if raw_getmetatable(err) == FailureMT then err, trace = err[1], err[2] end
    local fields = error_fields[err]
    if fields ~= nil then
        return "error", fields.kind, fields.message, fields.retryable, trace
    end
    return "error", raised and "INTERNAL" or "UNKNOWN", describe_value(err), false, trace
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
    if timed_out then return "error", "TIMEOUT", "Lua code exceeded its deadline", false, nil end
    if described[1] then return unpack(described, 2, described.n) end
    local why = "could not describe the Lua error: " .. describe_value(described[2])
    return "error", "INTERNAL", why, false, nil
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

return {env = env, invoke = invoke, compile = compile, new_array = new_array, meta_kind = meta_kind}
"""
