"""``/metrics``, ``/healthz`` and ``/readyz`` of ``conveyor run --processes N``: the workers' sum.

The supervisor serves the public port; each worker serves its own app's endpoint on a
Unix socket in a private directory the supervisor made (one path per worker slot).
A request to the supervisor asks every worker at once, with a timeout:

- ``/metrics``: every worker's :class:`~conveyor.observe.snapshot.Snapshot`, summed
  (:meth:`Snapshot.add`): counters and histograms per label set, busy/idle workers.
  The queues are shared, so only one worker (the first that answered) is asked to
  sample them: a queue is counted once, not N times. A worker that does not answer
  keeps the counters of its last answer in the sum; a worker that was restarted (a
  new process in its slot) has its predecessor's last counters added for good, so no
  counter goes back. What a worker counted after the last scrape before it died is
  lost with it. ``conveyor_prefork_workers{state}`` says how many answered.
- ``/readyz``: ready when every slot's worker answers that it is ready; otherwise 503
  naming each worker that is not, and why (its own ``/readyz`` answer).
- ``/healthz``: the supervisor's own event loop answers (a worker's liveness is the
  supervisor's business: it restarts workers that die).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import GaugeMetricFamily

from conveyor.observe.http import (
    Endpoint,
    Listen,
    Request,
    Response,
    exposition,
    fetch_unix,
    json_response,
    not_found,
)
from conveyor.observe.observer import INDEX, PROBE_TIMEOUT, SAMPLE_TIMEOUT, call_on_loop
from conveyor.observe.snapshot import Snapshot, families

__all__ = ["WORKER_TIMEOUT", "WorkersEndpoint", "WorkersSource"]

log = logging.getLogger("conveyor.observe")

# seconds a worker has to answer: its own probe or queue sampling, plus the way there and back
WORKER_TIMEOUT = SAMPLE_TIMEOUT + PROBE_TIMEOUT + 1.0


class WorkersSource:
    """Answers for a prefork supervisor from its workers' endpoints (``sockets``: slot -> path).

    ``loop`` is the supervisor's event loop (``/healthz`` pings it). :meth:`close` when done.
    """

    def __init__(self, sockets: dict[int, str], loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.sockets = dict(sockets)
        self.loop = loop
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(len(sockets), 16) or 1, thread_name_prefix="conveyor-metrics-ask"
        )
        self._lock = threading.Lock()
        self._last: dict[int, Snapshot] = {}  # slot -> the counters of its worker's last answer
        self._retired = Snapshot()  # counters of workers that were replaced

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- asking the workers -------------------------------------------------------------------

    def _ask(self, slot: int, target: str) -> tuple[int, Any] | str:
        """``target``'s status and JSON answer from ``slot``'s worker, or why there is none."""
        try:
            status, body = fetch_unix(self.sockets[slot], target, WORKER_TIMEOUT)
        except (OSError, http.client.HTTPException) as exc:
            return f"not answering (starting, restarting or stuck): {exc}"
        try:
            return status, json.loads(body)
        except ValueError:
            return f"answered {status} with something that is not JSON"

    def _ask_all(self, target: str) -> dict[int, tuple[int, Any] | str]:
        slots = sorted(self.sockets)
        answers = self._pool.map(lambda slot: self._ask(slot, target), slots)
        return dict(zip(slots, answers, strict=True))

    # -- the answers ------------------------------------------------------------------------------

    def respond(self, request: Request) -> Response:
        if request.path == "/metrics":
            return exposition(self._families(), request.accept)
        if request.path == "/readyz":
            ready, answer = self.readiness()
            return json_response(200 if ready else 503, answer)
        if request.path == "/healthz":
            return self._healthz()
        if request.path == "/":
            return Response(200, "text/plain; charset=utf-8", INDEX)
        return not_found(request.path)

    def snapshot(self) -> tuple[Snapshot, int]:
        """The workers' metrics summed, and how many workers answered."""
        answers = self._ask_all("/snapshot?queues=0")
        live: dict[int, Snapshot] = {}
        for slot, answer in answers.items():
            snap = _snapshot_of(answer)
            if snap is not None:
                live[slot] = snap
        if live:  # the shared queues: sampled by one worker
            first = min(live)
            snap = _snapshot_of(self._ask(first, "/snapshot?queues=1"))
            if snap is not None:
                live[first] = snap
        total = Snapshot()
        with self._lock:
            for slot, snap in live.items():
                last = self._last.get(slot)
                if last is not None and last.pid != snap.pid:  # a new worker in the slot
                    self._retired.add(last, gauges=False)
                self._last[slot] = snap
            total.add(self._retired, gauges=False)
            for slot, last in self._last.items():
                if slot not in live:
                    total.add(last, gauges=False)
        for snap in live.values():
            total.add(snap)
        return total, len(live)

    def _families(self) -> list[Any]:
        total, answered = self.snapshot()
        found = families(total)
        workers = GaugeMetricFamily(
            "conveyor_prefork_workers",
            "Worker processes of conveyor run --processes that answered this scrape (up) or not (down).",
            labels=["state"],
        )
        workers.add_metric(["up"], answered)
        workers.add_metric(["down"], len(self.sockets) - answered)
        found.append(workers)
        return found

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        workers: dict[str, Any] = {}
        reasons: list[str] = []
        for slot, reply in self._ask_all("/readyz").items():
            if isinstance(reply, str):
                workers[str(slot)] = {"ready": False, "reason": reply}
                reasons.append(f"worker {slot}: {reply}")
                continue
            status, body = reply
            ready = status == 200
            workers[str(slot)] = {"ready": ready, **(body if isinstance(body, dict) else {})}
            if not ready:
                why = body.get("reasons") if isinstance(body, dict) else None
                text = "; ".join(str(r) for r in why) if isinstance(why, list) and why else "not ready"
                reasons.append(f"worker {slot}: {text}")
        ready = not reasons
        answer: dict[str, Any] = {"status": "ready" if ready else "not ready"}
        if reasons:
            answer["reasons"] = reasons
        answer["workers"] = workers
        return ready, answer

    def _healthz(self) -> Response:
        loop = self.loop
        if loop is not None:
            try:
                call_on_loop(loop, lambda: None, PROBE_TIMEOUT)
            except (TimeoutError, RuntimeError):
                why = f"the supervisor's event loop did not answer within {PROBE_TIMEOUT:g}s"
                return json_response(503, {"status": "not responding", "reason": why})
        return json_response(200, {"status": "alive", "workers": len(self.sockets)})


