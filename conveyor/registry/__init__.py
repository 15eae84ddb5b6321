"""The registry: YAML configuration loaded into validated, immutable specs.

``load_registry(path)`` reads a YAML file or a directory of them and returns a
:class:`Registry`, or raises one INVALID ``errors.Error`` listing every problem.
"""

from __future__ import annotations

from conveyor.registry.durations import parse_duration
from conveyor.registry.loader import load_registry
from conveyor.registry.model import (
    ConsumerSpec,
    DeadLetterSpec,
    DriverSpec,
    FunctionSpec,
    PolicySpec,
    QueueSpec,
    Registry,
    RetrySpec,
    SecurityBlock,
)

__all__ = [
    "ConsumerSpec",
    "DeadLetterSpec",
    "DriverSpec",
    "FunctionSpec",
    "PolicySpec",
    "QueueSpec",
    "Registry",
    "RetrySpec",
    "SecurityBlock",
    "load_registry",
    "parse_duration",
]
