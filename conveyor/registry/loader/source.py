"""Reading one YAML document: its values, the line of every key, its duplicate keys,
and ``${VAR}`` / ``${VAR:-default}`` substitution.

Nothing here knows what an entry is. :func:`parse_yaml` returns the document as
PyYAML builds it plus a :class:`LineIndex` (``KeyPath`` → line), so that problems
found later can name the line they are about. Before anything walks the document,
its shape is checked (:class:`ShapeError`): it may nest at most :data:`MAX_NESTING`
levels, its aliases may repeat at most :data:`MAX_REPEATED_NODES` nodes in all, and
no alias may refer to a node that contains it. PyYAML shares the node of an anchor
between its aliases, so a few hundred bytes can stand for billions of nodes; these
limits refuse such a file in milliseconds instead of walking every copy.

:func:`substitute` replaces variables in a subtree and reports each failure through
a callback; a string whose substitution failed becomes :attr:`Marker.UNRESOLVED`, so
that readers report nothing more about it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from conveyor.registry.convert import EnvStr, Marker

__all__ = [
    "MAX_NESTING",
    "MAX_REPEATED_NODES",
    "KeyPath",
    "LineIndex",
    "Report",
    "ShapeError",
    "parse_yaml",
    "substitute",
]

# A location inside a YAML document: mapping keys and list indexes.
KeyPath = tuple[str | int, ...]

# Called with the location and the message of a failed substitution.
Report = Callable[[KeyPath, str], None]

# CSafeLoader is the libyaml build of SafeLoader: same (safe) semantics, faster.
_BASE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

MAX_NESTING = 64  # levels of nodes, the document's top mapping being the first
MAX_REPEATED_NODES = 10_000  # nodes that aliases add to the document, in all

_ENV_TOKEN = re.compile(r"\$\$\{|\$\{([^{}]*)\}|\$\{")
_ENV_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


@dataclass
class LineIndex:
    """Where things are in one document (lines are 1-based)."""

    lines: dict[KeyPath, int] = field(default_factory=dict)
    # (path of the repeated key, message, line of the repetition)
    duplicate_keys: list[tuple[KeyPath, str, int]] = field(default_factory=list)


class ShapeError(ValueError):
    """A document too deep, or whose aliases expand too far; ``line`` is where it shows."""

    def __init__(self, message: str, node: yaml.Node) -> None:
        super().__init__(message)
        self.line: int = node.start_mark.line + 1


class _Loader(_BASE_LOADER):  # type: ignore[misc]
    """The safe loader, with a located YAML error for a tagged value it cannot read.

    PyYAML raises bare ValueError, KeyError or AttributeError for ``!!int abc``,
    ``2001-02-30``, an empty ``!!timestamp`` or an integer of more digits than Python
    converts; every one becomes a ``ConstructorError`` that names the node's line.
    """

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except Exception as exc:  # PyYAML's constructors raise several unrelated types
            if isinstance(exc, (yaml.YAMLError, MemoryError)):
                raise
            reason = f"unknown value {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else exc
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read the value as {node.tag}: {reason}", node.start_mark
            ) from None


def parse_yaml(text: str, index: LineIndex) -> Any:
    """Parse one document, recording node lines and duplicate keys in ``index``.

    Raises ``yaml.YAMLError`` on syntax errors (and on values PyYAML cannot construct),
    :class:`ShapeError` on a document nested too deep or whose aliases expand too far.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_shape(node)
        _index_nodes(node, (), index, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def check_shape(root: yaml.Node) -> None:
    """Raise :class:`ShapeError` unless the document, aliases expanded, is a tree of at
    most :data:`MAX_NESTING` levels with at most :data:`MAX_REPEATED_NODES` nodes more
    than it spells out.

    One pass over the distinct nodes, without recursion: each node's expanded size and
    height are computed once, however many aliases point at it.
    """
    size: dict[int, int] = {}  # id(node) -> nodes in its expansion, itself included
    height: dict[int, int] = {}  # id(node) -> levels in its expansion, itself included
    path: list[tuple[yaml.Node, Iterator[yaml.Node]]] = []
    on_path: set[int] = set()

    def enter(node: yaml.Node) -> None:
        if len(path) >= MAX_NESTING:
            raise ShapeError(f"the document nests deeper than {MAX_NESTING} levels", node)
        on_path.add(id(node))
        path.append((node, iter(_children(node))))

    enter(root)
    while path:
        node, children = path[-1]
        child = next(children, None)
        if child is None:
            path.pop()
            on_path.discard(id(node))
            below = [id(c) for c in _children(node)]
            size[id(node)] = 1 + sum(size[c] for c in below)
            height[id(node)] = 1 + max((height[c] for c in below), default=0)
        elif id(child) in on_path:
            raise ShapeError("an alias refers to a node that contains it (a recursive structure)", child)
        elif id(child) not in size:
            enter(child)
        elif len(path) + height[id(child)] > MAX_NESTING:  # met before: an alias, expanded here
            raise ShapeError(f"the document nests deeper than {MAX_NESTING} levels (through an alias)", child)
    repeated = size[id(root)] - len(size)
    if repeated > MAX_REPEATED_NODES:
        raise ShapeError(f"aliases repeat {repeated} nodes, more than the {MAX_REPEATED_NODES} allowed", root)


def _index_nodes(node: yaml.Node, path: KeyPath, index: LineIndex, active: set[int]) -> None:
    """Map every key/item path to its line, and note duplicate keys (PyYAML keeps the last)."""
    if id(node) in active:
        return  # a recursive alias: already being walked
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in first_lines:
                message = f"duplicate key {key!r} (first at line {first_lines[key]}; the last one wins)"
                index.duplicate_keys.append(((*path, key), message, line))
            first_lines.setdefault(key, line)
            index.lines[(*path, key)] = line  # the last duplicate is the value PyYAML keeps
            _index_nodes(value_node, (*path, key), index, active)
    elif isinstance(node, yaml.SequenceNode):
        for position, item in enumerate(node.value):
            index.lines.setdefault((*path, position), item.start_mark.line + 1)
            _index_nodes(item, (*path, position), index, active)
    active.discard(id(node))


def substitute(value: Any, path: KeyPath, env: Mapping[str, str], report: Report) -> Any:
    """``value`` with ``${VAR}`` replaced in every string, recursively.

    A string whose substitution fails becomes ``Marker.UNRESOLVED`` after its problem
    is reported, so that no second problem ("wrong type", "missing") follows from it.
    A string that had a variable replaced becomes an :class:`EnvStr`.
    """
    if isinstance(value, str):
        return _substitute_text(value, path, env, report)
    if isinstance(value, Mapping):
        return {k: substitute(v, (*path, str(k)), env, report) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, (*path, i), env, report) for i, v in enumerate(value)]
    return value


