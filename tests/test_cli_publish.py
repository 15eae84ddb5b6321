"""``conveyor publish``: JSON payloads (strict), ``--text``, stdin, ``@FILE``, ``--lines``.

Run as a real subprocess (``python -m conveyor``) against a SQLite app, so that what
one command stored can be read back by the next (``peek --json``, ``info --json``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_cli import TIMEOUT, _env, write_app

SQLITE_APP = """\
version: "1.0"
namespace: app
entries:
  - {name: store, kind: queue.driver.sqlite, path: ./queues.db}
  - name: tasks
    kind: queue.queue
    driver: store
    dead_letter: {queue: app:tasks_dlq, max_attempts: 2}
  - {name: tasks_dlq, kind: queue.queue, driver: store}
"""

MESSAGE_ID = re.compile(r"[0-9a-f]{16}-\d+")


def conveyor(
    cwd: Path, *args: str, stdin: str | bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m conveyor ARGS`` in ``cwd``, with ``stdin`` as its standard input."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    result = subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        cwd=cwd,
        env=_env(env),
        input=data if data is not None else b"",
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    write_app(tmp_path, SQLITE_APP)
    return tmp_path


def bodies(cwd: Path, queue: str = "app:tasks") -> list[Any]:
    """The bodies waiting in ``queue``, in order (read with ``conveyor peek --json``)."""
    result = conveyor(cwd, "peek", queue, "--limit", "10000", "--json")
    assert result.returncode == 0, result.stderr
    return [m["body"] for m in json.loads(result.stdout)["messages"]]


def count(cwd: Path, queue: str = "app:tasks") -> int:
    result = conveyor(cwd, "info", queue, "--json")
    assert result.returncode == 0, result.stderr
    value = json.loads(result.stdout)["message_count"]
    assert isinstance(value, int)
    return value


def json_problem(text: str) -> json.JSONDecodeError:
    """What this Python's json module says about ``text`` (3.13 words some problems differently)."""
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return exc
    raise AssertionError(f"{text!r} is valid JSON")


def usage_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line of a usage error (exit 2, no traceback)."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# --------------------------------------------------------------------------- one message


def test_publish_prints_the_id_of_what_it_stored(app_dir: Path) -> None:
    result = conveyor(app_dir, "publish", "app:tasks", '{"id": 1, "tags": ["a", "b"]}')
    assert result.returncode == 0, result.stderr
    message_id = result.stdout.strip()
    assert MESSAGE_ID.fullmatch(message_id)
    peek = json.loads(conveyor(app_dir, "peek", "app:tasks", "--json").stdout)
    assert [(m["id"], m["body"]) for m in peek["messages"]] == [(message_id, {"id": 1, "tags": ["a", "b"]})]


def test_invalid_json_is_refused_and_nothing_is_sent(app_dir: Path) -> None:
    """The issue's example: a trailing comma used to be sent as a string."""
    line = usage_error(conveyor(app_dir, "publish", "app:tasks", '{"id": 1,}'))
    problem = json_problem('{"id": 1,}')  # 3.11: "Expecting property name enclosed in double quotes"
    assert line == (
        f"conveyor: error: PAYLOAD is not valid JSON: {problem.msg} at line 1, column {problem.colno} "
        "(--text sends it as a string)"
    )
    word = usage_error(conveyor(app_dir, "publish", "app:tasks", "hello"))
    assert word.startswith("conveyor: error: PAYLOAD is not valid JSON: Expecting value at line 1, column 1")
    assert count(app_dir) == 0


@pytest.mark.parametrize(("payload", "problem"), [("NaN", "NaN is not JSON"), ("[1e999]", "too large")])
def test_non_standard_numbers_are_refused(app_dir: Path, payload: str, problem: str) -> None:
    line = usage_error(conveyor(app_dir, "publish", "app:tasks", payload))
    assert line.startswith("conveyor: error: PAYLOAD is not valid JSON") and problem in line
    assert count(app_dir) == 0


