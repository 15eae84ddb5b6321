"""Running one app in several processes: ``conveyor run --processes N`` (prefork).

A *supervisor* process starts N *workers*. Each worker is a normal ``conveyor run`` of
the same app, started as ``python -m conveyor run PATH ... --prefork-worker I:FD``
(the same flags minus ``--processes``), so a worker loads, runs, stops and reports
exactly as a single ``conveyor run`` does. The workers share the work through the
driver: every queue must live outside the process (SQLite, AMQP; see
:func:`check_shareable`).

Why a fresh interpreter (``subprocess`` of ``sys.executable -m conveyor``) and not
``fork`` or ``multiprocessing``: the supervisor imports no handler and starts no app
and no thread that a forked child would inherit half-done; a worker needs nothing
pickled (it reads the configuration file itself); its exit status is its own; and a
restarted worker re-reads the file like the first one did.

Each worker is tied to the supervisor by one control socket (a ``socketpair``; the
worker's end is passed as ``FD``, the supervisor keeps the other end and passes it to
no one else). Over it the worker sends its final report (the ``--json`` summary of
``conveyor run``) when its run has ended; the supervisor never writes to it. The
worker watches it from a daemon thread: end-of-file means the supervisor is gone
(the kernel closes its end when it dies, even by SIGKILL), and the worker then stops
itself as the supervisor would have: SIGTERM (a graceful stop, or an immediate one if
it was already stopping); a second SIGTERM if it still runs ``grace + KILL_AFTER``
seconds later; ``os._exit`` ``KILL_AFTER`` seconds after that.

Processes and their owners:

============================  =======================  ==========================================
process / task                owner                    ended by
============================  =======================  ==========================================
worker process of slot I      the keeper task of       its stop signal, forwarded; EOF on its
                              slot I                   control socket; SIGKILL after a forced stop
control socket of a worker    that worker's run        closed by the supervisor once the worker
                              (``Prefork._run``)       has exited
keeper task of slot I         ``Prefork.run``          a stop, the worker finishing for good
                                                       (idle, timeout), or a fatal exit
kill timer                    ``Prefork.run``          firing, or the end of the run
watcher thread (in a worker)  the worker process       the process's exit (a daemon thread)
metrics endpoint (with        ``Prefork.run``          the end of the run, after every worker
``metrics``) and the                                   has exited (the directory is removed)
workers' socket directory
============================  =======================  ==========================================

Workers run in their own process groups, so a Ctrl-C in a terminal reaches the
supervisor only, and each worker gets each signal exactly once, from the supervisor.

Shutdown order:

1. The first SIGINT or SIGTERM to the supervisor (or a worker exiting with a
   configuration error, which stops the others with SIGTERM): restarts stop; pending
   restarts are cancelled; the signal is forwarded to every live worker.
2. Each worker stops as ``conveyor run`` does: its consumers stop taking deliveries,
   in-flight handlers get the grace period, unsettled messages go back to their
   queues, its drivers close; it writes its report on its control socket and exits.
3. A second signal (or any signal once the stop has begun) is forwarded again: the
   workers stop at once. Workers still alive ``kill_after`` seconds later are killed
   (SIGKILL); the messages they held come back through the driver's own recovery
   (a SQLite lease of a dead process, a closed AMQP channel).
4. The supervisor waits for every worker to exit, closes their control sockets, and
   returns what happened (:class:`PreforkResult`); the command prints the summed
   report and exits (non-zero after a forced stop).

If the supervisor itself dies (even by SIGKILL), steps 2 and 3 happen anyway: every
worker's control socket reaches end-of-file and the worker stops itself, escalating
on the same schedule (see :class:`WorkerLink`).

Size: over 500 lines because the supervisor and the worker's side of the link
(:class:`WorkerLink`) speak one protocol over one socket and share the stop schedule;
kept in one module so the two halves change together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from conveyor import errors
from conveyor.app import DEFAULT_GRACE
from conveyor.drivers.kinds import driver_class
from conveyor.observe.http import Listen
from conveyor.observe.workers import WorkersEndpoint
from conveyor.registry.model import Registry

__all__ = [
    "KILL_AFTER",
    "Backoff",
    "Prefork",
    "PreforkResult",
    "WorkerLink",
    "WorkerRun",
    "check_shareable",
    "combine_reports",
    "next_step",
]

log = logging.getLogger("conveyor.prefork")

KILL_AFTER = 5.0  # seconds after a forced stop before workers still alive are killed
REPORT_WAIT = 1.0  # seconds to wait for the rest of a report once its worker has exited
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# -- what the command checks first ------------------------------------------------------------


def check_shareable(registry: Registry, processes: int) -> None:
    """INVALID unless every declared queue lives where several processes can share it.

    A driver without the ``cross_process`` capability (the memory driver) keeps its
    queues inside one process: N workers would each get their own empty queues.
    """
    local: dict[str, list[str]] = {}
    for qid, spec in registry.queues.items():
        driver = registry.drivers[spec.driver]
        if not driver_class(driver.kind).capabilities.cross_process:
            local.setdefault(driver.id, []).append(qid)
    if local:
        where = "; ".join(
            f"driver {did} ({registry.drivers[did].kind}) keeps {', '.join(qids)} inside one process"
            for did, qids in local.items()
        )
        raise errors.invalid(
            f"--processes {processes}: the workers cannot share the work: {where}; "
            "use a driver whose queues several processes share (such as queue.driver.sqlite)",
            drivers=sorted(local),
        )
    if os.name != "posix":
        raise errors.invalid(f"--processes {processes} needs a POSIX system (signals, process groups)")


# -- the worker's side --------------------------------------------------------------------------


class _WorkerTag(logging.Filter):
    """Adds ``worker=I`` to every record a worker logs (shown with the record's extra fields)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.setdefault("worker", self.index)
        return True


class WorkerLink:
    """A worker's end of its control socket: notices the supervisor's death, carries the report.

    When the supervisor is gone, the worker stops as the supervisor would have stopped
    it: SIGTERM to itself; a second SIGTERM if it still runs ``grace + KILL_AFTER``
    seconds later; and if even that has not ended it ``KILL_AFTER`` seconds after, it
    exits on the spot (a handler or a start that ignores every stop request).
    """

    def __init__(self, index: int, fd: int, grace: float | None = None) -> None:
        self.index = index
        self.grace = DEFAULT_GRACE if grace is None else grace
        self._sock = socket.socket(fileno=fd)
        self._sock.set_inheritable(False)  # a handler's subprocess must not keep it open
        self._thread = threading.Thread(target=self._watch, name="conveyor-prefork-watch", daemon=True)

    @classmethod
    def attach(cls, index: int, fd: int, grace: float | None = None) -> WorkerLink:
        """Tag this process's log lines with ``worker=index`` and start watching the supervisor."""
        try:
            link = cls(index, fd, grace)
        except OSError as exc:
            raise errors.invalid(f"--prefork-worker: file descriptor {fd} is not a socket: {exc}") from None
        for handler in logging.getLogger().handlers:
            handler.addFilter(_WorkerTag(index))
        link._thread.start()
        return link

    def _watch(self) -> None:
        try:
            while self._sock.recv(256):
                pass  # the supervisor writes nothing: only the end of the stream matters
        except OSError:
            pass
        log.warning("the supervisor is gone: stopping this worker (as on SIGTERM)")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(self.grace + KILL_AFTER)
        log.warning(
            "still running %gs after its supervisor died: stopping at once (as on a second SIGTERM)",
            self.grace + KILL_AFTER,
        )
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(KILL_AFTER)
        log.critical("still running after being told to stop at once: exiting now")
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(128 + signal.SIGKILL)  # as if the supervisor had killed it

    def send_report(self, report: dict[str, Any]) -> None:
        """Send the run's report to the supervisor (the end of this worker's part of the talk)."""
        try:
            self._sock.sendall(json.dumps(report).encode())
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            log.warning("cannot send the report to the supervisor: %s", exc)


# -- the supervisor's side ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    """Restart delays of one worker: ``initial * factor ** n`` capped at ``cap``, where n
    counts the restarts since the last run that lasted ``healthy`` seconds or more."""

    initial: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    healthy: float = 60.0

    def delay(self, failures: int) -> float:
        return float(min(self.cap, self.initial * self.factor**failures))

    def after(self, ran: float, failures: int) -> tuple[float, int]:
        """The delay before the next start of a worker whose run lasted ``ran`` seconds after
        ``failures`` quick restarts, and the new count."""
        if ran >= self.healthy:
            failures = 0
        return self.delay(failures), failures + 1


@dataclass(slots=True)
class WorkerRun:
    """One run of one worker process, once it has ended."""

    worker: int  # the slot, 1..N
    pid: int | None
    returncode: int | None  # None: the process could not be started
    seconds: float
    report: dict[str, Any] | None = None  # its ``conveyor run --json`` summary, if it sent one
    during_stop: bool = False  # it ended after the supervisor's stop had begun
    error: str | None = None  # why it could not be started

    @property
    def ended(self) -> str:
        """How it ended, in words: ``exited with code 1``, ``was killed by SIGKILL``."""
        if self.returncode is None:
            return f"could not be started ({self.error})"
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            return f"was killed by {name}"
        return f"exited with code {self.returncode}"

    @property
    def reason(self) -> str | None:
        reason = (self.report or {}).get("reason")
        return reason if isinstance(reason, str) else None

    def to_dict(self) -> dict[str, Any]:
        code = self.returncode
        killed_by = None
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                killed_by = signal.Signals(-code).name
        return {
            "worker": self.worker,
            "pid": self.pid,
            "exit_code": code if code is None or code >= 0 else None,
            "signal": killed_by,
            "seconds": round(self.seconds, 3),
            "reason": self.reason,
            "reported": self.report is not None,
        }


def next_step(run: WorkerRun, *, stopping: bool, fatal_codes: Collection[int]) -> str:
    """What the supervisor does after ``run`` ended.

    ``"stopped"``: the supervisor is stopping, nothing to do; ``"fatal"``: an exit code
    that a restart would only repeat (a configuration error), stop everything;
    ``"finished"``: the worker's run ended as asked (``--until-idle`` found the app idle,
    or its ``--timeout`` ran out), no restart; ``"restart"``: anything else — a crash, a
    kill, a runtime failure, a stop the supervisor did not ask for.
    """
    if stopping:
        return "stopped"
    if run.returncode is not None and run.returncode in fatal_codes:
        return "fatal"
    if run.reason in ("idle", "timeout"):
        return "finished"
    return "restart"


def combine_reports(
    reports: Sequence[dict[str, Any]],
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, Any]]]:
    """Consumer counters summed over ``reports``; the queue counts of the last one.

    Every worker reads the same shared queues, so summing their queue counts would
    count each message once per worker: the last report is the latest reading.
    """
    consumers: dict[str, dict[str, int]] = {}
    for report in reports:
        for cid, counters in (report.get("consumers") or {}).items():
            total = consumers.setdefault(cid, {})
            for key, value in counters.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    total[key] = total.get(key, 0) + value
    queues: dict[str, dict[str, Any]] = dict(reports[-1].get("queues") or {}) if reports else {}
    return consumers, queues


@dataclass(slots=True)
class PreforkResult:
    """How a prefork run ended: every worker run, in the order they ended."""

    processes: int
    elapsed: float = 0.0
    signalled: bool = False  # a signal stopped the supervisor
    forced: bool = False  # a second signal (or a signal once stopping) made the stop immediate
    killed: int = 0  # workers killed (SIGKILL) after a forced stop
    timed_out: bool = False  # a worker's --timeout ran out, or no time was left to restart one
    failed: WorkerRun | None = None  # the run whose exit code stopped everything
    runs: list[WorkerRun] = field(default_factory=list)

    @property
    def restarts(self) -> int:
        return max(0, len(self.runs) - self.processes)

    @property
    def reports(self) -> list[dict[str, Any]]:
        return [run.report for run in self.runs if run.report is not None]

    @property
    def reason(self) -> str:
        """``failed``, ``timeout``, ``signal`` or ``idle`` (every worker found the app idle)."""
        if self.failed is not None:
            return "failed"
        if self.timed_out or any(run.reason == "timeout" for run in self.runs):
            return "timeout"
        return "signal" if self.signalled else "idle"

    @property
    def unclean(self) -> list[WorkerRun]:
        """Runs that ended badly during a graceful stop (not 0, nor killed by the stop's signal
        before the worker could handle it)."""
        stopped_by_signal = {-int(sig) for sig in _SIGNALS} | {128 + int(sig) for sig in _SIGNALS}
        return [
            run
            for run in self.runs
            if run.during_stop
            and run.returncode != 0
            and not (run.report is None and run.returncode in stopped_by_signal)
        ]


@dataclass(slots=True)
class _Slot:
    """A worker slot's state across its runs."""

    index: int
    failures: int = 0  # restarts since the last healthy run
    proc: asyncio.subprocess.Process | None = None


