from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from conveyor.drivers import kinds
from tests.support.rabbit_node import rabbit_available
from tests.support.stub_drivers import FlakyStartDriver

REQUIRE_BROKERS = os.environ.get("CONVEYOR_REQUIRE_BROKERS") == "1"


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def unavailable(reason: str) -> None:
    """Skip (locally) or fail (CONVEYOR_REQUIRE_BROKERS=1): what a test needs is missing."""
    if REQUIRE_BROKERS:
        pytest.fail(reason + " and CONVEYOR_REQUIRE_BROKERS=1", pytrace=False)
    pytest.skip(reason)


def require_private_rabbit() -> None:
    """Skip or fail (see ``unavailable``) when no private RabbitMQ node can be started
    here (``rabbitmq-server`` is not installed)."""
    why = rabbit_available()
    if why is not None:
        unavailable(f"cannot start a private RabbitMQ node: {why}")


def require_service(name: str, port: int) -> None:
    """Skip or fail (see ``unavailable``) when a service is not reachable on loopback."""
    if not _reachable(port):
        unavailable(f"{name} is not reachable on 127.0.0.1:{port}")


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FlakyStartDriver]]:
    """The memory driver kind, replaced by one whose open/subscribe fail on demand."""
    row = kinds.DriverKind(
        "queue.driver.memory",
        "conveyor.drivers.options.memory",
        "tests.support.stub_drivers:FlakyStartDriver",
    )
    monkeypatch.setattr(kinds, "KINDS", (row, *kinds.KINDS[1:]))
    FlakyStartDriver.reset()
    yield FlakyStartDriver
    FlakyStartDriver.reset()