def test_text_sends_the_argument_as_a_string(app_dir: Path) -> None:
    for text in ("hello", '{"id": 1,}', "42"):
        result = conveyor(app_dir, "publish", "app:tasks", text, "--text")
        assert result.returncode == 0, result.stderr
    old_spelling = conveyor(app_dir, "publish", "app:tasks", "x", "--string")
    assert old_spelling.returncode == 0, old_spelling.stderr
    assert bodies(app_dir) == ["hello", '{"id": 1,}', "42", "x"]


def test_empty_data_is_invalid(app_dir: Path) -> None:
    line = usage_error(conveyor(app_dir, "publish", "app:tasks", "{}"))
    assert line == "conveyor: INVALID: message data is empty ({})"


def test_stdin_holds_one_json_document(app_dir: Path) -> None:
    document = '{\n  "order": 7,\n  "items": [1, 2]\n}\n'
    result = conveyor(app_dir, "publish", "app:tasks", "-", "--json", stdin=document)
    assert result.returncode == 0, result.stderr
    sent = json.loads(result.stdout)
    assert sent == {"id": sent["id"], "queue": "app:tasks", "headers": {}}
    text = conveyor(app_dir, "publish", "app:tasks", "-", "--text", stdin="two words\n")
    assert text.returncode == 0, text.stderr
    assert bodies(app_dir) == [{"order": 7, "items": [1, 2]}, "two words"]  # one trailing newline dropped
    bad = usage_error(conveyor(app_dir, "publish", "app:tasks", "-", stdin='{\n  "order": 7\n  "x": 1}'))
    assert bad == "conveyor: error: stdin is not valid JSON: Expecting ',' delimiter at line 3, column 3"
    empty = usage_error(conveyor(app_dir, "publish", "app:tasks", "-", stdin=""))
    assert empty == "conveyor: error: stdin is empty: nothing to publish"
    two = usage_error(conveyor(app_dir, "publish", "app:tasks", "-", stdin="1\n2\n"))
    assert "Extra data at line 2, column 1" in two
    assert count(app_dir) == 2


def test_at_file_reads_a_file(app_dir: Path) -> None:
    (app_dir / "order.json").write_text('{"order": 8}')
    result = conveyor(app_dir, "publish", "app:tasks", "@order.json")
    assert result.returncode == 0, result.stderr
    (app_dir / "broken.json").write_text('{"order": 8,\n "x": }\n')
    broken = usage_error(conveyor(app_dir, "publish", "app:tasks", "@broken.json"))
    assert (
        broken == "conveyor: error: file broken.json is not valid JSON: Expecting value at line 2, column 7"
    )
    missing = usage_error(conveyor(app_dir, "publish", "app:tasks", "@nowhere.json"))
    assert missing == "conveyor: error: cannot read file nowhere.json: No such file or directory"
    (app_dir / "latin1.json").write_bytes(b'"caf\xe9"')
    latin1 = usage_error(conveyor(app_dir, "publish", "app:tasks", "@latin1.json"))
    assert latin1 == "conveyor: error: file latin1.json is not UTF-8 text (byte 5)"
    assert bodies(app_dir) == [{"order": 8}]


# --------------------------------------------------------------------------- --lines


def test_lines_from_stdin(app_dir: Path) -> None:
    ndjson = '{"n": 1}\n"two"\n\n   \n[3]\n'
    result = conveyor(app_dir, "publish", "app:tasks", "--lines", "-", stdin=ndjson)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar: stderr is not a terminal
    ids = result.stdout.splitlines()
    assert len(ids) == 3 and all(MESSAGE_ID.fullmatch(i) for i in ids)
    assert bodies(app_dir) == [{"n": 1}, "two", [3]]
    as_json = conveyor(app_dir, "publish", "app:tasks", "--lines", "-", "--json", stdin='{"n": 4}\n')
    report = json.loads(as_json.stdout)
    assert report == {"ids": report["ids"], "count": 1, "queue": "app:tasks", "complete": True}
    text = conveyor(app_dir, "publish", "app:tasks", "--lines", "-", "--text", stdin="a b\n{not json}\n")
    assert text.returncode == 0, text.stderr
    assert bodies(app_dir)[-3:] == [{"n": 4}, "a b", "{not json}"]


