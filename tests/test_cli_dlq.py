"""``conveyor peek`` and ``conveyor dlq list | show | replay | purge``, as real subprocesses.

SQLite keeps the queues between commands, so the dead letters a ``conveyor run``
made are listed, shown, replayed and purged by the commands that follow. The
memory driver keeps nothing between processes: on it the commands are tested on
what an empty app gives (shapes, exit codes). RabbitMQ: the last test (skipped
without a broker, failing instead with CONVEYOR_REQUIRE_BROKERS=1).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_service
from tests.support.harness import Harness
from tests.test_cli import MODULE, TIMEOUT, _env, write_app
from tests.test_cli_publish import conveyor, usage_error

DLQ_APP = """\
version: "1.0"
namespace: app
entries:
  - {name: store, kind: queue.driver.sqlite, path: ./queues.db}
  - name: tasks
    kind: queue.queue
    driver: store
    retry: {delay: 0}
    dead_letter: {queue: app:tasks_dlq, max_attempts: 2}
  - {name: tasks_dlq, kind: queue.queue, driver: store}
  - name: emails
    kind: queue.queue
    driver: store
    dead_letter: {queue: app:emails_dlq}
  - {name: emails_dlq, kind: queue.queue, driver: store}
  - {name: plain, kind: queue.queue, driver: store}
  - {name: worker, kind: queue.consumer, queue: app:tasks, func: app:handle, lifecycle: {auto_start: WORKER}}
  - {name: handle, kind: function.python, source: "dlqmod:handle"}
"""

HANDLERS = """\
def handle(payload):
    if payload.get("fail"):
        raise RuntimeError(payload.get("reason") or f"task {payload['n']} failed")
