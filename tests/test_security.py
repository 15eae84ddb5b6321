"""Tests for conveyor.security: patterns, evaluation, conditions, scopes and contexts."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from conveyor import errors, security
from conveyor.queue import context as qctx
from conveyor.queue.runtime import Runtime
from conveyor.registry.conditions import NO_VALUE, Condition
from conveyor.registry.ids import canonical_id
from conveyor.registry.model import PolicySpec, SecurityBlock
from conveyor.registry.problems import Origin
from conveyor.security import Actor, PolicyEngine, SecurityContext
from conveyor.security.context import activate, current

# --- helpers --------------------------------------------------------------------------


def pol(
    pid: str,
    actions: str | tuple[str, ...] = "*",
    resources: str | tuple[str, ...] = "*",
    effect: str = "allow",
    *,
    conditions: tuple[Condition, ...] = (),
    groups: tuple[str, ...] = (),
) -> PolicySpec:
    """A policy spec; single patterns may be given as plain strings."""
    return PolicySpec(pid, _patterns(actions), _patterns(resources), effect, conditions, groups)


def _patterns(value: str | tuple[str, ...]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else value


def engine_of(*specs: PolicySpec, strict: bool = False) -> PolicyEngine:
    return PolicyEngine({spec.id: spec for spec in specs}, strict)


def ctx_of(*specs: PolicySpec, actor: Actor | str = "svc-a") -> SecurityContext:
    return SecurityContext(actor, [spec.id for spec in specs])


def allowed(spec: PolicySpec, action: str = "act", resource: str = "", **meta: Any) -> bool:
    """Evaluate one request against an engine and a scope holding only ``spec``."""
    return engine_of(spec).is_allowed(ctx_of(spec), action, resource, meta)


def cond(field: str, operator: str, value: Any = None, value_from: str | None = None) -> Condition:
    """A condition; ``value=None`` means none written (use ``Condition`` for a null value)."""
    return Condition(field, operator, NO_VALUE if value is None else value, value_from)


@contextlib.contextmanager
def current_engine(engine: PolicyEngine) -> Iterator[None]:
    """Make a running app runtime judged by ``engine`` current in this thread."""
    loop = asyncio.new_event_loop()
    runtime = Runtime(engine)
    runtime.attach(loop, {})
    token = qctx.entered.set(runtime)
    try:
        yield
    finally:
        qctx.entered.reset(token)
        runtime.detach()
        loop.close()


# --- public surface -----------------------------------------------------------------


def test_all_is_sorted_and_complete() -> None:
    expected = {
        "Actor",
        "PolicyEngine",
        "SecurityContext",
        "acontext",
        "context",
        "context_from_block",
        "current",
        "is_allowed",
    }
    assert set(security.__all__) == expected
    assert list(security.__all__) == sorted(security.__all__)
    for name in security.__all__:
        assert getattr(security, name) is not None


def test_security_context_attribute_is_the_context_manager() -> None:
    with security.context("svc-a") as ctx:
        assert security.current() is ctx


# --- patterns -----------------------------------------------------------------------

PATTERN_CASES = [
    ("*", "app:tasks", True),
    ("*", "", True),
    ("app:tasks", "app:tasks", True),
    ("app:tasks", "app:tasks2", False),
    ("app:tasks", "app:task", False),
    ("app:*", "app:tasks", True),
    ("app:*", "app:", True),
    ("app:*", "apps:tasks", False),
    ("app:*", "other:app:tasks", False),
    ("app:*", "", False),
    ("app.queue:*", "app.queue:x", True),
    ("app.queue:*", "app:x", False),
    ("queue.*", "queue.publish", True),
    ("queue.*", "queue.publish.queue", True),
    ("queue.*", "queue", False),
    ("queue.*", "queues.x", False),
    ("queue*", "queue", True),
    ("queue*", "queues", True),
    # A "*" that is not last is a literal character, not a wildcard.
    ("app:*tasks", "app:xtasks", False),
    ("app:*tasks", "app:*tasks", True),
]


@pytest.mark.parametrize(("pattern", "value", "expected"), PATTERN_CASES)
def test_resource_patterns(pattern: str, value: str, expected: bool) -> None:
    assert allowed(pol("app:p", "act", pattern), "act", value) is expected


@pytest.mark.parametrize(("pattern", "value", "expected"), [c for c in PATTERN_CASES if c[1]])
def test_action_patterns(pattern: str, value: str, expected: bool) -> None:
    assert allowed(pol("app:p", pattern, "*"), value, "r") is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("app:tasks", True), ("ops:alpha", True), ("ops:", True), ("app:other", False), ("x:tasks", False)],
)
def test_pattern_lists_match_if_any_entry_matches(value: str, expected: bool) -> None:
    spec = pol("app:p", "act", ("app:tasks", "ops:*"))
    assert allowed(spec, "act", value) is expected


@pytest.mark.parametrize(
    "spelling",
    [
        "App:secret",
        "APP:SECRET",
        "app:Secret",
        "app:secret ",
        " app:secret",
        "app:secret\n",
        "app:secre",
        "app:\u017fecret",
    ],
)
def test_matching_is_exact_and_never_normalised(spelling: str) -> None:
    spec = pol("app:p", "queue.publish.queue", "app:secret")
    assert allowed(spec, "queue.publish.queue", "app:secret") is True
    assert allowed(spec, "queue.publish.queue", spelling) is False


def test_deny_matches_only_the_exact_id_it_names() -> None:
    engine = engine_of(pol("app:all", "*", "app:*"), pol("app:no", "*", "app:secret", "deny"))
    ctx = SecurityContext("svc-a", ["app:all", "app:no"])
    assert engine.is_allowed(ctx, "queue.publish.queue", "app:secret") is False
    assert engine.is_allowed(ctx, "queue.publish.queue", "app:tasks") is True
    # A different case is a different (valid) ID, and not under the "app:*" allow either.
    assert engine.is_allowed(ctx, "queue.publish.queue", "App:secret") is False
    # The engine never trims: "app:secret " is not "app:secret" (so the deny does not
    # apply and the prefix allow does). Such spellings are stopped before the check,
    # by ID validation, as the next test pins.
    assert engine.is_allowed(ctx, "queue.publish.queue", "app:secret ") is True


@pytest.mark.parametrize("spelling", ["app:secret ", " app:secret", "app:secret\n", "app: secret"])
def test_odd_spellings_never_reach_the_engine(spelling: str) -> None:
    with pytest.raises(errors.Error) as info:
        canonical_id(spelling)
    assert info.value.kind == errors.INVALID


# --- evaluation ---------------------------------------------------------------------


@pytest.mark.parametrize("order", [("app:allow", "app:deny"), ("app:deny", "app:allow")])
def test_deny_overrides_allow_in_any_order(order: tuple[str, str]) -> None:
    engine = engine_of(pol("app:allow"), pol("app:deny", "queue.publish.queue", "app:secret", "deny"))
    ctx = SecurityContext("svc-a", order)
    assert engine.is_allowed(ctx, "queue.publish.queue", "app:secret") is False
    assert engine.is_allowed(ctx, "queue.publish.queue", "app:tasks") is True
    assert engine.is_allowed(ctx, "queue.publish") is True


def test_default_deny_with_a_context_and_no_applicable_policy() -> None:
    engine = engine_of(pol("app:p", "queue.info", "*"))
    ctx = SecurityContext("svc-a", ["app:p"])
    assert engine.is_allowed(ctx, "queue.info", "app:x") is True
    assert engine.is_allowed(ctx, "queue.publish", "") is False


def test_empty_scope_denies_everything() -> None:
    engine = engine_of(pol("app:p"))
    assert engine.is_allowed(SecurityContext("svc-a"), "queue.publish") is False


def test_policies_outside_the_scope_do_not_count() -> None:
    engine = engine_of(pol("app:p"), pol("app:q", effect="deny"))
    assert engine.is_allowed(SecurityContext("svc-a", ["app:p"]), "x") is True
    assert engine.is_allowed(SecurityContext("svc-a", ["app:q"]), "x") is False


def test_deny_only_applies_when_its_conditions_hold() -> None:
    deny = pol("app:deny", conditions=(cond("actor.meta.role", "ne", "admin"),), effect="deny")
    engine = engine_of(pol("app:allow"), deny)
    user = SecurityContext(Actor("u", {"role": "user"}), ["app:allow", "app:deny"])
    admin = SecurityContext(Actor("a", {"role": "admin"}), ["app:allow", "app:deny"])
    assert engine.is_allowed(user, "x") is False
    assert engine.is_allowed(admin, "x") is True


def test_no_context_is_allowed_unless_strict() -> None:
    assert engine_of(pol("app:p", effect="deny")).is_allowed(None, "queue.publish") is True
    strict = engine_of(pol("app:p"), strict=True)
    assert strict.strict is True
    assert strict.is_allowed(None, "queue.publish") is False


def test_check_without_context_in_strict_mode_raises() -> None:
    with pytest.raises(errors.Error) as info:
        engine_of(strict=True).check(None, "queue.info", "app:x")
    assert info.value.kind == errors.PERMISSION_DENIED
    assert info.value.details == {"action": "queue.info", "resource": "app:x", "actor": None}


def test_check_error_carries_kind_retryable_and_details() -> None:
    engine = engine_of(pol("app:p", "queue.publish", "*"))
    ctx = SecurityContext("svc-a", ["app:p"])
    engine.check(ctx, "queue.publish")  # allowed: no raise
    with pytest.raises(errors.Error) as info:
        engine.check(ctx, "queue.publish.queue", "app:tasks")
    err = info.value
    assert err.kind == errors.PERMISSION_DENIED
    assert err.retryable is False
    assert err.message == "permission denied: actor 'svc-a' may not queue.publish.queue on app:tasks"
    assert err.details == {"action": "queue.publish.queue", "resource": "app:tasks", "actor": "svc-a"}


def test_check_message_without_resource() -> None:
    with pytest.raises(errors.Error) as info:
        engine_of().check(SecurityContext("svc-b"), "queue.publish")
    assert info.value.message == "permission denied: actor 'svc-b' may not queue.publish"


@pytest.mark.parametrize(
    ("action", "resource", "meta"),
    [("", "", None), (None, "", None), ("x", None, None), ("x", 5, None), ("x", "", ["not", "a", "map"])],
)
def test_malformed_requests_are_invalid(action: Any, resource: Any, meta: Any) -> None:
    engine = engine_of(pol("app:p"))
    with pytest.raises(errors.Error) as info:
        engine.is_allowed(SecurityContext("a", ["app:p"]), action, resource, meta)
    assert info.value.kind == errors.INVALID


# --- publishing ---------------------------------------------------------------------


def _publish_denied(engine: PolicyEngine, ctx: SecurityContext | None, queue_id: str) -> errors.Error | None:
    try:
        engine.check_publish(ctx, queue_id)
    except errors.Error as err:
        return err
    return None


def test_publish_needs_both_permissions() -> None:
    both = engine_of(pol("app:pub", "queue.publish", "*"), pol("app:q", "queue.publish.queue", "app:tasks"))
    ctx = SecurityContext("svc-a", ["app:pub", "app:q"])
    assert _publish_denied(both, ctx, "app:tasks") is None
    err = _publish_denied(both, ctx, "app:other")
    assert err is not None
    assert err.details == {"action": "queue.publish.queue", "resource": "app:other", "actor": "svc-a"}


def test_publish_denied_with_only_queue_publish() -> None:
    engine = engine_of(pol("app:pub", "queue.publish", "*"))
    err = _publish_denied(engine, SecurityContext("svc-a", ["app:pub"]), "app:tasks")
    assert err is not None
    assert err.kind == errors.PERMISSION_DENIED
    assert err.details["action"] == "queue.publish.queue"
    assert err.details["resource"] == "app:tasks"


def test_publish_denied_with_only_queue_publish_queue() -> None:
    engine = engine_of(pol("app:q", "queue.publish.queue", "*"))
    err = _publish_denied(engine, SecurityContext("svc-a", ["app:q"]), "app:tasks")
    assert err is not None
    assert err.details == {"action": "queue.publish", "resource": "", "actor": "svc-a"}


def test_publish_with_queue_prefix_policy() -> None:
    engine = engine_of(pol("app:p", "queue.*", "*"))
    assert _publish_denied(engine, SecurityContext("a", ["app:p"]), "app:tasks") is None


def test_resource_limited_policy_does_not_grant_resourceless_publish() -> None:
    # "queue.publish" is checked with resource "", which "app:*" does not match.
    engine = engine_of(pol("app:p", "queue.*", "app:*"))
    err = _publish_denied(engine, SecurityContext("a", ["app:p"]), "app:tasks")
    assert err is not None
    assert err.details["action"] == "queue.publish"


def test_publish_deny_on_one_queue() -> None:
    engine = engine_of(
        pol("app:all", "queue.*", "*"), pol("app:no", "queue.publish.queue", "app:secret", "deny")
    )
    ctx = SecurityContext("a", ["app:all", "app:no"])
    assert _publish_denied(engine, ctx, "app:tasks") is None
    assert _publish_denied(engine, ctx, "app:secret") is not None


def test_publish_without_context() -> None:
    assert _publish_denied(engine_of(pol("app:p", effect="deny")), None, "app:tasks") is None
    err = _publish_denied(engine_of(strict=True), None, "app:tasks")
    assert err is not None
    assert err.details == {"action": "queue.publish", "resource": "", "actor": None}


def test_publish_conditions_see_meta() -> None:
    spec = pol("app:p", "queue.*", "*", conditions=(cond("meta.tenant", "eq", "acme"),))
    engine, ctx = engine_of(spec), ctx_of(spec)
    engine.check_publish(ctx, "app:tasks", {"tenant": "acme"})
    with pytest.raises(errors.Error):
        engine.check_publish(ctx, "app:tasks", {"tenant": "other"})


# --- conditions: operators ------------------------------------------------------------

OPERATOR_CASES: list[tuple[str, Any, Any, bool]] = [
    ("eq", 5, 5, True),
    ("eq", 5, 5.0, True),
    ("eq", 5.5, 5.5, True),
    ("eq", 5, 6, False),
    ("eq", "5", 5, False),
    ("eq", "abc", "abc", True),
    ("eq", "abc", "ABC", False),
    ("eq", True, True, True),
    ("eq", True, 1, False),
    ("eq", 1, True, False),
    ("eq", False, 0, False),
    ("eq", 0.0, False, False),
    ("eq", [1, 2], [1, 2], True),
    ("eq", [True], [1], False),
    ("eq", {"a": 1}, {"a": 1}, True),
    ("eq", {"a": True}, {"a": 1}, False),
    ("ne", 5, 6, True),
    ("ne", 5, 5, False),
    ("ne", 5, 5.0, False),
    ("ne", True, 1, True),
    ("ne", "a", "b", True),
    ("lt", 1, 2, True),
    ("lt", 2, 1, False),
    ("lt", 2, 2, False),
    ("lt", 1, 2.5, True),
    ("lt", -1.5, 0, True),
    ("lt", "a", "b", True),
    ("lt", "b", "a", False),
    ("lt", 1, "2", False),
    ("lt", "1", 2, False),
    ("lt", True, 2, False),
    ("lt", [1], 2, False),
    ("lt", float("nan"), 1, False),
    ("gt", 3, 2, True),
    ("gt", 2, 3, False),
    ("gt", 2, 2, False),
    ("gt", 2.5, 2, True),
    ("gt", "b", "a", True),
    ("gt", "a", "b", False),
    ("gt", 3, "2", False),
    ("gt", True, 0, False),
    ("in", "b", ["a", "b"], True),
    ("in", "c", ["a", "b"], False),
    ("in", 1, [1.0, 2.0], True),
    ("in", True, [1, 2], False),
    ("in", 1, [True], False),
    ("in", "a", [], False),
    ("in", [1], [[1], [2]], True),
    ("contains", "hello world", "world", True),
    ("contains", "hello world", "World", False),
    ("contains", ["a", "b"], "a", True),
    ("contains", ["a", "b"], "c", False),
    ("contains", [1, 2], 2.0, True),
    ("contains", [1, 2], True, False),
    ("contains", "123", 1, False),
    ("contains", 5, 5, False),
    ("contains", {"a": 1}, "a", False),
    ("matches", "user-42", r"^user-\d+$", True),
    ("matches", "admin", r"^user-\d+$", False),
    ("matches", "xx-user-1", r"user-\d", True),  # search, not a full match
    ("matches", "USER-1", r"user-\d", False),
    ("matches", 42, "4", False),
    ("matches", ["user-1"], "user", False),
]

# Values a static condition may not hold (rejected when the engine is built) but a
# value_from field can produce at run time.
RUNTIME_ONLY_CASES: list[tuple[str, Any, Any, bool]] = [
    ("lt", 0, True, False),
    ("gt", 2, True, False),
    ("lt", 1, [2], False),
    ("in", "a", "abc", False),
    ("in", 1, 1, False),
    ("matches", "abc", 5, False),
    ("matches", "abc", "(", False),
]


@pytest.mark.parametrize(("operator", "actual", "value", "expected"), OPERATOR_CASES)
def test_operators(operator: str, actual: Any, value: Any, expected: bool) -> None:
    spec = pol("app:p", conditions=(Condition("meta.x", operator, value),))
    assert allowed(spec, x=actual) is expected


@pytest.mark.parametrize(("operator", "actual", "value", "expected"), OPERATOR_CASES + RUNTIME_ONLY_CASES)
def test_operators_with_value_from(operator: str, actual: Any, value: Any, expected: bool) -> None:
    spec = pol("app:p", conditions=(cond("meta.x", operator, value_from="actor.meta.y"),))
    engine = engine_of(spec)
    ctx = SecurityContext(Actor("a", {"y": value}), ["app:p"])
    assert engine.is_allowed(ctx, "act", "", {"x": actual}) is expected


@pytest.mark.parametrize(
    ("value", "present", "expected"),
    [
        (None, True, True),
        (None, False, False),
        (True, True, True),
        (True, False, False),
        (False, True, False),
        (False, False, True),
    ],
)
def test_exists(value: bool | None, present: bool, expected: bool) -> None:
    spec = pol("app:p", conditions=(cond("meta.x", "exists", value),))
    meta = {"x": "anything"} if present else {"other": 1}
    assert allowed(spec, **meta) is expected


def test_exists_counts_a_none_value_as_present() -> None:
    spec = pol("app:p", conditions=(cond("meta.x", "exists"),))
    assert allowed(spec, x=None) is True


@pytest.mark.parametrize("operator", ["eq", "ne", "lt", "gt", "in", "contains", "matches"])
def test_missing_field_makes_every_operator_false(operator: str) -> None:
    value = {"in": ["a"], "matches": "a", "lt": 1, "gt": 1}.get(operator, "a")
    spec = pol("app:p", conditions=(cond("meta.x", operator, value),))
    assert allowed(spec, y="a") is False


@pytest.mark.parametrize("operator", ["eq", "ne", "lt", "gt", "in", "contains", "matches"])
def test_missing_value_from_field_makes_every_operator_false(operator: str) -> None:
    spec = pol("app:p", conditions=(cond("meta.x", operator, value_from="meta.nope"),))
    assert allowed(spec, x="a") is False


class _Weird:
    """A value whose comparisons all explode."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("boom")

    def __lt__(self, other: object) -> bool:
        raise RuntimeError("boom")

    __hash__ = object.__hash__


