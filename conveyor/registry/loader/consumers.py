"""``queue.consumer`` entries: queue, handler form, limits, security, lifecycle."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conveyor.registry.convert import boolean, duration, import_path, integer, mapping, name, string, strings
from conveyor.registry.loader.drivers import consumer_bags
from conveyor.registry.loader.fields import Fields
from conveyor.registry.loader.functions import FUNCTION_KINDS, lua_file
from conveyor.registry.loader.policies import POLICY
from conveyor.registry.loader.queues import QUEUE
from conveyor.registry.model import ConsumerSpec, SecurityBlock

__all__ = ["CONSUMER", "parse_consumer"]

CONSUMER = "queue.consumer"

_HANDLER_FIELDS = ("func", "method", "handler")


def parse_consumer(f: Fields) -> ConsumerSpec:
    _check_handler_fields(f)
    lifecycle = f.sub("lifecycle")
    return ConsumerSpec(
        id=f.scope.entry_id,
        queue=f.ref("queue", (QUEUE,), required=True) or "",
        func=f.ref("func", FUNCTION_KINDS),
        handler=f.get("handler", import_path, None),
        method=f.get("method", name, None),
        concurrency=f.get("concurrency", integer(1, 1000), 1),
        prefetch=f.get("prefetch", integer(1, 10000), 10),
        auto_ack=f.get("auto_ack", boolean, False),
        timeout=f.get("timeout", duration(positive=True), None),
        security=_security_block(f.sub("security")),
        driver_options=consumer_bags(f.sub("driver_options")),
        lua_source=_consumer_source(f),
        base_dir=f.scope.file.base_dir,
        auto_start=lifecycle.get("auto_start", boolean, True) if lifecycle else True,
        depends_on=lifecycle.refs("depends_on", (CONSUMER,)) if lifecycle else (),
        origin=f.scope.origin,
    )


def _check_handler_fields(f: Fields) -> None:
    """Exactly one of func / method / handler."""
    given = [key for key in _HANDLER_FIELDS if f.has(key)]
    if not given:
        f.report("one of func, method or handler is required", "func")
    elif len(given) > 1:
        f.report(f"{' and '.join(given)} are mutually exclusive: give exactly one", given[1])


def _consumer_source(f: Fields) -> Path | None:
    """The ``source: file://x.lua`` searched for a ``method:`` that names no function entry."""
    if not f.has("source"):
        f.raw("source")
        return None
    if not f.has("method"):
        f.report("source is only used with method:", "source")
    return lua_file(f, "source")


def _security_block(f: Fields | None) -> SecurityBlock | None:
    if f is None:
        return None
    actor, meta = _actor(f)
    return SecurityBlock(
        actor=actor,
        actor_meta=meta,
        policies=f.refs("policies", (POLICY,)),
        groups=f.get("groups", strings(), ()),
    )


def _actor(f: Fields) -> tuple[str | None, dict[str, Any]]:
    """``actor: some-id`` or ``actor: {id: some-id, meta: {...}}``."""
    actor = f.sub("actor") if isinstance(f.raw("actor"), Mapping) else None
    if actor is not None:
        return actor.need("id", string), actor.get("meta", mapping, {})
    return f.get("actor", string, None), {}
