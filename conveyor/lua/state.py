"""One sandboxed Lua 5.4 state with a user chunk loaded and its entry point resolved.

A ``LuaState`` is not thread-safe (neither is a ``lupa.LuaRuntime``): each thread
gets its own (see :mod:`conveyor.lua.function`).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, NoReturn

import lupa.lua54 as lupa

from conveyor import errors
from conveyor.lua.convert import Converter
from conveyor.lua.host import Host, ModuleFiles
from conveyor.lua.patterns import BUDGET, CHECK, PATTERNS
from conveyor.lua.prelude import HOOK_INSTRUCTIONS, PRELUDE

__all__ = ["LOAD_TIMEOUT", "MAX_MEMORY", "LuaState"]

MAX_MEMORY = 256 * 1024 * 1024  # bytes per Lua state; beyond it allocations fail ("not enough memory")
LOAD_TIMEOUT = 5.0  # seconds a chunk's top-level code may run when it is loaded


def _deny_attribute(obj: Any, name: Any, value: Any = None) -> NoReturn:
    # Defence in depth: Lua code never holds a Python object, but if one leaked it
    # still could not reach `__class__`, `__globals__` and the like.
    raise AttributeError("Python attributes are not accessible from Lua")


def _new_runtime() -> Any:
    return lupa.LuaRuntime(
        encoding=None,
        register_eval=False,
        register_builtins=False,
        unpack_returned_tuples=True,
        attribute_handlers=(_deny_attribute, _deny_attribute),
        max_memory=MAX_MEMORY,
    )


@functools.cache
def _bytecode(source: str, chunkname: str) -> bytes:
    """Trusted Lua code (the prelude, the pattern guard) compiled once per process: loading
    bytecode is about ten times faster than compiling the text again in every state."""
    lua = lupa.LuaRuntime(encoding=None, register_eval=False, register_builtins=False)
    dump = lua.eval("function(source, name) return string.dump(assert(load(source, name, 't'))) end")
    chunk: bytes = dump(source.encode(), chunkname.encode())
    return chunk


class LuaState:
    """A Lua state running ``source``; :meth:`call` invokes its entry point."""

    def __init__(
        self,
        source: bytes,
        chunkname: str,
        method: str | None,
        modules: ModuleFiles,
        log: logging.Logger,
    ) -> None:
        self.log = log
        self.lua = _new_runtime()
        host = Host(modules, log)
        prelude = self.lua.execute(
            _bytecode(PRELUDE, "=conveyor"),
            *host.callables(),
            time.monotonic,
            HOOK_INSTRUCTIONS,
            _bytecode(PATTERNS, "=conveyor.patterns"),
            BUDGET,
            CHECK,
            name="=conveyor",
            mode="b",
        )
        self.converter = host.converter = Converter(self.lua.table_from, prelude.new_array, prelude.meta_kind)
        self._invoke = prelude.invoke
        self.env = prelude.env
        self.lua_patterns = prelude.lua_patterns  # the pattern matcher in Lua (tests compare it)
        self.entry = self._load(prelude, source, chunkname, method)

    def _load(self, prelude: Any, source: bytes, chunkname: str, method: str | None) -> Any:
        """Compile and run the chunk once, then find the entry point (INVALID otherwise)."""
        compiled = prelude.compile(source, chunkname.encode())
        if isinstance(compiled, tuple):  # nil, message
            raise errors.invalid(_text(compiled[1]))
        status, *rest = self._invoke(compiled, time.monotonic() + LOAD_TIMEOUT)
        if status != b"ok":
            raise errors.invalid(f"running the file failed: {_text(rest[1])}")
        return self._entry(rest[0], method)

    def _entry(self, returned: Any, method: str | None) -> Any:
        """``method`` (default ``main``) of the returned table, else the global; or the returned function."""
        name = (method or "main").encode()
        if method is None and lupa.lua_type(returned) == "function":
            return returned
        for scope in (returned, self.env):
            if lupa.lua_type(scope) == "table" and lupa.lua_type(scope[name]) == "function":
                return scope[name]
        if method is None:
            raise errors.invalid(
                "no entry point: the file must return a function or a table with `main`, "
                "or define a global function `main` (or set `method:`)"
            )
        raise errors.invalid(
            f"no function {method!r}: neither a field of the table the file returns nor a global"
        )

    def call(self, args: tuple[Any, ...], deadline: float | None) -> Any:
        """Run the entry point with ``args``; its first result, or ``errors.Error``."""
        converter = self.converter
        try:
            lua_args = [converter.to_lua(arg, f"argument {i + 1}") for i, arg in enumerate(args)]
            result = self._invoke(self.entry, deadline, *lua_args)
        except lupa.LuaError as exc:  # outside user code: building arguments or the prelude ran out of memory
            raise errors.Error(errors.INTERNAL, f"Lua failed: {exc or type(exc).__name__}") from None
        if result[0] == b"ok":
            try:
                return converter.from_lua(result[1], "return value")
            except errors.Error as exc:
                # The code is wrong, not the message: leave retryable unsaid (a consumer
                # retries it, so the message survives until the function is fixed).
                raise errors.Error(exc.kind, exc.message, details=exc.details) from None
        self._fail(*result[1:])

    def _fail(self, kind: bytes, message: Any, retryable: bool | None, trace: Any) -> NoReturn:
        text = _text(message)
        details: dict[str, Any] = {}
        if trace is not None:
            details["lua_traceback"] = _user_frames(_text(trace))
            self.log.debug("Lua error: %s\n%s", text, details["lua_traceback"])
        hint = None if retryable is None else bool(retryable)
        raise errors.Error(kind.decode(), text, retryable=hint, details=details)


def _user_frames(trace: str) -> str:
    """The traceback without the prelude's frames (from its ``xpcall`` down)."""
    lines = trace.splitlines()
    for index, line in enumerate(lines):
        if line.strip() == "[C]: in function 'xpcall'":
            lines = lines[:index]
            break
    return "\n".join(lines)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)
