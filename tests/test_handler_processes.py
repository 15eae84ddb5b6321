"""HandlerProcesses: sync handlers in child processes that can be killed for real.

The handlers live in tests/support/process_handlers.py (spawned children import them).
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from conveyor import errors
from conveyor.consumer.processes import HandlerProcesses, RemoteTraceback, _waitable
from tests.support import process_handlers
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def wrapper() -> T:
        return await main()

    return asyncio.run(wrapper())


def pool(size: int, factory: Any = process_handlers.build, **options: Any) -> HandlerProcesses:
    return HandlerProcesses(size, "test-pool", asyncio.get_running_loop(), factory, **options)


def state(pid: int) -> str | None:
    """The process state letter from /proc (None: no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def reaped(pid: int) -> bool:
    """Gone for good: not running, not a zombie, not our child any more (WNOWAIT: the
    check itself collects nothing)."""
    if state(pid) is not None:
        return False
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return False


def running(pid: int) -> bool:
    return state(pid) not in (None, "Z", "X")


def spawned_children() -> list[int]:
    """Processes whose parent is this one and that run a spawned multiprocessing child."""
    me = str(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[1] == me and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


async def failure(call: Awaitable[Any]) -> BaseException:
    try:
        await call
    except Exception as exc:
        return exc
    raise AssertionError("the call did not fail")


def test_results_and_exceptions_round_trip() -> None:
    async def main() -> None:
        procs = pool(1)
        try:
            await procs.wait_ready()
            assert procs.stats.startup_seconds > 0
            assert 0 < procs.stats.launch_seconds < procs.stats.startup_seconds
            pid = await procs.run(("pid",))
            assert procs.pids == [pid]
            data = {"a": [1, 2.5, "x", None, b"\x00"], "b": (1, 2)}
            assert await procs.run(("echo", data)) == data
            big = os.urandom(3 << 20)  # more than a socket buffer: written and read in parts
            assert await procs.run(("echo", big)) == big

            exc = await failure(procs.run(("error", errors.CONFLICT, "boom", True, {"k": [1]})))
            assert isinstance(exc, errors.Error)
            assert (exc.kind, exc.message, exc.retryable, exc.details) == (
                errors.CONFLICT,
                "boom",
                True,
                {"k": [1]},
            )
            assert isinstance(exc.__cause__, RemoteTraceback)
            assert "process_handlers.py" in exc.__cause__.text
            assert "raise errors.Error" in exc.__cause__.text

            exc = await failure(procs.run(("value_error", "bad")))
            assert type(exc) is ValueError
            assert exc.args == ("bad",)

            exc = await failure(procs.run(("unpicklable_result",)))
            assert isinstance(exc, errors.Error)
            assert exc.kind == errors.INVALID
            assert not exc.retryable
            assert "result (_thread.lock) cannot be sent back" in exc.message

            for op, name in [("unpicklable_exception", "Unpicklable"), ("two_arguments", "TwoArguments")]:
                exc = await failure(procs.run((op,)))
                assert isinstance(exc, errors.Error), op
                assert exc.kind == errors.INTERNAL
                assert exc.retryable
                assert exc.message.startswith(f"handler raised {name}: ")
                assert "cannot be sent back from its process" in exc.message
                assert exc.details["exception"] == f"tests.support.process_handlers.{name}"

            # A BaseException must not end the caller's task: it arrives as an Error.
            exc = await failure(procs.run(("system_exit",)))
            assert isinstance(exc, errors.Error)
            assert (exc.kind, exc.message) == (errors.INTERNAL, "handler raised SystemExit: 3")

            exc = await failure(procs.run(("echo", lambda: None)))
            assert isinstance(exc, errors.Error)
            assert exc.kind == errors.INVALID
            assert exc.message.startswith("the message cannot be sent to a handler process")

            # What the child does not see: the caller's context variables, its delivery.
            process_handlers.marker.set("set in the parent")
            assert await procs.run(("marker",)) == "unset"
            exc = await failure(procs.run(("current_message",)))
            assert isinstance(exc, errors.Error)
            assert exc.kind == errors.INVALID
            assert exc.message.startswith("no delivery context")

            exc = await failure(procs.run(("pid",), hard_timeout=0))
            assert isinstance(exc, errors.Error)
            assert exc.kind == errors.INVALID

            assert await procs.run(("pid",)) == pid  # nothing above cost the process
            assert procs.stats.crashes == procs.stats.timeouts == 0
        finally:
            await procs.close(0)

    run(main)


def test_factory_that_cannot_be_pickled_is_invalid() -> None:
    async def main() -> None:
        with pytest.raises(errors.Error) as info:
            pool(1, factory=lambda: process_handlers.handle)
        assert info.value.kind == errors.INVALID
        assert "cannot be sent to a handler process" in info.value.message
        with pytest.raises(errors.Error) as info:
            pool(0)
        assert info.value.kind == errors.INVALID

    run(main)


@pytest.mark.parametrize("op", [("spin",), ("sleep", 1000)], ids=["busy-loop", "sleep"])
def test_hard_timeout_kills_the_process_and_the_pool_serves_on(op: tuple[Any, ...]) -> None:
    """Faults H02, H04: a hung handler is killed at its hard timeout, its slot is refilled."""

    async def main() -> None:
        procs = pool(1)
        try:
            pid = await procs.run(("pid",))
            assert await procs.run(("echo", 1), hard_timeout=30) == 1  # in time: not killed
            began = time.monotonic()
            exc = await failure(procs.run(op, hard_timeout=0.3))
            assert time.monotonic() - began >= 0.3
            assert isinstance(exc, errors.Error)
            assert exc.kind == errors.TIMEOUT
            assert exc.retryable
            assert (
                exc.message
                == f"handler exceeded its 0.3s hard timeout: process {pid} of test-pool was killed"
            )
            assert exc.details == {"pool": "test-pool", "pid": pid, "exitcode": -9, "signal": "SIGKILL"}
            # The call fails only once the process is gone: no CPU, no zombie.
            assert reaped(pid)
            replacement = await procs.run(("pid",))
            assert replacement != pid
            assert procs.pids == [replacement]
            assert procs.stats.timeouts == 1
            assert procs.stats.crashes == 0
        finally:
            await procs.close(0)

    run(main)


def test_a_process_that_dies_is_replaced() -> None:
    """Faults F01, H04, H05, P02: a child killed from outside (or by its handler) fails the
    call with a clear, retryable error and is replaced."""

    async def main() -> None:
        procs = pool(1, backoff=0.05)
        try:
            pid = await procs.run(("pid",))
            call = asyncio.ensure_future(procs.run(("sleep", 1000)))
            await asyncio.sleep(0.2)
            assert not call.done()
            os.kill(pid, signal.SIGKILL)  # the OOM killer does the same
            exc = await failure(call)
            assert isinstance(exc, errors.Error)
            assert exc.kind == errors.INTERNAL
            assert exc.retryable
            assert exc.message == (
                f"handler process {pid} of test-pool was killed by SIGKILL "
                "(out of memory, or killed from outside) during the call"
            )
            assert exc.details == {"pool": "test-pool", "pid": pid, "exitcode": -9, "signal": "SIGKILL"}
            assert reaped(pid)

            pid = await procs.run(("pid",))
            os.kill(pid, signal.SIGKILL)  # while idle
            await wait_for(lambda: reaped(pid) and len(procs.pids) == 1)
            assert await procs.run(("pid",)) not in (pid, None)

            exc = await failure(procs.run(("exit", 3)))
            assert isinstance(exc, errors.Error)
            assert (exc.kind, exc.retryable, exc.details["exitcode"]) == (errors.INTERNAL, True, 3)
            assert "exited with code 3 during the call" in exc.message

            exc = await failure(procs.run(("segfault",)))
            assert isinstance(exc, errors.Error)
            assert (exc.kind, exc.details["signal"]) == (errors.INTERNAL, "SIGSEGV")

            assert await procs.run(("echo", "still serving")) == "still serving"
            assert procs.stats.crashes == 4
            assert procs.stats.start_failures == 0
        finally:
            await procs.close(0)

    run(main)


def test_failing_factory_backs_off_and_recovers(tmp_path: Path) -> None:
    """A handler that cannot be loaded fails the waiting calls and is retried with backoff."""
    log = tmp_path / "tries.txt"
    ready = tmp_path / "ready"
    factory = functools.partial(process_handlers.failing_until, str(log), str(ready))

    def tries() -> list[float]:
        return [float(line) for line in log.read_text().split()] if log.exists() else []

    async def main() -> None:
        procs = pool(2, factory, backoff=0.1, backoff_cap=0.4)
        try:
            exc = await failure(procs.wait_ready())
            assert isinstance(exc, errors.Error)
            assert exc.kind == errors.INTERNAL
            assert exc.retryable
            assert exc.message == (
                "handler processes of test-pool cannot start: the handler factory raised "
                "ImportError: No module named 'missing_app'"
            )
            assert exc.details["exception"] == "builtins.ImportError"
            assert "failing_until" in exc.details["traceback"]
            delays = [exc.details["retry_in"]]
            for _ in range(3):  # each waiting call gets the error of the next try
                exc = await failure(procs.run(("pid",)))
                assert isinstance(exc, errors.Error)
                assert exc.kind == errors.INTERNAL
                assert "ImportError" in exc.message
                delays.append(exc.details["retry_in"])
            # 0.1 s after the first failure, doubling up to 0.4 s, each ±20 %
            assert 0.08 <= delays[0] <= 0.12
            assert max(delays) >= 0.32
            assert all(0.08 <= d <= 0.48 for d in delays)
            await wait_for(lambda: len(tries()) >= 5)
            t = tries()
            # Two children tried at once, then one at a time after 0.1, 0.2, 0.4 s (±20 %).
            assert t[2] - t[0] >= 0.08
            assert t[3] - t[2] >= 0.16
            assert t[4] - t[3] >= 0.32
            ready.touch()
            for _ in range(3):  # a try that began before the file existed may still fail
                try:
                    pid = await procs.run(("pid",))
                    break
                except errors.Error as exc:
                    assert "ImportError" in exc.message
            else:
                raise AssertionError("the pool did not recover")
            await procs.wait_ready()
            assert pid in procs.pids
            assert len(procs.pids) == 2
            assert procs.stats.ready == 2
        finally:
            await procs.close(0)

    run(main)


def test_a_factory_that_hangs_is_killed_at_the_start_timeout() -> None:
    async def main() -> None:
        procs = pool(1, process_handlers.hanging, start_timeout=0.5, backoff=5)
        try:
            pid = procs.pids[0]
            exc = await failure(procs.wait_ready())
            assert isinstance(exc, errors.Error)
            assert exc.kind == errors.TIMEOUT
            assert exc.message == f"handler process {pid} of test-pool was not ready within 0.5s"
            assert reaped(pid)
            assert procs.pids == []  # the next try waits for its backoff
        finally:
            await procs.close(0)

    run(main)


def test_a_cancelled_call_kills_its_process() -> None:
    """A caller that gives up (a consumer stopping past its grace period) stops the handler."""

    async def main() -> None:
        procs = pool(1)
        try:
            pid = await procs.run(("pid",))
            call = asyncio.ensure_future(procs.run(("sleep", 1000)))
            await asyncio.sleep(0.2)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await wait_for(lambda: reaped(pid))
            replacement = await procs.run(("pid",))
            assert replacement != pid
            # Whether an exit status is still there to collect (WNOWAIT: nothing is taken).
            assert _waitable(replacement)
            assert not _waitable(os.getppid())
            assert procs.stats.crashes == 0
        finally:
            await procs.close(0)

    run(main)


def test_close_stops_idle_waits_for_busy_then_kills_and_reaps_all() -> None:
    async def main() -> None:
        procs = pool(3)
        await procs.wait_ready()
        pids = procs.pids
        finishing = asyncio.ensure_future(procs.run(("sleep", 0.4)))
        stuck = asyncio.ensure_future(procs.run(("sleep", 1000)))
        await asyncio.sleep(0.1)
        began = time.monotonic()
        await procs.close(grace=1.0)
        took = time.monotonic() - began
        assert took >= 0.9  # the stuck one had its grace period
        assert await finishing in pids  # finished within the grace period: its result counts
        exc = await failure(stuck)
        assert isinstance(exc, errors.Error)
        assert exc.kind == errors.CANCELED
        assert exc.retryable
        assert "the pool closed and the call outlived the grace period" in exc.message
        assert procs.pids == []
        for pid in pids:
            assert reaped(pid), pid
        assert not {p.pid for p in multiprocessing.active_children()} & set(pids)
        assert spawned_children() == []
        exc = await failure(procs.run(("pid",)))
        assert isinstance(exc, errors.Error)
        assert exc.kind == errors.CANCELED

    run(main)


def test_never_more_processes_than_size() -> None:
    """At most ``size`` handlers run at once and at most ``size`` processes exist (running,
    dying or not yet reaped), even while crashed and killed ones are being replaced."""

    async def main() -> None:
        procs = pool(2, backoff=0.01, backoff_cap=0.05)
        most = 0
        seen: set[int] = set()
        sampling = True

        async def sample() -> None:
            nonlocal most
            while sampling:
                seen.update(procs.pids)
                present = [pid for pid in seen if state(pid) is not None]  # zombies count
                most = max(most, len(present))
                await asyncio.sleep(0.002)

        sampler = asyncio.ensure_future(sample())
        try:
            calls = [procs.run(("hold", 0.2)) for _ in range(5)]
            for _ in range(2):
                calls += [procs.run(("exit", 1)), procs.run(("spin",), hard_timeout=0.05)]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            await procs.wait_ready()  # the last replacements, sampled too
        finally:
            sampling = False
            await sampler
            await procs.close(0)
        held = outcomes[:5]
        assert all(isinstance(o, tuple) for o in held), held
        kinds = [o.kind if isinstance(o, errors.Error) else o for o in outcomes[5:]]
        assert kinds == [errors.INTERNAL, errors.TIMEOUT] * 2
        # The most handlers that ran at the same moment.
        edges = sorted([(start, 1) for _, start, _ in held] + [(end, -1) for _, _, end in held])
        overlap = peak = 0
        for _, step in edges:
            overlap += step
            peak = max(peak, overlap)
        assert peak <= 2
        assert 1 <= most <= 2
        assert procs.stats.started == 2 + 2 + 2  # each crash and each kill was replaced once
        assert spawned_children() == []

    run(main)


ORPHAN_SCRIPT = """
import asyncio
from conveyor.consumer.processes import HandlerProcesses
from tests.support import process_handlers

async def main():
    procs = HandlerProcesses(2, "orphans", asyncio.get_running_loop(), process_handlers.build)
    await procs.wait_ready()
    busy = asyncio.ensure_future(procs.run(("sleep", 1000)))
    await asyncio.sleep(0.2)
    print(*procs.pids, flush=True)
    await busy

asyncio.run(main())
"""


def test_children_do_not_outlive_their_parent() -> None:
    """Fault F01 (the other way round): the parent is SIGKILLed, its idle and its busy
    handler processes go too."""
    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_SCRIPT], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        pids = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(pids) == 2
        assert all(running(pid) for pid in pids)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    wait_until(lambda: not any(running(pid) for pid in pids), timeout=10)
