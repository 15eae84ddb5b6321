"""The README's main job: the quick start, run through the real CLI on a copy of it."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOOD = {
    "ada@example.com",
    "grace@example.com",
    "linus@example.com",
    "margaret@example.com",
    "barbara@example.com",
    "edsger@example.com",
    "donald@example.com",
    "frances@example.com",
    "ken@example.com",
}
SENT = re.compile(r"sent welcome email to (\S+)")


@pytest.fixture
def quickstart(tmp_path: Path) -> Path:
    target = tmp_path / "quickstart"
    shutil.copytree(
        ROOT / "examples" / "quickstart", target, ignore=shutil.ignore_patterns("data", "__pycache__")
    )
    return target


def conveyor(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_quickstart_runs_until_idle_and_dead_letters_the_bounce(quickstart: Path) -> None:
    result = conveyor("run", str(quickstart), "--until-idle", "--timeout", "30", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    worker = summary["consumers"]["app:email_worker"]
    assert (worker["acked"], worker["dead_lettered"], worker["failed"]) == (9, 1, 3)
    assert summary["queues"]["app:emails"]["message_count"] == 0
    assert summary["queues"]["app:emails_dlq"]["message_count"] == 1
    assert set(SENT.findall(result.stderr)) == GOOD
    assert (quickstart / "data" / "quickstart.db").exists()


@pytest.mark.timeout(90)
def test_quickstart_killed_with_sigkill_and_restarted_loses_nothing(quickstart: Path) -> None:
    first = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "run", str(quickstart)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert first.stderr is not None
    sent_before: list[str] = []
    deadline = time.monotonic() + 30
    for line in first.stderr:  # kill it after a couple of emails went out
        sent_before += SENT.findall(line)
        if len(sent_before) >= 2 or time.monotonic() > deadline:
            break
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    first.stderr.close()
    assert first.stdout is not None
    first.stdout.close()
    assert len(sent_before) >= 2

    second = conveyor("run", str(quickstart), "--until-idle", "--timeout", "30", "--json")
    assert second.returncode == 0, second.stderr
    assert "not enqueuing a new batch" in second.stderr
    summary = json.loads(second.stdout)
    sent_after = set(SENT.findall(second.stderr))
    assert set(sent_before) | sent_after == GOOD, "an email was lost across the kill"
    assert summary["queues"]["app:emails"]["message_count"] == 0
    assert summary["queues"]["app:emails_dlq"]["message_count"] == 1