class Prefork:
    """Runs N workers until a stop (or until each has finished); see the module docstring.

    ``args`` are the worker's ``conveyor run`` arguments after ``run`` (the config path
    and flags, without ``--processes``, ``--timeout``, ``--json``); ``timeout`` is the
    ``--timeout`` counted from the supervisor's start (a restarted worker gets what is
    left). ``fatal_codes`` are the exit codes a restart would only repeat. With
    ``metrics``, the supervisor serves ``/metrics``, ``/healthz`` and ``/readyz`` there,
    summed over its workers (:mod:`conveyor.observe.workers`), and tells each worker
    where to serve its own (``--metrics-socket``).
    """

    def __init__(
        self,
        args: Sequence[str],
        processes: int,
        *,
        timeout: float | None = None,
        backoff: Backoff | None = None,
        kill_after: float = KILL_AFTER,
        fatal_codes: Collection[int] = (),
        metrics: Listen | None = None,
    ) -> None:
        if processes < 1:
            raise errors.invalid(f"processes must be >= 1, got {processes}")
        self.args = list(args)
        self.processes = processes
        self.timeout = timeout
        self.backoff = backoff or Backoff()
        self.kill_after = kill_after
        self.fatal_codes = frozenset(fatal_codes)
        self.result = PreforkResult(processes)
        self._slots = [_Slot(i) for i in range(1, processes + 1)]
        self._started = 0.0
        self._stopping = False
        self._stop_event: asyncio.Event | None = None
        self._forwarded: list[int] = []  # signals sent to every worker so far, in order
        self._killer: asyncio.Task[None] | None = None
        # metrics: the public endpoint sums the workers' (each on a Unix socket of its slot)
        self.metrics = metrics
        self._metrics: WorkersEndpoint | None = None

    # -- running ---------------------------------------------------------------------------------

    async def run(self) -> PreforkResult:
        """Start the workers, keep them running, stop them; the result once all have exited."""
        loop = asyncio.get_running_loop()
        self._started = time.monotonic()
        self._stop_event = asyncio.Event()
        if self.metrics is not None:  # bound before any worker starts: a taken port fails the run
            self._metrics = WorkersEndpoint(self.metrics, self.processes, loop)
            self._metrics.start()
        installed: list[int] = []
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
        log.info(
            "starting %d worker processes: %s",
            self.processes,
            " ".join([os.path.basename(sys.executable), "-m", "conveyor", "run", *self.args]),
        )
        keepers = [asyncio.create_task(self._keep(slot)) for slot in self._slots]
        try:
            await asyncio.gather(*keepers)
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
            if self._killer is not None:
                self._killer.cancel()
            await self._kill_leftovers(keepers)
            if self._metrics is not None:
                await asyncio.to_thread(self._metrics.close)
        self.result.elapsed = time.monotonic() - self._started
        return self.result

    async def _keep(self, slot: _Slot) -> None:
        """Keep slot ``slot`` running: start its worker, restart it with backoff, until done."""
        while not self._stopping:
            remaining = self._remaining()
            if remaining is not None and remaining <= 0:
                log.warning("worker %d not restarted: the --timeout has run out", slot.index)
                self.result.timed_out = True
                return
            run = await self._run(slot, remaining)
            step = next_step(run, stopping=self._stopping, fatal_codes=self.fatal_codes)
            if step == "stopped":
                self._log_stopped(run)
                return
            if step == "finished":
                log.info("worker %d (pid %s) finished: %s, %s", slot.index, run.pid, run.reason, run.ended)
                return
            if step == "fatal":
                log.error(
                    "worker %d (pid %s) %s after %.1fs: a restart would fail the same way; "
                    "stopping the other workers",
                    slot.index,
                    run.pid,
                    run.ended,
                    run.seconds,
                )
                self.result.failed = run
                self._begin_stop()
                self._forward(signal.SIGTERM)
                return
            delay, slot.failures = self.backoff.after(run.seconds, slot.failures)
            log.warning(
                "worker %d (pid %s) %s after %.1fs%s; restarting it in %gs",
                slot.index,
                run.pid,
                run.ended,
                run.seconds,
                f" (its run ended: {run.reason})" if run.reason else "",
                delay,
            )
            if await self._stopped_within(delay):
                return

    def _log_stopped(self, run: WorkerRun) -> None:
        at_once = {128 + sig for sig in self._forwarded} | {-sig for sig in self._forwarded}
        if run.returncode == 0:
            log.info("worker %d (pid %s) stopped", run.worker, run.pid)
        elif self.result.forced and run.returncode in at_once:
            log.info("worker %d (pid %s) stopped at once (%s)", run.worker, run.pid, run.ended)
        else:
            log.warning("worker %d (pid %s) %s while stopping", run.worker, run.pid, run.ended)

    def _remaining(self) -> float | None:
        if self.timeout is None:
            return None
        return self.timeout - (time.monotonic() - self._started)

    async def _stopped_within(self, delay: float) -> bool:
        assert self._stop_event is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), delay)
        return self._stopping

    def _command(self, slot: _Slot, fd: int, remaining: float | None) -> list[str]:
        command = [sys.executable, "-m", "conveyor", "run", *self.args]
        if remaining is not None:
            command += ["--timeout", f"{remaining:.3f}"]
        if self._metrics is not None:
            command += ["--metrics-socket", self._metrics.socket(slot.index)]
        return [*command, "--prefork-worker", f"{slot.index}:{fd}"]

    async def _run(self, slot: _Slot, remaining: float | None) -> WorkerRun:
        """One run of slot ``slot``'s worker, from its start to its exit."""
        ours, theirs = socket.socketpair()
        started = time.monotonic()
        try:
            with theirs:
                proc = await asyncio.create_subprocess_exec(
                    *self._command(slot, theirs.fileno(), remaining),
                    stdin=asyncio.subprocess.DEVNULL,
                    pass_fds=(theirs.fileno(),),
                    process_group=0,  # signals reach a worker only through the supervisor
                )
        except OSError as exc:
            ours.close()
            run = WorkerRun(slot.index, None, None, 0.0, error=str(exc), during_stop=self._stopping)
            self.result.runs.append(run)
            return run
        slot.proc = proc
        log.info("worker %d started (pid %d)", slot.index, proc.pid)
        for sig in self._forwarded:  # a stop began while it was being started
            self._send(proc, sig)
        try:
            report = await self._collect(proc, ours)
        finally:
            slot.proc = None
            ours.close()
        assert proc.returncode is not None
        run = WorkerRun(
            slot.index, proc.pid, proc.returncode, time.monotonic() - started, report, self._stopping
        )
        self.result.runs.append(run)
        return run

    async def _collect(self, proc: asyncio.subprocess.Process, sock: socket.socket) -> dict[str, Any] | None:
        """Wait for ``proc`` to exit; its report, read from ``sock`` meanwhile (None if none)."""
        sock.setblocking(False)
        reading = asyncio.create_task(_read_all(sock))
        try:
            await proc.wait()
            try:
                data = await asyncio.wait_for(reading, REPORT_WAIT)
            except TimeoutError:  # a descendant of the worker still holds its end open
                data = b""
        finally:
            reading.cancel()
        if not data:
            return None
        try:
            report = json.loads(data)
        except ValueError:
            log.warning("worker (pid %d) sent a report that is not JSON; ignored", proc.pid)
            return None
        return report if isinstance(report, dict) else None

    # -- stopping --------------------------------------------------------------------------------

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        self.result.signalled = True
        live = sum(1 for slot in self._slots if slot.proc is not None)
        if self._stopping:
            log.warning("received %s: stopping the workers at once", name)
            self.result.forced = True
            if self._killer is None:
                self._killer = asyncio.get_running_loop().create_task(self._kill_later())
        else:
            log.info(
                "received %s: stopping %d worker(s) gracefully (send it again to stop at once)", name, live
            )
        self._begin_stop()
        self._forward(sig)

    def _begin_stop(self) -> None:
        self._stopping = True
        if self._stop_event is not None:
            self._stop_event.set()

    def _forward(self, sig: int) -> None:
        self._forwarded.append(sig)
        for slot in self._slots:
            if slot.proc is not None:
                self._send(slot.proc, sig)

    @staticmethod
    def _send(proc: asyncio.subprocess.Process, sig: int) -> None:
        # os.kill, not proc.send_signal: Popen.send_signal polls (waitpid) and could reap the
        # child before asyncio's child watcher does, which then reports a wrong exit status.
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)

    async def _kill_later(self) -> None:
        await asyncio.sleep(self.kill_after)
        for slot in self._slots:
            if slot.proc is not None and slot.proc.returncode is None:
                log.warning(
                    "worker %d (pid %d) still running %gs after the forced stop: killing it (SIGKILL)",
                    slot.index,
                    slot.proc.pid,
                    self.kill_after,
                )
                self.result.killed += 1
                self._send(slot.proc, signal.SIGKILL)

    async def _kill_leftovers(self, keepers: list[asyncio.Task[None]]) -> None:
        """Only after a failure of the supervisor itself: no worker may outlive it."""
        if all(task.done() for task in keepers):
            return
        self._begin_stop()
        for slot in self._slots:
            if slot.proc is not None and slot.proc.returncode is None:
                log.error("worker %d (pid %d) left running: killing it (SIGKILL)", slot.index, slot.proc.pid)
                self._send(slot.proc, signal.SIGKILL)
        _, pending = await asyncio.wait(keepers, timeout=self.kill_after)
        for task in pending:
            task.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)


async def _read_all(sock: socket.socket) -> bytes:
    """Everything ``sock`` receives until end-of-file (or an error)."""
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    while True:
        try:
            chunk = await loop.sock_recv(sock, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
