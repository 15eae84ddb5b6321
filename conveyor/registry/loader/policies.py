"""``security.policy`` entries: actions, resources, effect, conditions, groups.

Conditions are checked by the rule set of :mod:`conveyor.registry.conditions`, the
one the policy engine uses too. The loader adds only what YAML needs: type checks
of the keys it reads (a missing or non-string ``field``, ``operator`` or
``value_from``, a ``${VAR}`` that failed) and each rule problem placed on the key it
names — unless that key was already reported, so that nothing is reported twice.
"""

from __future__ import annotations

import contextlib
from typing import Any

from conveyor.registry.conditions import NO_VALUE, Condition
from conveyor.registry.convert import EnvStr, Marker, boolean, choice, plain, string, strings
from conveyor.registry.loader.fields import Fields
from conveyor.registry.model import PolicySpec

__all__ = ["POLICY", "parse_policy"]

POLICY = "security.policy"

_EXISTS = "exists"


def parse_policy(f: Fields) -> PolicySpec:
    body = f.sub("policy", required=True)
    actions: tuple[str, ...] = ()
    resources: tuple[str, ...] = ("*",)
    effect = "allow"
    conditions: tuple[Condition, ...] = ()
    if body is not None:
        actions = body.need("actions", strings(single=True, non_empty=True)) or ()
        resources = body.get("resources", strings(single=True, non_empty=True), ("*",))
        effect = body.get("effect", choice("allow", "deny"), "allow")
        conditions = tuple(_conditions(body))
    return PolicySpec(
        id=f.scope.entry_id,
        actions=actions,
        resources=resources,
        effect=effect,
        conditions=conditions,
        groups=f.get("groups", strings(), ()),
        origin=f.scope.origin,
    )


def _conditions(body: Fields) -> list[Condition]:
    result = []
    for index, item in body.items("conditions"):
        f = body.item_fields("conditions", index, item)
        if f is not None:
            result.append(_condition(f))
    return result


def _condition(f: Fields) -> Condition:
    """``{field, operator, value}`` or ``{field, operator, value_from}``, checked.

    A key whose value was already reported is passed to :class:`Condition` as written
    (``""`` when missing or unresolved), so that the rules about the other keys still
    apply, and the rules' problems about that key are dropped.
    """
    reported: set[str] = set()
    field = _text(f, "field", reported, required=True)
    operator = _text(f, "operator", reported, required=True)
    value_from = _text(f, "value_from", reported, required=False)
    condition = Condition(field, operator, _value(f, operator, reported), value_from)
    for key, message in condition.problems():
        if key not in reported:
            f.report(message, key)
    return condition


def _text(f: Fields, key: str, reported: set[str], *, required: bool) -> Any:
    """The string under ``key``; if it is a problem, ``key`` joins ``reported`` and the
    value is returned as written (``""`` if missing or unresolved). An absent optional
    key is None."""
    before = f.problem_count
    text = f.need(key, string) if required else f.get(key, string, None)
    raw = f.raw(key)
    if f.problem_count == before and raw is not Marker.UNRESOLVED:
        return text
    reported.add(key)
    return "" if isinstance(raw, Marker) else plain(raw)


def _value(f: Fields, operator: object, reported: set[str]) -> object:
    """The constant operand, :data:`NO_VALUE` if not written.

    ``value: null`` is a real value (compare with null), hence ``present``; except
    under ``exists``, where null means no value, as an absent key does. There a value
    from ``${VAR}`` may spell a boolean (``value: ${MUST_EXIST:-true}``).
    """
    written = f.has("value") if operator == _EXISTS else f.present("value")
    raw = f.raw("value")
    if raw is Marker.UNRESOLVED:
        reported.add("value")
    if not written:
        return NO_VALUE
    if operator == _EXISTS and isinstance(raw, EnvStr):
        with contextlib.suppress(ValueError):  # not a boolean: the rules report it
            return boolean(raw)
    return plain(raw)
