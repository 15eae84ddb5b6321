"""Driver lookup by entry kind. Driver modules are imported lazily, only when used."""

from __future__ import annotations

import importlib

from conveyor import errors
from conveyor.drivers.base import Driver
from conveyor.registry.model import DriverSpec

__all__ = ["DRIVER_KINDS", "create_driver", "driver_class"]

# kind -> (module, class, pip extra that provides its client library or None)
_DRIVERS: dict[str, tuple[str, str, str | None]] = {
    "queue.driver.memory": ("conveyor.drivers.memory", "MemoryDriver", None),
    "queue.driver.sqlite": ("conveyor.drivers.sqlite", "SqliteDriver", None),
    "queue.driver.amqp": ("conveyor.drivers.amqp", "AmqpDriver", "amqp"),
}

DRIVER_KINDS: frozenset[str] = frozenset(_DRIVERS)


def driver_class(kind: str) -> type[Driver]:
    try:
        module_name, class_name, extra = _DRIVERS[kind]
    except KeyError:
        raise errors.invalid(f"unknown driver kind {kind!r}", kind=kind) from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise errors.invalid(
                f"driver {kind} is not available in this version of conveyor "
                f"(module {module_name} is missing)",
                kind=kind,
            ) from None
        hint = f"; install it with: pip install 'conveyor[{extra}]'" if extra else ""
        raise errors.invalid(
            f"driver {kind} needs the Python package {exc.name!r}{hint}", kind=kind, missing=exc.name
        ) from None
    cls: type[Driver] = getattr(module, class_name)
    return cls


def create_driver(spec: DriverSpec) -> Driver:
    return driver_class(spec.kind)(spec)
