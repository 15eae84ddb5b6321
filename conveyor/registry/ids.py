"""IDs: ``namespace:name``.

An ID is checked once, where it enters the system, and then used verbatim: the
permission check, the lookup and the driver all see the same string. Nothing is
normalised — an ID with stray whitespace or an empty part is INVALID, never quietly
turned into another queue's ID.
"""

from __future__ import annotations

import re

from conveyor import errors

__all__ = ["canonical_id", "is_valid_id", "resolve_ref", "split_id"]

_NAMESPACE = r"[A-Za-z0-9_][A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_][A-Za-z0-9_\-]*)*"
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.\-]*"
_ID_RE = re.compile(rf"(?:{_NAMESPACE}):(?:{_NAME})")
_NAME_RE = re.compile(_NAME)
_NAMESPACE_RE = re.compile(_NAMESPACE)

# Valid IDs seen so far: the hot publish path checks each distinct ID once.
_known: set[str] = set()


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def canonical_id(value: object, *, what: str = "queue ID") -> str:
    """Return ``value`` if it is a well-formed ID, else raise INVALID.

    The accepted form is exactly ``namespace:name``: no whitespace anywhere, no empty
    namespace or name, one colon, dots only between non-empty namespace segments.
    """
    if value.__class__ is str and value in _known:
        return value
    if not isinstance(value, str):
        raise errors.invalid(f"{what} must be a string, not {type(value).__name__}", value=_printable(value))
    if not value:
        raise errors.invalid(f"{what} is empty", value=value)
    if _ID_RE.fullmatch(value) is None:
        raise errors.invalid(
            f"malformed {what} {value!r}: expected 'namespace:name' "
            "(letters, digits, '_', '-', '.'; no spaces, no empty parts)",
            value=value,
        )
    if len(_known) < 100_000:
        _known.add(value)
    return value


def split_id(value: str) -> tuple[str, str]:
    namespace, _, name = value.partition(":")
    return namespace, name


def is_valid_name(value: object) -> bool:
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None


def is_valid_namespace(value: object) -> bool:
    return isinstance(value, str) and _NAMESPACE_RE.fullmatch(value) is not None


def resolve_ref(value: str, namespace: str) -> str:
    """Resolve a reference written in a file of ``namespace``: a bare name gets it."""
    if ":" in value:
        return canonical_id(value, what="reference")
    if not is_valid_name(value):
        raise errors.invalid(f"malformed reference {value!r}", value=value)
    return f"{namespace}:{value}"


def _printable(value: object) -> object:
    return value if isinstance(value, (str, int, float, bool)) or value is None else repr(value)
