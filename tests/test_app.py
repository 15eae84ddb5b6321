"""App lifecycle, current-app rules, function calls, security and logging integration."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import conveyor
from conveyor import errors, queue, security
from tests.support.handlers import install
from tests.support.harness import Harness
from tests.support.waiting import wait_until


def test_public_surface_is_sorted_and_complete() -> None:
    for module in (conveyor, conveyor.queue, conveyor.errors, conveyor.security):
        names = module.__all__
        # ruff's RUF022 order: CONSTANTS, then Classes, then functions
        order = sorted(names, key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n))
        assert list(names) == order, module.__name__
        for name in names:
            assert hasattr(module, name), (module.__name__, name)
    assert {"load", "App", "queue", "errors", "security"} <= set(conveyor.__all__)
    assert {
        "publish",
        "apublish",
        "publish_many",
        "apublish_many",
        "info",
        "ainfo",
        "message",
        "Message",
        "browse",
        "abrowse",
        "replay",
        "areplay",
        "purge",
        "apurge",
        "QueuedMessage",
        "DeadLetter",
    } == set(conveyor.queue.__all__)


# -- lifecycle ----------------------------------------------------------------------------


def test_load_starts_nothing(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    q = h.queue("tasks")
    app = h.load()
    assert not app.running
    with pytest.raises(errors.Error) as info:
        queue.publish(q, "x")
    assert "no queue runtime" in info.value.message


def test_start_stop_from_a_plain_thread(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    q = h.queue("tasks")
    app = h.load()
    results: list[Any] = []

    def body() -> None:
        app.start()
        results.append(bool(queue.publish(q, "x")))
        results.append(queue.info(q)["message_count"])
        app.stop()

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(10)
    assert results == [True, 1]
    assert not app.running


def test_start_twice_is_invalid(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.queue("tasks")
    with h.load() as app, pytest.raises(errors.Error) as info:
        app.start()
    assert info.value.kind == errors.INVALID


def test_blocking_start_inside_loop_names_async_form(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.queue("tasks")
    app = h.load()

    async def main() -> None:
        with pytest.raises(errors.Error) as info:
            app.start()
        assert "app.astart" in info.value.message

    asyncio.run(main())


def test_async_start_with_consumers_inside_running_loop(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    q = h.queue("tasks")
    got: list[Any] = []

    async def handle(payload: Any) -> None:
        got.append(payload)

    h.consumer("worker", "tasks", handle)
    app = h.load()

    async def main() -> None:
        await app.astart(consumers=True)
        try:
            await queue.apublish(q, {"k": 1})
            for _ in range(200):
                if got:
                    break
                await asyncio.sleep(0.01)
        finally:
            await app.astop()
        assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    asyncio.run(main())
    assert got == [{"k": 1}]


def test_publish_from_other_thread_to_app_started_in_a_loop(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    q = h.queue("tasks")
    app = h.load()

    async def main() -> None:
        async with app:
            done = await asyncio.to_thread(queue.publish, q, "from a thread")
            assert isinstance(done, str) and done
            assert (await queue.ainfo(q))["message_count"] == 1

    asyncio.run(main())


def test_apublish_from_another_loop_is_bridged(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    q = h.queue("tasks")
    with h.load():

        async def other_loop() -> int:
            await queue.apublish(q, "x")
            return int((await queue.ainfo(q))["message_count"])

        assert asyncio.run(other_loop()) == 1


def test_no_pending_tasks_after_stop(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    q = h.queue("tasks", retry={"delay": "5s"})

    def fail(_p: Any) -> None:
        raise RuntimeError("x")

    h.consumer("worker", "tasks", fail, concurrency=3)
    app = h.load()

    async def main() -> None:
        await app.astart(consumers=True)
        await queue.apublish(q, "x")
        await asyncio.sleep(0.2)
        await app.astop()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert pending == []

    asyncio.run(main())


# -- current app rules ----------------------------------------------------------------------


def test_single_started_app_is_current_from_any_thread(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    q = h.queue("tasks")
    app = h.load()
    app.start()
    try:
        out: list[Any] = []
        thread = threading.Thread(target=lambda: out.append(bool(queue.publish(q, "x"))))
        thread.start()
        thread.join(10)
        assert out == [True]
    finally:
        app.stop()


def test_two_started_apps_need_an_entered_one(tmp_path: Path) -> None:
    h1, h2 = Harness(tmp_path), Harness(tmp_path)
    q1 = h1.queue("a")
    q2 = h2.queue("b")
    app1, app2 = h1.load(), h2.load()
    app1.start()
    app2.start()
    try:
        with pytest.raises(errors.Error) as info:
            queue.publish(q1, "x")
        assert info.value.kind == errors.INVALID
        assert "no queue runtime" in info.value.message
    finally:
        app1.stop()
        app2.stop()
    with h1.load(), h2.load():
        # the innermost entered app is current
        assert queue.publish(q2, "x")
        assert queue.info(q2)["message_count"] == 1
        with pytest.raises(errors.Error) as info:
            queue.publish(q1, "x")  # declared only in the outer app
        assert info.value.kind == errors.NOT_FOUND


def test_handler_sees_the_app_running_it(tmp_path: Path) -> None:
    h_other = Harness(tmp_path)
    h_other.queue("elsewhere")
    h = Harness(tmp_path)
    inbox = h.queue("in")
    out = h.queue("out")
    h.consumer("relay", "in", lambda p: queue.publish(out, {"relayed": p}))
    other = h_other.load()
    app = h.load()
    other.start()
    app.start(consumers=True)
    try:
        # two apps are started and none is entered here: only the handler knows its app
        asyncio.run_coroutine_threadsafe(app.runtime.apublish(inbox, 1), app.loop).result(5)

        def relayed() -> bool:
            info = asyncio.run_coroutine_threadsafe(app.ainfo(out), app.loop).result(5)
            return bool(info["message_count"] == 1)

        wait_until(relayed)
    finally:
        app.stop()
        other.stop()


# -- functions -------------------------------------------------------------------------------


def _double(x: int) -> int:
    return x * 2


async def _adouble(x: int) -> int:
    await asyncio.sleep(0)
    return x * 2


def test_call_and_acall_python_functions(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    q = h.queue("tasks")
    h.add(name="double", kind="function.python", source=install(_double))
    h.add(name="adouble", kind="function.python", source=install(_adouble))

    def publisher(n: int) -> bool:
        return bool(queue.publish(q, n))

    h.add(name="pub", kind="function.python", source=install(publisher))
    app = h.load()
    with app:
        assert app.call(h.qid("double"), 21) == 42
        assert app.call(h.qid("adouble"), 5) == 10
        assert app.call(h.qid("pub"), 3) is True
        with pytest.raises(errors.Error) as info:
            app.call(h.qid("missing"))
        assert info.value.kind == errors.NOT_FOUND

    async def main() -> None:
        async with app:
            assert await app.acall(h.qid("double"), 1) == 2
            assert await app.acall(h.qid("adouble"), 2) == 4
            assert await app.acall(h.qid("pub"), 3) is True

    asyncio.run(main())


def test_unresolvable_handler_is_reported_before_anything_starts(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.queue("tasks")
    h.add(name="w", kind="queue.consumer", queue="tasks", handler="no_such_module_xyz:handler")
    app = h.load()
    with pytest.raises(errors.Error) as info:
        app.start(consumers=True)
    assert info.value.kind == errors.INVALID
    assert "no_such_module_xyz" in info.value.message
    assert not app.running


def test_unavailable_driver_module_is_invalid_naming_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conveyor.drivers import kinds

    row = kinds.DriverKind(
        "queue.driver.memory", "conveyor.drivers.options.memory", "conveyor.drivers.nope:X"
    )
    monkeypatch.setattr(kinds, "KINDS", (row, *kinds.KINDS[1:]))
    h = Harness(tmp_path)
    h.queue("tasks")
    app = h.load()
    with pytest.raises(errors.Error) as info:
        app.start()
    assert info.value.kind == errors.INVALID
    assert "queue.driver.memory is not available" in info.value.message
    assert "conveyor.drivers.nope" in info.value.message
    assert not app.running


def test_missing_client_library_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from conveyor.drivers import kinds

    (tmp_path / "fake_driver_mod.py").write_text("import conveyor_absent_client_lib\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_driver_mod", raising=False)
    row = kinds.DriverKind(
        "queue.driver.memory", "conveyor.drivers.options.memory", "fake_driver_mod:X", "amqp"
    )
    monkeypatch.setattr(kinds, "KINDS", (row, *kinds.KINDS[1:]))
    with pytest.raises(errors.Error) as info:
        kinds.driver_class("queue.driver.memory")
    assert "conveyor_absent_client_lib" in info.value.message
    assert "pip install 'conveyor[amqp]'" in info.value.message


# -- security integration --------------------------------------------------------------------


def _policy(
    h: Harness, name: str, actions: Any, resources: Any = "*", effect: str = "allow", **extra: Any
) -> str:
    policy = {"actions": actions, "resources": resources, "effect": effect}
    h.add(name=name, kind="security.policy", policy=policy, **extra)
    return h.qid(name)


def test_publish_checks_both_permissions(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    q = h.queue("tasks")
    other = h.queue("other")
    general = _policy(h, "general", "queue.publish")
    specific = _policy(h, "specific", "queue.publish.queue", q)
    with h.load():
        with security.context("svc", policies=[general, specific]):
            assert queue.publish(q, "x")
            with pytest.raises(errors.Error) as info:
                queue.publish(other, "x")
            assert info.value.kind == errors.PERMISSION_DENIED
        with security.context("svc", policies=[specific]), pytest.raises(errors.Error) as info:
            queue.publish(q, "x")
        assert info.value.kind == errors.PERMISSION_DENIED
        with security.context("svc", policies=[general]), pytest.raises(errors.Error):
            queue.publish(q, "x")
        assert queue.info(q)["message_count"] == 1


def test_permission_checked_on_exactly_the_id_used(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    q = h.queue("secret")
    allow_all = _policy(h, "all", "*")
    deny = _policy(h, "deny_secret", "queue.publish.queue", q, effect="deny")
    with h.load():
        with security.context("svc", policies=[allow_all, deny]):
            for spelling in (q, f" {q}", f"{q} ", q.replace(":", "::"), q.upper()):
                with pytest.raises(errors.Error) as info:
                    queue.publish(spelling, "x")
                assert info.value.kind in (errors.PERMISSION_DENIED, errors.INVALID, errors.NOT_FOUND)
        assert queue.info(q)["message_count"] == 0


def test_strict_mode_denies_without_context(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.top["security"] = {"strict": True}
    q = h.queue("tasks")
    allow = _policy(h, "allow", "*")
    with h.load():
        with pytest.raises(errors.Error) as info:
            queue.publish(q, "x")
        assert info.value.kind == errors.PERMISSION_DENIED
        assert security.is_allowed("queue.publish") is False
        with security.context("svc", policies=[allow]):
            assert queue.publish(q, "x")


def test_consumer_security_block_applies_to_handler_publishes(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.top["security"] = {"strict": True}
    inbox = h.queue("inbox")
    allowed = h.queue("allowed")
    forbidden = h.queue("forbidden")
    _policy(h, "relay_general", "queue.publish", groups=["relay"])
    _policy(h, "relay_allowed", "queue.publish.queue", allowed, groups=["relay"])
    admin = _policy(h, "admin", "*")
    outcomes: list[Any] = []

    def relay(payload: Any) -> None:
        outcomes.append(bool(queue.publish(allowed, payload)))
        try:
            queue.publish(forbidden, payload)
        except errors.Error as exc:
            outcomes.append(exc.kind)

    h.consumer("relay", "inbox", relay, security={"actor": "relay-svc", "groups": ["relay"]})
    app = h.load()
    app.start(consumers=True)
    try:
        with security.context("admin", policies=[admin]):
            queue.publish(inbox, "hello")
        wait_until(lambda: len(outcomes) == 2)
    finally:
        app.stop()
    assert outcomes == [True, errors.PERMISSION_DENIED]


# -- logging ---------------------------------------------------------------------------------


def test_failures_and_dead_letters_are_logged_without_bodies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(tmp_path)
    q = h.queue("logged", dead_letter={"queue": "logged_dlq", "max_attempts": 2})
    h.queue("logged_dlq")

    def fail(_p: Any) -> None:
        raise RuntimeError("kaboom")

    h.consumer("worker", "logged", fail)
    app = h.load()
    caplog.set_level(logging.INFO, logger="conveyor")
    app.start(consumers=True)
    try:
        queue.publish(q, {"secret": "top-secret-body"})
        wait_until(lambda: any("dead-lettered" in r.getMessage() for r in caplog.records))
    finally:
        app.stop()
    attempts = [r for r in caplog.records if r.getMessage().startswith("attempt ")]
    assert attempts, [r.getMessage() for r in caplog.records]
    record = attempts[0]
    assert record.queue == q  # type: ignore[attr-defined]
    assert record.attempt == 1  # type: ignore[attr-defined]
    assert "kaboom" in record.error  # type: ignore[attr-defined]
    assert isinstance(record.message_id, str)  # type: ignore[attr-defined]
    dead = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert dead[0].levelno == logging.WARNING
    assert any("started" in r.getMessage() for r in caplog.records)
    assert any("stopped" in r.getMessage() for r in caplog.records)
    assert all("top-secret-body" not in r.getMessage() for r in caplog.records)
    assert all("top-secret-body" not in str(vars(r)) for r in caplog.records)


def test_bodies_logged_when_asked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(tmp_path)
    q = h.queue("logged", retry={"delay": "10s"})

    def fail(_p: Any) -> None:
        raise RuntimeError("kaboom")

    h.consumer("worker", "logged", fail)
    app = h.load(log_bodies=True)
    caplog.set_level(logging.INFO, logger="conveyor")
    app.start(consumers=True)
    try:
        queue.publish(q, {"visible": "body-text"})
        wait_until(lambda: any(r.getMessage().startswith("attempt ") for r in caplog.records))
    finally:
        app.stop(timeout=1)
    record = next(r for r in caplog.records if r.getMessage().startswith("attempt "))
    assert "body-text" in record.body  # type: ignore[attr-defined]


def test_hung_sync_handler_does_not_keep_the_process_alive(tmp_path: Path) -> None:
    """Regression: handler threads were joined at interpreter exit, so a hung handler hung exit."""
    import subprocess
    import sys
    import textwrap

    (tmp_path / "hang.py").write_text("import time\ndef handle(p):\n    time.sleep(3600)\n")
    (tmp_path / "app.yaml").write_text(
        textwrap.dedent(
            """
            namespace: hang
            entries:
              - {name: mem, kind: queue.driver.memory}
              - {name: q, kind: queue.queue, driver: mem}
              - {name: w, kind: queue.consumer, queue: q, handler: "hang:handle"}
            """
        )
    )
    script = textwrap.dedent(
        """
        import sys, time, conveyor
        from conveyor import queue
        sys.path.insert(0, ".")
        app = conveyor.load("app.yaml")
        app.start(consumers=True)
        queue.publish("hang:q", "x")
        time.sleep(0.3)
        app.stop(timeout=0.2)
        print("stopped", flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=20, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "stopped" in proc.stdout


def test_consumer_without_security_block_does_not_inherit_the_starters_context(tmp_path: Path) -> None:
    """Regression: workers copied the security context active where the app was started."""
    h = Harness(tmp_path)
    inbox = h.queue("inbox")
    seen: list[Any] = []
    h.consumer("w", "inbox", lambda _p: seen.append(security.current()))
    _policy(h, "all", "*")
    app = h.load()
    with security.context("operator", policies=[h.qid("all")]):
        app.start(consumers=True)
    try:
        queue.publish(inbox, "x")
        wait_until(lambda: len(seen) == 1)
    finally:
        app.stop()
    assert seen == [None]


def test_on_start_functions_run_once_per_start(tmp_path: Path) -> None:
    """Regression: a second start_consumers() re-ran every on_start function."""
    h = Harness(tmp_path)
    h.queue("tasks")
    calls: list[int] = []
    h.add(
        name="seed",
        kind="function.python",
        source=install(lambda: calls.append(1)),
        lifecycle={"on_start": True},
    )
    app = h.load()
    app.start(consumers=True)
    try:
        app.start_consumers()
        assert calls == [1]
    finally:
        app.stop()
    app.start(consumers=True)
    app.stop()
    assert calls == [1, 1]


@pytest.mark.parametrize("headers", [[], "", 0, ["a"]])
def test_non_mapping_headers_are_invalid_even_when_falsy(tmp_path: Path, headers: Any) -> None:
    """Regression: falsy non-mappings were taken as "no headers"."""
    h = Harness(tmp_path)
    q = h.queue("tasks")
    with h.load(), pytest.raises(errors.Error) as info:
        queue.publish(q, "x", headers)
    assert info.value.kind == errors.INVALID


def test_preflight_covers_dependencies_that_are_not_auto_started(tmp_path: Path) -> None:
    """Regression: a depends_on target with auto_start false was started but never preflighted."""
    h = Harness(tmp_path)
    h.queue("tasks")
    h.add(
        name="dep",
        kind="queue.consumer",
        queue="tasks",
        handler="absent_mod_xyz:h",
        lifecycle={"auto_start": False},
    )
    h.consumer("main", "tasks", lambda _p: None, lifecycle={"depends_on": ["dep"]})
    app = h.load()
    with pytest.raises(errors.Error) as info:
        app.start(consumers=True)
    assert info.value.message.startswith("cannot start the app:")  # caught before anything opened
    assert "absent_mod_xyz" in info.value.message
    assert not app.running


# -- App.run and its report --------------------------------------------------------------------


def test_run_until_reports_reason_stats_and_queue_counts(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    q = h.queue("tasks")
    left = h.queue("left")
    h.consumer("worker", "tasks", lambda payload: None)
    app = h.load()
    published: list[bool] = []

    def until() -> bool:
        if not published:
            published.append(queue.publish(q, {"n": 1}))
            queue.publish(left, "stays")
            return False
        return app.stats()[h.qid("worker")]["acked"] == 1

    report = app.run(until=until, grace=1)
    assert not app.running
    assert (report.reason, report.forced) == ("until", False)
    assert report.consumers[h.qid("worker")]["acked"] == 1
    assert report.queues[q]["message_count"] == 0
    assert report.queues[left]["message_count"] == 1
    assert report.elapsed > 0


def test_run_timeout_and_request_stop(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.queue("tasks")
    app = h.load()
    assert app.run(timeout=0.3).reason == "timeout"
    stopper = threading.Timer(0.3, app.request_stop)
    stopper.start()
    report = app.run()
    stopper.join()
    assert (report.reason, report.forced) == ("request", False)
    assert not app.running


def test_immediate_stop_request_cancels_a_running_handler_and_is_reported_forced(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    q = h.queue("tasks")
    started = threading.Event()

    async def slow(payload: Any) -> None:
        started.set()
        await asyncio.sleep(30)

    h.consumer("worker", "tasks", slow)
    app = h.load()

    def stop_when_busy() -> None:
        started.wait(10)
        app.request_stop()
        time.sleep(0.2)
        app.request_stop(immediate=True)

    def until() -> bool:
        if not thread.is_alive() and not started.is_set():
            queue.publish(q, "work")
            thread.start()
        return False

    thread = threading.Thread(target=stop_when_busy)
    began = time.monotonic()
    report = app.run(until=until, grace=20)
    thread.join()
    assert time.monotonic() - began < 10, "the immediate stop did not skip the 20 s grace period"
    assert (report.reason, report.forced) == ("request", True)
    assert report.queues[q]["message_count"] == 1  # the cancelled handler's message went back


def test_arun_returns_a_report_on_request(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    q = h.queue("tasks")
    h.consumer("worker", "tasks", lambda payload: None)
    app = h.load()

    async def main() -> Any:
        async def stop_soon() -> None:
            await asyncio.sleep(0.2)
            await queue.apublish(q, "one")
            await app.await_idle(settle=0.1, timeout=5)
            app.request_stop()

        task = asyncio.create_task(stop_soon())
        report = await app.arun(grace=1)
        await task
        return report

    report = asyncio.run(main())
    assert report.reason == "request"
    assert report.consumers[h.qid("worker")]["acked"] == 1
    assert report.queues[q]["message_count"] == 0


# -- driver errors pass through -----------------------------------------------------------------


def test_info_keeps_the_driver_errors_kind_and_retryable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: App.ainfo re-wrapped driver errors as INTERNAL, not retryable."""
    from conveyor.drivers import kinds

    row = kinds.DriverKind(
        "queue.driver.memory",
        "conveyor.drivers.options.memory",
        "tests.support.stub_drivers:InfoFailingDriver",
    )
    monkeypatch.setattr(kinds, "KINDS", (row, *kinds.KINDS[1:]))
    h = Harness(tmp_path)
    q = h.queue("tasks")
    with h.load() as app:
        for call in (lambda: queue.info(q), lambda: app.info(q)):
            with pytest.raises(errors.Error) as info:
                call()
            assert (info.value.kind, info.value.retryable) == (errors.UNAVAILABLE, True)
            assert info.value.details == {"queue": q}


# -- start-time problems --------------------------------------------------------------------------


def test_preflight_problems_locate_without_rewriting_messages(tmp_path: Path) -> None:
    """Regression: problems were built by cutting the entry's location back out of the
    message, so a message that did not start with it kept it (or lost part of itself)."""
    h = Harness(tmp_path)
    h.queue("tasks")
    h.add(name="broken", kind="function.python", source="no_such_module_q1:fn")
    h.add(name="w1", kind="queue.consumer", queue="tasks", func="broken")
    h.add(name="w2", kind="queue.consumer", queue="tasks", handler="no_such_module_q2:fn")
    app = h.load()
    with pytest.raises(errors.Error) as info:
        app.preflight()
    problems = {p["entry"]: p for p in info.value.details["problems"]}
    file = str(h.write())
    own = problems[h.qid("w2")]
    assert (own["file"], own["field"], own["line"]) == (file, "handler", None)
    assert own["message"].startswith("cannot import module 'no_such_module_q2'")
    via = problems[h.qid("w1")]
    assert via["field"] == "func"
    # the failing function is declared elsewhere: its own location stays in the message
    assert via["message"].startswith(f"{file}: entry {h.qid('broken')}: cannot import module")
    assert info.value.message.splitlines()[0] == "cannot start the app:"
