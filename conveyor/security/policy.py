"""Policy evaluation: may this actor perform this action on this resource?

Contract (docs/semantics.md#permissions):

- A policy *applies* to a request when one of its action patterns matches the action,
  one of its resource patterns matches the resource, and every condition holds.
- Any applicable ``deny`` denies; otherwise any applicable ``allow`` allows; otherwise
  the request is denied. With no security context at all the answer is ``not strict``.
- Patterns are ``"*"`` (anything), an exact string, or a prefix ending in ``*``
  (``queue.*`` matches ``queue.publish`` but not ``queue``; ``app:*`` matches
  ``app:tasks``). Matching is exact and case-sensitive: nothing is normalised, because
  IDs are validated where they enter and a lenient match here could let ``App:secret``
  slip past a rule written for ``app:secret``.
- Conditions never raise. A missing field, a missing ``value_from`` field or values of
  types the operator cannot compare make the condition false (``exists`` aside). Note
  that this applies to deny policies too: write deny conditions so that a missing
  field does not silently lift the deny (e.g. prefer ``exists``-based rules).

- One physical queue may have several IDs (queue entries with the same driver and
  ``queue_name``, declared with ``alias_of``). The engine is told these aliases and
  judges a resource that is one of them as all of them: a policy applies when it
  applies to any of the IDs, so a deny written for one ID denies the queue through
  every ID, and an allow allows it through every ID.

Configuration mistakes (unknown operator, bad field reference, bad regex, ...) are
reported once, all together, as INVALID when the :class:`PolicyEngine` is built; the
rules for conditions are :mod:`conveyor.registry.conditions`, the ones the loader
applies to YAML, so a policy that loads always compiles.

The engine is passed to whoever needs it (the app's queue runtime); the module-level
``security.is_allowed`` finds the current app's engine through the current app
(:mod:`conveyor.security.access`).

Size: just over 500 lines: the engine, its compiled rules and the alias map of
physical queues are one evaluation path; the condition rules live in
:mod:`conveyor.registry.conditions`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from itertools import chain
from operator import attrgetter
from typing import Any, Final, TypeGuard

from conveyor import errors
from conveyor.registry.conditions import NO_VALUE, Condition, FieldRef, parse_field
from conveyor.registry.model import PolicySpec, QueueSpec
from conveyor.registry.problems import Problem, problems_error
from conveyor.security.context import Actor, SecurityContext, as_names

__all__ = ["PUBLISH", "PUBLISH_QUEUE", "PolicyEngine", "Scope", "check_request", "queue_aliases"]

PUBLISH: Final = "queue.publish"
PUBLISH_QUEUE: Final = "queue.publish.queue"

_MISSING: Final = object()  # a field that is absent from the request


# --- the request ------------------------------------------------------------------


class _Request:
    """What conditions can see: the action, the resource, the actor and request meta."""

    __slots__ = ("action", "actor_id", "actor_meta", "meta", "resource")

    def __init__(self, action: str, resource: str, actor: Actor, meta: Mapping[str, Any] | None) -> None:
        self.action = action
        self.resource = resource
        self.actor_id = actor.id
        self.actor_meta = actor.meta
        self.meta: Mapping[str, Any] = meta if meta is not None else {}


_Getter = Callable[[_Request], object]

_FIXED_FIELDS: Final[dict[str, _Getter]] = {
    "action": attrgetter("action"),
    "resource": attrgetter("resource"),
    "actor.id": attrgetter("actor_id"),
}
_PATH_SOURCES: Final = {"actor.meta": "actor_meta", "meta": "meta"}


def _field_getter(ref: FieldRef) -> _Getter:
    """The reader for a parsed field reference."""
    fixed = _FIXED_FIELDS.get(ref.source)
    if fixed is not None:
        return fixed
    return functools.partial(_walk, _PATH_SOURCES[ref.source], ref.path)


def _walk(attr: str, path: tuple[str, ...], request: _Request) -> object:
    """Follow a dotted path through nested mappings; :data:`_MISSING` if it breaks off."""
    node: object = getattr(request, attr)
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return _MISSING
        node = node[key]
    return node


# --- operators ----------------------------------------------------------------------


def _is_number(value: object) -> TypeGuard[int | float]:
    # bool is an int subclass, but True is not a number a policy author means.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _equal(a: object, b: object) -> bool:
    """Value equality that never treats a bool as an int; lists and tuples compare alike."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # an exotic __eq__ must not turn a policy check into a crash
        return False


def _op_ne(a: object, b: object) -> bool:
    return not _equal(a, b)


def _op_lt(a: object, b: object) -> bool:
    if _is_number(a) and _is_number(b):
        return a < b
    if isinstance(a, str) and isinstance(b, str):
        return a < b
    return False