"""

LONG_REASON = "x" * 200


def make_app(directory: Path, *, worker: bool = True) -> Path:
    path = write_app(directory, DLQ_APP.replace("WORKER", "true" if worker else "false"))
    (directory / "dlqmod.py").write_text(HANDLERS)
    return path


def dead_letters(directory: Path, payloads: list[dict[str, Any]]) -> list[str]:
    """Publish ``payloads`` to app:tasks and run until idle: the failing ones are dead-lettered.
    Returns the IDs, in order."""
    ndjson = "".join(json.dumps(p) + "\n" for p in payloads)
    published = conveyor(directory, "publish", "app:tasks", "--lines", "-", stdin=ndjson)
    assert published.returncode == 0, published.stderr
    run = conveyor(directory, "run", "--until-idle", "--idle-settle", "0.2", "--timeout", "20")
    assert run.returncode == 0, run.stderr
    return published.stdout.split()


@pytest.fixture
def dlq_dir(tmp_path: Path) -> tuple[Path, list[str]]:
    """An app whose app:tasks_dlq holds two dead letters (n=2 and n=3); n=1 succeeded."""
    make_app(tmp_path)
    ids = dead_letters(
        tmp_path,
        [{"n": 1}, {"n": 2, "fail": True}, {"n": 3, "fail": True, "reason": LONG_REASON}],
    )
    return tmp_path, ids


def table(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines()]


# --------------------------------------------------------------------------- dlq list


def test_dlq_list_every_dead_letter_queue_with_counts(dlq_dir: tuple[Path, list[str]]) -> None:
    directory, _ = dlq_dir
    result = conveyor(directory, "dlq", "list")
    assert result.returncode == 0, result.stderr
    assert table(result.stdout) == [
        ["DEAD_LETTER_QUEUE", "MESSAGES", "FROM"],
        ["app:tasks_dlq", "2", "app:tasks"],
        ["app:emails_dlq", "0", "app:emails"],
    ]
    as_json = json.loads(conveyor(directory, "dlq", "list", "--json").stdout)
    assert as_json == [
        {"queue": "app:tasks_dlq", "driver": "app:store", "sources": ["app:tasks"], "message_count": 2},
        {"queue": "app:emails_dlq", "driver": "app:store", "sources": ["app:emails"], "message_count": 0},
    ]


def test_dlq_list_one_queue(dlq_dir: tuple[Path, list[str]]) -> None:
    directory, ids = dlq_dir
    result = conveyor(directory, "dlq", "list", "app:tasks_dlq")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "DEAD_LETTERED", "FROM", "ATTEMPTS", "REASON"]
    first, second = (line.split(maxsplit=4) for line in lines[1:])
    assert first[0] == ids[1] and first[2:] == ["app:tasks", "2", "RuntimeError: task 2 failed"]
    assert first[1].endswith("Z")  # the dead-letter time, UTC
    assert second[0] == ids[2]
    assert second[4] == "RuntimeError: " + "x" * 45 + "…"  # cut to 60 characters
    page = json.loads(conveyor(directory, "dlq", "list", "app:tasks_dlq", "--json").stdout)
    assert page["queue"] == "app:tasks_dlq" and page["total"] == 2
    assert [m["id"] for m in page["messages"]] == ids[1:]
    assert page["messages"][1]["dead_letter"]["reason"] == f"RuntimeError: {LONG_REASON}"  # in full


def test_dlq_list_pages(dlq_dir: tuple[Path, list[str]]) -> None:
    directory, ids = dlq_dir
    first = conveyor(directory, "dlq", "list", "app:tasks_dlq", "--limit", "1")
    assert [row[0] for row in table(first.stdout)[1:]] == [ids[1]]
    assert first.stderr == "(1 shown, 2 in the queue; --limit N shows more, --after ID the next page)\n"
    rest = conveyor(directory, "dlq", "list", "app:tasks_dlq", "--limit", "1", "--after", ids[1])
    assert [row[0] for row in table(rest.stdout)[1:]] == [ids[2]]
    bad_limit = conveyor(directory, "dlq", "list", "app:tasks_dlq", "--limit", "0")
    assert bad_limit.returncode == 2 and "must be between 1 and 10000" in bad_limit.stderr


# --------------------------------------------------------------------------- dlq show


def test_dlq_show(dlq_dir: tuple[Path, list[str]]) -> None:
    directory, ids = dlq_dir
    result = conveyor(directory, "dlq", "show", "app:tasks_dlq", ids[1])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    fields = dict(line.split(":", 1) for line in lines[:7])
    assert {k: v.strip() for k, v in fields.items() if k != "dead-lettered"} == {
        "id": ids[1],
        "queue": "app:tasks_dlq",
        "state": "ready",
        "original queue": "app:tasks",
        "attempts": "2",
        "reason": "RuntimeError: task 2 failed",
    }
    assert lines[7:] == ["headers: -", "body:", "  {", '    "n": 2,', '    "fail": true', "  }"]
    as_json = json.loads(conveyor(directory, "dlq", "show", "app:tasks_dlq", ids[2], "--json").stdout)
    assert as_json["body"] == {"n": 3, "fail": True, "reason": LONG_REASON}
    assert as_json["dead_letter"]["original_queue"] == "app:tasks"
    assert as_json["attempts"] == 2
    missing = usage_error(conveyor(directory, "dlq", "show", "app:tasks_dlq", "nope-1"))
    assert missing == "conveyor: NOT_FOUND: message nope-1 is not in app:tasks_dlq"


# --------------------------------------------------------------------------- dlq replay


def test_dlq_replay_by_id_and_all(dlq_dir: tuple[Path, list[str]]) -> None:
    directory, ids = dlq_dir
    make_app(directory, worker=False)  # nothing consumes the replayed messages
    one = conveyor(directory, "dlq", "replay", "app:tasks_dlq", "--id", ids[1], "unknown-7")
    assert one.returncode == 0, one.stderr
    assert one.stdout == "replayed 1 message from app:tasks_dlq (each to its original queue)\n"
    assert one.stderr == (
        "conveyor: warning: 1 of the 2 IDs given was not replayed: not in the queue, or held by a "
        "consumer right now\n"
    )
    back = json.loads(conveyor(directory, "peek", "app:tasks", "--json").stdout)["messages"]
    assert [(m["id"], m["attempts"], m["headers"], m.get("dead_letter")) for m in back] == [
        (ids[1], 0, {}, None)  # attempts start over, the dead-letter headers are gone
    ]
    rest = conveyor(directory, "dlq", "replay", "app:tasks_dlq", "--all", "--to", "app:plain", "--json")
    assert rest.returncode == 0, rest.stderr
    assert json.loads(rest.stdout) == {
        "queue": "app:tasks_dlq",
        "to": "app:plain",
        "requested": None,
        "replayed": 1,
    }
    counts = json.loads(conveyor(directory, "dlq", "list", "--json").stdout)
    assert counts[0]["message_count"] == 0
    plain = json.loads(conveyor(directory, "peek", "app:plain", "--json").stdout)["messages"]
    assert [m["id"] for m in plain] == [ids[2]]


def test_dlq_replay_needs_a_selection(dlq_dir: tuple[Path, list[str]]) -> None:
    directory, _ = dlq_dir
    neither = conveyor(directory, "dlq", "replay", "app:tasks_dlq")
    assert neither.returncode == 2
    assert "one of the arguments --all --id is required" in neither.stderr
    both = conveyor(directory, "dlq", "replay", "app:tasks_dlq", "--all", "--id", "x")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    undeclared = usage_error(
        conveyor(directory, "dlq", "replay", "app:tasks_dlq", "--all", "--to", "app:nope")
    )
    assert undeclared == "conveyor: NOT_FOUND: queue app:nope is not declared"


def test_replaying_messages_that_name_no_queue(app_dir_plain: Path) -> None:
    """Messages that were never dead-lettered have no original queue: INVALID, and the
    count of what moved (none) in --json."""
    result = conveyor(app_dir_plain, "dlq", "replay", "app:plain", "--all", "--json")
    assert result.returncode == 2
    report = json.loads(result.stdout)
    assert report["replayed"] == 0 and report["error"]["kind"] == "INVALID"
    assert result.stderr.startswith("conveyor: INVALID: replayed 0 message(s) from app:plain; left there: 2 ")
    assert "replay them with --to QUEUE" in result.stderr


@pytest.fixture
def app_dir_plain(tmp_path: Path) -> Path:
    make_app(tmp_path, worker=False)
    published = conveyor(tmp_path, "publish", "app:plain", "--lines", "-", stdin="1\n2\n")
    assert published.returncode == 0, published.stderr
    return tmp_path


# --------------------------------------------------------------------------- dlq purge


def test_dlq_purge_refuses_without_a_terminal_or_yes(dlq_dir: tuple[Path, list[str]]) -> None:
    directory, ids = dlq_dir
    refused = usage_error(conveyor(directory, "dlq", "purge", "app:tasks_dlq", "--all"))
    assert refused == (
        "conveyor: error: refusing to purge app:tasks_dlq without confirmation: stdin is not a terminal; "
        "pass --yes"
    )
    one = conveyor(directory, "dlq", "purge", "app:tasks_dlq", "--id", ids[2], "--yes")
    assert one.returncode == 0, one.stderr
    assert one.stdout == "purged 1 message from app:tasks_dlq\n"
    rest = conveyor(directory, "dlq", "purge", "app:tasks_dlq", "--all", "-y", "--json")
    assert json.loads(rest.stdout) == {"queue": "app:tasks_dlq", "purged": 1, "requested": None}
    again = conveyor(directory, "dlq", "purge", "app:tasks_dlq", "--all", "--yes")
    assert again.stdout == "purged 0 messages from app:tasks_dlq\n"


# --------------------------------------------------------------------------- peek


def test_peek_any_queue(tmp_path: Path) -> None:
    make_app(tmp_path, worker=False)
    for payload in ('{"to": "ann"}', '"text"'):
        assert conveyor(tmp_path, "publish", "app:emails", payload, "-H", "priority=high").returncode == 0
    result = conveyor(tmp_path, "peek", "app:emails")
    assert result.returncode == 0, result.stderr
    assert table(result.stdout)[0] == ["ID", "STATE", "ATTEMPTS", "HEADERS", "BODY"]
    rows = [line.split(maxsplit=4)[1:] for line in result.stdout.splitlines()[1:]]
    assert rows == [
        ["ready", "0", "priority=high", '{"to": "ann"}'],
        ["ready", "0", "priority=high", '"text"'],
    ]
    empty = json.loads(conveyor(tmp_path, "peek", "app:plain", "--json").stdout)
    assert empty == {"queue": "app:plain", "total": 0, "messages": []}
    undeclared = usage_error(conveyor(tmp_path, "peek", "app:nope"))
    assert undeclared == "conveyor: NOT_FOUND: queue app:nope is not declared"


def test_strict_security_denies_the_tooling(tmp_path: Path) -> None:
    """The CLI runs without a security context: a strict app denies it (exit 1)."""
    make_app(tmp_path, worker=False)
    config = tmp_path / "conveyor.yaml"
    config.write_text(config.read_text() + "security: {strict: true}\n")
    for args in (["peek", "app:tasks"], ["dlq", "replay", "app:tasks_dlq", "--all"]):
        result = conveyor(tmp_path, *args)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("conveyor: PERMISSION_DENIED: permission denied: no security context")


# --------------------------------------------------------------------------- memory


MEMORY_APP = DLQ_APP.replace(
    "{name: store, kind: queue.driver.sqlite, path: ./queues.db}", "{name: store, kind: queue.driver.memory}"
)


def test_memory_app_shapes_and_exit_codes(tmp_path: Path) -> None:
    """A memory app keeps nothing between processes: every queue is empty here."""
    write_app(tmp_path, MEMORY_APP.replace("WORKER", "false"))
    (tmp_path / "dlqmod.py").write_text(HANDLERS)
    listing = conveyor(tmp_path, "dlq", "list")
    assert table(listing.stdout)[1:] == [
        ["app:tasks_dlq", "0", "app:tasks"],
        ["app:emails_dlq", "0", "app:emails"],
    ]
    one = conveyor(tmp_path, "dlq", "list", "app:tasks_dlq")
    assert one.returncode == 0 and table(one.stdout) == [
        ["ID", "DEAD_LETTERED", "FROM", "ATTEMPTS", "REASON"]
    ]
    peek = json.loads(conveyor(tmp_path, "peek", "app:tasks", "--json").stdout)
    assert peek == {"queue": "app:tasks", "total": 0, "messages": []}
    replay = conveyor(tmp_path, "dlq", "replay", "app:tasks_dlq", "--all", "--json")
    assert json.loads(replay.stdout)["replayed"] == 0
    purge = conveyor(tmp_path, "dlq", "purge", "app:tasks_dlq", "--all", "--yes", "--json")
    assert json.loads(purge.stdout)["purged"] == 0
    show = usage_error(conveyor(tmp_path, "dlq", "show", "app:tasks_dlq", "x-1"))
    assert show == "conveyor: NOT_FOUND: message x-1 is not in app:tasks_dlq"
    no_dlq = MEMORY_APP.split("  - name: tasks\n")[0] + "  - {name: q, kind: queue.queue, driver: store}\n"
    write_app(tmp_path / "none", no_dlq)
    empty = conveyor(tmp_path / "none", "dlq", "list")
    assert empty.stdout == "no dead-letter queues: no queue of this app names a dead_letter queue\n"
    assert json.loads(conveyor(tmp_path / "none", "dlq", "list", "--json").stdout) == []


# --------------------------------------------------------------------------- pipes


def pipeline(cwd: Path, command: str) -> tuple[list[int], str, str]:
    """``command | head -n 1`` in bash; the exit codes of both sides, stdout, stderr."""
    script = f'{command} | head -n 1; echo "${{PIPESTATUS[@]}}" >&2'
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=cwd,
        env=_env(None),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    *errors, codes = result.stderr.splitlines()
    return [int(c) for c in codes.split()], result.stdout, "\n".join(errors)


def test_json_piped_into_head_ends_quietly(tmp_path: Path) -> None:
    """No BrokenPipeError when the reader goes away: exit 141 (128 + SIGPIPE), nothing on stderr."""
    make_app(tmp_path, worker=False)
    lines = "".join(json.dumps({"n": n, "pad": "y" * 200}) + "\n" for n in range(2000))  # > a pipe's 64 KiB
    assert conveyor(tmp_path, "publish", "app:plain", "--lines", "-", stdin=lines).returncode == 0
    command = f"{sys.executable} -m conveyor peek app:plain --limit 2000 --json"
    codes, stdout, stderr = pipeline(tmp_path, command)
    assert stdout == "{\n"
    assert codes == [141, 0], stderr
    assert stderr == ""
    (tmp_path / "mymod.py").write_text(MODULE + "\n\ndef big():\n    return list(range(100000))\n")
    write_app_text = (tmp_path / "conveyor.yaml").read_text()
    big = '  - {name: big, kind: function.python, source: "mymod:big"}\n'
    (tmp_path / "conveyor.yaml").write_text(write_app_text + big)
    codes, stdout, stderr = pipeline(tmp_path, f"{sys.executable} -m conveyor call app:big")
    assert (codes, stdout, stderr) == ([141, 0], "[\n", "")


# --------------------------------------------------------------------------- RabbitMQ


@pytest.mark.broker
def test_dlq_commands_on_rabbitmq(tmp_path: Path) -> None:
    require_service("RabbitMQ", 5672)
    harness = Harness(tmp_path, "amqp")
    dlq = harness.queue("tasks_dlq")
    tasks = harness.queue("tasks", dead_letter={"queue": dlq, "max_attempts": 2})
    plain = harness.queue("plain")
    harness.add(name="worker", kind="queue.consumer", queue=tasks, handler="dlqmod:handle")
    (tmp_path / "dlqmod.py").write_text(HANDLERS)
    path = harness.write()

    def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return conveyor(tmp_path, *args, "-c", str(path), stdin=stdin)

    published = cli(
        "publish", tasks, "--lines", "-", stdin='{"n": 1}\n{"n": 2, "fail": true}\n{"n": 3, "fail": true}\n'
    )
    assert published.returncode == 0, published.stderr
    ids = published.stdout.split()
    run = cli("run", "--until-idle", "--idle-settle", "0.5", "--timeout", "30")
    assert run.returncode == 0, run.stderr
    listing = json.loads(cli("dlq", "list", "--json").stdout)
    assert listing == [{"queue": dlq, "driver": harness.qid("drv"), "sources": [tasks], "message_count": 2}]
    page = json.loads(cli("dlq", "list", dlq, "--json").stdout)
    assert [m["id"] for m in page["messages"]] == ids[1:]
    assert {m["dead_letter"]["original_queue"] for m in page["messages"]} == {tasks}
    show = json.loads(cli("dlq", "show", dlq, ids[2], "--json").stdout)
    assert show["body"] == {"n": 3, "fail": True}
    assert show["dead_letter"]["reason"] == "RuntimeError: task 3 failed"
    replay = cli("dlq", "replay", dlq, "--id", ids[1], "--to", plain, "--json")
    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout)["replayed"] == 1
    peek = json.loads(cli("peek", plain, "--json").stdout)
    assert [(m["id"], m["body"]) for m in peek["messages"]] == [(ids[1], {"n": 2, "fail": True})]
    refused = cli("dlq", "purge", dlq, "--all")
    assert refused.returncode == 2
    purge = cli("dlq", "purge", dlq, "--all", "--yes", "--json")
    assert purge.returncode == 0, purge.stderr
    assert json.loads(purge.stdout)["purged"] == 1
    assert json.loads(cli("dlq", "list", "--json").stdout)[0]["message_count"] == 0