def _snapshot_of(answer: tuple[int, Any] | str) -> Snapshot | None:
    if isinstance(answer, str):
        return None
    status, body = answer
    if status != 200 or not isinstance(body, dict):
        return None
    try:
        return Snapshot.from_dict(body.get("snapshot"))
    except (TypeError, ValueError) as exc:
        log.warning("a worker's metrics could not be read: %s", exc)
        return None


class WorkersEndpoint:
    """A supervisor's public endpoint and its workers' private sockets; owned by ``Prefork.run``.

    :meth:`start` makes a private directory (mode 0700) for the workers' sockets and
    binds ``listen`` (INVALID if it cannot: before any worker starts); :meth:`close`
    closes the endpoint and removes the directory. Blocking: call it off the loop.
    """

    def __init__(self, listen: Listen, processes: int, loop: asyncio.AbstractEventLoop | None) -> None:
        self.listen = listen
        self.processes = processes
        self.loop = loop
        self._dir: str | None = None
        self._endpoint: Endpoint | None = None
        self._source: WorkersSource | None = None

    @property
    def address(self) -> tuple[str, int] | str | None:
        return self._endpoint.address if self._endpoint is not None else None

    def socket(self, slot: int) -> str:
        """Where the worker of ``slot`` serves its endpoint."""
        assert self._dir is not None, "not started"
        return str(Path(self._dir) / f"worker-{slot}.sock")

    def start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="conveyor-metrics-")
        sockets = {slot: self.socket(slot) for slot in range(1, self.processes + 1)}
        self._source = WorkersSource(sockets, self.loop)
        endpoint = Endpoint(self.listen, self._source)
        try:
            endpoint.start()
        except BaseException:
            self.close()
            raise
        self._endpoint = endpoint

    def close(self) -> None:
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            endpoint.close()
        source, self._source = self._source, None
        if source is not None:
            source.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
