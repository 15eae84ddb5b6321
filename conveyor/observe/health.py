"""When an app is ready, and why not (``/readyz``).

An app is ready when it has started (``phase == "running"``), every driver it declares
is open and connected, and every consumer it runs is attached: started, not stopping.
Which consumers it runs: the ``auto_start`` ones (and their dependencies) once the app
was started with its consumers, those started by ID, and optional ones still being
retried in the background. An optional driver or consumer that is down makes the app
not ready, though it let the app start: ``startup: optional`` says the app may run
without it, not that it is complete without it. The answer names each part that is
not ready and why.

:func:`readiness` only reads: the app gathers :class:`Parts` on its event loop, where
those dictionaries change, and this module judges them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from conveyor.consumer.runtime import Consumer
from conveyor.drivers.base import Driver
from conveyor.registry.model import Registry

__all__ = ["PHASES", "Parts", "readiness"]

# starting: App.astart runs; running: started; stopping: App.astop runs; stopped.
PHASES = ("starting", "running", "stopping", "stopped")


@dataclass(frozen=True, slots=True)
class Parts:
    """What the app knows about its parts, read on its loop."""

    registry: Registry
    drivers: Mapping[str, Driver]  # open drivers
    missing: Mapping[str, str]  # optional drivers that have not started: id -> why
    consumers: Mapping[str, Consumer]  # consumers started (stopping ones included)
    wanted: Collection[str]  # consumer IDs the app runs once started with consumers
    retrying: Collection[str]  # background start retries: "driver X", "consumer Y"


def readiness(phase: str, parts: Parts | None) -> tuple[bool, dict[str, Any]]:
    """Whether the app is ready, and the ``/readyz`` answer that says why (not)."""
    if phase != "running" or parts is None:
        why = {"starting": "the app is starting", "stopping": "the app is stopping"}.get(
            phase, "the app is not started"
        )
        return False, {"status": "not ready", "phase": phase, "reasons": [why]}
    reasons: list[str] = []
    drivers: dict[str, dict[str, Any]] = {}
    for did, spec in parts.registry.drivers.items():
        state: dict[str, Any] = {"ready": True}
        if spec.startup == "optional":
            state["optional"] = True
        problem = _driver_problem(did, parts)
        if problem is not None:
            state.update(ready=False, reason=problem)
            reasons.append(f"driver {did}: {problem}")
        drivers[did] = state
    consumers: dict[str, dict[str, Any]] = {}
    retrying_consumers = {
        name.removeprefix("consumer ") for name in parts.retrying if name.startswith("consumer ")
    }
    for cid in _consumers_run(parts, retrying_consumers):
        state = {"ready": True}
        problem = _consumer_problem(cid, parts, retrying_consumers)
        if problem is not None:
            state.update(ready=False, reason=problem)
            reasons.append(f"consumer {cid}: {problem}")
        consumers[cid] = state
    ready = not reasons
    answer: dict[str, Any] = {"status": "ready" if ready else "not ready", "phase": phase}
    if reasons:
        answer["reasons"] = reasons
    answer.update(drivers=drivers, consumers=consumers)
    return ready, answer


def _driver_problem(did: str, parts: Parts) -> str | None:
    driver = parts.drivers.get(did)
    if driver is not None:
        return None if driver.connected else "not connected (the connection is down; reconnecting)"
    why = parts.missing.get(did)
    if why is not None:
        return f"not started (optional; retrying in the background): {why}"
    return "not open"


def _consumers_run(parts: Parts, retrying: set[str]) -> list[str]:
    declared = parts.registry.consumers
    found = dict.fromkeys(parts.wanted)
    found.update(dict.fromkeys(parts.consumers))
    found.update(dict.fromkeys(cid for cid in declared if cid in retrying))
    return [cid for cid in found if cid in declared]


def _consumer_problem(cid: str, parts: Parts, retrying: set[str]) -> str | None:
    consumer = parts.consumers.get(cid)
    if consumer is not None:
        return "stopping" if consumer.stopping else None
    driver = parts.registry.queues[parts.registry.consumers[cid].queue].driver
    if driver in parts.missing:
        return f"not attached: its driver {driver} has not started"
    if cid in retrying:
        return "not attached: its start failed (optional; retrying in the background)"
    return "not attached (stopped)"