def _op_gt(a: object, b: object) -> bool:
    return _op_lt(b, a)


def _op_in(a: object, b: object) -> bool:
    return isinstance(b, list | tuple) and any(_equal(a, item) for item in b)


def _op_contains(a: object, b: object) -> bool:
    if isinstance(a, str):
        return isinstance(b, str) and b in a
    if isinstance(a, list | tuple):
        return any(_equal(item, b) for item in a)
    return False


@functools.lru_cache(maxsize=512)
def _regex(pattern: str) -> re.Pattern[str] | None:
    """Compiled ``pattern``, cached; None if it does not compile (from ``value_from``)."""
    try:
        return re.compile(pattern)
    except re.error:
        return None


def _op_matches(a: object, b: object) -> bool:
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    regex = _regex(b)
    return regex is not None and regex.search(a) is not None


_BINARY: Final[dict[str, Callable[[object, object], bool]]] = {
    "eq": _equal,
    "ne": _op_ne,
    "lt": _op_lt,
    "gt": _op_gt,
    "in": _op_in,
    "contains": _op_contains,
    "matches": _op_matches,
}


# --- conditions ---------------------------------------------------------------------


class _Compare:
    """A binary condition: ``field <operator> value`` (or ``value_from``)."""

    __slots__ = ("_field", "_operand", "_test")

    def __init__(self, field: _Getter, test: Callable[[object, object], bool], operand: _Getter) -> None:
        self._field = field
        self._test = test
        self._operand = operand

    def holds(self, request: _Request) -> bool:
        actual = self._field(request)
        expected = self._operand(request)
        if actual is _MISSING or expected is _MISSING:
            return False
        return self._test(actual, expected)


class _Exists:
    """``exists``: true when the field's presence is what the condition asks for."""

    __slots__ = ("_field", "_present")

    def __init__(self, field: _Getter, present: bool) -> None:
        self._field = field
        self._present = present

    def holds(self, request: _Request) -> bool:
        return (self._field(request) is not _MISSING) is self._present


def _constant(value: object, _request: _Request) -> object:
    return value


def _getter(text: str | None) -> _Getter:
    ref = parse_field(text)
    assert ref is not None  # checked by Condition.problems()
    return _field_getter(ref)


def _compile_condition(condition: Condition) -> _Compare | _Exists:
    """Build a condition whose :meth:`Condition.problems` are none."""
    field = _getter(condition.field)
    if condition.operator == "exists":
        return _Exists(field, condition.must_exist)
    if condition.value_from is not None:
        operand = _getter(condition.value_from)
    else:
        operand = functools.partial(_constant, None if condition.value is NO_VALUE else condition.value)
    return _Compare(field, _BINARY[condition.operator], operand)


# --- patterns and policies ----------------------------------------------------------


class _Patterns:
    """A compiled ``actions`` or ``resources`` list: exact strings and ``*`` prefixes."""

    __slots__ = ("_exact", "_prefixes")

    def __init__(self, patterns: Iterable[str]) -> None:
        patterns = tuple(patterns)
        self._exact = frozenset(p for p in patterns if not p.endswith("*"))
        # "*" becomes the empty prefix, which every string starts with.
        self._prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))

    def matches(self, value: str) -> bool:
        return value in self._exact or value.startswith(self._prefixes)


def _patterns_problems(what: str, patterns: Iterable[object]) -> list[str]:
    items = tuple(patterns)
    if not items:
        return [f"{what} is empty: the policy would never apply"]
    return [f"{what} entry {p!r} is not a non-empty string" for p in items if not isinstance(p, str) or not p]


class _Policy:
    """A :class:`PolicySpec` compiled for evaluation."""

    __slots__ = ("_actions", "_conditions", "_resources", "deny", "spec")

    def __init__(self, spec: PolicySpec) -> None:
        self.spec = spec
        self.deny = spec.effect == "deny"
        self._actions = _Patterns(spec.actions)
        self._resources = _Patterns(spec.resources)
        self._conditions = tuple(_compile_condition(c) for c in spec.conditions)

    def applies(self, request: _Request) -> bool:
        if not (self._actions.matches(request.action) and self._resources.matches(request.resource)):
            return False
        # Most policies have no conditions: skip building a generator for them.
        return not self._conditions or all(condition.holds(request) for condition in self._conditions)