WEIRD_VALUES: list[Any] = [
    None,
    object(),
    _Weird(),
    b"bytes",
    float("nan"),
    {"nested": {"a": 1}},
    [{"a": 1}, None],
    ("tuple",),
    {1, 2},
    "",
    0,
    True,
]


@pytest.mark.parametrize("operator", ["eq", "ne", "lt", "gt", "in", "contains", "matches"])
@pytest.mark.parametrize("weird", WEIRD_VALUES, ids=lambda v: type(v).__name__)
def test_type_mismatches_never_raise(operator: str, weird: Any) -> None:
    both_ways = (
        cond("meta.x", operator, value_from="meta.w"),
        cond("meta.w", operator, value_from="meta.x"),
    )
    for condition in both_ways:
        spec = pol("app:p", conditions=(condition,))
        for plain in ("text", 3, 2.5, ["a"], {"k": "v"}):
            assert allowed(spec, x=plain, w=weird) in (True, False)


def test_weird_eq_is_false_not_an_error() -> None:
    spec = pol("app:p", conditions=(cond("meta.x", "eq", value_from="meta.w"),))
    assert allowed(spec, x="a", w=_Weird()) is False


def test_invalid_regex_from_value_from_is_false() -> None:
    spec = pol("app:p", conditions=(cond("meta.x", "matches", value_from="meta.re"),))
    assert allowed(spec, x="abc", re="(unclosed") is False
    assert allowed(spec, x="abc", re="^a") is True


