"""Driver entries and the ``driver_options`` bags of queues and consumers.

The loader knows no driver: every driver-specific field, default and rule lives in
the driver's option records (``conveyor/drivers/options/<name>.py``), found through
the kind table (:mod:`conveyor.drivers.kinds`). A ``queue.driver.*`` entry is read
into its driver's record; ``driver_options.<name>`` on a queue or a consumer is read
into that driver's queue or consumer record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from conveyor.drivers.kinds import kinds, schema
from conveyor.registry.convert import choice, duration
from conveyor.registry.loader.fields import Fields
from conveyor.registry.model import DriverSpec
from conveyor.registry.options import Options, read_options

__all__ = ["STARTUP_TIMEOUT", "consumer_bags", "driver_parsers", "queue_bags", "startup_fields"]

STARTUP_TIMEOUT = 30.0  # seconds a required part may take to come up (retryable failures)


def startup_fields(f: Fields | None) -> tuple[str, float]:
    """``lifecycle.startup`` (required | optional) and ``lifecycle.startup_timeout``."""
    if f is None:
        return "required", STARTUP_TIMEOUT
    return (
        f.get("startup", choice("required", "optional"), "required"),
        f.get("startup_timeout", duration(), STARTUP_TIMEOUT),
    )


def driver_parsers() -> dict[str, Callable[[Fields], DriverSpec | None]]:
    """One parser per driver kind, for the entry dispatch."""
    return {kind: _driver_parser(kind) for kind in kinds()}


def _driver_parser(kind: str) -> Callable[[Fields], DriverSpec | None]:
    def parse(f: Fields) -> DriverSpec | None:
        """The entry read into its driver's record; None once a problem was reported."""
        startup, startup_timeout = startup_fields(f.sub("lifecycle"))
        options = read_options(schema(kind).driver, f)
        if options is None:
            return None
        return DriverSpec(
            id=f.scope.entry_id,
            kind=kind,
            options=options,
            startup=startup,
            startup_timeout=startup_timeout,
            origin=f.scope.origin,
        )

    return parse


def queue_bags(f: Fields | None) -> dict[str, Options]:
    """A queue's ``driver_options``: every driver's bag may be written."""
    schemas = [schema(kind) for kind in kinds()]
    return _bags(f, [(s.name, s.queue) for s in schemas])


def consumer_bags(f: Fields | None) -> dict[str, Options]:
    """A consumer's ``driver_options``: only drivers with consumer options have a bag
    (for the others, ``driver_options.<name>`` is an unknown field)."""
    schemas = [schema(kind) for kind in kinds()]
    return _bags(f, [(s.name, s.consumer) for s in schemas if s.consumer is not None])


def _bags(f: Fields | None, records: Iterable[tuple[str, type[Options]]]) -> dict[str, Options]:
    """The bags written under ``f``, each read into its record; bags with a problem are left out."""
    if f is None:
        return {}
    bags: dict[str, Options] = {}
    for name, record_type in records:
        bag = f.sub(name)
        if bag is None:
            continue
        record = read_options(record_type, bag)
        if record is not None:
            bags[name] = record
    return bags
