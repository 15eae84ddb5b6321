"""Fixtures for the chaos tests: a RabbitMQ node of their own (never the shared broker)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import require_private_rabbit
from tests.support.rabbit_node import RabbitNode


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A private RabbitMQ node for this module; only chaos clients connect to it."""
    require_private_rabbit()
    node = RabbitNode(tmp_path_factory.mktemp("rabbit"), name="conveyor-chaos")
    node.start()
    try:
        yield node
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):  # a slow rabbitmqctl on a busy machine
            node.stop(timeout=60)
        node.kill()