def test_in_with_non_list_from_value_from_is_false() -> None:
    spec = pol("app:p", conditions=(cond("meta.x", "in", value_from="meta.v"),))
    assert allowed(spec, x="a", v="abc") is False
    assert allowed(spec, x="a", v=["a"]) is True


# --- conditions: fields -------------------------------------------------------------


def test_field_actor_id() -> None:
    spec = pol("app:p", conditions=(cond("actor.id", "eq", "svc-a"),))
    engine = engine_of(spec)
    assert engine.is_allowed(ctx_of(spec, actor="svc-a"), "x") is True
    assert engine.is_allowed(ctx_of(spec, actor="svc-b"), "x") is False


def test_fields_action_and_resource() -> None:
    spec = pol(
        "app:p",
        conditions=(cond("action", "matches", r"^queue\."), cond("resource", "ne", "app:secret")),
    )
    engine, ctx = engine_of(spec), ctx_of(spec)
    assert engine.is_allowed(ctx, "queue.publish.queue", "app:tasks") is True
    assert engine.is_allowed(ctx, "queue.publish.queue", "app:secret") is False
    assert engine.is_allowed(ctx, "other", "app:tasks") is False


def test_field_resource_exists_even_when_empty() -> None:
    spec = pol("app:p", conditions=(cond("resource", "exists"),))
    assert allowed(spec, "act", "") is True


