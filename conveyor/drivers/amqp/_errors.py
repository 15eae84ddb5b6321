"""Client exceptions -> ``conveyor.errors.Error``: the one place aiormq errors are read.

Everything that reaches a caller of the driver is an ``errors.Error``; the client's
own exception types never leak. Failures of the broker or the network are INTERNAL
and retryable (the same call may succeed after a reconnect). A publish the broker
definitely refused says so, and says that nothing was stored: a refusal of the
message itself (too large, a foreign ``user_id``, access refused) is not retryable.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

import aiormq.exceptions as amqp_exc

from conveyor import errors

__all__ = [
    "Refusal",
    "describe",
    "is_connection_failure",
    "not_stored_error",
    "publish_error",
    "refusal_of",
    "too_large",
]

_TOO_LARGE = re.compile(r"message size (\d+) is larger than configured max size (\d+)")
_USER_ID = re.compile(r"user_id property set to '([^']*)' but authenticated user was '([^']*)'")
_CODES: tuple[tuple[type[amqp_exc.ChannelClosed], int], ...] = (
    (amqp_exc.ChannelPreconditionFailed, 406),
    (amqp_exc.ChannelAccessRefused, 403),
    (amqp_exc.ChannelNotFoundEntity, 404),
)


def describe(exc: BaseException) -> str:
    """A one-line human text for a client exception (no traceback, no class soup)."""
    if isinstance(exc, amqp_exc.PublishError):
        frame = exc.frame
        return f"message returned by the broker: {getattr(frame, 'reply_text', 'unroutable')}"
    if isinstance(exc, amqp_exc.DeliveryError):
        return "the broker refused the message (basic.nack)"
    if isinstance(exc, amqp_exc.ChannelClosed | amqp_exc.ConnectionClosed) and len(exc.args) >= 2:
        code, text = exc.args[0], exc.args[1]
        return f"{text} ({code})" if code else str(text or "closed")
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_connection_failure(exc: BaseException) -> bool:
    """True when the failure means the channel or connection is gone (not the message)."""
    return isinstance(
        exc,
        amqp_exc.AMQPConnectionError
        | amqp_exc.ChannelClosed
        | amqp_exc.ChannelInvalidStateError
        | ConnectionError
        | OSError
        | RuntimeError,
    )


@dataclass(frozen=True, slots=True)
class Refusal:
    """The broker closed the publishing channel because of one publish.

    ``limit`` is set for a message over the broker's ``max_message_size``,
    ``user_id`` for a message whose ``user_id`` is not the connection's user; other
    refusals (access refused) apply to every publish on the channel.
    """

    code: int
    text: str  # the broker's reply text
    limit: int | None = None
    user_id: str | None = None

    def applies_to(self, size: int, user_id: str | None) -> bool:
        """Whether the broker refuses a message of ``size`` body bytes and this ``user_id``."""
        if self.limit is not None:
            return size > self.limit
        if self.user_id is not None:
            return user_id == self.user_id
        return True

    def error(self, queue_id: str, size: int, **details: Any) -> errors.Error:
        """The error for the refused message itself: nothing stored, not retryable."""
        if self.limit is not None:
            return too_large(queue_id, size, self.limit, **details)
        if self.user_id is not None:
            return errors.invalid(
                f"the broker refused the message for {queue_id}: its amqp.user_id {self.user_id!r} "
                f"is not the user this driver logged in as ({self.text}); nothing was stored",
                queue=queue_id,
                reason="user_id",
                **details,
            )
        text = f"the broker refused the publish to {queue_id}: {self.text} ({self.code}); nothing was stored"
        if self.code == 403:
            return errors.permission_denied(text, queue=queue_id, reason="access_refused", **details)
        return errors.not_found(text, queue=queue_id, reason="not_found", **details)


def refusal_of(exc: BaseException | None) -> Refusal | None:
    """The refusal a channel close names, or None when it names no publish."""
    if not isinstance(exc, amqp_exc.ChannelClosed):
        return None
    code = next((code for cls, code in _CODES if isinstance(exc, cls)), None)
    if code is None:
        return None
    text = str(exc.args[-1]) if exc.args else ""
    if code == 406:
        size = _TOO_LARGE.search(text)
        if size is not None:
            return Refusal(code, text, limit=int(size.group(2)))
        user = _USER_ID.search(text)
        if user is not None:
            return Refusal(code, text, user_id=user.group(1))
        return None  # a 406 about something else: not known to be about one message
    return Refusal(code, text)


def too_large(queue_id: str, size: int, limit: int, *, sent: bool = True, **details: Any) -> errors.Error:
    """INVALID: a body over the broker's ``max_message_size`` (it is never stored).

    ``sent`` False: refused before sending, by the limit a refusal of the broker taught.
    """
    outcome = (
        "the broker refused it and nothing was stored"
        if sent
        else "not sent (the broker refused a message over that size before); nothing was stored"
    )
    return errors.invalid(
        f"message of {size} bytes for {queue_id} is larger than the broker's max_message_size "
        f"({limit} bytes): {outcome}",
        queue=queue_id,
        reason="too_large",
        size=size,
        limit=limit,
        **details,
    )


def not_stored_error(refusal: Refusal, queue_id: str, **details: Any) -> errors.Error:
    """INTERNAL (retryable): dropped with the channel that another publish got closed."""
    return errors.internal(
        f"publish to {queue_id} was not stored: the broker closed the shared publishing channel "
        f"because of another message ({refusal.text}); publishing it again is safe",
        queue=queue_id,
        reason="channel_closed",
        retryable=True,
        **details,
    )


def publish_error(exc: BaseException, queue_id: str, *, full: bool, **details: Any) -> errors.Error:
    """The INTERNAL (retryable) error for a publish that was not confirmed.

    ``full`` says the queue has a length limit, so a broker nack means "queue full".
    A return or a nack means nothing was stored. A timeout or a lost connection
    leaves the outcome unknown: the message may still be stored, so a retry can
    duplicate it (at-least-once), but it is never lost without an error.
    """
    if isinstance(exc, amqp_exc.PublishError):
        reason, text = (
            "unroutable",
            (
                f"the broker could not route the message to {queue_id} (the queue does not exist "
                "on the broker: deleted since it was declared?); nothing was stored"
            ),
        )
    elif isinstance(exc, amqp_exc.DeliveryError):
        if full:
            reason, text = "queue_full", f"queue {queue_id} is full (max_length reached); nothing was stored"
        else:
            reason, text = (
                "nack",
                f"the broker refused the message for {queue_id} (basic.nack); nothing was stored",
            )
    elif isinstance(exc, TimeoutError | asyncio.TimeoutError):
        reason, text = (
            "timeout",
            (
                f"no publisher confirm for {queue_id} in time (broker blocked or overloaded?); "
                "the message may or may not be stored"
            ),
        )
    else:
        reason, text = (
            "connection",
            (f"publish to {queue_id} failed: {describe(exc)}; the message may or may not be stored"),
        )
    return errors.internal(text, queue=queue_id, reason=reason, **details, retryable=True)