def _policy_problems(spec: PolicySpec) -> list[Problem]:
    """Every configuration problem of one policy, located like the loader locates them."""
    found = [("policy.actions", p) for p in _patterns_problems("actions", spec.actions)]
    found += [("policy.resources", p) for p in _patterns_problems("resources", spec.resources)]
    if spec.effect not in ("allow", "deny"):
        found.append(("policy.effect", f"effect {spec.effect!r} is not 'allow' or 'deny'"))
    for index, item in enumerate(spec.conditions):
        condition: object = item  # a spec built in Python may hold anything
        if not isinstance(condition, Condition):
            found.append(
                (f"policy.conditions[{index}]", f"expected a Condition, got {type(condition).__name__}")
            )
            continue
        found += [(f"policy.conditions[{index}].{key}", message) for key, message in condition.problems()]
    origin = spec.origin
    entry = origin.entry or spec.id
    return [Problem(origin.file, entry, field, message, origin.line) for field, message in found]


def _compile(spec: PolicySpec) -> _Policy:
    """Compile one policy; INVALID listing every problem if it is malformed."""
    problems = _policy_problems(spec)
    if problems:
        raise problems_error("invalid security policy", problems)
    return _Policy(spec)


Scope = tuple[_Policy, ...]
"""A compiled scope, deny policies first (see :func:`_permits`)."""


def _permits(scope: Scope, request: _Request) -> bool:
    # Denies come first in a scope, so the first policy that applies decides: a deny
    # is seen before any allow could be.
    for policy in scope:
        if policy.applies(request):
            return not policy.deny
    return False


def _permits_any(scope: Scope, requests: tuple[_Request, ...]) -> bool:
    """:func:`_permits` for one resource known by several names (a queue's aliases):
    a policy applies when it applies to any of them."""
    for policy in scope:
        if any(policy.applies(request) for request in requests):
            return not policy.deny
    return False


def _denied(
    ctx: SecurityContext | None, action: str, resource: str, aliases: tuple[str, ...] = ()
) -> errors.Error:
    actor = ctx.actor.id if ctx is not None else None
    target = f" on {resource}" if resource else ""
    others = [name for name in aliases if name != resource]
    if others:
        target += f" (the same queue as {', '.join(others)})"
    if ctx is None:
        message = f"permission denied: no security context may {action}{target} (security is strict)"
    else:
        message = f"permission denied: actor {actor!r} may not {action}{target}"
    details = {"action": action, "resource": resource, "actor": actor}
    return errors.Error(errors.PERMISSION_DENIED, message, retryable=False, details=details)


def queue_aliases(queues: Mapping[str, QueueSpec]) -> dict[str, tuple[str, ...]]:
    """Queue ID -> every ID of its physical queue (same driver and ``queue_name``), in
    declaration order; only for queues that have more than one ID."""
    groups: dict[tuple[str, str], list[str]] = {}
    for queue in queues.values():
        groups.setdefault((queue.driver, queue.queue_name), []).append(queue.id)
    return {qid: tuple(ids) for ids in groups.values() if len(ids) > 1 for qid in ids}


def check_request(action: object, resource: object, meta: object) -> None:
    """INVALID unless ``action`` is a non-empty string, ``resource`` a string, ``meta`` a mapping."""
    if not isinstance(action, str) or not action:
        raise errors.invalid(f"action must be a non-empty string, not {action!r}")
    if not isinstance(resource, str):
        raise errors.invalid(f"resource must be a string, not {resource!r}")
    if meta is not None and not isinstance(meta, Mapping):
        raise errors.invalid(f"meta must be a mapping, not {type(meta).__name__}")


# --- the engine ---------------------------------------------------------------------


