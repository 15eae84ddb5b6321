"""Drivers' option records, one client-free module per driver.

Each module declares the fields its driver accepts — on the driver entry, in a
queue's ``driver_options.<name>`` and (if any) in a consumer's — with their
converters and defaults, and exports them as ``SCHEMA``. The loader reads every
driver's records from here without importing any driver or client library; the
driver reads its typed record at run time. See docs/adding-a-driver.md.

This package holds what every driver's entry declares the same way: the
``max_message_size`` field (:func:`message_size_option`), whose value the core reads
through :func:`max_message_size` to refuse oversized messages before the driver is
called.
"""

from __future__ import annotations

import re
from typing import Any, Final

from conveyor.registry.convert import Converter, describe
from conveyor.registry.options import Options, option

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "KIB",
    "MIB",
    "byte_size",
    "max_message_size",
    "message_size_option",
    "show_size",
]

KIB: Final = 1024
MIB: Final = 1024 * KIB
# The default of every driver that sets none of its own. Large enough for any message a
# queue should carry (bigger payloads belong in a store, the message names them), small
# enough that a runaway publish fails at once instead of filling memory, a database
# file or a broker; and RabbitMQ 4's own default, so that moving an app between
# drivers does not change which messages fit.
DEFAULT_MAX_MESSAGE_SIZE: Final = 16 * MIB

_UNITS: Final = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "kib": KIB,
    "mb": 1000**2,
    "mib": MIB,
    "gb": 1000**3,
    "gib": 1024 * MIB,
}
_SIZE: Final = re.compile(r"([0-9]{1,18}) *([A-Za-z]*)")


def show_size(size: int) -> str:
    """``16777216`` → ``16 MiB``; ``1000`` → ``1000 bytes``."""
    for unit, factor in (("GiB", 1024 * MIB), ("MiB", MIB), ("KiB", KIB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return "1 byte" if size == 1 else f"{size} bytes"


def byte_size(low: int = 1, high: int | None = None) -> Converter[int]:
    """A size in bytes: an integer, or a string like ``256KiB``, ``16MiB``, ``1MB``.

    Units (case does not matter): B, KB (1000), KiB (1024), MB, MiB, GB, GiB.
    """

    def convert(value: Any) -> int:
        if isinstance(value, str):
            parsed = _SIZE.fullmatch(value.strip())
            factor = _UNITS.get(parsed.group(2).lower()) if parsed is not None else None
            if parsed is None or factor is None:
                raise ValueError(
                    f"expected a size such as 1048576, 256KiB or 16MiB (units B, KB, KiB, MB, MiB, "
                    f"GB, GiB), got {describe(value)}"
                )
            size = int(parsed.group(1)) * factor
        elif isinstance(value, int) and not isinstance(value, bool):
            size = value
        else:
            raise ValueError(
                f"expected a size in bytes (an integer, or a string like 16MiB), got {describe(value)}"
            )
        if size < low:
            raise ValueError(f"must be at least {show_size(low)}, got {value!r}")
        if high is not None and size > high:
            raise ValueError(f"must be at most {show_size(high)}, got {value!r}")
        return size

    return convert


def message_size_option(default: int = DEFAULT_MAX_MESSAGE_SIZE, maximum: int | None = None) -> Any:
    """The ``max_message_size`` field of a driver entry's record (a :func:`option`).

    Every driver declares it with this helper, so every driver reads it the same way;
    ``maximum`` is what the backend itself can take, if it has such a limit.
    """
    return option(byte_size(1, maximum), default)


def max_message_size(options: Options) -> int:
    """The largest message (encoded body plus headers, in bytes) a driver entry accepts."""
    size = getattr(options, "max_message_size", None)
    return size if isinstance(size, int) else DEFAULT_MAX_MESSAGE_SIZE
