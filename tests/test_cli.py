"""The ``conveyor`` command line, run as a real subprocess (``python -m conveyor``).

Every app here uses ``queue.driver.memory``, which keeps nothing between processes:
publish and info are tested on their exit codes and output shapes, and everything
that needs messages to flow happens inside one ``conveyor run``.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent

import pytest

import conveyor as conveyor_package
from conveyor import cli

TIMEOUT = 30  # seconds: no subprocess call of this file may run longer

BASIC_APP = """\
version: "1.0"
namespace: app
entries:
  - {name: mem, kind: queue.driver.memory}
  - name: tasks
    kind: queue.queue
    driver: mem
    retry: {delay: 0}
    dead_letter: {queue: app:tasks_dlq, max_attempts: 2}
  - {name: tasks_dlq, kind: queue.queue, driver: mem}
  - {name: worker, kind: queue.consumer, queue: app:tasks, func: app:handle}
  - {name: handle, kind: function.python, source: "mymod:handle"}
  - {name: add, kind: function.python, source: "mymod:add"}
  - {name: greet, kind: function.python, source: "mymod:greet"}
  - {name: boom, kind: function.python, source: "mymod:boom"}
  - {name: slow, kind: function.python, source: "mymod:slow"}
"""

SEEDED_APP = (
    BASIC_APP
    + """\
  - name: seed
    kind: function.python
    source: "mymod:seed"
    lifecycle: {on_start: true}
"""
)

WARNING_APP = """\
version: "1.0"
namespace: app
entries:
  - {name: mem, kind: queue.driver.memory}
  - {name: tasks, kind: queue.queue, driver: mem}
  - {name: worker, kind: queue.consumer, queue: tasks, func: handle, concurrency: 4, prefetch: 2}
  - {name: handle, kind: function.python, source: "mymod:handle"}
"""

BROKEN_APP = """\
version: "1.0"
namespace: app
entries:
  - {name: mem, kind: queue.driver.memory}
  - {name: tasks, kind: queue.queue, driver: nowhere}
  - {name: worker, kind: queue.consumer, queue: app:tasks, func: app:missing, concurrency: 0}
  - {name: extra, kind: queue.cosumer}
"""

MODULE = """\
import os
import re
import pathlib
import time

from conveyor import queue

HERE = pathlib.Path(__file__).parent


def handle(payload):
    if payload.get("hang"):
        (HERE / "handler-started").write_text("yes")
        time.sleep(120)
    if payload.get("fail"):
        raise RuntimeError(f"task {payload['n']} failed")


def seed():
    mode = os.environ.get("SEED", "three")
    if mode == "hang":
        queue.publish("app:tasks", {"n": 1, "hang": True})
    else:
        for n in (1, 2, 3):
            queue.publish("app:tasks", {"n": n, "fail": n == 2})
    (HERE / "seeded").write_text("yes")


def add(a, b):
    return {"sum": a + b}


def greet(name):
    return f"hello {name}"


def boom():
    raise ValueError("kaboom")


def slow():
    (HERE / "call-started").write_text("yes")
    time.sleep(120)
"""


# --------------------------------------------------------------------------- helpers


def write_app(directory: Path, text: str = BASIC_APP, name: str = "conveyor.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mymod.py").write_text(MODULE)
    path = directory / name
    path.write_text(text)
    return path


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_CONFIG"}
    env.update(extra or {})
    return env


def conveyor(
    cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m conveyor ARGS`` in ``cwd`` and wait (at most ``timeout`` s)."""
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        cwd=cwd,
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def spawn(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "conveyor", *args],
        cwd=cwd,
        env=_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_file(path: Path, proc: subprocess.Popen[str], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"conveyor exited early ({proc.returncode}):\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} never appeared")
        time.sleep(0.05)


def finish(proc: subprocess.Popen[str], timeout: float = 15) -> tuple[str, str, float]:
    """Wait for ``proc`` (killing it if it outlives ``timeout``); return stdout, stderr, seconds."""
    started = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"conveyor did not exit within {timeout}s:\n{out}\n{err}")
    return out, err, time.monotonic() - started


def foreign_tracebacks(stderr: str, handler_error: str = "RuntimeError: task 2 failed") -> list[str]:
    """The tracebacks on ``stderr`` other than those logged for the handler's own failure."""
    blocks = stderr.split("Traceback (most recent call last):")[1:]
    return [block for block in blocks if handler_error not in block]