def test_nested_actor_meta_path() -> None:
    spec = pol("app:p", conditions=(cond("actor.meta.org.team", "eq", "core"),))
    engine = engine_of(spec)
    assert engine.is_allowed(ctx_of(spec, actor=Actor("a", {"org": {"team": "core"}})), "x") is True
    assert engine.is_allowed(ctx_of(spec, actor=Actor("a", {"org": {"team": "web"}})), "x") is False
    assert engine.is_allowed(ctx_of(spec, actor=Actor("a", {"org": "core"})), "x") is False
    # A literal dotted key is not a path.
    assert engine.is_allowed(ctx_of(spec, actor=Actor("a", {"org.team": "core"})), "x") is False


def test_nested_request_meta_path() -> None:
    spec = pol("app:p", conditions=(cond("meta.a.b.c", "gt", 1),))
    assert allowed(spec, a={"b": {"c": 2}}) is True
    assert allowed(spec, a={"b": {"c": 0}}) is False
    assert allowed(spec, a={"b": [2]}) is False


def test_no_request_meta_means_meta_fields_are_missing() -> None:
    spec = pol("app:p", conditions=(cond("meta.x", "exists", False),))
    engine, ctx = engine_of(spec), ctx_of(spec)
    assert engine.is_allowed(ctx, "x", "", None) is True


