"""Where a configuration entry came from, and what is wrong with it.

:class:`Origin` travels on every spec (file, entry ID, line), so that a message
about an entry can name it without parsing a string back apart. :class:`Problem` is
the one record every configuration check produces — the loader, the start-time
checks and the policy engine — and :func:`problems_error` the one INVALID error
that carries a list of them. ``details["problems"]`` holds them as plain dicts
(``file``, ``entry``, ``field``, ``message``, ``line``) so that the error pickles and
prints as JSON.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from conveyor import errors

__all__ = ["Origin", "Problem", "problems_error", "suggest"]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an entry was declared: its file, its ID (or ``entries[i]``) and its line."""

    file: str = ""
    entry: str = ""
    line: int | None = None

    def __str__(self) -> str:
        return ": ".join(part for part in (self.file, f"entry {self.entry}" if self.entry else "") if part)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the configuration, located as precisely as known."""

    file: str
    entry: str
    field: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        parts = [
            self.file,
            f"entry {self.entry}" if self.entry else "",
            f"field {self.field}" if self.field else "",
        ]
        text = ": ".join(part for part in (*parts, self.message) if part)
        return f"{text} (line {self.line})" if self.line else text

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "entry": self.entry,
            "field": self.field,
            "message": self.message,
            "line": self.line,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Problem:
        """The inverse of :meth:`to_dict`; missing keys are empty."""
        line = data.get("line")
        return cls(
            str(data.get("file") or ""),
            str(data.get("entry") or ""),
            str(data.get("field") or ""),
            str(data.get("message") or ""),
            line if isinstance(line, int) else None,
        )


def problems_error(headline: str, problems: Sequence[Problem]) -> errors.Error:
    """INVALID: ``headline:`` then one indented line per problem; ``details["problems"]`` as dicts."""
    lines = "".join(f"\n  {problem}" for problem in problems)
    return errors.Error(
        errors.INVALID, f"{headline}:{lines}", details={"problems": [p.to_dict() for p in problems]}
    )


def suggest(word: str, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options``, or nothing."""
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
