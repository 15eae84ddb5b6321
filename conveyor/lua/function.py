"""``LuaFunction``: a ``function.lua`` entry as a plain (sync) Python callable.

Threading model: one Lua state per calling thread (``threading.local``), each loading
the file once. A consumer with ``concurrency: N`` runs its handler in N pool threads,
so N states run truly in parallel (lupa releases the GIL while Lua code runs), and no
two deliveries ever share a state at the same time. Lua globals therefore persist
between the deliveries handled by one thread, never across threads.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from conveyor import errors
from conveyor.lua.host import ModuleFiles
from conveyor.lua.state import LuaState
from conveyor.queue.context import deadline_var
from conveyor.registry.model import FunctionSpec

__all__ = ["LuaFunction", "load_function"]

_FILE_PREFIX = "file://"


def _source_path(spec: FunctionSpec) -> Path:
    """The Lua file of ``spec``: the loader gives an absolute path; ``file://`` is accepted too."""
    text = spec.source.removeprefix(_FILE_PREFIX)
    return (spec.base_dir / text).resolve()


def _chunkname(path: Path, base_dir: Path) -> str:
    """``@handlers.lua``: what Lua error messages and tracebacks show."""
    try:
        shown = path.relative_to(base_dir.resolve()).as_posix()
    except ValueError:
        shown = path.name
    return f"@{shown}"


class LuaFunction:
    """Calls the entry point of a Lua file: ``fn(*args)`` returns its first result.

    Arguments are converted to Lua and the result back (see
    :mod:`conveyor.lua.convert`). A Lua ``nil, err`` return or a Lua error raises
    :class:`errors.Error`. When the caller runs under a deadline
    (``conveyor.queue.context.deadline_var``, set by consumers with a ``timeout``), Lua
    code still running at that instant is stopped with a TIMEOUT error.
    """

    def __init__(self, spec: FunctionSpec) -> None:
        self.id = spec.id
        self.method = spec.method
        self.path = _source_path(spec)
        self._origin = spec.origin
        try:
            self._source = self.path.read_bytes()
        except OSError as exc:
            raise errors.invalid(f"cannot read Lua file {str(self.path)!r}: {exc}") from None
        self._chunkname = _chunkname(self.path, spec.base_dir)
        self._modules = ModuleFiles(spec.base_dir)
        self.log = logging.getLogger(f"conveyor.lua.{spec.id}")
        self._local = threading.local()
        # Load now, in the resolving thread: syntax errors and a missing entry point fail
        # at start, and the caller says which entry failed.
        self._local.state = self._new_state()

    def __repr__(self) -> str:
        return f"<LuaFunction {self.id} ({self.path.name}:{self.method or 'main'})>"

    def __call__(self, *args: Any) -> Any:
        return self._state().call(args, deadline_var.get())

    def _state(self) -> LuaState:
        state: LuaState | None = getattr(self._local, "state", None)
        if state is None:
            try:
                state = self._local.state = self._new_state()
            except errors.Error as exc:  # a later thread's state: no caller knows the entry
                where = str(self._origin) or self.id
                raise errors.invalid(f"{where}: {exc.message}") from None
        return state

    def _new_state(self) -> LuaState:
        try:
            return LuaState(self._source, self._chunkname, self.method, self._modules, self.log)
        except errors.Error as exc:
            raise errors.invalid(f"Lua file {str(self.path)!r}: {exc.message}") from None


def load_function(spec: FunctionSpec) -> LuaFunction:
    """The callable for a ``function.lua`` entry; INVALID if it cannot load (see docs/lua.md)."""
    return LuaFunction(spec)