def test_value_from_compares_actor_with_request() -> None:
    spec = pol("app:p", conditions=(cond("actor.meta.tenant", "eq", value_from="meta.tenant"),))
    engine = engine_of(spec)
    ctx = ctx_of(spec, actor=Actor("a", {"tenant": "acme"}))
    assert engine.is_allowed(ctx, "x", "", {"tenant": "acme"}) is True
    assert engine.is_allowed(ctx, "x", "", {"tenant": "other"}) is False


def test_value_from_actor_id_and_resource() -> None:
    spec = pol("app:p", conditions=(cond("resource", "eq", value_from="actor.id"),))
    engine, ctx = engine_of(spec), ctx_of(spec, actor="app:mine")
    assert engine.is_allowed(ctx, "x", "app:mine") is True
    assert engine.is_allowed(ctx, "x", "app:yours") is False


def test_all_conditions_must_hold() -> None:
    spec = pol("app:p", conditions=(cond("meta.a", "eq", 1), cond("meta.b", "eq", 2)))
    assert allowed(spec, a=1, b=2) is True
    assert allowed(spec, a=1, b=3) is False
    assert allowed(spec, a=0, b=2) is False


# --- configuration problems ---------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (pol("app:p", conditions=(cond("meta.x", "like", "a"),)), "operator: must be one of eq"),
        (pol("app:p", conditions=(cond("user.id", "eq", "a"),)), "field 'user.id'"),
        (pol("app:p", conditions=(cond("meta.", "eq", "a"),)), "field 'meta.'"),
        (pol("app:p", conditions=(cond("actor.meta", "eq", "a"),)), "field 'actor.meta'"),
        (pol("app:p", conditions=(cond("meta.x", "in", "abc"),)), "'in' needs a list"),
        (pol("app:p", conditions=(cond("meta.x", "lt", [1]),)), "'lt' needs a number or string"),
        (pol("app:p", conditions=(cond("meta.x", "gt", True),)), "'gt' needs a number or string"),
        (pol("app:p", conditions=(cond("meta.x", "matches", "(unclosed"),)), "regular expression"),
        (pol("app:p", conditions=(cond("meta.x", "exists", "yes"),)), "exists takes true, false or no value"),
        (pol("app:p", conditions=(cond("meta.x", "exists", value_from="meta.y"),)), "no value_from"),
        (pol("app:p", conditions=(cond("meta.x", "eq", 1, value_from="meta.y"),)), "give exactly one of"),
        (pol("app:p", conditions=(cond("meta.x", "eq", value_from="nope"),)), "value_from 'nope'"),
        (pol("app:p", conditions=(Condition("meta.x", "eq"),)), "give exactly one of value and value_from"),
        (pol("app:p", effect="permit"), "effect 'permit'"),
        (pol("app:p", actions=()), "actions is empty"),
        (pol("app:p", resources=("app:x", "")), "resources entry ''"),
    ],
)
def test_malformed_policies_are_invalid_at_construction(spec: PolicySpec, fragment: str) -> None:
    with pytest.raises(errors.Error) as info:
        engine_of(spec)
    assert info.value.kind == errors.INVALID
    assert fragment in info.value.message
    assert "app:p" in info.value.message


