"""Security: who may publish where, decided by the app's ``security.policy`` entries.

``with security.context(actor, policies=[...], groups=[...])`` (or ``async with
security.acontext(...)``) sets the context that publishes and
:func:`is_allowed` are judged by; see docs/security.md and :mod:`conveyor.security.policy`.

Note: ``security.context`` is the context-manager function, which shadows the
``conveyor.security.context`` submodule as a package attribute; import names from the
submodule with ``from conveyor.security.context import ...``.
"""

from __future__ import annotations

from conveyor.security.access import is_allowed
from conveyor.security.context import (
    Actor,
    SecurityContext,
    acontext,
    context,
    context_from_block,
    current,
)
from conveyor.security.policy import PolicyEngine

__all__ = [
    "Actor",
    "PolicyEngine",
    "SecurityContext",
    "acontext",
    "context",
    "context_from_block",
    "current",
    "is_allowed",
]
