"""Typed, validated configuration entries: what the loader produces.

Every object here is immutable and already validated; the runtime never re-checks
configuration. Durations are float seconds. References are canonical IDs. Each spec
carries the :class:`Origin` of its entry (file, ID, line) for messages. Driver
options are typed records declared by each driver's options module (see
:mod:`conveyor.registry.options`); ``driver_options`` maps a driver's name
(``sqlite``, ``amqp``, ...) to its record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conveyor.registry.conditions import Condition
from conveyor.registry.options import NoOptions, Options
from conveyor.registry.problems import Origin

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
]

_NO_BAGS: Mapping[str, Options] = {}


@dataclass(frozen=True, slots=True)
class DriverSpec:
    """A ``queue.driver.*`` entry. ``options`` is the driver's own record, validated,
    with defaults filled in (``conveyor/drivers/options/<name>.py``)."""

    id: str
    kind: str
    options: Options = field(default_factory=NoOptions)
    startup: str = "required"  # lifecycle.startup: "required" | "optional"
    startup_timeout: float = 30.0  # lifecycle.startup_timeout: retry a retryable open for so long
    origin: Origin = Origin()


@dataclass(frozen=True, slots=True)
class RetrySpec:
    """Redelivery backoff: ``delay * backoff ** (attempts - 1)``, capped at ``max_delay``."""

    delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 300.0

    def delay_for(self, attempts: int) -> float:
        """Seconds to wait before redelivering a message whose ``attempts``-th try failed."""
        if self.delay <= 0:
            return 0.0
        exponent = max(attempts - 1, 0)
        try:
            value = self.delay * (self.backoff**exponent)
        except OverflowError:
            return self.max_delay
        return min(value, self.max_delay)


@dataclass(frozen=True, slots=True)
class DeadLetterSpec:
    queue: str
    max_attempts: int = 5


@dataclass(frozen=True, slots=True)
class QueueSpec:
    id: str
    driver: str
    queue_name: str
    codec: str = "json/plain"
    dead_letter: DeadLetterSpec | None = None
    retry: RetrySpec = field(default_factory=RetrySpec)
    # {"memory": MemoryQueueOptions(max_length=10), "amqp": AmqpQueueOptions(...)}: the bags
    # written, each validated by its driver's record; a driver reads its own.
    driver_options: Mapping[str, Options] = field(default_factory=lambda: _NO_BAGS)
    # The ID of the queue entry whose physical queue (driver and queue_name) this one
    # shares on purpose. Policies judge every ID of one physical queue together.
    alias_of: str | None = None
    origin: Origin = Origin()


@dataclass(frozen=True, slots=True)
class SecurityBlock:
    actor: str | None = None
    actor_meta: dict[str, Any] = field(default_factory=dict)
    policies: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    id: str
    queue: str
    # exactly one of these is set after loading
    func: str | None = None  # function entry ID
    handler: str | None = None  # python import path "pkg.mod:callable"
    method: str | None = None  # as written; resolved into func when possible
    concurrency: int = 1
    prefetch: int = 10
    auto_ack: bool = False
    timeout: float | None = None
    # a sync or Lua handler with a hard_timeout runs in worker processes; past it, its
    # process is killed and replaced
    hard_timeout: float | None = None
    security: SecurityBlock | None = None
    driver_options: Mapping[str, Options] = field(default_factory=lambda: _NO_BAGS)
    lua_source: Path | None = None  # consumer `source:` file for `method:` Lua lookup
    base_dir: Path | None = None  # directory of the declaring YAML (for `handler:` imports)
    auto_start: bool = True
    depends_on: tuple[str, ...] = ()
    startup: str = "required"  # lifecycle.startup: "required" | "optional"
    startup_timeout: float = 30.0  # lifecycle.startup_timeout
    # retry: {never_on: [...], always_on: [...]}: error kinds ("INVALID") or exception
    # classes ("ValueError", "pkg.mod:MyError") that never / always retry a failure
    never_retry: tuple[str, ...] = ()
    always_retry: tuple[str, ...] = ()
    origin: Origin = Origin()


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    id: str
    kind: str  # function.python | function.lua
    source: str  # "pkg.mod:callable" or "file://path.lua"
    method: str | None = None
    base_dir: Path = field(default_factory=Path)  # directory of the declaring YAML file
    on_start: bool = False  # lifecycle.on_start: called once when consumers start
    origin: Origin = Origin()


@dataclass(frozen=True, slots=True)
class PolicySpec:
    id: str
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    effect: str  # "allow" | "deny"
    conditions: tuple[Condition, ...] = ()
    groups: tuple[str, ...] = ()
    origin: Origin = Origin()


@dataclass(frozen=True, slots=True)
class Registry:
    """Everything one app declares, validated and cross-referenced."""

    drivers: dict[str, DriverSpec] = field(default_factory=dict)
    queues: dict[str, QueueSpec] = field(default_factory=dict)
    consumers: dict[str, ConsumerSpec] = field(default_factory=dict)
    functions: dict[str, FunctionSpec] = field(default_factory=dict)
    policies: dict[str, PolicySpec] = field(default_factory=dict)
    strict_security: bool = False
    files: tuple[Path, ...] = ()
    warnings: tuple[str, ...] = ()
