"""``queue.consumer`` entries: queue, handler form, limits, security, lifecycle."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conveyor import errors
from conveyor.registry.convert import boolean, duration, import_path, integer, mapping, name, string, strings
from conveyor.registry.loader.drivers import consumer_bags, startup_fields
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
    startup, startup_timeout = startup_fields(lifecycle)
    never_retry, always_retry = _retry_rules(f.sub("retry"))
    auto_ack = f.get("auto_ack", boolean, False)
    timeout = f.get("timeout", duration(positive=True), None)
    return ConsumerSpec(
        id=f.scope.entry_id,
        queue=f.ref("queue", (QUEUE,), required=True) or "",
        func=f.ref("func", FUNCTION_KINDS),
        handler=f.get("handler", import_path, None),
        method=f.get("method", name, None),
        concurrency=f.get("concurrency", integer(1, 1000), 1),
        prefetch=f.get("prefetch", integer(1, 10000), 10),
        auto_ack=auto_ack,
        timeout=timeout,
        hard_timeout=_hard_timeout(f, timeout, auto_ack),
        security=_security_block(f.sub("security")),
        driver_options=consumer_bags(f.sub("driver_options")),
        lua_source=_consumer_source(f),
        base_dir=f.scope.file.base_dir,
        auto_start=lifecycle.get("auto_start", boolean, True) if lifecycle else True,
        depends_on=lifecycle.refs("depends_on", (CONSUMER,)) if lifecycle else (),
        startup=startup,
        startup_timeout=startup_timeout,
        never_retry=never_retry,
        always_retry=always_retry,
        origin=f.scope.origin,
    )


def _retry_rules(f: Fields | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``retry: {never_on: [...], always_on: [...]}``: error kinds or exception classes."""
    if f is None:
        return (), ()
    never = f.get("never_on", strings(), ())
    always = f.get("always_on", strings(), ())
    for key, refs in (("never_on", never), ("always_on", always)):
        for ref in refs:
            problem = _failure_ref_problem(ref)
            if problem:
                f.report(problem, key)
    both = sorted(set(never) & set(always))
    if both:
        f.report(f"{', '.join(both)} cannot be in both never_on and always_on", "always_on")
    return never, always


def _failure_ref_problem(ref: str) -> str | None:
    """Why ``ref`` names neither an error kind nor an exception class, or None."""
    if ref.isupper() and ref.replace("_", "").isalpha():
        return None if ref in errors.KINDS else f"unknown error kind {ref!r}"
    module, _, attr = ref.rpartition(":") if ":" in ref else ("", "", ref)
    parts = [*module.split("."), *attr.split(".")] if module else attr.split(".")
    if all(part.isidentifier() for part in parts):
        return None
    return (
        f"{ref!r} is neither an error kind (INVALID, ...) "
        "nor an exception class (ValueError, pkg.mod:MyError)"
    )


def _hard_timeout(f: Fields, soft: float | None, auto_ack: bool) -> float | None:
    """``hard_timeout``: not shorter than ``timeout`` (which settles first, if given)."""
    hard: float | None = f.get("hard_timeout", duration(positive=True), None)
    if hard is not None and soft is not None and hard < soft:
        f.report(f"hard_timeout ({hard:g}s) is shorter than timeout ({soft:g}s)", "hard_timeout")
    if hard is not None and auto_ack:
        f.report("hard_timeout cannot be used with auto_ack", "hard_timeout")
    return hard


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