def _substitute_text(text: str, path: KeyPath, env: Mapping[str, str], report: Report) -> Any:
    if "${" not in text:
        return text
    pieces: list[str] = []
    position = 0
    substituted = failed = False
    for match in _ENV_TOKEN.finditer(text):
        pieces.append(text[position : match.start()])
        position = match.end()
        if match.group(0) == "$${":
            pieces.append("${")  # the escape for a literal "${"
            continue
        try:
            pieces.append(_env_value(match.group(1), env))
        except ValueError as exc:
            failed = True
            report(path, str(exc))
            continue
        substituted = True
    pieces.append(text[position:])
    if failed:
        return Marker.UNRESOLVED
    result = "".join(pieces)
    return EnvStr(result) if substituted else result


def _env_value(body: str | None, env: Mapping[str, str]) -> str:
    """The text for one ``${body}`` (``body`` is None for an unclosed ``${``).

    Like the shell's ``${VAR:-default}``, the default applies when the variable is
    unset *or empty*. Raises ValueError for a malformed reference or an unset variable.
    """
    parsed = _ENV_BODY.fullmatch(body) if body is not None else None
    if parsed is None:
        shown = "${" if body is None else "${" + body + "}"
        raise ValueError(
            f"malformed variable reference {shown!r}: expected ${{VAR}} or ${{VAR:-default}} "
            "(write $${ for a literal ${)"
        )
    name, default = parsed.group(1), parsed.group(2)
    value = env.get(name)
    if value is not None and (value or default is None):
        return value
    if default is not None:
        return default
    raise ValueError(f"environment variable {name} is not set (write ${{{name}:-default}} for a default)")
