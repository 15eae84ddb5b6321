"""The callables behind function entries and consumer handlers.

:class:`Functions` resolves them for one app, once each: a ``function.python`` entry
or a consumer's ``handler:`` by importing ``package.module:callable`` (the declaring
YAML file's directory is searched too), a ``function.lua`` entry or a consumer's
``method:`` in a Lua ``source:`` through :mod:`conveyor.lua`, imported only then.

Resolving raises INVALID whose message says what failed ("cannot import module
'x': ..."), not where: the caller knows the entry and the field, and says so — as a
:class:`~conveyor.registry.problems.Problem` (start-time checks) or by
:func:`located` (prefixing the entry's origin).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from conveyor import errors
from conveyor.registry.model import ConsumerSpec, FunctionSpec, Registry
from conveyor.registry.problems import Origin, Problem

__all__ = ["Functions", "handler_field", "import_callable", "located", "resolve_function"]


def located(origin: Origin, exc: errors.Error) -> errors.Error:
    """``exc`` with its message prefixed by where the entry was declared."""
    if not str(origin):
        return exc
    return errors.Error(exc.kind, f"{origin}: {exc.message}", retryable=exc.retryable, details=exc.details)


def import_callable(source: str, base_dir: Path | None = None) -> Callable[..., Any]:
    """Import ``package.module:attr.path``; the declaring YAML's directory is searched too."""
    module_name, _, attr_path = source.partition(":")
    if not module_name or not attr_path:
        raise errors.invalid(f"python source {source!r} is not 'package.module:callable'")
    if base_dir is not None and str(base_dir) not in sys.path:
        sys.path.append(str(base_dir))
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise errors.invalid(f"cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:
        raise errors.invalid(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise errors.invalid(f"{module_name!r} has no attribute {attr_path!r}") from None
    if not callable(target):
        raise errors.invalid(f"{source!r} is not callable")
    return target  # type: ignore[no-any-return]


def resolve_function(spec: FunctionSpec) -> Callable[..., Any]:
    """The callable behind a function entry (Python, or Lua through ``conveyor.lua``)."""
    if spec.kind == "function.python":
        return import_callable(spec.source, spec.base_dir)
    if spec.kind == "function.lua":
        try:
            lua = importlib.import_module("conveyor.lua")
        except ModuleNotFoundError as exc:
            if exc.name == "conveyor.lua":
                raise errors.invalid(
                    "function.lua entries are not supported by this version of conveyor yet "
                    "(module conveyor.lua is missing)"
                ) from None
            raise errors.invalid(
                f"Lua functions need the package {exc.name!r}; install it with: pip install 'conveyor[lua]'"
            ) from None
        fn: Callable[..., Any] = lua.load_function(spec)
        return fn
    raise errors.invalid(f"unknown function kind {spec.kind!r}")


def handler_field(spec: ConsumerSpec) -> str:
    """The field that names a consumer's handler: ``func``, ``handler`` or ``method``."""
    return "func" if spec.func else "handler" if spec.handler else "method"


class Functions:
    """The function entries and consumer handlers of one app, each resolved once."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._resolved: dict[str, Callable[..., Any]] = {}

    def function(self, func_id: str) -> Callable[..., Any]:
        """The callable of function entry ``func_id``; NOT_FOUND, or INVALID naming the entry."""
        fn = self._resolved.get(func_id)
        if fn is None:
            try:
                spec = self.registry.functions[func_id]
            except KeyError:
                raise errors.not_found(f"function {func_id} is not declared", function=func_id) from None
            try:
                fn = self._resolved[func_id] = resolve_function(spec)
            except errors.Error as exc:
                raise located(spec.origin, exc) from None
        return fn

    def handler(self, spec: ConsumerSpec) -> Callable[[Any], Any]:
        """The handler of consumer ``spec``; INVALID naming the consumer if it cannot resolve."""
        if spec.func is not None:
            return self.function(spec.func)
        try:
            return self._own_handler(spec)
        except errors.Error as exc:
            raise located(spec.origin, exc) from None

    def _own_handler(self, spec: ConsumerSpec) -> Callable[[Any], Any]:
        if spec.handler is not None:
            return import_callable(spec.handler, spec.base_dir)
        if spec.method is not None and spec.lua_source is not None:
            lua_spec = FunctionSpec(
                id=spec.id,
                kind="function.lua",
                source=str(spec.lua_source),
                method=spec.method,
                base_dir=spec.base_dir or spec.lua_source.parent,  # require() looks next to the YAML
                origin=spec.origin,
            )
            return resolve_function(lua_spec)
        raise errors.invalid("consumer has no handler")

    def problems(self, consumers: list[ConsumerSpec]) -> list[Problem]:
        """What would fail to resolve: the handlers of ``consumers`` and ``on_start`` functions."""
        found: list[Problem] = []
        for spec in consumers:
            resolve = partial(self._bare_handler, spec)
            found += self._check(spec.origin, spec.id, handler_field(spec), resolve)
        for fspec in self.registry.functions.values():
            if fspec.on_start:
                found += self._check(fspec.origin, fspec.id, "source", partial(resolve_function, fspec))
        return found

    def _bare_handler(self, spec: ConsumerSpec) -> Callable[..., Any]:
        """Like :meth:`handler`, but the consumer's own errors not located (a Problem says
        where); a failing function entry still names itself, being declared elsewhere."""
        return self.function(spec.func) if spec.func is not None else self._own_handler(spec)

    @staticmethod
    def _check(origin: Origin, entry: str, field: str, resolve: Callable[[], Any]) -> list[Problem]:
        try:
            resolve()
        except errors.Error as exc:
            return [Problem(origin.file, entry, field, exc.message)]
        return []