def test_every_policy_problem_is_reported_at_once() -> None:
    bad_a = PolicySpec("app:a", ("x",), ("*",), "maybe", origin=Origin("app.yaml", "app:a", 7))
    bad_b = pol("app:b", conditions=(cond("meta.x", "??", 1),))
    with pytest.raises(errors.Error) as info:
        engine_of(bad_a, pol("app:ok"), bad_b)
    problems = info.value.details["problems"]
    assert len(problems) == 2
    assert problems[0] == {
        "file": "app.yaml",
        "entry": "app:a",
        "field": "policy.effect",
        "message": "effect 'maybe' is not 'allow' or 'deny'",
        "line": 7,
    }
    assert (problems[1]["entry"], problems[1]["field"]) == ("app:b", "policy.conditions[0].operator")
    assert "app.yaml: entry app:a: field policy.effect: effect 'maybe'" in info.value.message


def test_eq_null_value_is_allowed() -> None:
    spec = pol("app:p", conditions=(Condition("meta.x", "eq", None),))
    assert allowed(spec, x=None) is True
    assert allowed(spec, x=0) is False


# --- scopes and groups ----------------------------------------------------------------


def _grouped_engine() -> PolicyEngine:
    return engine_of(
        pol("app:read", "queue.info", groups=("readers", "ops")),
        pol("app:publish", "queue.publish", groups=("writers", "ops")),
        pol("app:publish_q", "queue.publish.queue", "app:*", groups=("writers",)),
        pol("app:solo", "solo"),
    )


def test_group_brings_all_its_policies() -> None:
    engine = _grouped_engine()
    ctx = SecurityContext("svc", groups=["writers"])
    engine.check_publish(ctx, "app:tasks")
    assert engine.is_allowed(ctx, "queue.info") is False
    assert engine.is_allowed(ctx, "solo") is False


def test_scope_combines_policies_and_groups_deduplicated_in_order() -> None:
    engine = _grouped_engine()
    scope = engine.resolve_scope(["app:solo", "app:publish"], ["ops", "writers"])
    assert [spec.id for spec in scope] == ["app:solo", "app:publish", "app:read", "app:publish_q"]
    again = engine.resolve_scope(["app:solo", "app:publish"], ["ops", "writers"])
    assert again == scope


def test_unknown_policy_is_not_found() -> None:
    with pytest.raises(errors.Error) as info:
        _grouped_engine().resolve_scope(["app:read", "app:nope"], [])
    assert info.value.kind == errors.NOT_FOUND
    assert "app:nope" in info.value.message
    assert info.value.details == {"policies": ["app:nope"], "groups": []}


def test_unknown_group_is_not_found() -> None:
    with pytest.raises(errors.Error) as info:
        _grouped_engine().resolve_scope([], ["admins"])
    assert info.value.kind == errors.NOT_FOUND
    assert "'admins'" in info.value.message


def test_unknown_names_surface_when_a_context_is_evaluated() -> None:
    engine = _grouped_engine()
    ctx = SecurityContext("svc", ["app:typo"])
    for _ in range(2):  # failures are not cached as empty scopes
        with pytest.raises(errors.Error) as info:
            engine.is_allowed(ctx, "queue.info")
        assert info.value.kind == errors.NOT_FOUND


def test_a_bare_string_is_not_a_list_of_policies() -> None:
    with pytest.raises(errors.Error) as info:
        SecurityContext("svc", "app:read")
    assert info.value.kind == errors.INVALID
    with pytest.raises(errors.Error):
        _grouped_engine().resolve_scope([], "ops")