def test_lines_from_a_file_in_batches(app_dir: Path) -> None:
    lines = [json.dumps({"n": n}) for n in range(1, 1201)]  # three publish_many batches
    (app_dir / "orders.ndjson").write_text("\n".join(lines) + "\n")
    result = conveyor(app_dir, "publish", "app:tasks", "--lines", "@orders.ndjson", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["count"] == 1200 and len(set(report["ids"])) == 1200 and report["complete"] is True
    assert bodies(app_dir) == [{"n": n} for n in range(1, 1201)]


def test_a_bad_line_stops_after_publishing_every_line_before_it(app_dir: Path) -> None:
    lines = [json.dumps({"n": n}) for n in range(1, 703)]
    lines[701] = '{"n": 702,}'  # line 702: in the second batch
    result = conveyor(app_dir, "publish", "app:tasks", "--lines", "-", stdin="\n".join(lines))
    line = usage_error(result)
    problem = json_problem('{"n": 702,}')
    assert line == (
        f"conveyor: error: line 702 of stdin is not valid JSON: {problem.msg} at column {problem.colno}; "
        "the 701 messages up to line 701 were published, nothing from line 702 on"
    )
    assert len(result.stdout.splitlines()) == 701  # their IDs
    assert bodies(app_dir) == [{"n": n} for n in range(1, 702)]


def test_a_bad_first_line_sends_nothing(app_dir: Path) -> None:
    result = conveyor(app_dir, "publish", "app:tasks", "--lines", "-", "--json", stdin='nope\n{"n": 2}\n')
    line = usage_error(result)
    assert line.endswith("; nothing was published")
    assert json.loads(result.stdout) == {"ids": [], "count": 0, "queue": "app:tasks", "complete": False}
    assert count(app_dir) == 0


def test_a_line_the_runtime_refuses_names_its_line(app_dir: Path) -> None:
    """The runtime refuses an empty message ({}): the lines before it in its batch still go."""
    result = conveyor(
        app_dir, "publish", "app:tasks", "--lines", "-", stdin='{"n": 1}\n\n{"n": 2}\n{}\n{"n": 4}'
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "conveyor: INVALID: line 4 of stdin: message data is empty ({}); the 2 messages up to line 3 were "
        "published, nothing from line 4 on"
    )
    assert bodies(app_dir) == [{"n": 1}, {"n": 2}]


def test_lines_needs_stdin_or_a_file(app_dir: Path) -> None:
    line = usage_error(conveyor(app_dir, "publish", "app:tasks", '{"n": 1}', "--lines"))
    assert line == "conveyor: error: --lines reads stdin (-) or a file (@FILE), not a PAYLOAD argument"


def test_headers_go_with_every_line(app_dir: Path) -> None:
    result = conveyor(app_dir, "publish", "app:tasks", "--lines", "-", "-H", "priority=high", stdin="1\n2\n")
    assert result.returncode == 0, result.stderr
    peek = json.loads(conveyor(app_dir, "peek", "app:tasks", "--json").stdout)
    assert [m["headers"] for m in peek["messages"]] == [{"priority": "high"}] * 2


def test_progress_never_imports_rich_off_a_terminal(app_dir: Path) -> None:
    """rich is imported only to draw a bar, and a bar only on a terminal."""
    (app_dir / "two.ndjson").write_text("1\n2\n")
    script = (
        "import sys\n"
        "from conveyor.cli import main\n"
        "code = main(['publish', 'app:tasks', '--lines', '@two.ndjson'])\n"
        "print(code, 'rich' in sys.modules, 'argcomplete' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=app_dir,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "0 False False"
