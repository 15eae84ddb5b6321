"""What the metrics say, as plain data, and how that becomes Prometheus metric families.

A :class:`Snapshot` is one reading of an app: how many messages it published per
queue, each consumer's counters and handler-duration histogram (those of its earlier
runs in this app included), how many of each consumer's workers are busy, and —
when sampled — how many messages each queue holds. Snapshots of several processes
add up (:meth:`Snapshot.add`): counters and histograms are summed, worker gauges too;
a queue's counts are the same shared queue seen from every process, so only one
reading of each is kept. :func:`families` turns a snapshot into the metric families
the Prometheus exposition helpers write; the names and their meaning are listed in
docs/operations.md#metrics.

Snapshots travel as JSON between a ``conveyor run --processes N`` worker and its
supervisor (:meth:`Snapshot.to_dict` / :meth:`Snapshot.from_dict`); both ends are the
same version of this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from conveyor.consumer.settlement import DURATION_BUCKETS, ConsumerStats

__all__ = ["OUTCOMES", "QUEUE_STATES", "ConsumerCounts", "Snapshot", "families"]

# outcome label of conveyor_messages_processed_total -> the ConsumerStats counter it reads
OUTCOMES = ("acked", "failed", "dead_lettered", "undecodable", "dropped")
# state label of conveyor_queue_messages, as Driver.info names the counts
QUEUE_STATES = ("ready", "in_flight", "delayed")

_COUNTERS = ("delivered", *OUTCOMES, "worker_restarts")


def _no_durations() -> list[int]:
    return [0] * (len(DURATION_BUCKETS) + 1)


@dataclass(slots=True)
class ConsumerCounts:
    """One consumer's counters (summed over its runs and processes) and its worker gauges.

    ``buckets[i]`` counts handler runs that took at most ``DURATION_BUCKETS[i]`` seconds
    and more than the bound before it (per bucket, not cumulative; the last slot: above
    every bound), as :class:`~conveyor.consumer.settlement.Durations` keeps them.
    """

    queue: str
    delivered: int = 0
    acked: int = 0
    failed: int = 0
    dead_lettered: int = 0
    undecodable: int = 0
    dropped: int = 0
    worker_restarts: int = 0
    buckets: list[int] = field(default_factory=_no_durations)
    duration_sum: float = 0.0
    busy: int = 0  # gauges: workers running a handler right now, and the others
    idle: int = 0

    def add_stats(self, stats: ConsumerStats) -> None:
        """Add a consumer's live counters (read from another thread: each value is one read)."""
        for name in _COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(stats, name))
        durations = stats.durations
        for index, count in enumerate(list(durations.counts)):
            self.buckets[index] += count
        self.duration_sum += durations.sum

    def add(self, other: ConsumerCounts, *, gauges: bool = True) -> None:
        for name in _COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for index, count in enumerate(other.buckets):
            self.buckets[index] += count
        self.duration_sum += other.duration_sum
        if gauges:
            self.busy += other.busy
            self.idle += other.idle

    def to_dict(self) -> dict[str, Any]:
        found: dict[str, Any] = {name: getattr(self, name) for name in _COUNTERS}
        return {
            **found,
            "queue": self.queue,
            "buckets": list(self.buckets),
            "duration_sum": self.duration_sum,
            "busy": self.busy,
            "idle": self.idle,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ConsumerCounts:
        if not isinstance(data, dict) or not isinstance(data.get("queue"), str):
            raise ValueError("a consumer's counts must be an object with a queue")
        counts = cls(data["queue"])
        for name in (*_COUNTERS, "busy", "idle"):
            setattr(counts, name, _count(data.get(name, 0)))
        buckets = data.get("buckets", [])
        if not isinstance(buckets, list) or len(buckets) != len(counts.buckets):
            raise ValueError("the duration buckets differ from this version's")
        counts.buckets = [_count(value) for value in buckets]
        counts.duration_sum = float(data.get("duration_sum", 0.0))
        return counts


@dataclass(slots=True)
class Snapshot:
    """One reading of an app's metrics (or the sum of several processes' readings).

    ``queues`` is None when the queues were not sampled; a queue missing from it could
    not be read (``sample_errors`` counts the failed readings of each queue).
    """

    published: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, ConsumerCounts] = field(default_factory=dict)
    queues: dict[str, dict[str, int]] | None = None
    sample_errors: dict[str, int] = field(default_factory=dict)
    pid: int = 0  # the process it was read in (0: a sum)

    def add(self, other: Snapshot, *, gauges: bool = True) -> None:
        """Add ``other``: counters summed; with ``gauges``, busy/idle workers summed and
        each queue's counts kept from the first snapshot that has them."""
        for qid, count in other.published.items():
            self.published[qid] = self.published.get(qid, 0) + count
        for qid, count in other.sample_errors.items():
            self.sample_errors[qid] = self.sample_errors.get(qid, 0) + count
        for cid, counts in other.consumers.items():
            mine = self.consumers.get(cid)
            if mine is None:
                mine = self.consumers[cid] = ConsumerCounts(counts.queue)
            mine.add(counts, gauges=gauges)
        if gauges and other.queues is not None:
            queues = self.queues if self.queues is not None else {}
            for qid, states in other.queues.items():
                queues.setdefault(qid, dict(states))
            self.queues = queues

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "published": dict(self.published),
            "consumers": {cid: counts.to_dict() for cid, counts in self.consumers.items()},
            "queues": None if self.queues is None else {q: dict(s) for q, s in self.queues.items()},
            "sample_errors": dict(self.sample_errors),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Snapshot:
        """The snapshot ``to_dict`` wrote; ValueError if ``data`` is not one."""
        if not isinstance(data, dict):
            raise ValueError("a snapshot must be an object")
        consumers = data.get("consumers") or {}
        queues = data.get("queues")
        if not isinstance(consumers, dict) or not (queues is None or isinstance(queues, dict)):
            raise ValueError("a snapshot's consumers and queues must be objects")
        return cls(
            published=_counts(data.get("published")),
            consumers={str(cid): ConsumerCounts.from_dict(c) for cid, c in consumers.items()},
            queues=None if queues is None else {str(q): _counts(s) for q, s in queues.items()},
            sample_errors=_counts(data.get("sample_errors")),
            pid=_count(data.get("pid", 0)),
        )


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"not a count: {value!r}")
    return value