def test_scope_is_cached_per_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[PolicyEngine] = []
    original = PolicyEngine.compile_scope

    def counting(self: PolicyEngine, ctx: SecurityContext) -> Any:
        calls.append(self)
        return original(self, ctx)

    monkeypatch.setattr(PolicyEngine, "compile_scope", counting)
    first, second = _grouped_engine(), _grouped_engine()
    ctx = SecurityContext("svc", groups=["writers"])
    for _ in range(5):
        first.check_publish(ctx, "app:tasks")
    assert calls == [first]
    second.check_publish(ctx, "app:tasks")
    assert calls == [first, second]


def test_scope_cache_is_not_fooled_by_a_reused_engine_id() -> None:
    ctx = SecurityContext("svc", ["app:p"])
    allow = engine_of(pol("app:p"))
    assert allow.is_allowed(ctx, "x") is True
    deny = engine_of(pol("app:p", effect="deny"))
    # What CPython does when an engine is freed and the next one gets its id(): the
    # cache holds, under the new engine's id, a scope compiled for another engine.
    ctx._scopes[id(deny)] = ctx._scopes.pop(id(allow))
    assert deny.is_allowed(ctx, "x") is False


def test_scope_resolves_against_the_evaluating_engine() -> None:
    ctx = SecurityContext("svc", ["app:p"])
    assert engine_of(pol("app:p")).is_allowed(ctx, "x") is True
    assert engine_of(pol("app:p", effect="deny")).is_allowed(ctx, "x") is False


def test_pre_resolved_policies_join_the_scope() -> None:
    engine = engine_of(pol("app:p", "queue.publish"))
    extra = pol("app:extra", "queue.publish.queue", "app:tasks")
    ctx = SecurityContext("svc", ["app:p"], resolved=[extra])
    engine.check_publish(ctx, "app:tasks")
    with pytest.raises(errors.Error):
        engine.check_publish(ctx, "app:other")


def test_malformed_pre_resolved_policy_is_invalid_when_evaluated() -> None:
    ctx = SecurityContext("svc", resolved=[pol("app:bad", effect="nah")])
    with pytest.raises(errors.Error) as info:
        engine_of().is_allowed(ctx, "x")
    assert info.value.kind == errors.INVALID


# --- actors -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", None, 42, b"svc"])
def test_actor_id_must_be_a_non_empty_string(bad: Any) -> None:
    with pytest.raises(errors.Error) as info:
        Actor(bad)
    assert info.value.kind == errors.INVALID


def test_actor_meta_must_be_a_mapping() -> None:
    with pytest.raises(errors.Error):
        Actor("a", ["role", "admin"])  # type: ignore[arg-type]


def test_actor_meta_is_a_read_only_copy() -> None:
    meta = {"role": "user"}
    actor = Actor("a", meta)
    meta["role"] = "admin"
    assert actor.meta["role"] == "user"
    with pytest.raises(TypeError):
        actor.meta["role"] = "admin"  # type: ignore[index]
    assert Actor("a").meta == {}


def test_actor_is_hashable_and_compares_by_value() -> None:
    assert Actor("a", {"x": 1}) == Actor("a", {"x": 1})
    assert Actor("a", {"x": 1}) != Actor("a", {"x": 2})
    assert hash(Actor("a", {"x": 1})) == hash(Actor("a", {"x": 2}))


# --- contexts -----------------------------------------------------------------------


def test_context_sets_and_restores() -> None:
    assert current() is None
    with security.context("svc-a", ["app:p"], ["g"]) as ctx:
        assert security.current() is ctx
        assert ctx.actor == Actor("svc-a")
        assert ctx.policies == ("app:p",)
        assert ctx.groups == ("g",)
    assert security.current() is None


def test_contexts_nest_and_restore() -> None:
    with security.context(Actor("outer")) as outer:
        with security.context("inner") as inner:
            assert security.current() is inner
        assert security.current() is outer
    assert security.current() is None


def test_context_restored_when_the_body_raises() -> None:
    with pytest.raises(ZeroDivisionError), security.context("svc"):
        _ = 1 / 0
    assert security.current() is None


def test_context_accepts_a_ready_security_context() -> None:
    ready = SecurityContext("svc", ["app:p"])
    with security.context(ready) as ctx:
        assert ctx is ready
    with pytest.raises(errors.Error), security.context(ready, ["app:q"]):
        pass


def test_activate_sets_the_current_context() -> None:
    ctx = SecurityContext("svc")
    token = activate(ctx)
    try:
        assert current() is ctx
    finally:
        from conveyor.security.context import _current

        _current.reset(token)
    assert current() is None


