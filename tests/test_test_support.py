"""The suite's own rules for missing servers: skip with a visible reason locally, fail
under CONVEYOR_REQUIRE_BROKERS=1 (what .ci/run sets)."""

from __future__ import annotations

import pytest

import tests.conftest as suite


def test_no_private_rabbitmq_node_skips_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``rabbitmq-server`` the tests that start a private node skip, naming why
    (regression: they failed even when brokers were not required)."""
    monkeypatch.setattr(suite, "rabbit_available", lambda: "rabbitmq-server is not installed")
    monkeypatch.setattr(suite, "REQUIRE_BROKERS", False)
    with pytest.raises(pytest.skip.Exception, match="rabbitmq-server is not installed"):
        suite.require_private_rabbit()


def test_no_private_rabbitmq_node_fails_when_brokers_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(suite, "rabbit_available", lambda: "rabbitmq-server is not installed")
    monkeypatch.setattr(suite, "REQUIRE_BROKERS", True)
    with pytest.raises(pytest.fail.Exception, match="CONVEYOR_REQUIRE_BROKERS=1"):
        suite.require_private_rabbit()


def test_a_private_rabbitmq_node_that_can_start_is_neither_skipped_nor_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(suite, "rabbit_available", lambda: None)
    monkeypatch.setattr(suite, "REQUIRE_BROKERS", True)
    suite.require_private_rabbit()
