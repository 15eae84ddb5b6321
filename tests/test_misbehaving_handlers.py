"""Handlers that misbehave must not take a worker, the loop or the shutdown with them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor import errors, queue
from conveyor.consumer import runtime as consumer_runtime
from tests.support.harness import Harness
from tests.support.waiting import wait_until


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


# -- exceptions that are not Exceptions ----------------------------------------------------


@pytest.mark.parametrize("raised", [GeneratorExit, SystemExit, KeyboardInterrupt])
@pytest.mark.parametrize("form", ["sync", "async"])
def test_a_base_exception_from_a_handler_is_a_failed_attempt_not_a_dead_worker(
    harness: Harness, raised: type[BaseException], form: str
) -> None:
    """Regression: a sync handler raising GeneratorExit ended its worker task silently
    (the consumer still counted as attached; later messages were never taken)."""
    seen: list[int] = []

    def handle(payload: int) -> None:
        seen.append(payload)
        if payload == 1:
            raise raised("from the handler")

    async def ahandle(payload: int) -> None:
        handle(payload)

    q = harness.queue("q", dead_letter={"queue": harness.queue("dlq"), "max_attempts": 1})
    harness.consumer("c", "q", handle if form == "sync" else ahandle)
    app = harness.load()
    app.start(consumers=True)
    try:
        for n in (1, 2, 3):
            queue.publish(q, n)
        wait_until(lambda: len(seen) == 3)
        assert app.wait_idle(timeout=5)
        stats = app.stats()[harness.qid("c")]
        assert (stats["acked"], stats["dead_lettered"]) == (2, 1)
    finally:
        app.stop(2)


# -- async handlers that swallow their cancellation ----------------------------------------


async def _stubborn(payload: Any) -> None:
    """Never ends: every cancellation is swallowed."""
    while True:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)


def test_timeout_holds_for_an_async_handler_that_swallows_cancellation(harness: Harness) -> None:
    """Regression: the timeout cancelled the worker itself; a handler swallowing the
    CancelledError kept the worker (and the message) for ever."""
    seen: list[Any] = []

    async def handle(payload: Any) -> None:
        seen.append(payload)
        if payload == "stubborn":
            await _stubborn(payload)

    q = harness.queue("q", dead_letter={"queue": harness.queue("dlq"), "max_attempts": 1})
    harness.consumer("c", "q", handle, timeout="200ms")
    app = harness.load()
    app.start(consumers=True)
    try:
        queue.publish(q, "stubborn")
        queue.publish(q, "next")
        wait_until(lambda: "next" in seen)  # one worker: it moved on
        wait_until(lambda: app.stats()[harness.qid("c")]["dead_lettered"] == 1)
        assert queue.info(harness.qid("dlq"))["message_count"] == 1
    finally:
        started = time.monotonic()
        app.stop(1)
    # grace 1 s, plus the bounded waits for handlers that ignore cancellation
    assert time.monotonic() - started < 1 + 3 * consumer_runtime.CANCEL_WAIT + 2


def test_stop_returns_although_a_running_handler_swallows_cancellation(harness: Harness) -> None:
    """Regression: app.stop(timeout=...) never returned (it awaited the cancelled worker)."""
    started_event = threading.Event()

    async def handle(payload: Any) -> None:
        started_event.set()
        await _stubborn(payload)

    q = harness.queue("q")
    harness.consumer("c", "q", handle)  # no timeout: the fast path
    app = harness.load()
    app.start(consumers=True)
    queue.publish(q, "x")
    assert started_event.wait(5)
    began = time.monotonic()
    app.stop(timeout=1)
    assert time.monotonic() - began < 1 + 2 * consumer_runtime.CANCEL_WAIT + 2


# -- the loop is shared ------------------------------------------------------------------


def test_a_handler_that_never_awaits_does_not_hold_the_loop_while_a_backlog_drains(
    harness: Harness,
) -> None:
    """Regression: a worker draining ready deliveries never yielded to the loop when
    its handler never awaits: 200k messages held every other coroutine for ~0.8 s."""
    count = 50_000

    async def handle(payload: Any) -> None:  # never awaits
        return None

    q = harness.queue("q")
    harness.consumer("c", "q", handle, prefetch=1000, lifecycle={"auto_start": False})
    app = harness.load()
    cid = harness.qid("c")

    async def scenario() -> tuple[int, int]:
        async with app:
            await queue.apublish_many(q, range(count))
            ticks_during = 0
            done = False

            async def ticker() -> None:
                nonlocal ticks_during
                while not done:
                    await asyncio.sleep(0)
                    delivered = app.stats().get(cid, {}).get("delivered", 0)
                    if 0 < delivered < count:
                        ticks_during += 1

            tick = asyncio.create_task(ticker())
            await app.astart_consumers([cid])
            while (await app.runtime.ainfo(q))["message_count"]:  # noqa: ASYNC110 - polling the queue
                await asyncio.sleep(0.01)
            done = True
            await tick
            return ticks_during, app.stats()[cid]["delivered"]

    ticks, delivered = asyncio.run(scenario())
    assert delivered == count
    # Before the fix the ticker ran at most once or twice while the backlog drained;
    # a worker now yields every few milliseconds.
    assert ticks >= 10, ticks


# -- the command line: signals and threads --------------------------------------------------

APP = """\
version: "1.0"
namespace: app
entries:
  - {name: mem, kind: queue.driver.memory}
  - {name: jobs, kind: queue.queue, driver: mem}
  - {name: worker, kind: queue.consumer, queue: jobs, handler: "bad:HANDLER"}
  - {name: seed, kind: function.python, source: "bad:seed", lifecycle: {on_start: true}}
