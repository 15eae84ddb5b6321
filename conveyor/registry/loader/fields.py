"""The load state and :class:`Fields`, the typed reader of one YAML mapping.

:class:`Load` accumulates everything across files: the :class:`Problem` list, the
declared IDs, the references to check in phase two and the parsed specs. A
:class:`Scope` is what a problem is attached to (a file's top level or one entry)
and knows the line of every key. :class:`Fields` reads one mapping of a scope: each
key read becomes a known field and each bad value a problem, never an exception.
It is the :class:`~conveyor.registry.options.OptionReader` that driver option
records are read through.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from conveyor import errors
from conveyor.registry import ids
from conveyor.registry.convert import Marker, describe, string
from conveyor.registry.model import ConsumerSpec, DriverSpec, FunctionSpec, PolicySpec, QueueSpec
from conveyor.registry.problems import Origin, Problem, suggest

if TYPE_CHECKING:
    from conveyor.registry.loader.source import KeyPath, LineIndex

__all__ = ["Declared", "Fields", "FileCtx", "Load", "Ref", "Scope", "Spec", "dotted"]

Spec: TypeAlias = DriverSpec | QueueSpec | ConsumerSpec | FunctionSpec | PolicySpec

T = TypeVar("T")
D = TypeVar("D")


@dataclass
class FileCtx:
    """One YAML file being loaded."""

    path: Path  # as discovered, used in messages
    base_dir: Path  # absolute directory of the file: relative paths resolve here
    index: LineIndex
    namespace: str = ""


@dataclass
class Ref:
    """A reference to check once every entry is known."""

    scope: Scope
    path: KeyPath
    target: str
    kinds: tuple[str, ...]


@dataclass
class Declared:
    """A declared ID: its entry's kind (None when the kind is itself a problem) and
    where it was declared, as ``duplicate ID`` messages show it."""

    kind: str | None
    where: str


@dataclass
class Load:
    """Everything accumulated across files: problems, declarations, pending checks."""

    problems: list[Problem] = field(default_factory=list)
    declared: dict[str, Declared] = field(default_factory=dict)
    scopes: dict[str, Scope] = field(default_factory=dict)
    refs: list[Ref] = field(default_factory=list)
    specs: list[Spec] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    strict_security: bool = False


@dataclass
class Scope:
    """What a problem is attached to: a file's top level (``label == ""``) or one entry."""

    load: Load
    file: FileCtx
    root: KeyPath  # () for the file's top level, ("entries", i) for an entry
    label: str = ""  # the entry ID, or "entries[i]" while (or if) the ID is unknown
    id: str | None = None
    kind: str | None = None

    @property
    def entry_id(self) -> str:
        """The ID the entry's spec carries: its ID, or its ``entries[i]`` label when the
        name is a problem (such a spec is still built, to report its field problems,
        and never returned)."""
        return self.id or self.label

    @property
    def origin(self) -> Origin:
        """The entry's file, label and line (that of its first key)."""
        return Origin(file=str(self.file.path), entry=self.label, line=self.line_of(()))

    def report(self, path: KeyPath, message: str, line: int | None = None) -> None:
        problem = Problem(str(self.file.path), self.label, dotted(path), message, line or self.line_of(path))
        self.load.problems.append(problem)

    def line_of(self, path: KeyPath) -> int | None:
        """The line of the deepest known node on ``path`` (1-based), if any."""
        lines = self.file.index.lines
        full = self.root + path
        while full:
            if full in lines:
                return lines[full]
            full = full[:-1]
        return None

    def reference(self, path: KeyPath, value: str, kinds: tuple[str, ...]) -> str | None:
        """Resolve a reference written in this entry and queue it for the phase-two check."""
        try:
            target = ids.resolve_ref(value, self.file.namespace)
        except errors.Error as exc:
            self.report(path, exc.message)
            return None
        self.load.refs.append(Ref(self, path, target, kinds))
        return target


