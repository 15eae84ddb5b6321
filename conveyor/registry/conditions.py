"""Policy conditions: one typed record and one set of rules, for the loader and the engine.

A condition compares a field of the request — ``actor.id``, ``actor.meta.<key>``,
``meta.<key>``, ``action`` or ``resource`` — with a constant (``value``) or with
another field (``value_from``) using one of :data:`OPERATORS`. The loader builds a
:class:`Condition` from YAML and reports :meth:`Condition.problems` on the YAML keys
they name; the policy engine checks the same problems for policies built in Python
and compiles :func:`parse_field` results into readers. Both therefore accept exactly
the same conditions. What the operators mean is the engine's business
(``conveyor/security/policy.py`` and docs/security.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from conveyor.registry.convert import describe
from conveyor.registry.problems import suggest

__all__ = ["FIELDS", "NO_VALUE", "OPERATORS", "Condition", "FieldRef", "parse_field"]

OPERATORS: Final = ("eq", "ne", "lt", "gt", "in", "exists", "contains", "matches")
FIELDS: Final = "actor.id, actor.meta.<key>, meta.<key>, action or resource"

_FIXED: Final = ("action", "resource", "actor.id")
_PATHS: Final = ("actor.meta", "meta")  # followed by one or more ".<key>" segments
_SEGMENT = re.compile(r"[^.\s]+")


class _NoValue:
    """The type of :data:`NO_VALUE`: a condition written without ``value``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_VALUE"


NO_VALUE: Final = _NoValue()


@dataclass(frozen=True, slots=True)
class FieldRef:
    """A parsed field reference: ``source`` is one of ``action``, ``resource``,
    ``actor.id``, ``actor.meta``, ``meta``; ``path`` the keys below a meta source."""

    source: str
    path: tuple[str, ...] = ()


def parse_field(text: object) -> FieldRef | None:
    """The reference ``text`` names, or None if it is not one.

    Meta keys are non-empty and hold no dot and no whitespace: ``meta.a..b`` and
    ``meta.a b`` are mistakes, not keys.
    """
    if not isinstance(text, str):
        return None
    if text in _FIXED:
        return FieldRef(text)
    for source in _PATHS:
        if text.startswith(source + "."):
            path = tuple(text[len(source) + 1 :].split("."))
            return FieldRef(source, path) if all(_SEGMENT.fullmatch(key) for key in path) else None
    return None


@dataclass(frozen=True, slots=True)
class Condition:
    """``field <operator> value`` or ``field <operator> value_from``.

    ``value`` is :data:`NO_VALUE` when not written (``null`` is a real value: compare
    with null). For ``exists``, ``value`` is an optional boolean: the field must be
    present (true, the default) or absent (false).
    """

    field: str
    operator: str
    value: object = NO_VALUE
    value_from: str | None = None

    @property
    def must_exist(self) -> bool:
        """For ``exists``: whether the field must be present."""
        return self.value is not False

    def problems(self) -> list[tuple[str, str]]:
        """Everything wrong with this condition, as ``(key, message)`` pairs."""
        found: list[tuple[str, str]] = []
        if parse_field(self.field) is None:
            found.append(("field", f"unknown condition field {self.field!r}: expected {FIELDS}"))
        if self.operator not in OPERATORS:
            shown = self.operator if isinstance(self.operator, str) else describe(self.operator)
            found.append(("operator", f"must be one of {', '.join(OPERATORS)}; got {shown!r}{_hint(shown)}"))
        elif self.operator == "exists":
            found += self._exists_problems()
        else:
            found += self._operand_problems()
        return found

    def _exists_problems(self) -> list[tuple[str, str]]:
        found = []
        if self.value_from is not None:
            found.append(("value_from", "exists takes no value_from"))
        if self.value is not NO_VALUE and not isinstance(self.value, bool):
            found.append(("value", f"exists takes true, false or no value, got {describe(self.value)}"))
        return found

    def _operand_problems(self) -> list[tuple[str, str]]:
        if (self.value is NO_VALUE) == (self.value_from is None):
            return [("value", "give exactly one of value and value_from")]
        if self.value_from is not None:
            if parse_field(self.value_from) is None:
                return [("value_from", f"value_from {self.value_from!r} is not a field: expected {FIELDS}")]
            return []
        problem = _value_problem(self.operator, self.value)
        return [("value", problem)] if problem else []


def _hint(operator: str) -> str:
    return suggest(operator, OPERATORS)


def _value_problem(operator: str, value: object) -> str | None:
    """A constant the operator could never use: caught now rather than never matching."""
    if operator == "in" and not isinstance(value, list | tuple):
        return f"operator 'in' needs a list value, got {describe(value)}"
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if operator in ("lt", "gt") and not (numeric or isinstance(value, str)):
        return f"operator {operator!r} needs a number or string value, got {describe(value)}"
    if operator == "matches":
        if not isinstance(value, str):
            return f"operator 'matches' needs a regular expression, got {describe(value)}"
        try:
            re.compile(value)
        except re.error as exc:
            return f"operator 'matches' needs a valid regular expression: {exc}"
    return None
