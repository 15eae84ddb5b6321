"""The metrics and health of one app: what :class:`~conveyor.app.App` owns to answer
``/metrics``, ``/healthz`` and ``/readyz``.

Counters are read when a scrape asks, from the request's thread: the runtime's
``published`` counts, every consumer's :class:`~conveyor.consumer.settlement.ConsumerStats`
and those of consumers stopped since the app started (:meth:`Observer.retire` keeps
them, so a counter never goes back when a consumer restarts). Queue counts come from
the drivers (``Driver.info``), which only the app's event loop may call: a scrape
hands the loop one sampling of every declared queue, each bounded by
``SAMPLE_TIMEOUT``, reuses it for ``SAMPLE_TTL`` seconds, and leaves out a queue that
could not be read (counting it in ``conveyor_queue_sample_errors_total``). A loop
that does not answer makes ``/healthz`` fail, never hangs a request.

Lifecycle (driven by the app): :meth:`Observer.open` binds the endpoint first thing
in ``App.astart`` (so ``/healthz`` answers during a long start), :meth:`Observer.opened`
marks the app ready to be judged, :meth:`Observer.stopping` first thing in
``App.astop`` makes ``/readyz`` fail at once, and :meth:`Observer.close`, last thing
before the loop stops, closes the endpoint.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from conveyor import errors
from conveyor.consumer.runtime import Consumer
from conveyor.observe.health import Parts, readiness
from conveyor.observe.http import Endpoint, Listen, Request, Response, exposition, json_response, not_found
from conveyor.observe.snapshot import QUEUE_STATES, ConsumerCounts, Snapshot, families
from conveyor.queue.runtime import Runtime
from conveyor.registry.model import Registry

__all__ = ["PROBE_TIMEOUT", "SAMPLE_TIMEOUT", "SAMPLE_TTL", "Observer", "call_on_loop"]

log = logging.getLogger("conveyor.observe")

T = TypeVar("T")

PROBE_TIMEOUT = 1.0  # seconds the app's loop has to answer /healthz and /readyz
SAMPLE_TTL = 1.0  # seconds a sampling of the queues is reused by later scrapes
SAMPLE_TIMEOUT = 2.0  # seconds one queue's Driver.info may take before it is left out

INDEX = b"conveyor: /metrics (Prometheus), /healthz (alive), /readyz (ready)\n"


def _copy(counts: ConsumerCounts) -> ConsumerCounts:
    copy = ConsumerCounts(counts.queue)
    copy.add(counts)
    return copy


def call_on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], T], timeout: float) -> T:
    """Run ``fn`` on ``loop`` (from another thread) and return its result.

    TimeoutError if the loop does not get to it within ``timeout`` seconds (it is then
    not run at all); RuntimeError if the loop is closed.
    """
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not done.set_running_or_notify_cancel():
            return  # the caller gave up
        try:
            done.set_result(fn())
        except BaseException as exc:
            done.set_exception(exc)

    loop.call_soon_threadsafe(run)
    try:
        return done.result(timeout)
    except TimeoutError:
        done.cancel()
        raise


class Observer:
    """Metrics and health of one app; see the module docstring.

    ``consumers`` is the app's dict of running consumers (the same object for the app's
    life); ``parts`` gathers what ``/readyz`` judges and runs on the app's loop.
    """

    def __init__(
        self,
        registry: Registry,
        runtime: Runtime,
        consumers: dict[str, Consumer],
        parts: Callable[[], Parts],
    ) -> None:
        self._registry = registry
        self._runtime = runtime
        self._consumers = consumers
        self._parts = parts
        self._lock = threading.Lock()  # retire() against snapshot(): nothing counted twice
        self._retired: dict[str, ConsumerCounts] = {}
        self._listen: Listen | None = None
        self._endpoint: Endpoint | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.phase = "stopped"
        # queue sampling: one at a time, reused for SAMPLE_TTL
        self._sample_lock = threading.Lock()
        self._samples: dict[str, dict[str, int]] = {}
        self._sampled_at = float("-inf")
        self._sample_errors: dict[str, int] = {}
        self._failing: set[str] = set()

    # -- configuration and lifecycle -------------------------------------------------------------

    def configure(self, listen: Listen) -> None:
        self._listen = listen

    @property
    def configured(self) -> bool:
        """True once an endpoint was asked for: consumers then time their handlers."""
        return self._listen is not None

    @property
    def address(self) -> tuple[str, int] | str | None:
        return self._endpoint.address if self._endpoint is not None else None

    async def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """The app starts on ``loop``: bind the endpoint (INVALID if it cannot be bound)."""
        self._loop = loop
        self.phase = "starting"
        if self._listen is not None and self._endpoint is None:
            endpoint = Endpoint(self._listen, self)
            endpoint.start()
            self._endpoint = endpoint

    def opened(self) -> None:
        self.phase = "running"

    def stopping(self) -> None:
        self.phase = "stopping"

    async def close(self) -> None:
        """The app has stopped: close the endpoint (waits for its thread, off the loop)."""
        self.phase = "stopped"
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            await asyncio.to_thread(endpoint.close)
        self._loop = None
        self._sampled_at = float("-inf")  # a restart samples afresh (no lock: a scrape may hold it)

    # -- counters ----------------------------------------------------------------------------------

    def retire(self, consumers: dict[str, Consumer]) -> None:
        """Keep the counters of ``consumers`` (stopped) and empty the dict, in one step."""
        with self._lock:
            for cid, consumer in consumers.items():
                counts = self._retired.get(cid)
                if counts is None:
                    counts = self._retired[cid] = ConsumerCounts(consumer.queue.id)
                counts.add_stats(consumer.stats)
            consumers.clear()

    def snapshot(self, queues: bool = True) -> Snapshot:
        """The app's metrics now; with ``queues``, the queues' counts too (sampled on the
        app's loop: never call this on that loop with ``queues``)."""
        with self._lock:
            live = list(self._consumers.values())
            retired = [(cid, _copy(counts)) for cid, counts in self._retired.items()]
        found = Snapshot(pid=os.getpid())
        found.published = {qid: 0 for qid in self._registry.queues}
        found.published.update(self._runtime.published)
        for cid, spec in self._registry.consumers.items():
            found.consumers[cid] = ConsumerCounts(spec.queue)
        for cid, counts in retired:
            found.consumers[cid].add(counts)
        for consumer in live:
            counts = found.consumers[consumer.spec.id]
            counts.add_stats(consumer.stats)
            busy = consumer.in_flight  # a stopping consumer's handlers still run: busy, never idle
            counts.busy += busy
            if not consumer.stopping:
                counts.idle += max(consumer.spec.concurrency - busy, 0)
        if queues:
            found.queues = self._sample_queues()
        with self._sample_lock:
            found.sample_errors = {qid: self._sample_errors.get(qid, 0) for qid in self._registry.queues}
        return found

    # -- queue sampling ------------------------------------------------------------------------------

    def _sample_queues(self) -> dict[str, dict[str, int]]:
        loop = self._loop
        if loop is None or self.phase != "running":
            return {}
        with self._sample_lock:
            if time.monotonic() - self._sampled_at < SAMPLE_TTL:
                return {qid: dict(states) for qid, states in self._samples.items()}
            results: dict[str, dict[str, int] | str]
            try:
                future = asyncio.run_coroutine_threadsafe(self._sample(), loop)
            except RuntimeError:  # the loop has closed
                return {}
            try:
                results = future.result(SAMPLE_TIMEOUT + PROBE_TIMEOUT)
            except TimeoutError:
                future.cancel()
                why = f"the app's event loop did not answer within {SAMPLE_TIMEOUT + PROBE_TIMEOUT:g}s"
                results = dict.fromkeys(self._registry.queues, why)
            self._samples = {}
            for qid, result in results.items():
                if isinstance(result, str):
                    self._sample_failed(qid, result)
                else:
                    self._samples[qid] = result
                    if qid in self._failing:
                        self._failing.discard(qid)
                        log.info("queue %s can be sampled again", qid)
            self._sampled_at = time.monotonic()
            return {qid: dict(states) for qid, states in self._samples.items()}

    def _sample_failed(self, qid: str, why: str) -> None:
        self._sample_errors[qid] = self._sample_errors.get(qid, 0) + 1
        if qid not in self._failing:
            self._failing.add(qid)
            log.warning("cannot sample queue %s for metrics (left out until it can): %s", qid, why)

    async def _sample(self) -> dict[str, dict[str, int] | str]:
        """On the app's loop: every declared queue's counts, or why not."""
        ids = list(self._registry.queues)
        results = await asyncio.gather(
            *(asyncio.wait_for(self._runtime.ainfo(qid), SAMPLE_TIMEOUT) for qid in ids),
            return_exceptions=True,
        )
        found: dict[str, dict[str, int] | str] = {}
        for qid, result in zip(ids, results, strict=True):
            if isinstance(result, TimeoutError):
                found[qid] = f"the driver did not answer within {SAMPLE_TIMEOUT:g}s"
            elif isinstance(result, errors.Error):
                found[qid] = str(result)
            elif isinstance(result, BaseException):
                found[qid] = f"{type(result).__name__}: {result}"
            else:
                found[qid] = {state: int(result.get(state, 0)) for state in QUEUE_STATES}
        return found

    # -- the endpoint's answers (in a request thread) -------------------------------------------------

    def respond(self, request: Request) -> Response:
        path = request.path
        if path == "/metrics":
            return exposition(families(self.snapshot()), request.accept)
        if path == "/healthz":
            return self._healthz()
        if path == "/readyz":
            ready, answer = self._readiness()
            return json_response(200 if ready else 503, answer)
        if path == "/snapshot" and self._listen is not None and self._listen.path is not None:
            # the private link of a prefork worker: what its supervisor sums
            snap = self.snapshot(queues=request.query.get("queues") == "1")
            return json_response(200, {"snapshot": snap.to_dict()})
        if path == "/":
            return Response(200, "text/plain; charset=utf-8", INDEX)
        return not_found(path)

    def _healthz(self) -> Response:
        phase = self.phase
        loop = self._loop
        why = None
        if loop is None:
            why = "the app is not started"
        else:
            try:
                call_on_loop(loop, lambda: None, PROBE_TIMEOUT)
            except TimeoutError:
                why = (
                    f"the app's event loop did not answer within {PROBE_TIMEOUT:g}s "
                    "(something blocks it; the log names it)"
                )
            except RuntimeError:
                why = "the app's event loop has stopped"
        if why is not None:
            return json_response(503, {"status": "not responding", "phase": phase, "reason": why})
        return json_response(200, {"status": "alive", "phase": phase})

    def _readiness(self) -> tuple[bool, dict[str, Any]]:
        phase = self.phase
        loop = self._loop
        if phase != "running" or loop is None:
            return readiness(phase, None)
        try:
            parts = call_on_loop(loop, self._parts, PROBE_TIMEOUT)
        except (TimeoutError, RuntimeError):
            why = f"the app's event loop did not answer within {PROBE_TIMEOUT:g}s"
            return False, {"status": "not ready", "phase": phase, "reasons": [why]}
        return readiness(self.phase, parts)
