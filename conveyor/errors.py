"""The one error type of conveyor.

Every failure that crosses the public API is an :class:`Error` carrying a ``kind``
(one of the string constants below), a ``retryable`` flag, a human ``message`` and a
``details`` dict. Driver and library exceptions are translated at the driver edge and
never reach callers.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ALREADY_EXISTS",
    "CANCELED",
    "CONFLICT",
    "INTERNAL",
    "INVALID",
    "KINDS",
    "NOT_FOUND",
    "PERMISSION_DENIED",
    "RATE_LIMITED",
    "TIMEOUT",
    "UNAVAILABLE",
    "UNKNOWN",
    "Error",
    "already_settled",
    "internal",
    "invalid",
    "message_released",
    "no_delivery_context",
    "not_found",
    "permission_denied",
]

INVALID = "INVALID"
NOT_FOUND = "NOT_FOUND"
PERMISSION_DENIED = "PERMISSION_DENIED"
INTERNAL = "INTERNAL"
UNAVAILABLE = "UNAVAILABLE"
TIMEOUT = "TIMEOUT"
CANCELED = "CANCELED"
CONFLICT = "CONFLICT"
ALREADY_EXISTS = "ALREADY_EXISTS"
RATE_LIMITED = "RATE_LIMITED"
UNKNOWN = "UNKNOWN"

KINDS: frozenset[str] = frozenset(
    {
        INVALID,
        NOT_FOUND,
        PERMISSION_DENIED,
        INTERNAL,
        UNAVAILABLE,
        TIMEOUT,
        CANCELED,
        CONFLICT,
        ALREADY_EXISTS,
        RATE_LIMITED,
        UNKNOWN,
    }
)


class Error(Exception):
    """A structured conveyor failure: ``kind``, ``retryable``, ``message``, ``details``."""

    __slots__ = ("details", "kind", "message", "retry_hint", "retryable")

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        retryable: bool | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message
        # ``retryable`` as given: None when the code that raised the error did not say.
        # A consumer retries a failed handler unless this is False (see docs/semantics.md).
        self.retry_hint = retryable
        self.retryable = bool(retryable)
        self.details: dict[str, Any] = dict(details) if details else {}

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"Error(kind={self.kind!r}, message={self.message!r}, "
            f"retryable={self.retryable!r}, details={self.details!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.kind, self.message, self.retry_hint, self.details))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form (used by ``--json`` output and logs)."""
        return {
            "kind": self.kind,
            "message": self.message,
            "retryable": self.retryable,
            "details": self.details,
        }


def _rebuild(kind: str, message: str, retryable: bool | None, details: dict[str, Any]) -> Error:
    return Error(kind, message, retryable=retryable, details=details)


def invalid(message: str, **details: Any) -> Error:
    """Bad input: the same call fails the same way again (``retryable=False``, stated)."""
    return Error(INVALID, message, retryable=False, details=details)


def not_found(message: str, **details: Any) -> Error:
    return Error(NOT_FOUND, message, retryable=False, details=details)


def permission_denied(message: str, **details: Any) -> Error:
    return Error(PERMISSION_DENIED, message, retryable=False, details=details)


def internal(message: str, *, retryable: bool | None = None, **details: Any) -> Error:
    """An INTERNAL error; not retryable unless said so (``retry_hint`` None: not said)."""
    return Error(INTERNAL, message, retryable=retryable, details=details)


def no_delivery_context() -> Error:
    return Error(
        INVALID,
        "no delivery context: queue.message() is only available inside a consumer handler",
        retryable=False,
    )


def already_settled(message_id: str) -> Error:
    return Error(
        INVALID, f"message {message_id} already settled", retryable=False, details={"message_id": message_id}
    )


def message_released(message_id: str) -> Error:
    return Error(
        INVALID,
        f"message {message_id} released: the handler has returned",
        retryable=False,
        details={"message_id": message_id},
    )
