from __future__ import annotations

import os
import socket

import pytest

from tests.support.rabbit_node import rabbit_available

REQUIRE_BROKERS = os.environ.get("CONVEYOR_REQUIRE_BROKERS") == "1"


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def require_private_rabbit() -> None:
    """Skip (locally) or fail (CONVEYOR_REQUIRE_BROKERS=1) when no private RabbitMQ node
    can be started here (``rabbitmq-server`` is not installed)."""
    why = rabbit_available()
    if why is None:
        return
    reason = f"cannot start a private RabbitMQ node: {why}"
    if REQUIRE_BROKERS:
        pytest.fail(reason + " and CONVEYOR_REQUIRE_BROKERS=1", pytrace=False)
    pytest.skip(reason)


def require_service(name: str, port: int) -> None:
    """Skip (locally) or fail (CONVEYOR_REQUIRE_BROKERS=1) when a service is missing."""
    if _reachable(port):
        return
    reason = f"{name} is not reachable on 127.0.0.1:{port}"
    if REQUIRE_BROKERS:
        pytest.fail(reason + " and CONVEYOR_REQUIRE_BROKERS=1", pytrace=False)
    pytest.skip(reason)
