"""A bounded pool of handler processes: the process-based sibling of HandlerThreads.

A handler thread cannot be stopped; a process can. A consumer whose sync handler must
obey a hard time limit runs it here: each call goes to an idle child process, and a
call that outlives its ``hard_timeout`` gets its process killed (and replaced), so the
handler's CPU and side effects stop for real.

How children start. The ``spawn`` start method (a fresh interpreter through fork+exec,
never a plain fork): the parent runs an event loop and threads, and a forked copy of a
threaded process can inherit locks held by threads that do not exist in the child.
``forkserver`` would avoid that too, but its children belong to the fork server, not
to this process: the pool could not reap them (``waitpid``), watch them (a pidfd) or
be their parent for ``PR_SET_PDEATHSIG``. With ``spawn`` every child is a direct child
of the pool's process, owned and reaped by the pool. The cost is a fresh interpreter
per child (importing conveyor plus whatever the factory loads); children start when the
pool is built and when one has to be replaced, never per call. ``Process.start`` runs
on the loop's thread: it only forks, execs and writes a small pickle to a pipe, about a
millisecond (``ProcessStats.launch_seconds`` records it; the time until the child is
ready, a few hundred milliseconds, is ``startup_seconds``). It must be that thread (the one that owns the pool
for its whole life): the kernel sends ``PR_SET_PDEATHSIG`` when the thread that forked
the child ends, so a short-lived helper thread would take the children with it.

What the child sees. A fresh interpreter: ``factory()`` runs once, when the child
starts, and builds the handler; module state lives on in that child between calls and
is not shared with the parent or the other children. The parent's ``__main__`` module
is imported again (as ``__mp_main__``), as always with ``spawn``: a script that starts
an app must guard that with ``if __name__ == "__main__":``. Nothing of the caller's
context crosses: no context variables, so no current delivery (``queue.message()``
fails with its "no delivery context" error), no deadline and no security context or
current app unless the factory sets them up. The handler gets a pickled copy of the
payload; its result or exception comes back pickled. SIGINT is ignored in children (a
Ctrl-C in a terminal reaches the whole process group; stopping is the parent's call).
Standard output and error are the parent's. Children are daemonic processes: a handler
cannot start ``multiprocessing`` children of its own.

Outcomes of ``run``: the handler's result; the handler's exception (with the child's
traceback as its ``__cause__``); or an :class:`~conveyor.errors.Error` when the call
could not complete: TIMEOUT (hard timeout, the child was killed), INTERNAL (the child
died, details say how), CANCELED (the pool closed), INVALID (the payload or the result
cannot be pickled), or the error that keeps children from starting.

Killing. A child past its hard timeout gets SIGKILL straight away, not SIGTERM first:
Python's default SIGTERM action ends the process just as abruptly (no ``finally``, no
``atexit``), a handler stuck in C code would not run a Python signal handler anyway,
and the call has already failed: any grace period would only be a window in which the
abandoned handler can still publish or write while its message is being retried. The
call raises only once the process is gone (or after a bounded wait for the kernel).

Failures to start. A factory that raises (or a child that dies or hangs before it is
ready) fails the calls waiting at that moment with its error (the factory's own
:class:`~conveyor.errors.Error`, else INTERNAL, retryable, with the child's traceback in
``details``); the next start waits ``backoff`` seconds, doubling up to ``backoff_cap``
(±20 %), one child at a time, and calls arriving meanwhile wait for that try: a broken
handler neither spins nor burns through messages. A ready child that dies is replaced
with the same backoff, reset by the next successful call.

Children never outlive the parent: each sets ``PR_SET_PDEATHSIG`` (SIGKILL) on Linux and
runs a thread that exits the process when the pipe from its parent closes; an idle
child also exits when its socket to the parent closes.

The event loop never blocks on a child: the parent's end of each child's socket is
non-blocking and read and written from ``loop.add_reader``/``add_writer`` callbacks,
and each child's exit is watched through a pidfd (Linux; the process sentinel
elsewhere), so a death is noticed at once, the status is collected without waiting and
no zombie stays behind. The parent has no thread and no task per child or per call.

Size: over 500 lines because the parent's side (the pool) and the child's side
(``_child_main``) share the framing and the failure rules and must change together;
most of the length is the failure handling described above.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import inspect
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import random
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from conveyor import errors

__all__ = ["HandlerProcesses", "ProcessStats", "RemoteTraceback"]

log = logging.getLogger("conveyor.consumer")

HandlerFactory = Callable[[], Callable[[Any], Any]]

_HEADER = struct.Struct("!Q")  # every frame: its length, then a pickle
_MAX_FRAME = 1 << 40  # a longer length means the stream is corrupt
_READ_CHUNK = 1 << 18
_KILL_WAIT = 5.0  # how long a call waits for a SIGKILLed child to be gone
_LINK_GRACE = 1.0  # a child whose socket closed gets this long to exit by itself
_EXIT_ORPHANED = 70  # a child's exit status when its parent went away
_PR_SET_PDEATHSIG = 1

# Child states, as seen by the parent.
_STARTING = "starting"
_IDLE = "idle"
_BUSY = "busy"
_STOPPING = "stopping"  # asked to exit (its socket was closed)
_KILLED = "killed"  # sent SIGKILL, not reaped yet
_DEAD = "dead"  # reaped

# Why the parent killed a child.
_TIMEOUT = "hard timeout"
_CANCELLED = "call cancelled"
_CLOSED = "pool closed"
_LINK = "link to the process broke"
_START_TIMEOUT = "start timeout"


class RemoteTraceback(Exception):
    """The traceback of a handler exception in its process (set as its ``__cause__``)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text.rstrip()


