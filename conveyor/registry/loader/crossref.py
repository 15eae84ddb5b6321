"""Phase two: the checks that need every entry, and the :class:`Registry`.

References are checked against the declared IDs and kinds, ``method:`` is resolved
to a function entry where one exists, security groups must be some policy's,
``depends_on`` must not loop, queue entries that share one physical queue must say
so (``alias_of``), and legal but risky configuration becomes warnings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from conveyor.drivers.kinds import kinds as driver_kinds
from conveyor.registry import ids
from conveyor.registry.loader.fields import Load
from conveyor.registry.loader.functions import FUNCTION_KINDS
from conveyor.registry.model import ConsumerSpec, DriverSpec, FunctionSpec, PolicySpec, QueueSpec, Registry

__all__ = ["build", "check_refs"]


def _kinds_text(kinds: tuple[str, ...]) -> str:
    return "a queue.driver.* entry" if kinds == driver_kinds() else f"a {' or '.join(kinds)} entry"


def check_refs(load: Load) -> None:
    """Every reference must name a declared entry of a kind it accepts."""
    for ref in load.refs:
        target = load.declared.get(ref.target)
        wanted = _kinds_text(ref.kinds)
        if target is None:
            ref.scope.report(
                ref.path, f"dangling reference {ref.target}: no entry has this ID (expected {wanted})"
            )
        elif target.kind is not None and target.kind not in ref.kinds:
            ref.scope.report(ref.path, f"{ref.target} is a {target.kind} entry, expected {wanted}")


def build(load: Load) -> Registry:
    """The registry of the parsed specs, with the checks across entries reported."""
    buckets: dict[type, dict[str, Any]] = {
        DriverSpec: {},
        QueueSpec: {},
        ConsumerSpec: {},
        FunctionSpec: {},
        PolicySpec: {},
    }
    for parsed in load.specs:
        spec = _resolve_method(parsed, load) if isinstance(parsed, ConsumerSpec) else parsed
        buckets[type(spec)].setdefault(spec.id, spec)  # a duplicate is a problem already
    registry = Registry(
        drivers=buckets[DriverSpec],
        queues=buckets[QueueSpec],
        consumers=buckets[ConsumerSpec],
        functions=buckets[FunctionSpec],
        policies=buckets[PolicySpec],
        strict_security=load.strict_security,
        files=tuple(load.files),
    )
    _check_cycles(registry.consumers, load)
    _check_security_groups(registry, load)
    _check_shared_queues(registry.queues, load)
    return dataclasses.replace(registry, warnings=_warnings(registry))


def _resolve_method(spec: ConsumerSpec, load: Load) -> ConsumerSpec:
    """``method: name``: a function entry ``ns:name`` if one exists, else a Lua function
    of that name in the consumer's ``source:`` file."""
    if spec.method is None or spec.func is not None or spec.handler is not None:
        return spec
    candidate = f"{ids.split_id(spec.id)[0]}:{spec.method}"
    declared = load.declared.get(candidate)
    if declared is not None and declared.kind in FUNCTION_KINDS:
        return dataclasses.replace(spec, func=candidate)
    source_reported = any(p.entry == spec.id and p.field == "source" for p in load.problems)
    if spec.lua_source is None and not source_reported:  # a bad source: is problem enough
        scope = load.scopes.get(spec.id)
        if scope is not None:
            scope.report(
                ("method",), f"method {spec.method}: no function entry {candidate} and no source: file"
            )
    return spec


def _check_security_groups(registry: Registry, load: Load) -> None:
    """A consumer's ``security.groups`` must name groups some policy belongs to."""
    known = {group for policy in registry.policies.values() for group in policy.groups}
    for consumer in registry.consumers.values():
        block = consumer.security
        for index, group in enumerate(block.groups if block is not None else ()):
            scope = load.scopes.get(consumer.id)
            if group not in known and scope is not None:
                scope.report(
                    ("security", "groups", index),
                    f"unknown policy group {group!r}: no security.policy entry lists it in groups",
                )


def _physical(queue: QueueSpec) -> tuple[str, str]:
    """What names a physical queue: the driver entry and the queue's name on it."""
    return (queue.driver, queue.queue_name)


