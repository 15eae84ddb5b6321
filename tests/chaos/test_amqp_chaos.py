"""Chaos on the AMQP driver: workers and publishers killed and restarted at random.

The broker is a node owned by this module (tests/chaos/conftest.py), never the shared
one. Faults F01, F02, F04, F05, H01, P01, P02, D02; contract C1, C2, C3, C4.
See tests/support/chaos.py for the run and the audit.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from pathlib import Path

import pytest

from conveyor.drivers.amqp._topology import delay_name
from tests.support.chaos import chaos_run, chaos_timeout, write_app
from tests.support.rabbit_node import RabbitNode

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.broker]

# The in-suite run uses classic queues (attempts counted by the driver after a crash);
# `make chaos` adds quorum queues (attempts counted by the broker).
QUEUE_TYPES = os.environ.get("CONVEYOR_CHAOS_AMQP_QUEUE_TYPES", "classic").split(",")


# every delay the chaos app's retries can use: retry {delay: 50ms, backoff: 2.0, max_delay: 400ms}
DELAYS_MS = (50, 100, 200, 400)


def _broker_counts(url: str, names: list[str]) -> dict[str, int]:
    """Messages in each of ``names`` on the broker (0 for a queue that does not exist)."""
    import aiormq
    from aiormq.exceptions import ChannelNotFoundEntity

    async def count() -> dict[str, int]:
        counts = {}
        conn = await aiormq.connect(url)
        try:
            for name in names:
                channel = await conn.channel()
                try:
                    declared = await channel.queue_declare(name, passive=True)
                    counts[name] = int(declared.message_count or 0)
                except ChannelNotFoundEntity:  # never declared, or an idle delay queue that expired
                    counts[name] = 0
                finally:
                    if not channel.is_closed:
                        await channel.close()
        finally:
            await conn.close()
        return counts

    return asyncio.run(asyncio.wait_for(count(), 60))


def _settle_errors(node: RabbitNode, since: int) -> list[str]:
    """Channel errors the broker logged for a settlement (basic.ack, nack, reject) after
    byte ``since`` of its log: a settle must never close a channel."""
    log = node.base / "log" / f"{node.nodename}.log"
    with open(log, "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    bad = [
        line
        for line in text.splitlines()
        if re.search(r"operation basic\.\w+ caused a channel exception", line)
    ]
    return [f"the broker closed a channel for a settlement: {line}" for line in bad[:5]]


@pytest.mark.timeout(chaos_timeout())
@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
def test_amqp_loses_nothing_while_workers_and_publishers_are_killed(
    rabbit: RabbitNode, tmp_path: Path, queue_type: str
) -> None:
    """Faults F01, F02, F04, F05, H01, P01, P02, D02.

    Two ``conveyor run`` workers (concurrency 4, prefetch 8) and two publishers on a
    private node; every 0.3-1.5 s one of them gets SIGKILL or SIGTERM and a new one
    starts. Afterwards: every confirmed publish was handled or dead-lettered, nothing
    unexpected arrived, duplicates stay within what the killed workers held, dead
    letters carry their headers, neither queue nor any of its retry delay queues
    holds a message, and the broker never closed a channel over an ack or a nack.
    """
    prefix = f"chaos{uuid.uuid4().hex[:8]}"
    amqp = {"amqp": {"queue_type": queue_type}}
    queues = {
        "jobs": {"queue_name": f"{prefix}.jobs", "driver_options": amqp},
        "jobs_dlq": {"queue_name": f"{prefix}.jobs_dlq", "driver_options": amqp},
    }
    driver = {"kind": "queue.driver.amqp", "url": rabbit.url}
    app_dir = write_app(tmp_path / "app", driver, queues)

    names = [f"{prefix}.jobs", f"{prefix}.jobs_dlq"]
    names += [delay_name(f"{prefix}.jobs", ms) for ms in DELAYS_MS]

    def remaining() -> dict[str, int]:
        return _broker_counts(rabbit.url, names)

    log = rabbit.base / "log" / f"{rabbit.nodename}.log"
    since = log.stat().st_size if log.exists() else 0
    label = f"amqp ({queue_type} queues)"
    chaos_run(
        app_dir,
        tmp_path / "out",
        remaining,
        label,
        copies=True,
        store_problems=lambda: _settle_errors(rabbit, since),
    )
