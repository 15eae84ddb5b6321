"""The driver conformance suite runs every test once per driver listed here.

A new driver opts in with its row in ``tests/support/profiles.py`` (how tests configure
it, the server it needs). Documented differences are read from the driver's
``capabilities`` record, never from its name.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_service
from tests.support.drivers import DriverKit
from tests.support.harness import Harness
from tests.support.profiles import PROFILES

DRIVERS = list(PROFILES)


@pytest.fixture(params=DRIVERS)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    kind = request.param
    service = PROFILES[kind].service
    if service is not None:
        require_service(*service)
    return Harness(tmp_path, kind)


@pytest.fixture(params=DRIVERS)
def kit(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DriverKit]:
    """Driver-level tests (test_driver_contract.py): builds drivers and queues of one kind."""
    kind = request.param
    service = PROFILES[kind].service
    if service is not None:
        require_service(*service)
    drivers = DriverKit(kind, tmp_path)
    try:
        yield drivers
    finally:
        drivers.cleanup()
