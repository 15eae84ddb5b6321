"""``function.python`` and ``function.lua`` entries, and ``file://`` Lua sources
(also used by a consumer's ``source:``)."""

from __future__ import annotations

from pathlib import Path

from conveyor.registry.convert import Marker, boolean, import_path, string
from conveyor.registry.loader.fields import Fields
from conveyor.registry.model import FunctionSpec

__all__ = ["FUNCTION_KINDS", "LUA_FUNCTION", "PYTHON_FUNCTION", "lua_file", "parse_lua", "parse_python"]

PYTHON_FUNCTION = "function.python"
LUA_FUNCTION = "function.lua"
FUNCTION_KINDS = (PYTHON_FUNCTION, LUA_FUNCTION)

_FILE_PREFIX = "file://"


def parse_python(f: Fields) -> FunctionSpec:
    lifecycle = f.sub("lifecycle")
    return FunctionSpec(
        id=f.scope.entry_id,
        kind=PYTHON_FUNCTION,
        source=f.need("source", import_path) or "",
        base_dir=f.scope.file.base_dir,
        on_start=lifecycle.get("on_start", boolean, False) if lifecycle else False,
        origin=f.scope.origin,
    )


def parse_lua(f: Fields) -> FunctionSpec:
    if f.raw("source") is Marker.ABSENT:
        f.report("required field is missing", "source")
    path = lua_file(f, "source")
    return FunctionSpec(
        id=f.scope.entry_id,
        kind=LUA_FUNCTION,
        source=str(path) if path is not None else "",
        method=f.get("method", string, None),
        base_dir=f.scope.file.base_dir,
        origin=f.scope.origin,
    )


def lua_file(f: Fields, key: str) -> Path | None:
    """A ``file://`` source, resolved against the YAML file's directory; it must exist."""
    text = f.get(key, string, None)
    if text is None:
        return None
    if not text.startswith(_FILE_PREFIX) or len(text) == len(_FILE_PREFIX):
        f.report(f"expected file://path.lua, got {text!r}", key)
        return None
    path = f.resolve(text[len(_FILE_PREFIX) :])
    if not path.is_file():
        f.report(f"Lua file {str(path)!r} does not exist", key)
    return path
