"""The command line in a shell: -c on every command, .yml files, a terminal (progress
bars, the purge question), and shell completion (argcomplete)."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import conveyor as conveyor_package
from conveyor import errors
from tests.test_cli import BASIC_APP, TIMEOUT, _env, write_app
from tests.test_cli_dlq import dead_letters, make_app
from tests.test_cli_publish import conveyor, usage_error

# --------------------------------------------------------------------------- -c and .yml


def test_config_option_on_every_command(tmp_path: Path) -> None:
    path = write_app(tmp_path / "elsewhere", BASIC_APP, name="app.yaml")
    for args in (
        ["check", "-c", str(path)],
        ["-c", str(path), "check"],  # before the command, too
        ["info", "--config", str(path)],
        ["peek", "app:tasks", "-c", str(path)],
        ["dlq", "list", "-c", str(path)],
        ["dlq", "-c", str(path), "list"],
        ["publish", "app:tasks", "1", "-c", str(path)],
        ["call", "app:add", "1", "2", "-c", str(path)],
        ["run", "-c", str(path), "--until-idle", "--idle-settle", "0.1"],
        ["run", str(path), "--until-idle", "--idle-settle", "0.1"],  # run PATH still works
    ):
        result = conveyor(tmp_path, *args)
        assert result.returncode == 0, (args, result.stderr)


def test_path_and_config_must_agree(tmp_path: Path) -> None:
    path = write_app(tmp_path, BASIC_APP)
    same = conveyor(tmp_path, "check", str(path), "-c", str(path))
    assert same.returncode == 0, same.stderr
    line = usage_error(conveyor(tmp_path, "check", str(path), "-c", "other.yaml"))
    assert line == f"conveyor: error: two configurations given: PATH '{path}' and -c 'other.yaml'; give one"


def test_yml_files_load_like_yaml(tmp_path: Path) -> None:
    directory = tmp_path / "config"
    write_app(directory, BASIC_APP, name="app.yml")
    app = conveyor_package.load(directory)  # a directory: *.yml as well as *.yaml
    assert list(app.registry.queues) == ["app:tasks", "app:tasks_dlq"]
    listed = conveyor(tmp_path, "info", "-c", str(directory), "--json")
    assert listed.returncode == 0, listed.stderr
    assert [row["queue"] for row in json.loads(listed.stdout)] == ["app:tasks", "app:tasks_dlq"]
    write_app(tmp_path / "default", BASIC_APP, name="conveyor.yml")  # the default name, .yml spelling
    default = conveyor(tmp_path / "default", "check")
    assert default.returncode == 0, default.stderr
    assert default.stdout.startswith("ok: conveyor.yml — 1 driver, 2 queues")
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.Error) as caught:
        conveyor_package.load(tmp_path / "empty")
    assert caught.value.details["problems"][0]["message"] == "no *.yaml or *.yml files in this directory"


# --------------------------------------------------------------------------- a terminal


def on_terminal(cwd: Path, *args: str, answer: str | None = None) -> tuple[int, str, str]:
    """Run ``python -m conveyor ARGS`` with stdin and stderr on a pseudo-terminal (stdout
    a pipe); type ``answer``. Returns the exit code, stdout, and what the terminal showed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor", *args],
        cwd=cwd,
        env=_env({"TERM": "xterm", "COLUMNS": "120"}),
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    if answer is not None:
        os.write(master, answer.encode())
    shown = bytearray()
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the terminal's other side is closed
                    break
                if not data:
                    break
                shown += data
            elif proc.poll() is not None:
                break
        assert proc.stdout is not None
        with proc.stdout:
            stdout = proc.stdout.read().decode()
        code = proc.wait(timeout=TIMEOUT)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, stdout, shown.decode(errors="replace")


def test_purge_asks_on_a_terminal(tmp_path: Path) -> None:
    make_app(tmp_path)
    dead_letters(tmp_path, [{"n": 1, "fail": True}, {"n": 2, "fail": True}])
    code, stdout, shown = on_terminal(tmp_path, "dlq", "purge", "app:tasks_dlq", "--all", answer="n\n")
    assert "Purge all 2 waiting messages of app:tasks_dlq? This cannot be undone. [y/N]" in shown
    assert (code, stdout) == (1, "")
    assert "conveyor: nothing purged" in shown
    code, stdout, shown = on_terminal(tmp_path, "dlq", "purge", "app:tasks_dlq", "--all", answer="y\n")
    assert (code, stdout) == (0, "purged 2 messages from app:tasks_dlq\n"), shown


def test_progress_bars_on_a_terminal(tmp_path: Path) -> None:
    make_app(tmp_path, worker=False)
    (tmp_path / "jobs.ndjson").write_text("".join(json.dumps({"n": n}) + "\n" for n in range(1, 1001)))
    code, stdout, shown = on_terminal(tmp_path, "publish", "app:tasks", "--lines", "@jobs.ndjson", "--json")
    assert code == 0, shown
    assert json.loads(stdout)["count"] == 1000
    assert "publishing to app:tasks" in shown and "1000/1000" in shown
    code, stdout, shown = on_terminal(tmp_path, "dlq", "replay", "app:tasks", "--all", "--to", "app:plain")
    assert code == 0, shown
    assert stdout == "replayed 1000 messages from app:tasks to app:plain\n"
    assert "replaying app:tasks" in shown and "1000/1000" in shown


# --------------------------------------------------------------------------- completion


def completions(cwd: Path, line: str) -> list[str]:
    """What the shell would offer for ``line`` (the cursor at its end), as argcomplete answers."""
    answer = cwd / "completions.txt"
    env = {
        "_ARGCOMPLETE": "1",
        "_ARGCOMPLETE_IFS": "\n",
        "_ARGCOMPLETE_STDOUT_FILENAME": str(answer),
        "COMP_LINE": line,
        "COMP_POINT": str(len(line)),
    }
    result = subprocess.run(
        [sys.executable, "-m", "conveyor"],
        cwd=cwd,
        env=_env(env),
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    text = answer.read_text()
    return sorted(text.split("\n")) if text else []


def test_shell_completion(tmp_path: Path) -> None:
    make_app(tmp_path)
    assert completions(tmp_path, "conveyor d") == ["dlq "]
    offered = completions(tmp_path, "conveyor dlq ")
    assert {"list", "show", "replay", "purge", "-c", "--config", "--help"} <= set(offered)
    assert completions(tmp_path, "conveyor dlq re") == ["replay "]
    # the app's own IDs, read from the configuration (./conveyor.yaml here, or -c PATH)
    assert completions(tmp_path, "conveyor dlq list app:") == ["app:emails_dlq", "app:tasks_dlq"]
    assert completions(tmp_path, "conveyor peek app:e") == ["app:emails", "app:emails_dlq"]
    assert completions(tmp_path, "conveyor call app:") == ["app:handle "]
    other = write_app(tmp_path / "other", BASIC_APP, name="app.yaml")
    assert completions(tmp_path, f"conveyor info -c {other} app:t") == ["app:tasks", "app:tasks_dlq"]
    assert completions(tmp_path / "other", "conveyor info app:") == []  # no ./conveyor.yaml there