def assert_one_line_error(result: subprocess.CompletedProcess[str], starts: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(starts), lines[0]


# --------------------------------------------------------------------------- global


def test_version_and_console_script(tmp_path: Path) -> None:
    """One source for the version: conveyor.__version__, which the package metadata reads."""
    version = importlib.metadata.version("conveyor")
    assert version == conveyor_package.__version__
    result = conveyor(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"conveyor {version}"
    script = Path(sys.executable).parent / "conveyor"
    if script.exists():
        direct = subprocess.run(
            [str(script), "--version"], capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
        assert direct.stdout.strip() == f"conveyor {version}"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    write_app(tmp_path)
    no_command = conveyor(tmp_path)
    assert no_command.returncode == 2
    assert "usage: conveyor" in no_command.stderr
    bad_level = conveyor(tmp_path, "--log-level", "LOUD", "check")
    assert bad_level.returncode == 2
    assert "invalid choice" in bad_level.stderr
    timeout_alone = conveyor(tmp_path, "run", "--timeout", "1")
    assert_one_line_error(timeout_alone, "conveyor: error: --timeout only applies with --until-idle")


# --------------------------------------------------------------------------- check


def test_check_ok_prints_counts_and_warnings(tmp_path: Path) -> None:
    write_app(tmp_path, WARNING_APP)
    result = conveyor(tmp_path, "check")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "ok: conveyor.yaml — 1 driver, 1 queue, 1 consumer, 1 function, 0 policies"
    assert len(lines) == 3
    assert lines[1].startswith("warning: conveyor.yaml: entry app:worker: queue app:tasks has no dead_letter")
    assert lines[2].startswith("warning: ") and "prefetch 2 < concurrency 4" in lines[2]


def test_check_reports_every_problem(tmp_path: Path) -> None:
    write_app(tmp_path, BROKEN_APP)
    result = conveyor(tmp_path, "check")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "conveyor: INVALID: 4 problems in configuration:"
    problems = lines[1:]
    assert len(problems) == 4
    assert all(line.startswith("  conveyor.yaml: entry ") for line in problems)
    text = "\n".join(problems)
    assert "field concurrency: must be between 1 and 1000, got 0" in text
    assert "unknown kind 'queue.cosumer'" in text
    assert "dangling reference app:nowhere" in text
    assert "dangling reference app:missing" in text


def test_check_json(tmp_path: Path) -> None:
    good = write_app(tmp_path / "good", WARNING_APP)
    bad = write_app(tmp_path / "bad", BROKEN_APP)
    ok = conveyor(tmp_path, "check", str(good), "--json")
    assert ok.returncode == 0
    report = json.loads(ok.stdout)
    assert report["ok"] is True
    assert report["problems"] == []
    assert len(report["warnings"]) == 2
    assert report["counts"] == {"drivers": 1, "queues": 1, "consumers": 1, "functions": 1, "policies": 0}
    failed = conveyor(tmp_path, "check", str(bad), "--json")
    assert failed.returncode == 2
    report = json.loads(failed.stdout)
    assert report["ok"] is False
    assert report["counts"] is None
    assert {p["field"] for p in report["problems"]} == {"concurrency", "kind", "driver", "func"}
    assert all(p["file"].endswith("conveyor.yaml") for p in report["problems"])


# --------------------------------------------------------------------------- PATH resolution


def test_config_from_environment(tmp_path: Path) -> None:
    path = write_app(tmp_path / "elsewhere", BASIC_APP, name="app.yaml")
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = conveyor(workdir, "check", env={"CONVEYOR_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {path} — 1 driver, 2 queues")
    info = conveyor(workdir, "info", "--json", env={"CONVEYOR_CONFIG": str(path)})
    assert info.returncode == 0, info.stderr
    assert [row["queue"] for row in json.loads(info.stdout)] == ["app:tasks", "app:tasks_dlq"]


def test_explicit_path_beats_environment(tmp_path: Path) -> None:
    path = write_app(tmp_path, BASIC_APP)
    result = conveyor(tmp_path, "check", str(path), env={"CONVEYOR_CONFIG": str(tmp_path / "nope.yaml")})
    assert result.returncode == 0, result.stderr


def test_missing_config_is_a_usage_error(tmp_path: Path) -> None:
    default = conveyor(tmp_path, "check")
    assert_one_line_error(default, "conveyor: error: configuration not found: ")
    assert str(tmp_path / "conveyor.yaml") in default.stderr
    assert "$CONVEYOR_CONFIG" in default.stderr
    from_env = conveyor(tmp_path, "info", env={"CONVEYOR_CONFIG": "gone.yaml"})
    assert_one_line_error(from_env, "conveyor: error: configuration not found: ")
    assert "gone.yaml (from $CONVEYOR_CONFIG)" in from_env.stderr
    explicit = conveyor(tmp_path, "publish", "app:tasks", "1", "-c", "other.yaml")
    assert_one_line_error(explicit, f"conveyor: error: configuration not found: {tmp_path / 'other.yaml'}")


# --------------------------------------------------------------------------- publish


def test_publish(tmp_path: Path) -> None:
    write_app(tmp_path)
    result = conveyor(tmp_path, "publish", "app:tasks", '{"n": 1}')
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"[0-9a-f]{16}-1\n", result.stdout), result.stdout  # the new message's ID
    assert result.stderr == ""
    as_json = conveyor(tmp_path, "publish", "app:tasks", "plain text", "--text", "--json")
    assert as_json.returncode == 0, as_json.stderr
    sent = json.loads(as_json.stdout)
    assert sent == {"id": sent["id"], "queue": "app:tasks", "headers": {}}
    assert sent["id"].endswith("-1")


def test_publish_typed_headers(tmp_path: Path) -> None:
    write_app(tmp_path)
    headers = ["n=5", "f=1.5", "b=true", 's="5"', "name=alice", "priority=high", "empty=", "obj={}"]
    args = [arg for header in headers for arg in ("-H", header)]
    result = conveyor(tmp_path, "publish", "app:tasks", "1", *args, "--json")
    assert result.returncode == 0, result.stderr
    sent = json.loads(result.stdout)["headers"]
    assert sent == {
        "n": 5,
        "f": 1.5,
        "b": True,
        "s": "5",
        "name": "alice",
        "priority": "high",
        "empty": "",
        "obj": "{}",
    }
    assert type(sent["n"]) is int and type(sent["b"]) is bool
    # `300` parses as an int, which the runtime rejects as a priority (a string would not be).
    out_of_range = conveyor(tmp_path, "publish", "app:tasks", "1", "-H", "priority=300")
    assert out_of_range.returncode == 2
    assert "priority" in out_of_range.stderr and "Traceback" not in out_of_range.stderr


def test_publish_malformed_queue_id(tmp_path: Path) -> None:
    write_app(tmp_path)
    result = conveyor(tmp_path, "publish", " app:x", "1")
    assert_one_line_error(result, "conveyor: INVALID: malformed queue ID ' app:x'")
    undeclared = conveyor(tmp_path, "publish", "app:nope", "1")
    assert_one_line_error(undeclared, "conveyor: NOT_FOUND: queue app:nope is not declared")


@pytest.mark.parametrize("header", ["x_trace=1", "attempts=3"])
def test_publish_reserved_header(tmp_path: Path, header: str) -> None:
    write_app(tmp_path)
    result = conveyor(tmp_path, "publish", "app:tasks", "1", "-H", header)
    key = header.partition("=")[0]
    assert_one_line_error(result, f"conveyor: INVALID: header '{key}' is reserved for the runtime")


def test_publish_header_without_equals(tmp_path: Path) -> None:
    write_app(tmp_path)
    result = conveyor(tmp_path, "publish", "app:tasks", "1", "-H", "loose")
    assert_one_line_error(result, "conveyor: error: header 'loose' is not key=value")


# --------------------------------------------------------------------------- info


def test_info_table(tmp_path: Path) -> None:
    write_app(tmp_path)
    result = conveyor(tmp_path, "info")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["QUEUE", "DRIVER", "MESSAGES", "READY", "IN_FLIGHT", "DELAYED", "CONSUMERS"]
    assert [line.split() for line in lines[1:]] == [
        ["app:tasks", "app:mem", "0", "0", "0", "0", "0"],
        ["app:tasks_dlq", "app:mem", "0", "0", "0", "0", "0"],
    ]
    column = lines[0].index("DRIVER")
    assert all(line[column:].startswith("app:mem") for line in lines[1:])


def test_info_single_queue(tmp_path: Path) -> None:
    write_app(tmp_path)
    result = conveyor(tmp_path, "info", "app:tasks")
    assert result.returncode == 0, result.stderr
    pairs = dict(line.split(":", 1) for line in result.stdout.replace("app:", "app/").splitlines())
    assert {k: v.strip() for k, v in pairs.items()} == {
        "queue": "app/tasks",
        "driver": "app/mem",
        "message_count": "0",
        "ready": "0",
        "in_flight": "0",
        "delayed": "0",
        "consumer_count": "0",
    }
    as_json = conveyor(tmp_path, "info", "app:tasks_dlq", "--json")
    assert as_json.returncode == 0, as_json.stderr
    row = json.loads(as_json.stdout)
    assert row["queue"] == "app:tasks_dlq"
    assert row["message_count"] == 0
    missing = conveyor(tmp_path, "info", "app:nope")
    assert_one_line_error(missing, "conveyor: NOT_FOUND: queue app:nope is not declared")


# --------------------------------------------------------------------------- call


def test_call_python_function(tmp_path: Path) -> None:
    write_app(tmp_path)
    result = conveyor(tmp_path, "call", "app:add", "1", "2")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"sum": 3}
    lists = conveyor(tmp_path, "call", "app:add", "[1]", "[2, 3]")
    assert json.loads(lists.stdout) == {"sum": [1, 2, 3]}
    text = conveyor(tmp_path, "call", "app:greet", "bob")
    assert text.returncode == 0, text.stderr
    assert json.loads(text.stdout) == "hello bob"


def test_call_failures(tmp_path: Path) -> None:
    write_app(tmp_path)
    raised = conveyor(tmp_path, "call", "app:boom")
    assert raised.returncode == 1
    assert raised.stderr.strip() == "conveyor: function app:boom raised ValueError: kaboom"
    undeclared = conveyor(tmp_path, "call", "app:nothing")
    assert_one_line_error(undeclared, "conveyor: NOT_FOUND: function app:nothing is not declared")


def test_call_timeout_gives_up_on_a_function_that_does_not_return(tmp_path: Path) -> None:
    """``call --timeout``: a function still running when it is over is a TIMEOUT (exit 1),
    and the command does not wait for it (regression: ``call`` had no bound at all)."""
    write_app(tmp_path)
    started = time.monotonic()
    result = conveyor(tmp_path, "call", "app:slow", "--timeout", "0.5")
    assert time.monotonic() - started < 30  # the function sleeps for 120 s
    assert result.returncode == 1
    assert result.stderr.strip().endswith("conveyor: TIMEOUT: function app:slow did not return within 0.5s")
    quick = conveyor(tmp_path, "call", "app:add", "1", "2", "--timeout", "30")
    assert quick.returncode == 0, quick.stderr
    assert json.loads(quick.stdout) == {"sum": 3}
    bad = conveyor(tmp_path, "call", "app:add", "1", "2", "--timeout", "soon")
    assert bad.returncode == 2
    assert "not a number of seconds: 'soon'" in bad.stderr


def test_ctrl_c_outside_run_exits_130_quietly(tmp_path: Path) -> None:
    write_app(tmp_path)
    proc = spawn(tmp_path, "call", "app:slow")
    try:
        wait_for_file(tmp_path / "call-started", proc)
        proc.send_signal(signal.SIGINT)
        out, err, seconds = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    assert seconds < 10
    assert out == ""
    assert err == ""


# --------------------------------------------------------------------------- run


def test_run_until_idle_dead_letters_the_failing_message(tmp_path: Path) -> None:
    write_app(tmp_path, SEEDED_APP)
    result = conveyor(tmp_path, "run", "--until-idle", "--idle-settle", "0.3", "--timeout", "20", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] is True and summary["reason"] == "idle"
    assert summary["consumers"]["app:worker"] == {
        "delivered": 4,
        "acked": 2,
        "failed": 2,
        "dead_lettered": 1,
        "undecodable": 0,
        "dropped": 0,
        "worker_restarts": 0,
    }
    assert summary["queues"]["app:tasks"]["message_count"] == 0
    assert summary["queues"]["app:tasks_dlq"]["message_count"] == 1
    # the log format carries the record's extra fields
    assert "attempt=1" in result.stderr and "message_id=" in result.stderr
    assert 'error="RuntimeError: task 2 failed"' in result.stderr


def test_run_until_idle_text_summary(tmp_path: Path) -> None:
    write_app(tmp_path, SEEDED_APP)
    result = conveyor(tmp_path, "run", "--until-idle", "--idle-settle", "0.2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("idle after ")
    assert lines[1].split() == [
        "CONSUMER",
        "DELIVERED",
        "ACKED",
        "FAILED_ATTEMPTS",
        "DEAD_LETTERED",
        "UNDECODABLE",
        "DROPPED",
    ]
    assert lines[2].split() == ["app:worker", "4", "2", "2", "1", "0", "0"]
    assert lines[3] == ""
    assert lines[4].split() == ["QUEUE", "MESSAGES", "READY", "IN_FLIGHT", "DELAYED"]
    assert lines[5].split() == ["app:tasks", "0", "0", "0", "0"]
    assert lines[6].split() == ["app:tasks_dlq", "1", "1", "0", "0"]


def test_run_until_idle_timeout_with_a_hung_handler(tmp_path: Path) -> None:
    write_app(tmp_path, SEEDED_APP)
    started = time.monotonic()
    result = conveyor(
        tmp_path, "run", "--until-idle", "--timeout", "1", "--grace", "0.2", env={"SEED": "hang"}
    )
    assert result.returncode == 1
    assert time.monotonic() - started < 15
    assert result.stdout.startswith("timed out after ")
    assert result.stderr.splitlines()[-1] == "conveyor: TIMEOUT: not idle after 1s (--timeout)"
    assert "Traceback" not in result.stderr


def test_run_stops_gracefully_on_sigint(tmp_path: Path) -> None:
    write_app(tmp_path, SEEDED_APP)
    proc = spawn(tmp_path, "run")
    try:
        wait_for_file(tmp_path / "seeded", proc)
        proc.send_signal(signal.SIGINT)
        out, err, seconds = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert seconds < 10
    assert out.startswith("stopped by a signal after ")
    assert "(forced)" not in out
    assert "received SIGINT: stopping gracefully" in err
    assert foreign_tracebacks(err) == []


def test_second_signal_stops_at_once(tmp_path: Path) -> None:
    write_app(tmp_path, SEEDED_APP)
    proc = spawn(tmp_path, "run", env={"SEED": "hang"})  # default grace: 30s
    try:
        wait_for_file(tmp_path / "handler-started", proc)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # still waiting for the hung handler
        proc.send_signal(signal.SIGINT)
        out, err, seconds = finish(proc, timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGINT, err  # a forced stop is not a clean exit
    assert seconds < 10
    assert "(forced)" in out.splitlines()[0]
    assert "received SIGINT: stopping at once" in err


def test_run_reports_an_app_that_cannot_start(tmp_path: Path) -> None:
    text = BASIC_APP.replace('source: "mymod:handle"', 'source: "absent_module:handle"')
    write_app(tmp_path, text)
    result = conveyor(tmp_path, "run", "--until-idle", "--timeout", "5")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "conveyor: INVALID: cannot start the app:"
    assert "cannot import module 'absent_module'" in lines[1]


def test_check_catches_handlers_that_cannot_be_imported(tmp_path: Path) -> None:
    text = BASIC_APP.replace('source: "mymod:handle"', 'source: "absent_module:handle"')
    write_app(tmp_path, text)
    result = conveyor(tmp_path, "check")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "cannot import module 'absent_module'" in result.stderr
    as_json = json.loads(conveyor(tmp_path, "check", "--json").stdout)
    assert as_json["ok"] is False
    assert "absent_module" in as_json["problems"][0]["message"]


def test_debug_shows_a_traceback(tmp_path: Path) -> None:
    write_app(tmp_path)
    result = conveyor(tmp_path, "--debug", "publish", " app:x", "1")
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("conveyor: INVALID: malformed queue ID")
    after = conveyor(tmp_path, "call", "app:boom", "--debug")
    assert after.returncode == 1
    assert "Traceback" in after.stderr and "ValueError: kaboom" in after.stderr


# --------------------------------------------------------------------------- helpers, in process


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"a": 1}', {"a": 1}),
        ("[1, 2]", [1, 2]),
        ("42", 42),
        ("true", True),
        ('"quoted"', "quoted"),
        ("hello world", "hello world"),
        ("NaN", "NaN"),
        ("1e999", "1e999"),
    ],
)
def test_parse_value(text: str, value: object) -> None:
    assert cli.parse_value(text) == value


def test_parse_header() -> None:
    assert cli.parse_header("a=b=c") == ("a", "b=c")
    assert cli.parse_header("n=-3") == ("n", -3)
    assert cli.parse_header("z=null") == ("z", "null")
    with pytest.raises(cli.UsageError):
        cli.parse_header("nothing")


def test_format_table() -> None:
    table = cli.format_table(["A", "LONG_HEADER"], [["wide value", None], ["x", 1]])
    assert table == dedent(
        """\
        A           LONG_HEADER
        wide value  -
        x           1"""
    )


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``cli.main`` configures the root logger; put it back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_main_in_process_returns_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_app(tmp_path, BASIC_APP)
    assert cli.main(["check", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    assert cli.main(["check", str(tmp_path / "nothing.yaml")]) == 2
    assert cli.main(["--version"]) == 0
