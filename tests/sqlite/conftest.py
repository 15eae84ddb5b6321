from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.sqlite.helpers import kill


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[Any]]]:
    """Child processes of the test: killed (and reaped) at the end whatever happened."""
    started: list[subprocess.Popen[Any]] = []
    yield started
    for proc in started:
        kill(proc)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
