"""hard_timeout: sync and Lua handlers run in worker processes that are killed for real."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor import errors, queue
from tests.support.harness import Harness
from tests.support.waiting import wait_until

MODULE = """
import os, pathlib, time

HERE = pathlib.Path(__file__).parent

def handle(payload):
    (HERE / f"pid-{payload}").write_text(str(os.getpid()))
    if payload.startswith("spin"):
        while True:
            pass
    if payload.startswith("sleep"):
        time.sleep(3600)
    (HERE / f"done-{payload}").write_text(str(os.getpid()))
"""

LUA = """
return function(payload)
    -- a backtracking pattern: runs inside C, where no Lua hook fires
    if payload == "pattern" then
        string.find(string.rep("a", 40), string.rep("a?", 40) .. string.rep("a", 40))
    end
    return "ok"
end
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _pid_in(path: Path) -> int:
    """The pid a handler wrote to ``path``, once it is there in full."""
    wait_until(lambda: path.exists() and path.read_text().strip().isdigit(), timeout=30)
    return int(path.read_text())


def _harness(tmp_path: Path) -> tuple[Harness, str]:
    """A harness and the handler's import path: a module of its own per test (the
    directories of earlier tests stay on sys.path, in this process and in children)."""
    h = Harness(tmp_path)
    module = f"hard_{h.namespace}"
    (tmp_path / f"{module}.py").write_text(MODULE)
    return h, f"{module}:handle"


def _dead_letters(h: Harness) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    h.consumer("dlq_reader", "jobs_dlq", lambda p: found.append(dict(queue.message().headers)))
    return found


@pytest.mark.parametrize("payload", ["spin", "sleep"])
def test_a_sync_handler_past_its_hard_timeout_is_killed_and_the_message_counts_an_attempt(
    tmp_path: Path, payload: str
) -> None:
    h, handler = _harness(tmp_path)
    q = h.queue("jobs", dead_letter={"queue": "jobs_dlq", "max_attempts": 2})
    h.queue("jobs_dlq")
    h.add(name="worker", kind="queue.consumer", queue="jobs", handler=handler, hard_timeout="1s")
    dead = _dead_letters(h)
    app = h.load()
    app.start(consumers=True)
    try:
        queue.publish(q, payload)
        wait_until(lambda: len(dead) == 1, timeout=60)
        stuck = int((tmp_path / f"pid-{payload}").read_text())
        wait_until(lambda: not _alive(stuck))  # the runaway process is gone: no CPU burned
        assert stuck != os.getpid()
        queue.publish(q, "after")  # the pool serves the next message
        assert _pid_in(tmp_path / "done-after") != stuck
        # the file is written before the handler returns: wait for the ack itself
        wait_until(lambda: app.stats()[h.qid("worker")]["acked"] == 1)
        stats = app.stats()[h.qid("worker")]
    finally:
        app.stop(2)
    assert dead[0]["attempts"] == 2
    assert "hard timeout" in dead[0]["x_dead_letter_reason"]
    assert (stats["failed"], stats["dead_lettered"], stats["acked"]) == (2, 1, 1)


def test_a_lua_handler_stuck_in_c_code_is_killed_at_its_hard_timeout(tmp_path: Path) -> None:
    pytest.importorskip("lupa")
    (tmp_path / "runaway.lua").write_text(LUA)
    h = Harness(tmp_path)
    q = h.queue("jobs", dead_letter={"queue": "jobs_dlq", "max_attempts": 1})
    h.queue("jobs_dlq")
    h.add(name="handle", kind="function.lua", source="file://runaway.lua")
    h.add(name="worker", kind="queue.consumer", queue="jobs", func="handle", hard_timeout="1s")
    dead = _dead_letters(h)
    app = h.load()
    app.start(consumers=True)
    try:
        began = time.monotonic()
        queue.publish(q, "pattern")
        wait_until(lambda: len(dead) == 1, timeout=60)
        assert time.monotonic() - began < 30
        queue.publish(q, "fine")
        wait_until(lambda: app.stats()[h.qid("worker")]["acked"] == 1, timeout=30)
    finally:
        app.stop(2)
    assert "hard timeout" in dead[0]["x_dead_letter_reason"]


def test_timeout_settles_first_and_hard_timeout_then_kills(tmp_path: Path) -> None:
    h, handler = _harness(tmp_path)
    q = h.queue("jobs", dead_letter={"queue": "jobs_dlq", "max_attempts": 1})
    h.queue("jobs_dlq")
    h.add(
        name="worker",
        kind="queue.consumer",
        queue="jobs",
        handler=handler,
        timeout="500ms",
        hard_timeout="3s",
    )
    dead = _dead_letters(h)
    app = h.load()
    app.start(consumers=True)
    try:
        queue.publish(q, "sleep")
        wait_until(lambda: len(dead) == 1, timeout=30)
        assert "TIMEOUT: handler exceeded its 0.5s timeout" in dead[0]["x_dead_letter_reason"]
        stuck = _pid_in(tmp_path / "pid-sleep")  # a child may still be starting
        wait_until(lambda: not _alive(stuck), timeout=30)  # killed at the hard timeout
    finally:
        app.stop(2)


def test_hard_timeout_is_refused_for_async_handlers(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.queue("jobs")

    async def handle(payload: Any) -> None:
        return None

    h.consumer("worker", "jobs", handle, hard_timeout="1s")
    with pytest.raises(errors.Error) as caught:
        h.load().start(consumers=True)
    assert caught.value.kind == errors.INVALID
    assert "hard_timeout applies to sync and Lua handlers" in str(caught.value.details["problems"])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"timeout": "5s", "hard_timeout": "1s"}, "hard_timeout (1s) is shorter than timeout (5s)"),
        ({"auto_ack": True, "hard_timeout": "1s"}, "hard_timeout cannot be used with auto_ack"),
    ],
)
def test_hard_timeout_is_checked_when_loading(tmp_path: Path, fields: dict[str, Any], message: str) -> None:
    h = Harness(tmp_path)
    h.queue("jobs")
    h.consumer("worker", "jobs", lambda p: None, **fields)
    with pytest.raises(errors.Error) as caught:
        h.load()
    assert message in str(caught.value)


def test_handler_processes_are_stopped_with_the_consumer(tmp_path: Path) -> None:
    h, handler = _harness(tmp_path)
    q = h.queue("jobs")
    h.add(
        name="worker",
        kind="queue.consumer",
        queue="jobs",
        handler=handler,
        hard_timeout="60s",
        concurrency=2,
    )
    app = h.load()
    app.start(consumers=True)
    queue.publish(q, "sleep")
    busy = _pid_in(tmp_path / "pid-sleep")
    began = time.monotonic()
    app.stop(0.5)
    assert time.monotonic() - began < 10
    assert not _alive(busy)
