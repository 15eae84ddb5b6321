"""Lua functions (``function.lua`` entries) on an embedded Lua 5.4 engine (lupa).

``load_function(spec)`` returns a plain callable; :mod:`conveyor.functions` calls it
for every ``function.lua`` entry and for a consumer's ``method:`` found in a Lua
``source:`` file. The Lua side sees the queue module's API — ``queue``, ``errors``, ``logger``
— in a sandbox; see docs/lua.md for the reference.

Modules: ``prelude`` (the trusted Lua code that builds the sandbox), ``host`` (the
Python callables behind the Lua API), ``convert`` (data conversion both ways),
``state`` (one sandboxed Lua state) and ``function`` (the per-thread callable).
"""

from __future__ import annotations

from conveyor.lua.function import LuaFunction, load_function

__all__ = ["LuaFunction", "load_function"]
