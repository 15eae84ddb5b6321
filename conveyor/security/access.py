"""``security.is_allowed``: ask the current app's policies about the current context.

The current app is found by the same rules as ``conveyor.queue.publish`` uses
(:mod:`conveyor.queue.context`); its policy engine is the one it was built with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conveyor import errors
from conveyor.queue.context import current_runtime_or_none
from conveyor.security.context import current
from conveyor.security.policy import check_request

__all__ = ["is_allowed"]


def is_allowed(action: str, resource: str = "", meta: Mapping[str, Any] | None = None) -> bool:
    """Whether the current security context may perform ``action`` on ``resource``.

    Evaluated by the current app's engine. Without a current app there is no policy
    to consult and no strict flag: with no security context the answer is True, and
    with one it raises INVALID "no queue runtime" rather than guess.
    """
    check_request(action, resource, meta)
    runtime = current_runtime_or_none()
    ctx = current()
    if runtime is not None:
        return runtime.engine.is_allowed(ctx, action, resource, meta)
    if ctx is None:
        return True
    raise errors.invalid(
        "no queue runtime: security.is_allowed needs a running conveyor app to resolve policies"
    )