def _check_shared_queues(queues: Mapping[str, QueueSpec], load: Load) -> None:
    """Entries that share one physical queue are aliases on purpose, or a problem.

    Policies match queue IDs, so a second ID for one queue would let a deny written
    for the first be bypassed; the policy engine judges every ID of a physical queue
    together, and the load makes sure every such ID was meant (``alias_of``).
    """
    owners: dict[tuple[str, str], str] = {}
    for queue in queues.values():
        if queue.alias_of is None:
            owner = owners.setdefault(_physical(queue), queue.id)
            if owner != queue.id:
                _report(
                    load,
                    queue.id,
                    ("queue_name",),
                    f"queue_name {queue.queue_name!r} on driver {queue.driver} is also used by {owner}: "
                    "two entries would share one physical queue, and a policy written for one ID would "
                    f"not be applied to the other. If both IDs are meant to reach one queue, write "
                    f"alias_of: {owner} on this entry",
                )
    for queue in queues.values():
        target = queues.get(queue.alias_of) if queue.alias_of is not None else None
        if target is None:
            continue  # no alias, or a dangling reference (reported already)
        if target.alias_of is not None:
            message = (
                f"alias_of {target.id}: that entry is itself an alias; name the queue it aliases "
                f"(alias_of: {target.alias_of})"
            )
        elif _physical(target) != _physical(queue):
            message = (
                f"alias_of {target.id}: an alias uses the same driver and queue_name as the queue it "
                f"aliases ({target.id} is queue_name {target.queue_name!r} on driver {target.driver}; "
                f"this entry is queue_name {queue.queue_name!r} on driver {queue.driver})"
            )
        else:
            continue
        _report(load, queue.id, ("alias_of",), message)
    for queue in queues.values():
        dead = queues.get(queue.dead_letter.queue) if queue.dead_letter is not None else None
        if dead is not None and dead.id != queue.id and _physical(dead) == _physical(queue):
            _report(
                load,
                queue.id,
                ("dead_letter", "queue"),
                f"dead-letter queue {dead.id} is the same physical queue as this one (an alias): "
                "a dead-lettered message would come straight back",
            )


def _report(load: Load, entry_id: str, path: tuple[str, ...], message: str) -> None:
    scope = load.scopes.get(entry_id)
    if scope is not None:
        scope.report(path, message)


def _check_cycles(consumers: Mapping[str, ConsumerSpec], load: Load) -> None:
    """Report each ``depends_on`` cycle once, on the consumer where it is first entered."""
    state: dict[str, str] = {}  # "active" while on the DFS stack, then "done"

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "active"
        for target in consumers[node].depends_on if node in consumers else ():
            if state.get(target) == "active":
                cycle = [*stack[stack.index(target) :], target]
                scope = load.scopes.get(target)
                if scope is not None:
                    scope.report(("lifecycle", "depends_on"), f"depends_on cycle: {' -> '.join(cycle)}")
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = "done"

    for consumer_id in consumers:
        if consumer_id not in state:
            visit(consumer_id, [consumer_id])


def _warnings(registry: Registry) -> tuple[str, ...]:
    """Legal but risky configuration, for ``conveyor check`` and startup logs."""
    found: list[str] = []
    for consumer in registry.consumers.values():
        queue = registry.queues.get(consumer.queue)
        if queue is not None and queue.dead_letter is None:
            found.append(
                f"{consumer.origin}: queue {queue.id} has no dead_letter: "
                "failing messages are retried forever"
            )
        if consumer.prefetch < consumer.concurrency:
            found.append(
                f"{consumer.origin}: prefetch {consumer.prefetch} < concurrency {consumer.concurrency}: "
                "workers will idle"
            )
    for queue in registry.queues.values():
        target = registry.queues.get(queue.alias_of) if queue.alias_of is not None else None
        if target is not None and target.codec != queue.codec:
            found.append(
                f"{queue.origin}: alias of {target.id} with codec {queue.codec}, not {target.codec}: "
                "consumers of one ID may not decode messages published through the other"
            )
        if 0 < queue.retry.max_delay < queue.retry.delay:
            found.append(
                f"{queue.origin}: retry.max_delay {queue.retry.max_delay:g}s is below retry.delay "
                f"{queue.retry.delay:g}s: every retry waits max_delay"
            )
    for queue in registry.queues.values():
        dead = registry.queues.get(queue.dead_letter.queue) if queue.dead_letter else None
        if dead is None:
            continue
        if dead.codec != queue.codec:
            found.append(
                f"{queue.origin}: dead-letter queue {dead.id} uses codec {dead.codec}, not {queue.codec}: "
                "its consumers may not decode dead-lettered messages"
            )
        if dead.driver != queue.driver:
            found.append(
                f"{queue.origin}: dead-letter queue {dead.id} is on driver {dead.driver}, "
                f"not {queue.driver}: moving a message there is not atomic (it may be delivered twice)"
            )
    return tuple(found)
