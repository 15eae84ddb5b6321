"""Watching a running app from outside: Prometheus metrics and health probes over HTTP.

- :mod:`~conveyor.observe.snapshot`: what the metrics say, as plain data (one app's
  counters and samples), how snapshots of several processes add up, and how they
  become Prometheus metric families.
- :mod:`~conveyor.observe.health`: when an app is ready, and why not.
- :mod:`~conveyor.observe.http`: the small HTTP server (``/metrics``, ``/healthz``,
  ``/readyz``) in a daemon thread.
- :mod:`~conveyor.observe.observer`: the part an :class:`~conveyor.app.App` owns:
  reads its counters at scrape time, samples its queues on its loop, serves them.
- :mod:`~conveyor.observe.workers`: the same endpoints for ``conveyor run
  --processes N``, summed over the worker processes.

Nothing here runs per message: the consumer and the runtime count in plain
attributes, and a scrape reads them.
"""

from __future__ import annotations

__all__: list[str] = []
