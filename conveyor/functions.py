"""Resolving function entries and handler references into callables."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conveyor import errors
from conveyor.registry.model import FunctionSpec

__all__ = ["import_callable", "resolve_function"]


def import_callable(source: str, base_dir: Path | None = None, *, where: str = "") -> Callable[..., Any]:
    """Import ``package.module:attr.path``; the declaring YAML's directory is searched too."""
    module_name, _, attr_path = source.partition(":")
    if not module_name or not attr_path:
        raise errors.invalid(f"{where}: python source {source!r} is not 'package.module:callable'")
    if base_dir is not None and str(base_dir) not in sys.path:
        sys.path.append(str(base_dir))
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise errors.invalid(f"{where}: cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:
        raise errors.invalid(
            f"{where}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise errors.invalid(f"{where}: {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(target):
        raise errors.invalid(f"{where}: {source!r} is not callable")
    return target  # type: ignore[no-any-return]


def resolve_function(spec: FunctionSpec) -> Callable[..., Any]:
    """The callable behind a function entry (Python now; Lua through ``conveyor.lua``)."""
    if spec.kind == "function.python":
        return import_callable(spec.source, spec.base_dir, where=spec.where or spec.id)
    if spec.kind == "function.lua":
        try:
            lua = importlib.import_module("conveyor.lua")
        except ModuleNotFoundError as exc:
            if exc.name == "conveyor.lua":
                raise errors.invalid(
                    f"{spec.where or spec.id}: function.lua entries are not supported by this "
                    "version of conveyor yet (module conveyor.lua is missing)"
                ) from None
            raise errors.invalid(
                f"{spec.where or spec.id}: Lua functions need the package {exc.name!r}; "
                "install it with: pip install 'conveyor[lua]'"
            ) from None
        fn: Callable[..., Any] = lua.load_function(spec)
        return fn
    raise errors.invalid(f"unknown function kind {spec.kind!r}")