"""

MODULE = """
import asyncio, pathlib, threading, time

from conveyor import queue

HERE = pathlib.Path(__file__).parent

def seed():
    queue.publish("app:jobs", "go")

async def stubborn(payload):
    (HERE / "started").write_text("yes")
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass

def blocked(payload):
    (HERE / "started").write_text("yes")
    time.sleep(3600)

def leaves_a_thread(payload):
    threading.Thread(target=time.sleep, args=(3600,), name="left-behind", daemon=False).start()
    (HERE / "started").write_text("yes")
"""


def _start(tmp_path: Path, handler: str) -> subprocess.Popen[str]:
    (tmp_path / "conveyor.yaml").write_text(APP.replace("HANDLER", handler))
    (tmp_path / "bad.py").write_text(MODULE)
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_CONFIG"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "run", "--grace", "60"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "started").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the handler never started ({proc.returncode}):\n{out}\n{err}")
        time.sleep(0.05)
    return proc


def _finish(proc: subprocess.Popen[str], timeout: float) -> tuple[str, float]:
    began = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"conveyor run did not exit within {timeout}s:\n{err}")
    return err, time.monotonic() - began


@pytest.mark.parametrize("handler", ["stubborn", "blocked"])
def test_a_second_signal_ends_conveyor_run_whatever_the_handler_does(tmp_path: Path, handler: str) -> None:
    """Regression: with an async handler swallowing cancellation, `conveyor run`
    survived the second SIGTERM. Faults F06 (grace exceeded)."""
    proc = _start(tmp_path, handler)
    try:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # the grace period (60 s) is running
        proc.send_signal(signal.SIGTERM)
        err, seconds = _finish(proc, timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "received SIGTERM: stopping at once" in err
    assert seconds < 10


def test_conveyor_run_exits_after_a_graceful_stop_although_a_handler_left_a_thread(tmp_path: Path) -> None:
    """Regression: a non-daemon thread started by a handler kept `conveyor run` alive
    after the first SIGTERM (the interpreter joins such threads at exit)."""
    proc = _start(tmp_path, "leaves_a_thread")
    try:
        proc.send_signal(signal.SIGTERM)
        err, seconds = _finish(proc, timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "non-daemon thread(s) still run: left-behind" in err
    assert seconds < 10


def test_retry_lists_naming_what_cannot_be_imported_stop_the_start(harness: Harness) -> None:
    harness.queue("q")
    harness.consumer("c", "q", lambda p: None, retry={"never_on": ["no_such_module:Oops"]})
    app = harness.load()
    with pytest.raises(errors.Error) as caught:
        app.start(consumers=True)
    assert caught.value.kind == errors.INVALID
    assert "no_such_module" in str(caught.value.details["problems"])


@pytest.mark.parametrize(
    ("retry", "message"),
    [
        ({"never_on": ["NOT_A_KIND"]}, "unknown error kind 'NOT_A_KIND'"),
        ({"never_on": ["not a class!"]}, "is neither an error kind"),
        ({"never_on": ["ValueError"], "always_on": ["ValueError"]}, "cannot be in both"),
    ],
)
def test_retry_lists_are_checked_when_loading(harness: Harness, retry: dict[str, Any], message: str) -> None:
    harness.queue("q")
    harness.consumer("c", "q", lambda p: None, retry=retry)
    with pytest.raises(errors.Error) as caught:
        harness.load()
    assert caught.value.kind == errors.INVALID
    assert message in str(caught.value)


def test_a_blocked_event_loop_is_reported_with_the_handler_that_blocks_it(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """An async handler that blocks the loop is named, with how long it blocked.
    Faults F07 (heartbeats need a free loop)."""
    done = threading.Event()

    async def sleepy_handler(payload: Any) -> None:
        time.sleep(2.5)  # noqa: ASYNC251 - blocks the loop: the mistake being reported
        done.set()

    q = harness.queue("q")
    harness.consumer("c", "q", sleepy_handler)
    app = harness.load()
    app.start(consumers=True)
    try:
        queue.publish(q, "x")
        assert done.wait(10)
        wait_until(lambda: any("was blocked for" in r.getMessage() for r in caplog.records))
    finally:
        app.stop(2)
    lines = [r.getMessage() for r in caplog.records if r.name == "conveyor.app"]
    so_far = [line for line in lines if "blocked for" in line and "so far" in line]
    total = [line for line in lines if "was blocked for" in line]
    assert len(so_far) == 1 and len(total) == 1, lines
    assert f"task {harness.qid('c')}#0" in so_far[0]
    assert "test_misbehaving_handlers.py" in so_far[0] and "in sleepy_handler" in so_far[0]
    seconds = float(total[0].split("blocked for ")[1].split("s")[0])
    assert 2.0 <= seconds < 6, total[0]


def test_a_worker_that_crashes_is_replaced(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """The safety net: whatever ends a worker task while the consumer runs (here, a
    fault injected into the settlement step), the pool does not shrink silently."""
    seen: list[int] = []
    q = harness.queue("q")
    harness.consumer("c", "q", seen.append)
    app = harness.load()
    app.start(consumers=True)
    try:
        consumer = app.consumers[harness.qid("c")]
        real = consumer.settlement.exhausted
        calls = 0

        async def broken_once(delivery: Any) -> bool:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("injected worker fault")
            return await real(delivery)

        consumer.settlement.exhausted = broken_once  # type: ignore[method-assign]
        queue.publish(q, 1)  # kills the only worker (the message stays unsettled)
        wait_until(lambda: consumer.stats.worker_restarts == 1)
        queue.publish(q, 2)
        wait_until(lambda: 2 in seen)
    finally:
        app.stop(2)
    crashed = [r for r in caplog.records if "ended unexpectedly" in r.getMessage()]
    assert len(crashed) == 1 and crashed[0].levelname == "ERROR"
    assert crashed[0].exc_info is not None and "injected worker fault" in str(crashed[0].exc_info[1])