def _counts(data: Any) -> dict[str, int]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("counts must be an object")
    return {str(key): _count(value) for key, value in data.items()}


_LE = [floatToGoString(bound) for bound in DURATION_BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]


def families(snapshot: Snapshot) -> list[Metric]:
    """The metric families of ``snapshot``, in a stable order (sorted label values)."""
    published = CounterMetricFamily(
        "conveyor_messages_published_total",
        "Messages this app published (stored by the driver), per queue.",
        labels=["queue"],
    )
    for qid, count in sorted(snapshot.published.items()):
        published.add_metric([qid], count)
    processed = CounterMetricFamily(
        "conveyor_messages_processed_total",
        "Settlement outcomes of deliveries, per consumer: acked, failed (a failed attempt), "
        "dead_lettered, undecodable, dropped.",
        labels=["consumer", "queue", "outcome"],
    )
    delivered = CounterMetricFamily(
        "conveyor_messages_delivered_total",
        "Deliveries handed to a consumer (redeliveries included).",
        labels=["consumer", "queue"],
    )
    restarts = CounterMetricFamily(
        "conveyor_consumer_worker_restarts_total",
        "Consumer workers replaced after ending unexpectedly.",
        labels=["consumer"],
    )
    durations = HistogramMetricFamily(
        "conveyor_handler_duration_seconds",
        "How long handler runs took (successful or not), per consumer.",
        labels=["consumer"],
    )
    workers = GaugeMetricFamily(
        "conveyor_consumer_workers",
        "Consumer workers running a handler (busy) or waiting for a message (idle).",
        labels=["consumer", "state"],
    )
    for cid, counts in sorted(snapshot.consumers.items()):
        for outcome in OUTCOMES:
            processed.add_metric([cid, counts.queue, outcome], getattr(counts, outcome))
        delivered.add_metric([cid, counts.queue], counts.delivered)
        restarts.add_metric([cid], counts.worker_restarts)
        cumulative, total = [], 0
        for le, count in zip(_LE, counts.buckets, strict=True):
            total += count
            cumulative.append((le, float(total)))
        durations.add_metric([cid], cumulative, counts.duration_sum)
        workers.add_metric([cid, "busy"], counts.busy)
        workers.add_metric([cid, "idle"], counts.idle)
    found: list[Metric] = [published, processed, delivered, durations, workers, restarts]
    if snapshot.queues is not None:
        messages = GaugeMetricFamily(
            "conveyor_queue_messages",
            "Messages a queue holds, by state (sampled from the driver; a queue that could "
            "not be read is left out).",
            labels=["queue", "state"],
        )
        for qid, states in sorted(snapshot.queues.items()):
            for state in QUEUE_STATES:
                messages.add_metric([qid, state], states.get(state, 0))
        found.append(messages)
    errors = CounterMetricFamily(
        "conveyor_queue_sample_errors_total",
        "Readings of a queue's counts that failed or timed out (the queue was left out of "
        "conveyor_queue_messages).",
        labels=["queue"],
    )
    for qid, count in sorted(snapshot.sample_errors.items()):
        errors.add_metric([qid], count)
    found.append(errors)
    return found
