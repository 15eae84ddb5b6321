"""Fuzzing IDs: checking and resolving any value raises nothing but INVALID, and what is
accepted is exactly one well-formed ``namespace:name``, returned unchanged."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from conveyor import errors
from conveyor.registry import ids
from tests.fuzz import FUZZ

ID_CHARS = "abAB09_-.:: \t\n\u00e9\u0130\u212a\x00/"  # valid, separators, spaces, look-alikes
id_like = st.text(st.sampled_from(ID_CHARS), max_size=12)
anything = st.one_of(
    id_like,
    st.text(max_size=12),
    st.integers(),
    st.none(),
    st.binary(max_size=6),
    st.lists(id_like, max_size=2),
    st.builds(str.__new__, st.just(type("S", (str,), {})), id_like),  # a str subclass
)
WELL_FORMED = re.compile(
    r"[A-Za-z0-9_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_][A-Za-z0-9_\-]*)*:[A-Za-z0-9_][A-Za-z0-9_.\-]*"
)


def invalid_or(call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return call(*args, **kwargs)
    except errors.Error as exc:
        assert exc.kind == errors.INVALID, exc
        assert not exc.retryable
        return exc


@FUZZ
@given(value=anything)
def test_canonical_id_is_the_value_or_invalid(value: Any) -> None:
    result = invalid_or(ids.canonical_id, value)
    if isinstance(result, errors.Error):
        assert not ids.is_valid_id(value)
        return
    assert result == value and isinstance(result, str)
    assert WELL_FORMED.fullmatch(result)
    assert result.isascii() and not any(c.isspace() for c in result)
    namespace, name = ids.split_id(result)
    assert f"{namespace}:{name}" == result
    assert ids.is_valid_namespace(namespace) and ids.is_valid_name(name)
    assert ids.canonical_id(result) == result  # the cached path agrees


@FUZZ
@given(value=id_like, namespace=st.sampled_from(["app", "a.b", "x-1"]))
def test_resolving_a_reference_is_an_id_or_invalid(value: str, namespace: str) -> None:
    result = invalid_or(ids.resolve_ref, value, namespace)
    if not isinstance(result, errors.Error):
        assert ids.is_valid_id(result)
        assert result == value if ":" in value else result == f"{namespace}:{value}"


@FUZZ
@given(value=anything)
def test_the_predicates_never_raise(value: Any) -> None:
    for check in (ids.is_valid_id, ids.is_valid_name, ids.is_valid_namespace):
        assert check(value) in (True, False)
