"""The kind table: every driver conveyor knows, one row each.

A row names the entry kind, the client-free module that declares the driver's
option records (``SCHEMA``), the class that implements it and the pip extra that
installs its client library. The loader reads the option records from here; the
app looks driver classes up here. Driver modules are imported only when an app
uses them, so loading a configuration never imports a broker client.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from conveyor import errors
from conveyor.registry.options import DriverSchema

if TYPE_CHECKING:
    from conveyor.drivers.base import Driver

__all__ = ["KINDS", "DriverKind", "driver_class", "kinds", "lookup", "schema"]


@dataclass(frozen=True, slots=True)
class DriverKind:
    kind: str  # the entry kind: queue.driver.<name>
    options: str  # module with the driver's option records, as SCHEMA
    driver: str  # "module:Class" of the implementation
    extra: str | None = None  # the pip extra that installs its client library


KINDS: tuple[DriverKind, ...] = (
    DriverKind(
        "queue.driver.memory", "conveyor.drivers.options.memory", "conveyor.drivers.memory:MemoryDriver"
    ),
    DriverKind(
        "queue.driver.sqlite", "conveyor.drivers.options.sqlite", "conveyor.drivers.sqlite:SqliteDriver"
    ),
    DriverKind(
        "queue.driver.amqp", "conveyor.drivers.options.amqp", "conveyor.drivers.amqp:AmqpDriver", "amqp"
    ),
)


def lookup(kind: str) -> DriverKind:
    """The row of ``kind``; INVALID for a kind no row names."""
    for row in KINDS:
        if row.kind == kind:
            return row
    raise errors.invalid(f"unknown driver kind {kind!r}", kind=kind)


def kinds() -> tuple[str, ...]:
    """The entry kinds of every driver, in the table's order."""
    return tuple(row.kind for row in KINDS)


def schema(kind: str) -> DriverSchema[Any, Any, Any]:
    """The option records of ``kind`` (its options module imports no client library)."""
    return _schema(lookup(kind).options)


@cache
def _schema(module: str) -> DriverSchema[Any, Any, Any]:
    found = getattr(importlib.import_module(module), "SCHEMA", None)
    if not isinstance(found, DriverSchema):
        raise errors.invalid(f"{module} has no DriverSchema named SCHEMA")
    return found


def driver_class(kind: str) -> type[Driver]:
    """The class implementing ``kind``, imported now; INVALID naming the missing package."""
    row = lookup(kind)
    module_name, _, class_name = row.driver.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise errors.invalid(
                f"driver {kind} is not available in this version of conveyor "
                f"(module {module_name} is missing)",
                kind=kind,
            ) from None
        hint = f"; install it with: pip install 'conveyor[{row.extra}]'" if row.extra else ""
        raise errors.invalid(
            f"driver {kind} needs the Python package {exc.name!r}{hint}", kind=kind, missing=exc.name
        ) from None
    cls: type[Driver] = getattr(module, class_name)
    return cls