def test_contexts_are_isolated_between_threads() -> None:
    barrier = threading.Barrier(2, timeout=5)
    seen: dict[str, Any] = {}

    def worker(name: str) -> None:
        seen[name + ":before"] = security.current()
        with security.context(name):
            barrier.wait()  # both threads are inside their own context now
            seen[name] = security.current()
            barrier.wait()

    with security.context("main") as main:
        threads = [threading.Thread(target=worker, args=(n,)) for n in ("t1", "t2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        assert security.current() is main
    assert seen["t1:before"] is None
    assert seen["t2:before"] is None
    assert seen["t1"].actor.id == "t1"
    assert seen["t2"].actor.id == "t2"


def test_contexts_are_isolated_between_tasks() -> None:
    async def task(name: str, started: asyncio.Event, other: asyncio.Event) -> str:
        async with security.acontext(name) as ctx:
            started.set()
            await other.wait()  # the other task has entered its own context meanwhile
            assert security.current() is ctx
            return ctx.actor.id

    async def main() -> list[str]:
        a, b = asyncio.Event(), asyncio.Event()
        async with security.acontext("parent") as parent:
            results = await asyncio.gather(task("t1", a, b), task("t2", b, a))
            assert security.current() is parent
        assert security.current() is None
        return list(results)

    assert asyncio.run(main()) == ["t1", "t2"]


def test_task_inherits_context_but_does_not_leak_changes() -> None:
    async def child() -> str | None:
        inherited = security.current()
        activate(SecurityContext("child"))
        return inherited.actor.id if inherited else None

    async def main() -> None:
        async with security.acontext("parent") as parent:
            assert await asyncio.create_task(child()) == "parent"
            assert security.current() is parent

    asyncio.run(main())


def test_acontext_nests_and_restores() -> None:
    async def main() -> None:
        async with security.acontext("a") as a:
            async with security.acontext(Actor("b")) as b:
                assert security.current() is b
            assert security.current() is a
        assert security.current() is None

    asyncio.run(main())


def test_context_from_block() -> None:
    ctx = security.context_from_block(SecurityBlock("svc-w", {"team": "core"}, ("app:p",), ("g",)))
    assert ctx.actor == Actor("svc-w", {"team": "core"})
    assert ctx.policies == ("app:p",)
    assert ctx.groups == ("g",)


def test_context_from_block_without_actor_is_anonymous() -> None:
    ctx = security.context_from_block(SecurityBlock(None, {}, ("app:p",)))
    assert ctx.actor.id == "anonymous"
    engine = engine_of(pol("app:p", conditions=(cond("actor.id", "eq", "anonymous"),)))
    assert engine.is_allowed(ctx, "x") is True


def test_context_from_empty_block_denies() -> None:
    ctx = security.context_from_block(SecurityBlock())
    assert engine_of(pol("app:p")).is_allowed(ctx, "queue.publish") is False


# --- module-level is_allowed ----------------------------------------------------------


def test_module_is_allowed_without_app() -> None:
    assert security.is_allowed("queue.publish") is True
    with security.context("svc"), pytest.raises(errors.Error) as info:
        security.is_allowed("queue.publish")
    assert info.value.kind == errors.INVALID
    assert "no queue runtime" in info.value.message


def test_module_is_allowed_uses_the_current_apps_engine() -> None:
    engine = engine_of(pol("app:p", "queue.info", "app:*"), strict=True)
    with current_engine(engine):
        assert security.is_allowed("queue.info", "app:x") is False  # strict, no context
    with current_engine(engine), security.context("svc", ["app:p"]):
        assert security.is_allowed("queue.info", "app:x") is True
        assert security.is_allowed("queue.info", "ops:x") is False
        assert security.is_allowed("queue.publish") is False


def test_module_is_allowed_passes_meta() -> None:
    engine = engine_of(pol("app:p", conditions=(cond("meta.ok", "eq", True),)))
    with current_engine(engine), security.context("svc", ["app:p"]):
        assert security.is_allowed("x", "", {"ok": True}) is True
        assert security.is_allowed("x", "", {"ok": 1}) is False
        assert security.is_allowed("x") is False


def test_module_is_allowed_validates_its_arguments() -> None:
    with pytest.raises(errors.Error) as info:
        security.is_allowed("")
    assert info.value.kind == errors.INVALID


def test_policies_mapping_is_copied() -> None:
    specs: dict[str, PolicySpec] = {"app:p": pol("app:p")}
    engine = PolicyEngine(specs, False)
    specs["app:q"] = pol("app:q")
    with pytest.raises(errors.Error) as info:
        engine.resolve_scope(["app:q"], [])
    assert info.value.kind == errors.NOT_FOUND


@pytest.mark.parametrize("field", ["meta.a b", "meta.a..b", "meta.", "actor.meta. x"])
def test_loader_and_engine_accept_the_same_condition_fields(field: str, tmp_path: Any) -> None:
    """Regression: the loader rejected ``meta.a b`` while the engine accepted it (two
    grammars). One rule set now decides for both."""
    from conveyor.registry.loader import load_registry

    with pytest.raises(errors.Error) as engine_error:
        engine_of(pol("app:p", conditions=(cond(field, "eq", 1),)))
    (tmp_path / "app.yaml").write_text(
        "namespace: app\nentries:\n  - name: p\n    kind: security.policy\n"
        f"    policy: {{actions: '*', conditions: [{{field: '{field}', operator: eq, value: 1}}]}}\n"
    )
    with pytest.raises(errors.Error) as load_error:
        load_registry(tmp_path / "app.yaml")
    (from_engine,) = engine_error.value.details["problems"]
    (from_loader,) = load_error.value.details["problems"]
    assert from_engine["field"] == from_loader["field"] == "policy.conditions[0].field"
    assert from_engine["message"] == from_loader["message"]
