"""Neutral headers <-> AMQP properties and table: types survive, bookkeeping stays private."""

from __future__ import annotations

from typing import Any

import pytest
from pamqp import decode, encode
from pamqp.commands import Basic

from conveyor import errors
from conveyor.drivers.amqp._headers import (
    ATTEMPTS_KEY,
    attempts_of,
    decode_headers,
    encode_headers,
    republished,
)


def _roundtrip(props: Basic.Properties) -> Basic.Properties:
    from pamqp.header import ContentHeader

    header = ContentHeader(body_size=1, properties=props)
    data = header.marshal()
    back = ContentHeader()
    back.unmarshal(data)
    return back.properties


SENT: dict[str, Any] = {
    "s": "text",
    "empty": "",
    "i": 42,
    "neg": -7,
    "big": 2**53,
    "huge": 2**70,
    "f": 0.1,
    "whole_float": 2.0,
    "inf": float("inf"),
    "b_true": True,
    "b_false": False,
    "priority": "high",
    "correlation_id": "req-1",
    "reply_to": "app:replies",
    "content_type": "application/json",
    "message_type": "order.created",
    "expiration": 60000,
    "unicode": "héllo ✓",
    "x-foreign": "an x- key that is not bookkeeping",
}


def test_every_type_round_trips_exactly() -> None:
    enc = encode_headers(SENT, "id-1")
    got = decode_headers(_roundtrip(enc.properties))
    assert got == SENT
    for key, value in SENT.items():
        assert type(got[key]) is type(value), key


def test_neutral_keys_become_amqp_properties() -> None:
    props = encode_headers(SENT, "id-1").properties
    assert props.priority == 9
    assert props.correlation_id == "req-1"
    assert props.reply_to == "app:replies"
    assert props.content_type == "application/json"
    assert props.message_type == "order.created"
    assert props.expiration == "60000"
    assert props.delivery_mode == 2
    assert props.message_id == "id-1"
    for key in ("priority", "correlation_id", "reply_to", "content_type", "message_type", "expiration"):
        assert key not in props.headers


@pytest.mark.parametrize(("value", "expected"), [("low", 1), ("normal", 5), ("high", 9), (0, 0), (255, 255)])
def test_priority_names_and_numbers(value: Any, expected: int) -> None:
    props = _roundtrip(encode_headers({"priority": value}, "m").properties)
    assert props.priority == expected
    assert decode_headers(props)["priority"] == value


@pytest.mark.parametrize("value", [5, 1.5, True])
def test_non_string_property_values_keep_their_type(value: Any) -> None:
    got = decode_headers(_roundtrip(encode_headers({"correlation_id": value}, "m").properties))
    assert got["correlation_id"] == value
    assert type(got["correlation_id"]) is type(value)


def test_amqp_keys_are_consumed_not_delivered() -> None:
    enc = encode_headers({"amqp.mandatory": False, "amqp.expiration": "500", "amqp.app_id": "svc"}, "m")
    assert enc.mandatory is False
    assert enc.properties.expiration == "500"
    assert enc.properties.app_id == "svc"
    got = decode_headers(_roundtrip(enc.properties))
    assert not any(key.startswith("amqp.") for key in got)


def test_mandatory_is_the_default() -> None:
    assert encode_headers({}, "m").mandatory is True


@pytest.mark.parametrize(
    "headers",
    [
        {"amqp.nope": 1},
        {"amqp.mandatory": "yes"},
        {"x-conveyor-attempts": 3},
        {"x-death": "forged"},
        {"x-first-death-queue": "q"},
        {"expiration": -1},
        {"expiration": "1.5s"},
        {"correlation_id": "x" * 256},
        {"k" * 129: 1},
    ],
)
def test_what_amqp_cannot_carry_is_invalid(headers: dict[str, Any]) -> None:
    with pytest.raises(errors.Error) as info:
        encode_headers(headers, "m")
    assert info.value.kind == errors.INVALID


def test_foreign_messages_decode_to_neutral_types() -> None:
    import datetime as dt
    import decimal

    props = Basic.Properties(
        headers={
            "d": decimal.Decimal("1.25"),
            "t": dt.datetime(2026, 1, 2, tzinfo=dt.UTC),
            "bin": bytearray(b"ab"),
            "n": None,
        },
        priority=3,
        correlation_id="c",
    )
    got = decode_headers(_roundtrip(props))
    assert got["d"] == 1.25
    assert got["t"].startswith("2026-01-02")
    assert got["bin"] == "ab"
    assert "n" not in got
    assert got["priority"] == 3 and got["correlation_id"] == "c"


def test_broker_and_driver_bookkeeping_is_never_delivered() -> None:
    props = Basic.Properties(
        headers={
            ATTEMPTS_KEY: 2,
            "x-delivery-count": 1,
            "x-death": [{"count": 1}],
            "x-first-death-queue": "q",
            "x-last-death-reason": "expired",
            "user": "kept",
        }
    )
    assert decode_headers(_roundtrip(props)) == {"user": "kept"}


@pytest.mark.parametrize(
    ("table", "redelivered", "attempts"),
    [
        ({}, False, 1),
        ({}, True, 2),  # classic queue: the flag says "at least once before"
        ({ATTEMPTS_KEY: 3}, False, 4),
        ({ATTEMPTS_KEY: 3}, True, 5),
        ({"x-delivery-count": 0}, False, 1),  # quorum queue: exact count
        ({"x-delivery-count": 4}, True, 5),
        ({ATTEMPTS_KEY: 2, "x-delivery-count": 2}, True, 5),
        ({ATTEMPTS_KEY: "garbage"}, False, 1),
    ],
)
def test_attempts(table: dict[str, Any], redelivered: bool, attempts: int) -> None:
    assert attempts_of(Basic.Properties(headers=table or None), redelivered) == attempts


def test_republished_copy_records_attempts_and_drops_broker_bookkeeping() -> None:
    enc = encode_headers({"f": 0.5, "priority": "low", "expiration": 100}, "m")
    original = _roundtrip(enc.properties)
    original.headers = {**(original.headers or {}), "x-death": [{"count": 1}], "x-delivery-count": 3}
    copy = republished(original, 4, keep_expiration=False)
    assert copy.headers is not None
    assert copy.headers[ATTEMPTS_KEY] == 4
    assert "x-death" not in copy.headers and "x-delivery-count" not in copy.headers
    assert copy.expiration is None
    assert copy.message_id == "m" and copy.priority == 1 and copy.delivery_mode == 2
    got = decode_headers(_roundtrip(copy))
    assert got == {"f": 0.5, "priority": "low"}
    assert attempts_of(_roundtrip(copy), False) == 5
    assert republished(original, 0, keep_expiration=True).expiration == "100"


def test_pamqp_would_narrow_floats_which_is_why_they_travel_as_text() -> None:
    """Regression guard: if pamqp ever encodes floats as doubles, the text detour can go."""
    raw = encode.field_table({"f": 0.1})
    assert decode.field_table(raw)[1]["f"] != 0.1
