from __future__ import annotations

import pickle
from typing import Any

import pytest

from conveyor import errors
from conveyor.queue.codecs import CODECS, DecodeError, check_data, get_codec
from conveyor.queue.headers import check_headers, priority_value

# -- errors ------------------------------------------------------------------------------


def test_error_carries_kind_retryable_message_details() -> None:
    exc = errors.Error(errors.INTERNAL, "broker down", retryable=True, details={"queue": "app:q"})
    assert (exc.kind, exc.retryable, exc.message, exc.details) == (
        "INTERNAL",
        True,
        "broker down",
        {"queue": "app:q"},
    )
    assert str(exc) == "INTERNAL: broker down"
    assert isinstance(exc, Exception)
    assert exc.to_dict() == {
        "kind": "INTERNAL",
        "message": "broker down",
        "retryable": True,
        "details": {"queue": "app:q"},
    }


def test_every_spec_kind_is_a_constant() -> None:
    expected = {
        "INVALID",
        "NOT_FOUND",
        "PERMISSION_DENIED",
        "INTERNAL",
        "UNAVAILABLE",
        "TIMEOUT",
        "CANCELED",
        "CONFLICT",
        "ALREADY_EXISTS",
        "RATE_LIMITED",
        "UNKNOWN",
    }
    assert expected == errors.KINDS
    for kind in expected:
        assert getattr(errors, kind) == kind


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError):
        errors.Error("NOPE", "x")


def test_error_survives_pickling() -> None:
    exc = errors.internal("lost connection", retryable=True, queue="app:q")
    copy = pickle.loads(pickle.dumps(exc))
    assert (copy.kind, copy.message, copy.retryable, copy.details) == (
        exc.kind,
        exc.message,
        True,
        {"queue": "app:q"},
    )


def test_default_is_not_retryable() -> None:
    assert errors.invalid("x").retryable is False
    assert errors.permission_denied("x").retryable is False
    assert errors.not_found("x").retryable is False


def test_internal_defaults_like_the_error_type() -> None:
    """Regression: errors.internal() was retryable by default while Error(INTERNAL, ...)
    was not; one default now, and retryable errors say so where they are made."""
    assert errors.internal("x").retryable is errors.Error(errors.INTERNAL, "x").retryable is False
    assert errors.internal("x", retryable=True).retryable is True


# -- data --------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [None, "", b"", {}, [], bytearray()])
def test_empty_data_rejected(data: Any) -> None:
    with pytest.raises(errors.Error) as info:
        check_data(data)
    assert info.value.kind == errors.INVALID


@pytest.mark.parametrize("data", [0, False, 0.0, "x", {"a": None}, [None]])
def test_falsy_but_present_data_accepted(data: Any) -> None:
    check_data(data)


# -- codecs ------------------------------------------------------------------------------

VALUES = [{"a": 1, "b": [1.5, True, None, "ü"]}, [1, 2], "text", 42, 1.25, True]


@pytest.mark.parametrize("name", ["json/plain", "msgpack/plain"])
@pytest.mark.parametrize("value", VALUES)
def test_structured_codecs_round_trip(name: str, value: Any) -> None:
    codec = get_codec(name)
    decoded = codec.decode(codec.encode(value))
    assert decoded == value
    assert type(decoded) is type(value)


def test_msgpack_carries_bytes_json_does_not() -> None:
    assert get_codec("msgpack/plain").decode(get_codec("msgpack/plain").encode(b"\x00\xff")) == b"\x00\xff"
    with pytest.raises(errors.Error) as info:
        get_codec("json/plain").encode(b"\x00")
    assert info.value.kind == errors.INVALID
    assert "msgpack/plain" in info.value.message


@pytest.mark.parametrize("value", [float("nan"), {"s": {1, 2}}, object()])
def test_json_rejects_unencodable(value: Any) -> None:
    with pytest.raises(errors.Error) as info:
        get_codec("json/plain").encode(value)
    assert info.value.kind == errors.INVALID


def test_msgpack_rejects_unencodable() -> None:
    with pytest.raises(errors.Error) as info:
        get_codec("msgpack/plain").encode(object())
    assert info.value.kind == errors.INVALID


def test_raw_codec_carries_str_and_bytes_as_is() -> None:
    raw = get_codec("raw")
    assert raw.encode("héllo") == "héllo".encode()
    assert raw.encode(b"\x00\x01") == b"\x00\x01"
    assert raw.decode(b"\x00\x01") == b"\x00\x01"
    with pytest.raises(errors.Error):
        raw.encode({"a": 1})


@pytest.mark.parametrize(
    ("name", "body"), [("json/plain", b"\xff{"), ("json/plain", b"{"), ("msgpack/plain", b"\xc1")]
)
def test_undecodable_bodies_raise_decode_error(name: str, body: bytes) -> None:
    with pytest.raises(DecodeError):
        get_codec(name).decode(body)


def test_unknown_codec_is_invalid() -> None:
    with pytest.raises(errors.Error) as info:
        get_codec("xml/plain")
    assert info.value.kind == errors.INVALID
    assert sorted(CODECS) == ["json/plain", "msgpack/plain", "raw"]


# -- headers -----------------------------------------------------------------------------


def test_headers_copied_and_types_kept() -> None:
    given = {"s": "v", "i": 1, "f": 1.5, "b": False, "amqp.mandatory": True}
    out = check_headers(given)
    assert out == given and out is not given
    assert check_headers(None) == {}


@pytest.mark.parametrize(
    "headers",
    [
        {"attempts": 1},
        {"x_original_queue": "a:b"},
        {"x_": 1},
        {"": 1},
        {" k": 1},
        {1: "v"},
        {"k": None},
        {"k": {"n": 1}},
        {"k": [1]},
        {"k": b"bytes"},
        {"k": float("nan")},
    ],
)
def test_bad_headers_rejected(headers: dict[Any, Any]) -> None:
    with pytest.raises(errors.Error) as info:
        check_headers(headers)
    assert info.value.kind == errors.INVALID


def test_headers_must_be_a_mapping() -> None:
    with pytest.raises(errors.Error):
        check_headers([("k", "v")])


@pytest.mark.parametrize(("value", "number"), [("low", 1), ("normal", 5), ("high", 9), (0, 0), (255, 255)])
def test_priority_values(value: Any, number: int) -> None:
    assert priority_value(value) == number
    assert check_headers({"priority": value}) == {"priority": value}


@pytest.mark.parametrize("value", ["HIGH", "urgent", -1, 256, 2.0, True])
def test_bad_priority(value: Any) -> None:
    with pytest.raises(errors.Error):
        check_headers({"priority": value})


# -- waiters (shared by the drivers' get()) ----------------------------------------------


def test_a_cancelled_waiter_passes_its_wake_up_on() -> None:
    import asyncio

    from conveyor.drivers.waiters import Waiters

    async def main() -> list[str]:
        waiters = Waiters()
        woke: list[str] = []

        async def waiter(name: str) -> None:
            await waiters.wait()
            woke.append(name)

        first = asyncio.create_task(waiter("first"))
        second = asyncio.create_task(waiter("second"))
        await asyncio.sleep(0)
        waiters.wake()  # meant for `first`...
        first.cancel()  # ...which is cancelled before it runs
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.wait_for(second, 1)
        return woke

    assert asyncio.run(main()) == ["second"]
