"""The driver conformance suite runs every test once per driver listed here.

A new driver opts in by adding its short kind to DRIVERS (and, for a driver that needs
a service, a line to SERVICES). Documented differences are read from the driver's
``capabilities`` record, never from its name.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import require_service
from tests.support.harness import Harness

DRIVERS = ["memory", "sqlite", "amqp"]
SERVICES = {"amqp": ("RabbitMQ", 5672)}


@pytest.fixture(params=DRIVERS)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    kind = request.param
    if kind in SERVICES:
        require_service(*SERVICES[kind])
    return Harness(tmp_path, kind)