@dataclass
class ProcessStats:
    started: int = 0  # processes launched
    ready: int = 0  # processes whose factory returned
    start_failures: int = 0
    crashes: int = 0  # ready processes that died on their own
    timeouts: int = 0  # calls that hit their hard timeout
    launch_seconds: float = 0.0  # the last Process.start (the loop waits for this part)
    startup_seconds: float = 0.0  # the last launch-to-ready time (the loop does not wait)


class _Child:
    __slots__ = (
        "call",
        "death_fd",
        "epoch",
        "fd",
        "inbuf",
        "kill_reason",
        "launched",
        "limit",
        "linked",
        "outbuf",
        "pid",
        "pidfd",
        "process",
        "ready",
        "reaped",
        "sock",
        "start_error",
        "state",
        "timer",
    )

    def __init__(
        self, process: BaseProcess, sock: socket.socket, epoch: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.process = process
        self.pid: int = process.pid or 0
        self.sock = sock
        self.fd = sock.fileno()
        self.linked = True
        self.pidfd: int | None = None
        self.death_fd = -1
        self.state = _STARTING
        self.ready = False
        self.call: asyncio.Future[Any] | None = None
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.epoch = epoch
        self.launched = loop.time()
        self.kill_reason: str | None = None
        self.limit: float | None = None  # the hard timeout of the current call
        self.start_error: errors.Error | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.reaped: asyncio.Future[None] = loop.create_future()


class HandlerProcesses:
    """``size`` child processes, each running the handler ``factory()`` builds.

    Build and use it on the thread that runs ``loop`` (children start at once), and
    ``close`` it: that is what stops and reaps the children. ``factory`` is
    pickled to every child: a module-level function, or a ``functools.partial`` of
    one. ``start_timeout`` bounds how long a child may take to become ready; a child
    that fails to start (or crashes) is replaced after an exponential backoff from
    ``backoff`` to ``backoff_cap`` seconds, reset by a successful start or call.
    """

    def __init__(
        self,
        size: int,
        name: str,
        loop: asyncio.AbstractEventLoop,
        factory: HandlerFactory,
        *,
        start_timeout: float | None = 60.0,
        backoff: float = 0.1,
        backoff_cap: float = 10.0,
    ) -> None:
        if size < 1:
            raise errors.invalid(f"handler processes of {name}: size must be at least 1, not {size}")
        try:
            pickle.dumps(factory)
        except Exception as exc:
            raise errors.invalid(
                f"the handler factory of {name} cannot be sent to a handler process: {_text(exc)}",
                pool=name,
            ) from None
        self.size = size
        self.name = name
        self.stats = ProcessStats()
        self._loop = loop
        self._factory = factory
        self._start_timeout = start_timeout
        self._backoff = backoff
        self._backoff_cap = backoff_cap
        self._ctx = multiprocessing.get_context("spawn")
        self._children: set[_Child] = set()  # launched and not reaped: never more than size
        self._idle: deque[_Child] = deque()
        self._waiters: deque[asyncio.Future[_Child]] = deque()
        self._closed = False
        self._launches = 0
        # Backoff: consecutive start failures (one per batch of parallel starts, by
        # epoch) and consecutive crashes; no launch before _retry_at while any.
        self._start_failures = 0
        self._crashes = 0
        self._epoch = 0
        self._retry_at = 0.0
        self._retry_timer: asyncio.TimerHandle | None = None
        self._start_error: errors.Error | None = None
        self._changed: asyncio.Future[None] | None = None  # wait_ready's wake-up
        self._fill()

    # -- public ------------------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        """The processes of the pool that are not reaped yet (starting, ready, dying)."""
        return sorted(child.pid for child in self._children)

    @property
    def closed(self) -> bool:
        return self._closed

    async def run(self, payload: Any, hard_timeout: float | None = None) -> Any:
        """Run the handler on ``payload`` in an idle child; see the module docstring."""
        if hard_timeout is not None and not hard_timeout > 0:
            raise errors.invalid(f"hard_timeout must be positive, not {hard_timeout!r}")
        if self._closed:
            raise self._closed_error()
        try:
            data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise errors.invalid(
                f"the message cannot be sent to a handler process: {_text(exc)}",
                pool=self.name,
                type=_qualname(type(payload)),
            ) from None
        child = await self._acquire()
        fut: asyncio.Future[Any] = self._loop.create_future()
        child.state = _BUSY
        child.call = fut
        self._write(child, _HEADER.pack(len(data)) + data)
        timer = None
        if hard_timeout is not None:
            timer = self._loop.call_later(hard_timeout, self._expire, child, fut, hard_timeout)
        try:
            return await fut
        except asyncio.CancelledError:
            if child.call is fut and child.state == _BUSY:
                self._kill(child, _CANCELLED)  # nobody will take its answer: stop it now
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def wait_ready(self) -> None:
        """Wait until all ``size`` children are ready; raise the error that keeps one from starting."""
        while True:
            if self._closed:
                raise self._closed_error()
            if sum(1 for c in self._children if c.state in (_IDLE, _BUSY)) >= self.size:
                return
            if self._start_error is not None:
                raise _copy(self._start_error)
            if self._changed is None or self._changed.done():
                self._changed = self._loop.create_future()
            await asyncio.shield(self._changed)

    async def close(self, grace: float) -> None:
        """Stop: idle children exit now, busy ones get ``grace`` seconds, then SIGKILL.

        Returns when every child is reaped (or, for a process the kernel does not let
        die, after a bounded wait and a warning).
        """
        if not self._closed:
            self._closed = True
            if self._retry_timer is not None:
                self._retry_timer.cancel()
                self._retry_timer = None
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(self._closed_error())
            for child in list(self._children):
                if child.state in (_IDLE, _STARTING):
                    self._stop(child)
            self._notify()
        pending = {c.reaped for c in self._children}
        if pending and grace > 0:
            _, pending = await asyncio.wait(pending, timeout=grace)
        if not pending:
            return
        for child in list(self._children):
            self._kill(child, _CLOSED)
        _, pending = await asyncio.wait(pending, timeout=_KILL_WAIT)
        if pending:
            log.warning(
                "handler processes of %s: %s still running after SIGKILL",
                self.name,
                ", ".join(str(c.pid) for c in self._children),
            )

    # -- handing out children ------------------------------------------------------------

    async def _acquire(self) -> _Child:
        while True:
            while self._idle:
                child = self._idle.popleft()
                if child.state == _IDLE:
                    return child
            if self._closed:
                raise self._closed_error()
            waiter: asyncio.Future[_Child] = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                child = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._hand_out(waiter.result())  # handed to us as we were cancelled
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if child.state == _IDLE:
                return child

    def _hand_out(self, child: _Child) -> None:
        if child.state != _IDLE:
            return
        if self._closed:
            self._stop(child)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(child)
                return
        self._idle.append(child)

    def _notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    def _serving(self) -> bool:
        return any(c.state in (_IDLE, _BUSY) for c in self._children)

    def _closed_error(self) -> errors.Error:
        return errors.Error(errors.CANCELED, f"handler processes of {self.name} are closed", retryable=True)

    # -- starting children ---------------------------------------------------------------

    def _retry(self) -> None:
        self._retry_timer = None
        self._fill()

    def _fill(self) -> None:
        """Start children up to ``size``: all at once when healthy, one at a time after failures."""
        if self._closed:
            return
        missing = self.size - len(self._children)
        if missing <= 0:
            return
        if self._start_failures or self._crashes:
            wait = self._retry_at - self._loop.time()
            if wait > 0:
                if self._retry_timer is None:
                    self._retry_timer = self._loop.call_later(wait, self._retry)
                return
            if any(c.state == _STARTING for c in self._children):
                return  # one probe at a time while failing
            missing = 1
        epoch = self._epoch
        for _ in range(missing):
            if not self._launch(epoch):
                return

    def _launch(self, epoch: int) -> bool:
        parent_sock, child_sock = socket.socketpair()
        self._launches += 1
        process = self._ctx.Process(
            target=_child_main,
            args=(child_sock, self._factory, os.getpid()),
            name=f"{self.name}-{self._launches}",
            daemon=True,  # at interpreter exit multiprocessing terminates, not joins, them
        )
        began = time.perf_counter()
        try:
            process.start()
        except Exception as exc:  # fork/exec limits, a factory that pickled once but not now
            parent_sock.close()
            self.stats.start_failures += 1
            error = errors.internal(
                f"handler processes of {self.name} cannot start: {_text(exc)}",
                retryable=True,
                pool=self.name,
                exception=_qualname(type(exc)),
            )
            self._start_failed(epoch, error, None)
            return False
        finally:
            child_sock.close()
        self.stats.launch_seconds = time.perf_counter() - began
        self.stats.started += 1
        parent_sock.setblocking(False)
        child = _Child(process, parent_sock, epoch, self._loop)
        self._children.add(child)
        try:
            child.pidfd = os.pidfd_open(child.pid)
            child.death_fd = child.pidfd
        except (AttributeError, OSError):  # not Linux, or no pidfd in this kernel
            child.death_fd = process.sentinel
        self._loop.add_reader(child.death_fd, self._on_exit, child)
        self._loop.add_reader(child.fd, self._on_readable, child)
        if self._start_timeout is not None:
            child.timer = self._loop.call_later(self._start_timeout, self._start_timed_out, child)
        return True

    def _start_timed_out(self, child: _Child) -> None:
        if child.state == _STARTING:
            self._kill(child, _START_TIMEOUT)

    def _start_failed(self, epoch: int, error: errors.Error, child: _Child | None) -> None:
        if epoch == self._epoch:  # the first failure of a batch of parallel starts counts
            self._epoch += 1
            self._start_failures += 1
        self._start_error = error
        delay = self._note_failure()
        error.details["retry_in"] = round(delay, 3)
        log.error(
            "%s; next start in %.2fs%s",
            error.message,
            delay,
            "\n" + str(error.details["traceback"])
            if "traceback" in error.details and self._start_failures <= 1
            else "",
            extra={"pool": self.name, "pid": child.pid if child else None},
        )
        if not self._serving():
            # Nobody can serve the callers waiting now: each gets the error (and the
            # next ones wait for the next start, so a broken handler is not a tight loop).
            waiters, self._waiters = self._waiters, deque()
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(_copy(error))
        if self._retry_timer is None and not self._closed:
            self._retry_timer = self._loop.call_later(delay, self._retry)
        self._notify()

    def _note_failure(self) -> float:
        failures = self._start_failures + self._crashes
        delay: float = min(self._backoff_cap, self._backoff * 2.0 ** (failures - 1))
        delay *= random.uniform(0.8, 1.2)
        self._retry_at = self._loop.time() + delay
        return delay

    # -- the link to a child -------------------------------------------------------------

    def _write(self, child: _Child, data: bytes) -> None:
        if not child.linked:
            return
        if child.outbuf:
            child.outbuf += data
            return
        try:
            sent = child.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._unlink(child)
            self._kill(child, _LINK)
            return
        if sent < len(data):
            child.outbuf += memoryview(data)[sent:]
            self._loop.add_writer(child.fd, self._on_writable, child)

    def _on_writable(self, child: _Child) -> None:
        try:
            sent = child.sock.send(child.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._unlink(child)
            self._kill(child, _LINK)
            return
        del child.outbuf[:sent]
        if not child.outbuf:
            self._loop.remove_writer(child.fd)

    def _on_readable(self, child: _Child) -> None:
        try:
            chunk = child.sock.recv(_READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            # The child closed its end: it is exiting (its exit is reported through its
            # pidfd) or it closed the socket by hand; give it a moment, then kill it.
            self._unlink(child)
            if child.state not in (_KILLED, _DEAD):
                if child.timer is not None:
                    child.timer.cancel()
                child.timer = self._loop.call_later(_LINK_GRACE, self._kill, child, _LINK)
            return
        buf = child.inbuf
        buf += chunk
        while len(buf) >= _HEADER.size and child.linked:
            (size,) = _HEADER.unpack_from(buf)
            if size > _MAX_FRAME:
                self._unlink(child)
                self._kill(child, _LINK)
                return
            end = _HEADER.size + size
            if len(buf) < end:
                return
            frame = bytes(buf[_HEADER.size : end])
            del buf[:end]
            self._on_frame(child, frame)

    def _unlink(self, child: _Child) -> None:
        if not child.linked:
            return
        child.linked = False
        self._loop.remove_reader(child.fd)
        if child.outbuf:
            self._loop.remove_writer(child.fd)
            child.outbuf.clear()
        child.sock.close()

    def _on_frame(self, child: _Child, frame: bytes) -> None:
        try:
            message = pickle.loads(frame)
            tag = message[0]
        except Exception as exc:
            # A result whose class the parent cannot import, or a corrupt stream. The
            # stream is still in step when the frame was whole: only the call fails.
            if child.state == _BUSY and child.call is not None:
                self._finish_call(
                    child,
                    errors.internal(
                        f"the answer of handler process {child.pid} cannot be read: {_text(exc)}",
                        retryable=True,
                        pool=self.name,
                        pid=child.pid,
                    ),
                    ok=False,
                )
            return
        if tag == "ready":
            if child.state != _STARTING:
                return
            child.state = _IDLE
            if child.timer is not None:
                child.timer.cancel()
                child.timer = None
            self.stats.ready += 1
            self.stats.startup_seconds = self._loop.time() - child.launched
            child.ready = True
            self._start_failures = 0
            self._start_error = None
            self._notify()
            self._hand_out(child)
            self._fill()  # after failures, the other missing children start now
        elif tag == "start_failed":
            info: dict[str, Any] = message[1]
            child.start_error = _start_error(self.name, child.pid, info)
        elif tag in ("ok", "raised") and child.state == _BUSY:
            if tag == "ok":
                self._finish_call(child, message[1], ok=True)
            else:
                raised: BaseException = message[1]
                if message[2]:
                    raised.__cause__ = RemoteTraceback(message[2])
                self._finish_call(child, raised, ok=False)

    def _finish_call(self, child: _Child, value: Any, *, ok: bool) -> None:
        fut = child.call
        child.call = None
        child.state = _IDLE
        self._crashes = 0
        if fut is not None and not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
        self._hand_out(child)
        if self._start_failures == 0:
            self._fill()  # a crash backoff may have held replacements back

    # -- stopping and reaping ------------------------------------------------------------

    def _stop(self, child: _Child) -> None:
        """Ask a child to exit: it reads end-of-file and returns from its loop."""
        if child.state in (_KILLED, _DEAD, _STOPPING):
            return
        child.state = _STOPPING
        self._unlink(child)

    def _kill(self, child: _Child, reason: str) -> None:
        if child.state in (_KILLED, _DEAD):
            return
        child.kill_reason = reason
        child.state = _KILLED
        try:
            if child.pidfd is not None:
                signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
            else:
                child.process.kill()
        except ProcessLookupError:  # exited already; the exit watcher reaps it
            pass

    def _expire(self, child: _Child, fut: asyncio.Future[Any], timeout: float) -> None:
        if fut.done() or child.call is not fut:
            return
        self.stats.timeouts += 1
        log.warning(
            "handler processes of %s: call exceeded its %gs hard timeout; killing process %d",
            self.name,
            timeout,
            child.pid,
            extra={"pool": self.name, "pid": child.pid},
        )
        child.limit = timeout
        self._kill(child, _TIMEOUT)
        # The call fails when the process is gone (reaped); if the kernel takes longer
        # than _KILL_WAIT to let it die, the call fails anyway.
        self._loop.call_later(_KILL_WAIT, self._give_up, child, fut, timeout)

    def _give_up(self, child: _Child, fut: asyncio.Future[Any], timeout: float) -> None:
        if not fut.done():
            fut.set_exception(_timed_out(self.name, child.pid, timeout, None))

    def _on_exit(self, child: _Child) -> None:
        code = child.process.exitcode  # waitpid(WNOHANG)
        if code is None and _waitable(child.pid):
            # The sentinel can close a moment before the status is there; poll again.
            self._loop.remove_reader(child.death_fd)
            self._loop.call_later(0.01, self._on_exit, child)
            return
        self._reap(child, code)

    def _reap(self, child: _Child, code: int | None) -> None:
        if child.state == _DEAD:
            return
        self._loop.remove_reader(child.death_fd)
        self._unlink(child)
        if child.pidfd is not None:
            os.close(child.pidfd)
            child.pidfd = None
        if child.timer is not None:
            child.timer.cancel()
            child.timer = None
        if code is not None:
            child.process.join()  # the status is in: this only records it
            child.process.close()
        else:
            log.warning(
                "handler process %d of %s: its exit status was collected by other code",
                child.pid,
                self.name,
                extra={"pool": self.name, "pid": child.pid},
            )
        self._children.discard(child)
        state, reason, fut = child.state, child.kill_reason, child.call
        child.state = _DEAD
        child.call = None
        stopped = reason == _CLOSED or state == _STOPPING  # by close()
        if not child.ready:
            if not stopped:
                self._start_failed(child.epoch, self._why_not_started(child, code, reason), child)
        elif fut is not None and not fut.done():
            if reason == _TIMEOUT:
                fut.set_exception(_timed_out(self.name, child.pid, child.limit, code))
            elif reason == _CLOSED:
                fut.set_exception(
                    errors.Error(
                        errors.CANCELED,
                        f"handler process {child.pid} of {self.name} was killed: the pool closed "
                        "and the call outlived the grace period",
                        retryable=True,
                        details=_exit_details(self.name, child.pid, code),
                    )
                )
            else:
                self._crashed(child, code, reason)
                fut.set_exception(
                    errors.internal(
                        f"handler process {child.pid} of {self.name} {_how(code)} during the call",
                        retryable=True,
                        **_exit_details(self.name, child.pid, code),
                        **({"reason": reason} if reason else {}),
                    )
                )
        elif not stopped and reason in (None, _LINK):
            self._crashed(child, code, reason)  # died while idle (killed from outside, OOM)
        child.reaped.set_result(None)
        self._fill()

    def _why_not_started(self, child: _Child, code: int | None, reason: str | None) -> errors.Error:
        self.stats.start_failures += 1
        if child.start_error is not None:
            return child.start_error
        if reason == _START_TIMEOUT:
            return errors.Error(
                errors.TIMEOUT,
                f"handler process {child.pid} of {self.name} was not ready within {self._start_timeout:g}s",
                retryable=True,
                details={"pool": self.name, "pid": child.pid},
            )
        return errors.internal(
            f"handler process {child.pid} of {self.name} {_how(code)} while starting",
            retryable=True,
            **_exit_details(self.name, child.pid, code),
        )

    def _crashed(self, child: _Child, code: int | None, reason: str | None) -> None:
        self.stats.crashes += 1
        self._crashes += 1
        delay = self._note_failure()
        log.warning(
            "handler process %d of %s %s%s; replacing it in %.2fs",
            child.pid,
            self.name,
            _how(code),
            f" ({reason})" if reason else "",
            delay,
            extra={"pool": self.name, "pid": child.pid},
        )


# -- errors ------------------------------------------------------------------------------


def _text(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        text = "<unprintable>"
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _copy(error: errors.Error) -> errors.Error:
    return errors.Error(error.kind, error.message, retryable=error.retryable, details=error.details)


def _how(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if -code == signal.SIGKILL:
            return f"was killed by {name} (out of memory, or killed from outside)"
        return f"was killed by {name}"
    return f"exited with code {code}"


def _waitable(pid: int) -> bool:
    """Whether ``pid`` is still a child of this process that ``waitpid`` can collect."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    except (AttributeError, OSError):  # no waitid here: assume it is
        return True
    return True


def _exit_details(pool: str, pid: int, code: int | None) -> dict[str, Any]:
    details: dict[str, Any] = {"pool": pool, "pid": pid, "exitcode": code}
    if code is not None and code < 0:
        try:
            details["signal"] = signal.Signals(-code).name
        except ValueError:
            details["signal"] = -code
    return details


def _timed_out(pool: str, pid: int, timeout: float | None, code: int | None) -> errors.Error:
    what = f"its {timeout:g}s hard timeout" if timeout is not None else "its hard timeout"
    return errors.Error(
        errors.TIMEOUT,
        f"handler exceeded {what}: process {pid} of {pool} was killed",
        retryable=True,
        details=_exit_details(pool, pid, code),
    )


def _start_error(pool: str, pid: int, info: dict[str, Any]) -> errors.Error:
    details = {"pool": pool, "pid": pid, "exception": info["exception"], "traceback": info["traceback"]}
    kind = info["kind"] if info["kind"] in errors.KINDS else errors.INTERNAL
    retryable = info["retryable"] if info["kind"] is not None else True
    if info["details"]:
        details = {**info["details"], **details}
    return errors.Error(
        kind,
        f"handler processes of {pool} cannot start: the handler factory raised {info['text']}",
        retryable=retryable,
        details=details,
    )


# -- the child's side --------------------------------------------------------------------


def _child_main(sock: socket.socket, factory: HandlerFactory, parent_pid: int) -> None:
    """The body of every child: build the handler, then answer one frame per call."""
    began = time.perf_counter()
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock.set_inheritable(False)
    try:
        handler = factory()
    except BaseException as exc:
        _child_send(sock, pickle.dumps(("start_failed", _failure_info(exc))))
        return
    if not _child_send(sock, pickle.dumps(("ready", time.perf_counter() - began))):
        return
    while True:
        data = _child_recv(sock)
        if data is None:
            return  # the parent closed the socket (stop) or is gone
        if not _child_send(sock, _answer(handler, data)):
            return


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(
                ctypes.c_int(_PR_SET_PDEATHSIG),
                ctypes.c_ulong(signal.SIGKILL),
                ctypes.c_ulong(0),
                ctypes.c_ulong(0),
                ctypes.c_ulong(0),
            )
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(
            target=_exit_with_parent, args=(parent.sentinel,), name="conveyor-parent-watch", daemon=True
        ).start()
    if os.getppid() != parent_pid:  # the parent died before the watch was set up
        os._exit(_EXIT_ORPHANED)


def _exit_with_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(_EXIT_ORPHANED)


def _failure_info(exc: BaseException) -> dict[str, Any]:
    info: dict[str, Any] = {
        "exception": _qualname(type(exc)),
        "text": _text(exc),
        "traceback": traceback.format_exc(),
        "kind": None,
        "retryable": True,
        "details": {},
    }
    if isinstance(exc, errors.Error):
        info.update(kind=exc.kind, retryable=exc.retryable, text=exc.message)
        with contextlib.suppress(Exception):
            pickle.loads(pickle.dumps(exc.details))
            info["details"] = exc.details
    return info


def _answer(handler: Callable[[Any], Any], data: bytearray) -> bytes:
    try:
        payload = pickle.loads(data)
    except Exception as exc:
        error = errors.invalid(f"the message cannot be read in the handler process: {_text(exc)}")
        return pickle.dumps(("raised", error, None))
    try:
        result = handler(payload)
    except BaseException as exc:
        return _raised(exc, traceback.format_exc())
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        error = errors.invalid(
            "handler returned an awaitable; a handler in a process must be a plain function"
        )
        return pickle.dumps(("raised", error, None))
    try:
        return pickle.dumps(("ok", result), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        error = errors.invalid(
            f"the handler's result ({_qualname(type(result))}) cannot be sent back from its process: "
            f"{_text(exc)}",
            type=_qualname(type(result)),
        )
        return pickle.dumps(("raised", error, None))


def _raised(exc: BaseException, tb: str) -> bytes:
    if not isinstance(exc, Exception):
        # SystemExit, KeyboardInterrupt, a CancelledError: raised into the caller's task
        # these would end it, so they arrive as an ordinary failure that names them.
        name = type(exc).__name__
        text = _text(exc)
        exc = errors.Error(
            errors.INTERNAL, f"handler raised {text}", retryable=True, details={"exception": name}
        )
    try:
        data = pickle.dumps(("raised", exc, tb), protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(data)  # some exceptions pickle but do not unpickle (their __init__)
        return data
    except Exception as why:
        error = errors.internal(
            f"handler raised {_text(exc)} (it cannot be sent back from its process: {_text(why)})",
            retryable=True,
            exception=_qualname(type(exc)),
            reason=_text(why),
        )
        return pickle.dumps(("raised", error, tb))


def _child_send(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(_HEADER.pack(len(data)))
        sock.sendall(data)
    except OSError:
        return False
    return True


def _child_recv(sock: socket.socket) -> bytearray | None:
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    return _recv_exactly(sock, size)


def _recv_exactly(sock: socket.socket, size: int) -> bytearray | None:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    try:
        while got < size:
            n = sock.recv_into(view[got:])
            if n == 0:
                return None
            got += n
    except OSError:
        return None
    return buf
