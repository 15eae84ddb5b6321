"""Security contexts: who is acting, and which policies judge what they do.

A :class:`SecurityContext` pairs an :class:`Actor` with a *scope*: policy IDs and
group names. The scope is resolved lazily, against whichever
:class:`~conveyor.security.policy.PolicyEngine` evaluates the context, and the result
is cached per engine, so a context can be built before any app is loaded and repeated
checks cost one dictionary lookup.

The active context lives in a :class:`~contextvars.ContextVar`: every thread starts
with none, and every asyncio task sees the context that was active when it was
created but never leaks its own changes to its parent or siblings.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from conveyor import errors
from conveyor.registry.model import PolicySpec, SecurityBlock

if TYPE_CHECKING:
    from conveyor.security.policy import PolicyEngine, Scope

__all__ = [
    "ANONYMOUS",
    "Actor",
    "SecurityContext",
    "acontext",
    "activate",
    "as_names",
    "context",
    "context_from_block",
    "current",
]

ANONYMOUS = "anonymous"
"""Actor ID of a consumer whose ``security:`` block names policies but no actor."""

_current: ContextVar[SecurityContext | None] = ContextVar("conveyor.security.current", default=None)


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is acting: a non-empty ``id`` and a read-only ``meta`` mapping.

    ``meta`` is copied (one level deep) when the actor is built, so changing the
    caller's dict afterwards cannot change what policies see. Raises INVALID for an
    empty or non-string ``id`` or a ``meta`` that is not a mapping.
    """

    id: str
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _check_actor_id(self.id)
        object.__setattr__(self, "meta", MappingProxyType(_copy_meta(self.meta)))


def _check_actor_id(value: object) -> None:
    if not isinstance(value, str) or not value:
        raise errors.invalid(f"actor id must be a non-empty string, not {value!r}", actor=repr(value))


def _copy_meta(value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise errors.invalid(f"actor meta must be a mapping, not {type(value).__name__}")
    return dict(value)


def as_names(values: Iterable[str], what: str) -> tuple[str, ...]:
    """``values`` as a tuple of non-empty strings; INVALID otherwise.

    A bare string is rejected rather than iterated: ``policies="app:p"`` would
    otherwise become the policies ``a``, ``p``, ``p``, ...
    """
    if isinstance(values, str):
        raise errors.invalid(f"{what} must be a list of names, not the string {values!r}")
    names = tuple(values)
    for name in names:
        if not isinstance(name, str) or not name:
            raise errors.invalid(f"{what} must be non-empty strings, not {name!r}")
    return names


class SecurityContext:
    """An actor plus the scope (policy IDs, group names, pre-resolved policies) it acts under.

    Immutable once built. Unknown policy IDs or groups are reported (NOT_FOUND) when
    the context is first evaluated by an engine, not here: the context does not know
    which app will judge it.
    """

    __slots__ = ("_actor", "_groups", "_policies", "_resolved", "_scopes")

    def __init__(
        self,
        actor: Actor | str,
        policies: Iterable[str] = (),
        groups: Iterable[str] = (),
        *,
        resolved: Iterable[PolicySpec] = (),
    ) -> None:
        self._actor = actor if isinstance(actor, Actor) else Actor(actor)
        self._policies = as_names(policies, "policies")
        self._groups = as_names(groups, "groups")
        self._resolved = _check_specs(resolved)
        # id(engine) -> (weak ref to that engine, its compiled scope); see scope_for.
        self._scopes: dict[int, tuple[weakref.ref[PolicyEngine], Scope]] = {}

    @property
    def actor(self) -> Actor:
        return self._actor

    @property
    def policies(self) -> tuple[str, ...]:
        """The policy IDs named by this context, as given."""
        return self._policies

    @property
    def groups(self) -> tuple[str, ...]:
        """The policy group names named by this context, as given."""
        return self._groups

    @property
    def resolved(self) -> tuple[PolicySpec, ...]:
        """Policies handed over directly, in addition to the named ones."""
        return self._resolved

    def scope_for(self, engine: PolicyEngine) -> Scope:
        """The scope compiled by ``engine``, computed once per engine and then cached.

        Raises NOT_FOUND (from the engine) if a named policy or group does not exist
        there; failures are not cached, so every evaluation reports them.
        """
        entry = self._scopes.get(id(engine))
        # An id() can be reused after an engine is collected: the weak reference tells
        # a live match from a stale entry.
        if entry is not None and entry[0]() is engine:
            return entry[1]
        scope = engine.compile_scope(self)
        self._scopes[id(engine)] = (weakref.ref(engine), scope)
        return scope

    def __repr__(self) -> str:
        return (
            f"SecurityContext(actor={self._actor.id!r}, policies={list(self._policies)!r}, "
            f"groups={list(self._groups)!r})"
        )


def _check_specs(specs: Iterable[object]) -> tuple[PolicySpec, ...]:
    out: list[PolicySpec] = []
    for spec in specs:
        if not isinstance(spec, PolicySpec):
            raise errors.invalid(f"resolved policies must be PolicySpec objects, not {type(spec).__name__}")
        out.append(spec)
    return tuple(out)


def current() -> SecurityContext | None:
    """The security context active in this thread or asyncio task, or None."""
    return _current.get()


def activate(ctx: SecurityContext | None) -> Token[SecurityContext | None]:
    """Make ``ctx`` current without a ``with`` block; returns the token to reset it with.

    For runtimes that run each worker inside its own :class:`contextvars.Context`
    (a consumer's handlers), where the setting dies with that context.
    """
    if ctx is not None and not isinstance(ctx, SecurityContext):
        raise errors.invalid(f"activate needs a SecurityContext or None, not {type(ctx).__name__}")
    return _current.set(ctx)


def _build(
    actor: Actor | str | SecurityContext, policies: Iterable[str], groups: Iterable[str]
) -> SecurityContext:
    if not isinstance(actor, SecurityContext):
        return SecurityContext(actor, policies, groups)
    if tuple(policies) or tuple(groups):
        raise errors.invalid("pass policies and groups when building a SecurityContext, not alongside one")
    return actor


@contextlib.contextmanager
def context(
    actor: Actor | str | SecurityContext,
    policies: Iterable[str] = (),
    groups: Iterable[str] = (),
) -> Iterator[SecurityContext]:
    """Make ``actor`` with the given scope the current context for the ``with`` body.

    ``actor`` is an :class:`Actor`, an actor ID, or a ready :class:`SecurityContext`
    (then ``policies`` and ``groups`` must be empty). The previous context is restored
    on exit, also when the body raises. Contexts nest.
    """
    ctx = _build(actor, policies, groups)
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


@contextlib.asynccontextmanager
async def acontext(
    actor: Actor | str | SecurityContext,
    policies: Iterable[str] = (),
    groups: Iterable[str] = (),
) -> AsyncIterator[SecurityContext]:
    """The ``async with`` form of :func:`context`; the context is local to the task."""
    ctx = _build(actor, policies, groups)
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def context_from_block(block: SecurityBlock) -> SecurityContext:
    """The context a consumer's handler runs with, from its ``security:`` block.

    A block without an ``actor`` acts as :data:`ANONYMOUS`. A block naming no
    policies and no groups yields an empty scope, under which everything is denied.
    """
    actor = Actor(block.actor or ANONYMOUS, block.actor_meta)
    return SecurityContext(actor, block.policies, block.groups)