class PolicyEngine:
    """Evaluates security contexts against one app's policies.

    Built once per app from its ``security.policy`` entries (``policies`` maps policy
    ID to spec) and its ``strict`` flag; immutable afterwards. Raises INVALID, listing
    every malformed policy, if any policy cannot be compiled.
    """

    __slots__ = ("__weakref__", "_aliases", "_compiled", "_groups", "_specs", "_strict")

    def __init__(
        self,
        policies: Mapping[str, PolicySpec],
        strict: bool = False,
        *,
        aliases: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self._specs = dict(policies)
        self._strict = strict
        # resource -> every name of it, itself included (see queue_aliases)
        self._aliases = {name: _with(name, names) for name, names in (aliases or {}).items()}
        problems = [p for spec in self._specs.values() for p in _policy_problems(spec)]
        if problems:
            raise problems_error("invalid security policies", problems)
        self._compiled = {pid: _Policy(spec) for pid, spec in self._specs.items()}
        self._groups = _index_groups(self._specs)

    @property
    def strict(self) -> bool:
        """True when requests without a security context are denied."""
        return self._strict

    def resolve_scope(self, policies: Iterable[str], groups: Iterable[str]) -> tuple[PolicySpec, ...]:
        """The named policies, then every member of the named groups, each once.

        Order is deterministic: named policies as given, then each group's members in
        declaration order. Raises NOT_FOUND naming every unknown policy ID and group.
        """
        policy_ids, group_names = as_names(policies, "policies"), as_names(groups, "groups")
        missing = [p for p in policy_ids if p not in self._specs]
        unknown = [g for g in group_names if g not in self._groups]
        if missing or unknown:
            raise _not_found(missing, unknown)
        ordered = dict.fromkeys(chain(policy_ids, *(self._groups[g] for g in group_names)))
        return tuple(self._specs[pid] for pid in ordered)

    def compile_scope(self, ctx: SecurityContext) -> Scope:
        """The compiled scope of ``ctx`` (uncached: use ``ctx.scope_for(engine)``).

        Pre-resolved policies come first and win over a same-ID policy of the engine.
        """
        unique: dict[str, PolicySpec] = {}
        for spec in chain(ctx.resolved, self.resolve_scope(ctx.policies, ctx.groups)):
            unique.setdefault(spec.id, spec)
        compiled = [self._compiled_for(spec) for spec in unique.values()]
        compiled.sort(key=lambda policy: not policy.deny)  # stable: denies first
        return tuple(compiled)

    def _compiled_for(self, spec: PolicySpec) -> _Policy:
        known = self._compiled.get(spec.id)
        return known if known is not None and known.spec is spec else _compile(spec)

    def is_allowed(
        self,
        ctx: SecurityContext | None,
        action: str,
        resource: str = "",
        meta: Mapping[str, Any] | None = None,
    ) -> bool:
        """Whether ``ctx`` may perform ``action`` on ``resource``; ``not strict`` without a context.

        ``meta`` is the request metadata that ``meta.X`` conditions read. Raises INVALID
        for a malformed action or resource and NOT_FOUND for an unresolvable scope.
        """
        check_request(action, resource, meta)
        if ctx is None:
            return not self._strict
        return self._decide(ctx.scope_for(self), ctx.actor, action, resource, meta)

    def _decide(
        self, scope: Scope, actor: Actor, action: str, resource: str, meta: Mapping[str, Any] | None
    ) -> bool:
        names = self._aliases.get(resource)
        if names is None:
            return _permits(scope, _Request(action, resource, actor, meta))
        return _permits_any(scope, tuple(_Request(action, name, actor, meta) for name in names))

    def check(
        self,
        ctx: SecurityContext | None,
        action: str,
        resource: str = "",
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Like :meth:`is_allowed`, but raise PERMISSION_DENIED (not retryable) when denied.

        The error's ``details`` are ``{"action", "resource", "actor"}`` (actor ID or None).
        """
        if not self.is_allowed(ctx, action, resource, meta):
            raise _denied(ctx, action, resource)

    def check_publish(
        self, ctx: SecurityContext | None, queue_id: str, meta: Mapping[str, Any] | None = None
    ) -> None:
        """Raise PERMISSION_DENIED unless ``ctx`` may publish to ``queue_id``.

        Both ``queue.publish`` (no resource) and ``queue.publish.queue`` on the queue
        ID must be allowed, checked in that order. ``queue_id`` must already be
        validated: it is matched verbatim.
        """
        if ctx is None and not self._strict:
            return  # the hot path of apps that use no security: one test, no work
        if ctx is None:
            raise _denied(None, PUBLISH, "")
        scope = ctx.scope_for(self)
        if not _permits(scope, _Request(PUBLISH, "", ctx.actor, meta)):
            raise _denied(ctx, PUBLISH, "")
        if not self._decide(scope, ctx.actor, PUBLISH_QUEUE, queue_id, meta):
            raise _denied(ctx, PUBLISH_QUEUE, queue_id, self._aliases.get(queue_id, ()))


def _with(name: str, names: Iterable[str]) -> tuple[str, ...]:
    """``names`` as a tuple that holds ``name``, each once; INVALID for a non-string."""
    found = tuple(dict.fromkeys((name, *names)))
    bad = [n for n in found if not isinstance(n, str) or not n]
    if bad:
        raise errors.invalid(f"queue aliases must be non-empty strings, not {bad[0]!r}")
    return found


def _index_groups(specs: Mapping[str, PolicySpec]) -> dict[str, tuple[str, ...]]:
    """Group name -> member policy IDs, in declaration order."""
    groups: dict[str, list[str]] = {}
    for pid, spec in specs.items():
        for group in spec.groups:
            groups.setdefault(group, []).append(pid)
    return {name: tuple(members) for name, members in groups.items()}


def _not_found(policies: list[str], groups: list[str]) -> errors.Error:
    parts = [f"unknown security policy {p!r}" for p in policies]
    parts += [f"unknown policy group {g!r}" for g in groups]
    return errors.not_found("; ".join(parts), policies=policies, groups=groups)
