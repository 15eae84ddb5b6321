"""Client exceptions -> ``conveyor.errors.Error``: the one place aiormq errors are read.

Everything that reaches a caller of the driver is an ``errors.Error``; the client's
own exception types never leak. Failures of the broker or the network are INTERNAL
and retryable (the same call may succeed after a reconnect).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq.exceptions as amqp_exc

from conveyor import errors

__all__ = ["describe", "is_connection_failure", "publish_error"]


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


def publish_error(exc: BaseException, queue_id: str, *, full: bool, **details: Any) -> errors.Error:
    """The INTERNAL (retryable) error for a publish that was not confirmed.

    ``full`` says the queue has a length limit, so a broker nack means "queue full".
    A timeout or a lost connection leaves the outcome unknown: the message may still
    be stored, so a retry can duplicate it (at-least-once), but it is never lost
    without an error.
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
            reason, text = "nack", f"the broker refused the message for {queue_id} (basic.nack)"
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