def dotted(path: KeyPath) -> str:
    """``("retry", "delay")`` → ``retry.delay``; ``("groups", 0)`` → ``groups[0]``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _items(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {describe(value)}")
    return value


class Fields:
    """Typed, problem-recording access to one mapping of an entry.

    Every key asked for becomes a known field, present or not; :meth:`done` then
    reports every key of the mapping that nobody asked for, so a typo is a problem
    instead of a silently ignored field. Readers never raise: a bad value is reported
    and the default returned (the load fails anyway once a problem is recorded).
    An explicit ``null`` counts as absent.
    """

    def __init__(self, scope: Scope, data: Mapping[Any, Any], path: KeyPath = ()) -> None:
        self.scope = scope
        self.path = path
        self._data = data
        self._known: set[str] = set()
        self._children: list[Fields] = []

    @property
    def problem_count(self) -> int:
        """Problems recorded so far in the whole load (compare before and after a read)."""
        return len(self.scope.load.problems)

    def report(self, message: str, *keys: str | int) -> None:
        self.scope.report(self.path + keys, message)

    def has(self, key: str) -> bool:
        return self._data.get(key) is not None

    def present(self, key: str) -> bool:
        """Whether ``key`` is written at all, even as ``null``."""
        return key in self._data

    def raw(self, key: str) -> Any:
        """The value as written (``Marker.ABSENT`` if missing), marking ``key`` known."""
        self._known.add(key)
        value = self._data.get(key)
        return Marker.ABSENT if value is None else value

    def get(self, key: str, convert: Callable[[Any], T], default: D) -> T | D:
        value = self.raw(key)
        if isinstance(value, Marker):
            return default
        try:
            return convert(value)
        except ValueError as exc:
            self.report(str(exc), key)
            return default

    def need(self, key: str, convert: Callable[[Any], T]) -> T | None:
        if self.raw(key) is Marker.ABSENT:
            self.report("required field is missing", key)
            return None
        return self.get(key, convert, None)

    def sub(self, key: str, *, required: bool = False) -> Fields | None:
        """The nested mapping under ``key`` as a reader, checked by this reader's ``done``."""
        value = self.raw(key)
        if value is Marker.ABSENT and required:
            self.report("required field is missing", key)
        if isinstance(value, Marker):
            return None
        if not isinstance(value, Mapping):
            self.report(f"expected a mapping, got {describe(value)}", key)
            return None
        child = Fields(self.scope, value, (*self.path, key))
        self._children.append(child)
        return child

    def items(self, key: str) -> list[tuple[int, Any]]:
        """``(index, item)`` pairs of the list under ``key``; unresolved items are skipped."""
        value = self.get(key, _items, [])
        return [(i, item) for i, item in enumerate(value) if item is not Marker.UNRESOLVED]

    def item_fields(self, key: str, index: int, item: Any) -> Fields | None:
        """A reader for the mapping at ``key[index]``."""
        if not isinstance(item, Mapping):
            self.report(f"expected a mapping, got {describe(item)}", key, index)
            return None
        child = Fields(self.scope, item, (*self.path, key, index))
        self._children.append(child)
        return child

    def ref(self, key: str, kinds: tuple[str, ...], *, required: bool = False) -> str | None:
        """A reference to an entry of one of ``kinds``, resolved against the file's namespace."""
        text = self.need(key, string) if required else self.get(key, string, None)
        return None if text is None else self.scope.reference((*self.path, key), text, kinds)

    def refs(self, key: str, kinds: tuple[str, ...]) -> tuple[str, ...]:
        """A list of references (see :meth:`ref`); bad items are reported and left out."""
        resolved: list[str] = []
        for index, item in self.items(key):
            try:
                text = string(item)
            except ValueError as exc:
                self.report(str(exc), key, index)
                continue
            target = self.scope.reference((*self.path, key, index), text, kinds)
            if target is not None:
                resolved.append(target)
        return tuple(resolved)

    def resolve_path(self, text: str) -> str:
        """``text`` as an absolute path; relative ones are taken from the YAML file's directory."""
        return str(self.resolve(text))

    def resolve(self, text: str) -> Path:
        """:meth:`resolve_path` as a :class:`Path`."""
        return (self.scope.file.base_dir / Path(text).expanduser()).resolve()

    def done(self) -> None:
        """Report the keys nobody read, here and in every nested reader."""
        for key in self._data:
            if str(key) not in self._known:
                self.report(f"unknown field{suggest(str(key), self._known)}", str(key))
        for child in self._children:
            child.done()
