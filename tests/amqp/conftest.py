"""Fixtures for the AMQP driver tests: harnesses on the shared broker, a private node, a proxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.amqp.helpers import start_node
from tests.conftest import require_service
from tests.support.harness import Harness
from tests.support.rabbit_node import RabbitNode


@pytest.fixture
def amqp(tmp_path: Path) -> Harness:
    """A harness on the shared broker (127.0.0.1:5672); its queues are deleted afterwards."""
    require_service("RabbitMQ", 5672)
    return Harness(tmp_path, "amqp")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A RabbitMQ node owned by this test module: the tests may stop, kill and restart it."""
    yield from start_node(tmp_path_factory)
