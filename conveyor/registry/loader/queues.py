"""``queue.queue`` entries: driver, physical name, codec, dead letter, retry, driver options,
and ``alias_of`` (another entry whose physical queue this one shares on purpose; the
rules across entries are checked in phase two, :mod:`.crossref`)."""

from __future__ import annotations

from conveyor.drivers.kinds import kinds as driver_kinds
from conveyor.queue.codecs import CODECS
from conveyor.registry import ids
from conveyor.registry.convert import choice, duration, integer, number, string
from conveyor.registry.loader.drivers import queue_bags
from conveyor.registry.loader.fields import Fields
from conveyor.registry.model import DeadLetterSpec, QueueSpec, RetrySpec

__all__ = ["QUEUE", "parse_queue"]

QUEUE = "queue.queue"


def parse_queue(f: Fields) -> QueueSpec:
    entry_id = f.scope.entry_id
    driver = f.ref("driver", driver_kinds(), required=True)
    alias_of = f.ref("alias_of", (QUEUE,))
    if alias_of is not None and alias_of == entry_id:
        f.report("a queue cannot be an alias of itself", "alias_of")
    return QueueSpec(
        id=entry_id,
        driver=driver or "",
        queue_name=f.get("queue_name", string, ids.split_id(entry_id)[1]),
        codec=f.get("codec", choice(*CODECS), "json/plain"),
        dead_letter=_dead_letter(f.sub("dead_letter"), entry_id),
        retry=_retry(f.sub("retry")),
        driver_options=queue_bags(f.sub("driver_options")),
        alias_of=alias_of,
        origin=f.scope.origin,
    )


def _dead_letter(f: Fields | None, queue_id: str) -> DeadLetterSpec | None:
    if f is None:
        return None
    target = f.ref("queue", (QUEUE,), required=True)
    if target is not None and target == queue_id:
        f.report("a queue cannot be its own dead-letter queue", "queue")
    return DeadLetterSpec(queue=target or "", max_attempts=f.get("max_attempts", integer(1), 5))


def _retry(f: Fields | None) -> RetrySpec:
    if f is None:
        return RetrySpec()
    return RetrySpec(
        delay=f.get("delay", duration(), 1.0),
        backoff=f.get("backoff", number(1.0), 2.0),
        max_delay=f.get("max_delay", duration(), 300.0),
    )
