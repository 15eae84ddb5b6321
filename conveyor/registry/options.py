"""Typed option records: how a driver declares the fields it accepts, once.

A driver's options module (``conveyor/drivers/options/<name>.py``) declares frozen,
keyword-only dataclasses whose fields are made with :func:`option`: the converter
that checks the YAML value, the default (none: the field is required) and whether
the value is a file path. :func:`read_options` fills one record from an
:class:`OptionReader` — the loader's view of one YAML mapping — reporting every
problem with its file, entry, field and line, and :class:`DriverSchema` groups the
records of one driver: its entry's fields, its ``driver_options.<name>`` bag on
queues and (if it has one) on consumers.

Defaults live in the record and nowhere else: drivers read ``options.lease_duration``,
never ``options.get("lease_duration", 30.0)``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from conveyor import errors
from conveyor.registry.convert import Converter

__all__ = [
    "DriverSchema",
    "NoOptions",
    "OptionReader",
    "Options",
    "PathKind",
    "option",
    "read_options",
]

R = TypeVar("R", bound="Options")
D = TypeVar("D", bound="Options")
Q = TypeVar("Q", bound="Options")
C = TypeVar("C", bound="Options")


class PathKind(enum.Enum):
    """How a string field names a file: relative paths resolve next to the YAML file."""

    FILE = "file"
    FILE_OR_PEM = "file_or_pem"  # inline PEM text ("-----BEGIN ...") stays as written


class Options:
    """Base of option records (frozen, keyword-only dataclasses of :func:`option` fields)."""

    __slots__ = ()

    def problems(self) -> list[tuple[str, str]]:
        """Rules across fields, as ``(field, message)`` pairs; none by default."""
        return []


@dataclass(frozen=True, slots=True, kw_only=True)
class NoOptions(Options):
    """The record of a driver that takes no options."""


def option(
    convert: Converter[Any] | type[Options],
    default: Any = dataclasses.MISSING,
    *,
    path: PathKind | None = None,
) -> Any:
    """A record field: checked by ``convert``; required when it has no ``default``.

    A field whose ``convert`` is itself an :class:`Options` subclass is a nested
    mapping read into that record (``tls: {...}``).
    """
    metadata = {"convert": convert, "path": path}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class OptionReader(Protocol):
    """The loader's view of one YAML mapping (see ``conveyor/registry/loader/fields.py``).

    Reading a key makes it known; keys nobody reads are reported as unknown fields.
    Readers never raise: a bad value is reported and the default returned.
    """

    def get(self, key: str, convert: Converter[Any], default: Any) -> Any: ...

    def need(self, key: str, convert: Converter[Any]) -> Any: ...

    def sub(self, key: str) -> OptionReader | None: ...

    def resolve_path(self, text: str) -> str: ...

    def report(self, message: str, *keys: str | int) -> None: ...

    @property
    def problem_count(self) -> int: ...


def read_options(cls: type[R], reader: OptionReader) -> R | None:
    """The record ``cls`` read from ``reader``, or None once a problem was reported."""
    before = reader.problem_count
    values = {field.name: _read_field(field, reader) for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if reader.problem_count != before:
        return None
    record = cls(**values)
    for key, message in record.problems():
        reader.report(message, key)
    return None if reader.problem_count != before else record


def _read_field(field: dataclasses.Field[Any], reader: OptionReader) -> Any:
    convert = field.metadata["convert"]
    if isinstance(convert, type) and issubclass(convert, Options):
        sub = reader.sub(field.name)
        return None if sub is None else read_options(convert, sub)
    if field.default is dataclasses.MISSING:
        value = reader.need(field.name, convert)
    else:
        value = reader.get(field.name, convert, field.default)
    kind: PathKind | None = field.metadata["path"]
    if kind is None or not isinstance(value, str):
        return value
    if kind is PathKind.FILE_OR_PEM and "-----BEGIN" in value:
        return value
    return reader.resolve_path(value)


@dataclass(frozen=True, slots=True)
class DriverSchema(Generic[D, Q, C]):
    """The option records of one driver.

    ``name`` is the key of its bag under ``driver_options`` (``sqlite`` for
    ``driver_options.sqlite``); ``consumer`` is None for a driver that takes no
    consumer options (then ``driver_options.<name>`` on a consumer is an unknown field).
    """

    name: str
    driver: type[D]
    queue: type[Q]
    consumer: type[C] | None = None

    def driver_options(self, options: Options) -> D:
        """The driver entry's record, checked to be this driver's."""
        if not isinstance(options, self.driver):
            raise errors.invalid(
                f"driver options of type {type(options).__name__} given to the {self.name} driver, "
                f"which takes {self.driver.__name__}"
            )
        return options

    def queue_options(self, bags: Mapping[str, Options]) -> Q:
        """A queue's bag for this driver (its ``driver_options``), or the defaults."""
        found = bags.get(self.name)
        return found if isinstance(found, self.queue) else self.queue()

    def consumer_options(self, bags: Mapping[str, Options]) -> C | None:
        """A consumer's bag for this driver, the defaults, or None if it takes none."""
        if self.consumer is None:
            return None
        found = bags.get(self.name)
        return found if isinstance(found, self.consumer) else self.consumer()
