"""Load registry YAML files into a validated :class:`~conveyor.registry.model.Registry`.

Loading happens in two phases. Phase one reads every file and every entry on its own:
YAML syntax, ``${VAR}`` substitution, the entry's ID and kind, and every field of the
kind (type, range, default; unknown fields are problems). Phase two checks what needs
the whole set of entries: duplicate IDs, references, ``method:`` resolution and
``depends_on`` cycles. Problems never stop the load early: all of them are collected
and raised together as one INVALID :class:`~conveyor.errors.Error` whose
``details["problems"]`` lists ``{"file", "entry", "field", "message", "line"}`` dicts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from conveyor import errors
from conveyor.registry import ids
from conveyor.registry.durations import parse_duration
from conveyor.registry.model import (
    ConsumerSpec,
    DeadLetterSpec,
    DriverSpec,
    FunctionSpec,
    PolicySpec,
    QueueSpec,
    Registry,
    RetrySpec,
    SecurityBlock,
)

__all__ = ["load_registry"]

T = TypeVar("T")
D = TypeVar("D")

# A location inside a YAML document: mapping keys and list indexes.
_Path = tuple[str | int, ...]
_Spec = DriverSpec | QueueSpec | ConsumerSpec | FunctionSpec | PolicySpec

MEMORY = "queue.driver.memory"
SQLITE = "queue.driver.sqlite"
AMQP = "queue.driver.amqp"
QUEUE = "queue.queue"
CONSUMER = "queue.consumer"
PYTHON_FUNCTION = "function.python"
LUA_FUNCTION = "function.lua"
POLICY = "security.policy"

DRIVER_KINDS = (MEMORY, SQLITE, AMQP)
FUNCTION_KINDS = (PYTHON_FUNCTION, LUA_FUNCTION)
CODECS = ("json/plain", "msgpack/plain", "raw")
AUTH_MECHANISMS = ("PLAIN", "AMQPLAIN", "EXTERNAL")
OPERATORS = ("eq", "ne", "lt", "gt", "in", "exists", "contains", "matches")
TLS_STRING_KEYS = ("server_name", "cert", "key", "ca", "cert_env", "key_env", "ca_env")
TLS_PATH_KEYS = ("cert", "key", "ca")

_CONDITION_FIELD = re.compile(r"actor\.id|action|resource|(?:actor\.)?meta(?:\.[^.\s]+)+")
_FILE_PREFIX = "file://"


class _Marker(enum.Enum):
    ABSENT = "absent"  # the key is not in the mapping (or is null)
    UNRESOLVED = "unresolved"  # a ${VAR} failed; its problem is already reported


class _EnvStr(str):
    """A string produced by ``${VAR}`` substitution.

    Environment values are always text, so fields typed int/bool/float accept such a
    string when it spells a value of their type (``concurrency: ${WORKERS:-4}``).
    Literal YAML strings get no such leniency: ``concurrency: "4"`` is a type error.
    """

    __slots__ = ()


# --------------------------------------------------------------------------- problems


@dataclass
class _FileCtx:
    """One YAML file being loaded."""

    path: Path  # as discovered, used in messages
    base_dir: Path  # absolute directory of the file: relative paths resolve here
    lines: dict[_Path, int] = field(default_factory=dict)
    duplicate_keys: list[tuple[_Path, str, int]] = field(default_factory=list)
    namespace: str = ""


@dataclass
class _Ref:
    """A reference to check once every entry is known."""

    scope: _Scope
    path: _Path
    target: str
    kinds: tuple[str, ...]


@dataclass
class _Declared:
    kind: str | None  # None when the entry's kind is itself a problem
    where: str


@dataclass
class _Load:
    """Everything accumulated across files: problems, declarations, pending checks."""

    problems: list[dict[str, Any]] = field(default_factory=list)
    declared: dict[str, _Declared] = field(default_factory=dict)
    scopes: dict[str, _Scope] = field(default_factory=dict)
    refs: list[_Ref] = field(default_factory=list)
    specs: list[_Spec] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    strict_security: bool = False

    def add(self, file: object, entry: str, path: _Path, message: str, line: int | None) -> None:
        self.problems.append(
            {"file": str(file), "entry": entry, "field": _dotted(path), "message": message, "line": line}
        )


@dataclass
class _Scope:
    """What a problem is attached to: a file's top level (``label == ""``) or one entry."""

    load: _Load
    file: _FileCtx
    root: _Path  # () for the file's top level, ("entries", i) for an entry
    label: str = ""  # the entry ID, or "entries[i]" while (or if) the ID is unknown
    id: str | None = None
    kind: str | None = None

    @property
    def where(self) -> str:
        return f"{self.file.path}: entry {self.label}"

    def report(self, path: _Path, message: str, line: int | None = None) -> None:
        self.load.add(self.file.path, self.label, path, message, line or self.line_of(path))

    def line_of(self, path: _Path) -> int | None:
        """The line of the deepest known node on ``path`` (1-based), if any."""
        full = self.root + path
        while full:
            if full in self.file.lines:
                return self.file.lines[full]
            full = full[:-1]
        return None

    def reference(self, path: _Path, value: str, kinds: tuple[str, ...]) -> str | None:
        """Resolve a reference written in this entry and queue it for the phase-two check."""
        try:
            target = ids.resolve_ref(value, self.file.namespace)
        except errors.Error as exc:
            self.report(path, exc.message)
            return None
        self.load.refs.append(_Ref(self, path, target, kinds))
        return target


def _dotted(path: _Path) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _format_problem(problem: Mapping[str, Any]) -> str:
    parts = [problem["file"]]
    if problem["entry"]:
        parts.append(f"entry {problem['entry']}")
    if problem["field"]:
        parts.append(f"field {problem['field']}")
    parts.append(problem["message"])
    line = problem.get("line")
    return ": ".join(parts) + (f" (line {line})" if line else "")


def _invalid(problems: list[dict[str, Any]]) -> errors.Error:
    count = len(problems)
    noun = "problem" if count == 1 else "problems"
    lines = "".join(f"\n  {_format_problem(p)}" for p in problems)
    return errors.Error(
        errors.INVALID, f"{count} {noun} in configuration:{lines}", details={"problems": problems}
    )


# --------------------------------------------------------------------------- converters
# A converter takes a YAML value and returns it typed and checked, or raises ValueError
# with a message for a person. Values from ${VAR} arrive as _EnvStr.


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"string {str(value)!r}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_describe(value)}")
    if not value:
        raise ValueError("must not be empty")
    return str(value)  # drops the _EnvStr subclass: specs hold plain str


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, _EnvStr) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"expected true or false, got {_describe(value)}")


def _check_range(value: float, low: float | None, high: float | None, shown: str) -> None:
    if low is not None and high is not None and not low <= value <= high:
        raise ValueError(f"must be between {low} and {high}, got {shown}")
    if low is not None and value < low:
        raise ValueError(f"must be >= {low}, got {shown}")
    if high is not None and value > high:
        raise ValueError(f"must be <= {high}, got {shown}")


def _integer(low: int | None = None, high: int | None = None) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, _EnvStr) and re.fullmatch(r"[+-]?\d+", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_describe(value)}")
        _check_range(value, low, high, str(value))
        return value

    return convert


def _number(low: float | None = None) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, _EnvStr):
            with contextlib.suppress(ValueError):  # if not a number, reported below as text
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"expected a number, got {_describe(value)}")
        _check_range(float(value), low, None, repr(value))
        return float(value)

    return convert


def _duration(*, positive: bool = False, maximum: float | None = None) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        seconds = parse_duration(value)
        if positive and seconds <= 0:
            raise ValueError(f"must be greater than 0, got {value!r}")
        if maximum is not None and seconds > maximum:
            raise ValueError(f"must be at most {maximum:g}s, got {value!r}")
        return seconds

    return convert


def _choice(*options: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = _string(value)
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}; got {text!r}{_suggest(text, options)}")
        return text

    return convert


def _strings(*, single: bool = False, non_empty: bool = False) -> Callable[[Any], tuple[str, ...]]:
    """A list of non-empty strings; with ``single``, one bare string is a list of one;
    with ``non_empty``, an empty list is an error."""

    def convert(value: Any) -> tuple[str, ...]:
        if single and isinstance(value, str):
            return (_string(value),)
        if not isinstance(value, list):
            raise ValueError(f"expected a list of strings, got {_describe(value)}")
        if non_empty and not value:
            raise ValueError("must not be an empty list")
        result: list[str] = []
        for index, item in enumerate(value):
            if item is _Marker.UNRESOLVED:
                continue
            try:
                result.append(_string(item))
            except ValueError as exc:
                raise ValueError(f"item [{index}]: {exc}") from None
        return tuple(result)

    return convert


def _mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping, got {_describe(value)}")
    return {str(k): _plain(v) for k, v in value.items()}


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {_describe(value)}")
    return value


def _plain(value: Any) -> Any:
    """Free-form data (``meta``, condition values) with plain ``str`` and no markers."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    return None if isinstance(value, _Marker) else value


def _is_dotted_identifier(text: str) -> bool:
    return all(part.isidentifier() for part in text.split("."))


def _import_path(value: Any) -> str:
    """``package.module:callable`` (the attribute may be dotted: ``mod:Class.method``)."""
    text = _string(value)
    module, colon, attribute = text.partition(":")
    if not colon or not _is_dotted_identifier(module) or not _is_dotted_identifier(attribute):
        raise ValueError(f"expected a Python import path 'package.module:callable', got {text!r}")
    return text


def _name(value: Any) -> str:
    text = _string(value)
    if not ids.is_valid_name(text):
        raise ValueError(f"malformed name {text!r}: letters, digits, '_', '-', '.' only")
    return text


def _condition_field(value: Any) -> str:
    text = _string(value)
    if not _CONDITION_FIELD.fullmatch(text):
        raise ValueError(
            f"unknown condition field {text!r}: expected actor.id, actor.meta.X, meta.X, action or resource"
        )
    return text


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- field reader


class _Fields:
    """Typed, problem-recording access to one mapping of an entry.

    Every key asked for becomes a known field, present or not; :meth:`done` then
    reports every key of the mapping that nobody asked for, so a typo is a problem
    instead of a silently ignored field. Readers never raise: a bad value is reported
    and the default returned (the load fails anyway once a problem is recorded).
    An explicit ``null`` counts as absent.
    """

    def __init__(self, scope: _Scope, data: Mapping[Any, Any], path: _Path = ()) -> None:
        self.scope = scope
        self.path = path
        self._data = data
        self._known: set[str] = set()
        self._children: list[_Fields] = []

    def report(self, message: str, *keys: str | int) -> None:
        self.scope.report(self.path + keys, message)

    def has(self, key: str) -> bool:
        return self._data.get(key) is not None

    def present(self, key: str) -> bool:
        """Whether ``key`` is written at all, even as ``null``."""
        return key in self._data

    def raw(self, key: str) -> Any:
        """The value as written (``_Marker.ABSENT`` if missing), marking ``key`` known."""
        self._known.add(key)
        value = self._data.get(key)
        return _Marker.ABSENT if value is None else value

    def get(self, key: str, convert: Callable[[Any], T], default: D) -> T | D:
        value = self.raw(key)
        if isinstance(value, _Marker):
            return default
        try:
            return convert(value)
        except ValueError as exc:
            self.report(str(exc), key)
            return default

    def need(self, key: str, convert: Callable[[Any], T]) -> T | None:
        if self.raw(key) is _Marker.ABSENT:
            self.report("required field is missing", key)
            return None
        return self.get(key, convert, None)

    def sub(self, key: str, *, required: bool = False) -> _Fields | None:
        """The nested mapping under ``key`` as a reader, checked by this reader's ``done``."""
        value = self.raw(key)
        if value is _Marker.ABSENT and required:
            self.report("required field is missing", key)
        if isinstance(value, _Marker):
            return None
        if not isinstance(value, Mapping):
            self.report(f"expected a mapping, got {_describe(value)}", key)
            return None
        child = _Fields(self.scope, value, (*self.path, key))
        self._children.append(child)
        return child

    def items(self, key: str) -> list[tuple[int, Any]]:
        """``(index, item)`` pairs of the list under ``key``; unresolved items are skipped."""
        value = self.get(key, _list, [])
        return [(i, item) for i, item in enumerate(value) if item is not _Marker.UNRESOLVED]

    def item_fields(self, key: str, index: int, item: Any) -> _Fields | None:
        """A reader for the mapping at ``key[index]``."""
        if not isinstance(item, Mapping):
            self.report(f"expected a mapping, got {_describe(item)}", key, index)
            return None
        child = _Fields(self.scope, item, (*self.path, key, index))
        self._children.append(child)
        return child

    def ref(self, key: str, kinds: tuple[str, ...], *, required: bool = False) -> str | None:
        text = self.need(key, _string) if required else self.get(key, _string, None)
        return None if text is None else self.scope.reference((*self.path, key), text, kinds)

    def refs(self, key: str, kinds: tuple[str, ...]) -> tuple[str, ...]:
        resolved: list[str] = []
        for index, item in self.items(key):
            try:
                text = _string(item)
            except ValueError as exc:
                self.report(str(exc), key, index)
                continue
            target = self.scope.reference((*self.path, key, index), text, kinds)
            if target is not None:
                resolved.append(target)
        return tuple(resolved)

    def path_value(self, key: str) -> Path | None:
        """A filesystem path, relative ones resolved against the YAML file's directory."""
        text = self.get(key, _string, None)
        return None if text is None else _resolve_path(self.scope.file.base_dir, text)

    def done(self) -> None:
        for key in self._data:
            if str(key) not in self._known:
                self.report(f"unknown field{_suggest(str(key), self._known)}", str(key))
        for child in self._children:
            child.done()


def _resolve_path(base_dir: Path, text: str) -> Path:
    """``text`` as an absolute path; relative ones are taken from ``base_dir``."""
    return (base_dir / Path(text).expanduser()).resolve()


# --------------------------------------------------------------------------- YAML and ${VAR}

# CSafeLoader is the libyaml build of SafeLoader: same (safe) semantics, faster.
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _parse_yaml(text: str, file: _FileCtx) -> Any:
    """Parse one document, recording node lines and duplicate keys in ``file``.

    Raises ``yaml.YAMLError`` on syntax errors.
    """
    loader = _YAML_LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _index_nodes(node, (), file, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _index_nodes(node: yaml.Node, path: _Path, file: _FileCtx, active: set[int]) -> None:
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
                file.duplicate_keys.append(((*path, key), message, line))
            first_lines.setdefault(key, line)
            file.lines[(*path, key)] = line  # the last duplicate is the value PyYAML keeps
            _index_nodes(value_node, (*path, key), file, active)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            file.lines.setdefault((*path, index), item.start_mark.line + 1)
            _index_nodes(item, (*path, index), file, active)
    active.discard(id(node))


_ENV_TOKEN = re.compile(r"\$\$\{|\$\{([^{}]*)\}|\$\{")
_ENV_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)

_Report = Callable[[_Path, str], None]


def _substitute(value: Any, path: _Path, env: Mapping[str, str], report: _Report) -> Any:
    """``value`` with ``${VAR}`` replaced in every string, recursively.

    A string whose substitution fails becomes ``_Marker.UNRESOLVED`` after its problem
    is reported, so that no second problem ("wrong type", "missing") follows from it.
    """
    if isinstance(value, str):
        return _substitute_text(value, path, env, report)
    if isinstance(value, Mapping):
        return {k: _substitute(v, (*path, str(k)), env, report) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, (*path, i), env, report) for i, v in enumerate(value)]
    return value


def _substitute_text(text: str, path: _Path, env: Mapping[str, str], report: _Report) -> Any:
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
        return _Marker.UNRESOLVED
    result = "".join(pieces)
    return _EnvStr(result) if substituted else result


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


# --------------------------------------------------------------------------- drivers


def _memory_driver(f: _Fields) -> DriverSpec:
    return DriverSpec(id=_id(f), kind=MEMORY, options={}, where=f.scope.where)


def _sqlite_driver(f: _Fields) -> DriverSpec:
    if f.raw("path") is _Marker.ABSENT:
        f.report("required field is missing", "path")
    path = f.path_value("path")
    options = {
        "path": str(path) if path is not None else "",
        "busy_timeout": f.get("busy_timeout", _duration(), 5.0),
        "poll_interval": f.get("poll_interval", _duration(positive=True, maximum=60.0), 0.1),
        # conveyor extensions (docs/sqlite.md): durability level and lease length
        "synchronous": f.get("synchronous", _choice("full", "normal", "off"), "full"),
        "lease_duration": f.get("lease_duration", _duration(positive=True, maximum=86400.0), 30.0),
    }
    return DriverSpec(id=_id(f), kind=SQLITE, options=options, where=f.scope.where)


def _amqp_url(value: Any) -> str:
    text = _string(value)
    if not text.startswith(("amqp://", "amqps://")):
        raise ValueError("must start with amqp:// or amqps://")
    return text


def _amqp_driver(f: _Fields) -> DriverSpec:
    options: dict[str, Any] = {
        "url": f.get("url", _amqp_url, "amqp://guest:guest@localhost:5672/"),
        "vhost": f.get("vhost", _string, None),
        "connection_name": f.get("connection_name", _string, None),
        "auth_mechanism": f.get("auth_mechanism", _choice(*AUTH_MECHANISMS), None),
        "heartbeat": f.get("heartbeat", _duration(), None),
        "connection_timeout": f.get("connection_timeout", _duration(positive=True), None),
        "reconnect_delay": f.get("reconnect_delay", _duration(positive=True), 1.0),
        "reconnect_max_delay": f.get("reconnect_max_delay", _duration(positive=True), 30.0),
        "default_message_ttl": f.get("default_message_ttl", _duration(), None),
        # RabbitMQ rejects a zero x-expires: a queue must live for some time.
        "default_queue_expiry": f.get("default_queue_expiry", _duration(positive=True), None),
        "prefetch_count": f.get("prefetch_count", _integer(0, 65535), None),
        "frame_size": f.get("frame_size", _integer(0), None),
        "channel_max": f.get("channel_max", _integer(0, 65535), None),
        "tls": _amqp_tls(f.sub("tls")),
    }
    if options["reconnect_max_delay"] < options["reconnect_delay"]:
        f.report(
            f"must be >= reconnect_delay ({options['reconnect_delay']:g}s), "
            f"got {options['reconnect_max_delay']:g}s",
            "reconnect_max_delay",
        )
    return DriverSpec(id=_id(f), kind=AMQP, options=options, where=f.scope.where)


def _amqp_tls(f: _Fields | None) -> dict[str, Any] | None:
    if f is None:
        return None
    tls: dict[str, Any] = {"enabled": f.get("enabled", _boolean, None)}
    for key in TLS_STRING_KEYS:
        tls[key] = f.get(key, _string, None)
    for key in TLS_PATH_KEYS:
        # certificate files sit next to the YAML, like sqlite's path; inline PEM stays as written
        if tls[key] is not None and "-----BEGIN" not in tls[key]:
            tls[key] = str(_resolve_path(f.scope.file.base_dir, tls[key]))
    tls["insecure_skip_verify"] = f.get("insecure_skip_verify", _boolean, None)
    return tls


# --------------------------------------------------------------------------- queues

_QUEUE_OPTIONS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "memory": {"max_length": _integer(1)},
    "sqlite": {"max_length": _integer(1)},
    "amqp": {
        "durable": _boolean,
        "auto_delete": _boolean,
        "exclusive": _boolean,
        "message_ttl": _duration(),
        "queue_expiry": _duration(positive=True),
        "max_length": _integer(1),
        "overflow": _choice("drop-head", "reject-publish", "reject-publish-dlx"),
        "queue_type": _choice("classic", "quorum"),
        "max_priority": _integer(1, 255),
    },
}

_CONSUMER_OPTIONS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "amqp": {"consumer_tag": _string, "exclusive": _boolean, "no_local": _boolean, "no_wait": _boolean},
}


def _queue(f: _Fields) -> QueueSpec:
    entry_id = _id(f)
    driver = f.ref("driver", DRIVER_KINDS, required=True)
    spec = QueueSpec(
        id=entry_id,
        driver=driver or "",
        queue_name=f.get("queue_name", _string, ids.split_id(entry_id)[1]),
        codec=f.get("codec", _choice(*CODECS), "json/plain"),
        dead_letter=_dead_letter(f.sub("dead_letter"), entry_id),
        retry=_retry(f.sub("retry")),
        driver_options=_driver_options(f.sub("driver_options"), _QUEUE_OPTIONS),
        where=f.scope.where,
    )
    _check_quorum(f, spec.driver_options.get("amqp", {}))
    return spec


def _dead_letter(f: _Fields | None, queue_id: str) -> DeadLetterSpec | None:
    if f is None:
        return None
    target = f.ref("queue", (QUEUE,), required=True)
    if target is not None and target == queue_id:
        f.report("a queue cannot be its own dead-letter queue", "queue")
    return DeadLetterSpec(queue=target or "", max_attempts=f.get("max_attempts", _integer(1), 5))


def _retry(f: _Fields | None) -> RetrySpec:
    if f is None:
        return RetrySpec()
    return RetrySpec(
        delay=f.get("delay", _duration(), 1.0),
        backoff=f.get("backoff", _number(1.0), 2.0),
        max_delay=f.get("max_delay", _duration(), 300.0),
    )


def _driver_options(
    f: _Fields | None, known: Mapping[str, Mapping[str, Callable[[Any], Any]]]
) -> dict[str, dict[str, Any]]:
    """Per-driver option bags; only the keys written are kept (converted)."""
    if f is None:
        return {}
    result: dict[str, dict[str, Any]] = {}
    for driver, converters in known.items():
        bag = f.sub(driver)
        if bag is None:
            continue
        result[driver] = {}
        for key, convert in converters.items():
            value = bag.get(key, convert, _Marker.ABSENT)
            if value is not _Marker.ABSENT:
                result[driver][key] = value
    return result


def _check_quorum(f: _Fields, amqp: Mapping[str, Any]) -> None:
    # RabbitMQ refuses these combinations at declare time; say so at load time instead.
    if amqp.get("queue_type") != "quorum":
        return
    for key, bad in (("exclusive", True), ("auto_delete", True), ("durable", False)):
        if amqp.get(key) is bad:
            f.report(f"a quorum queue cannot have {key}: {str(bad).lower()}", "driver_options", "amqp", key)


# --------------------------------------------------------------------------- consumers

_HANDLER_FIELDS = ("func", "method", "handler")


def _consumer(f: _Fields) -> ConsumerSpec:
    lifecycle = f.sub("lifecycle")
    return ConsumerSpec(
        id=_id(f),
        queue=f.ref("queue", (QUEUE,), required=True) or "",
        func=f.ref("func", FUNCTION_KINDS),
        handler=f.get("handler", _import_path, None),
        method=f.get("method", _name, None),
        concurrency=f.get("concurrency", _integer(1, 1000), 1),
        prefetch=f.get("prefetch", _integer(1, 10000), 10),
        auto_ack=f.get("auto_ack", _boolean, False),
        timeout=f.get("timeout", _duration(positive=True), None),
        security=_security_block(f.sub("security")),
        driver_options=_driver_options(f.sub("driver_options"), _CONSUMER_OPTIONS),
        lua_source=_consumer_source(f),
        base_dir=f.scope.file.base_dir,
        auto_start=lifecycle.get("auto_start", _boolean, True) if lifecycle else True,
        depends_on=lifecycle.refs("depends_on", (CONSUMER,)) if lifecycle else (),
        where=f.scope.where,
    )


def _check_handler_fields(f: _Fields) -> None:
    """Exactly one of func / method / handler."""
    given = [name for name in _HANDLER_FIELDS if f.has(name)]
    if not given:
        f.report("one of func, method or handler is required", "func")
    elif len(given) > 1:
        f.report(f"{' and '.join(given)} are mutually exclusive: give exactly one", given[1])


def _consumer_source(f: _Fields) -> Path | None:
    """The ``source: file://x.lua`` searched for a ``method:`` that names no function entry."""
    if not f.has("source"):
        f.raw("source")
        return None
    if not f.has("method"):
        f.report("source is only used with method:", "source")
    return _lua_file(f, "source")


def _lua_file(f: _Fields, key: str) -> Path | None:
    """A ``file://`` source, resolved against the YAML file's directory; it must exist."""
    text = f.get(key, _string, None)
    if text is None:
        return None
    if not text.startswith(_FILE_PREFIX) or len(text) == len(_FILE_PREFIX):
        f.report(f"expected file://path.lua, got {text!r}", key)
        return None
    path = _resolve_path(f.scope.file.base_dir, text[len(_FILE_PREFIX) :])
    if not path.is_file():
        f.report(f"Lua file {str(path)!r} does not exist", key)
    return path


def _security_block(f: _Fields | None) -> SecurityBlock | None:
    if f is None:
        return None
    actor, meta = _actor(f)
    return SecurityBlock(
        actor=actor,
        actor_meta=meta,
        policies=f.refs("policies", (POLICY,)),
        groups=f.get("groups", _strings(), ()),
    )


def _actor(f: _Fields) -> tuple[str | None, dict[str, Any]]:
    """``actor: some-id`` or ``actor: {id: some-id, meta: {...}}``."""
    actor = f.sub("actor") if isinstance(f.raw("actor"), Mapping) else None
    if actor is not None:
        return actor.need("id", _string), actor.get("meta", _mapping, {})
    return f.get("actor", _string, None), {}


# --------------------------------------------------------------------------- functions


def _python_function(f: _Fields) -> FunctionSpec:
    lifecycle = f.sub("lifecycle")
    return FunctionSpec(
        id=_id(f),
        kind=PYTHON_FUNCTION,
        source=f.need("source", _import_path) or "",
        base_dir=f.scope.file.base_dir,
        on_start=lifecycle.get("on_start", _boolean, False) if lifecycle else False,
        where=f.scope.where,
    )


def _lua_function(f: _Fields) -> FunctionSpec:
    if f.raw("source") is _Marker.ABSENT:
        f.report("required field is missing", "source")
    path = _lua_file(f, "source")
    return FunctionSpec(
        id=_id(f),
        kind=LUA_FUNCTION,
        source=str(path) if path is not None else "",
        method=f.get("method", _string, None),
        base_dir=f.scope.file.base_dir,
        where=f.scope.where,
    )


# --------------------------------------------------------------------------- policies


def _policy(f: _Fields) -> PolicySpec:
    body = f.sub("policy", required=True)
    actions: tuple[str, ...] = ()
    resources: tuple[str, ...] = ("*",)
    effect = "allow"
    conditions: tuple[dict[str, Any], ...] = ()
    if body is not None:
        actions = body.need("actions", _strings(single=True, non_empty=True)) or ()
        resources = body.get("resources", _strings(single=True, non_empty=True), ("*",))
        effect = body.get("effect", _choice("allow", "deny"), "allow")
        conditions = tuple(_conditions(body))
    return PolicySpec(
        id=_id(f),
        actions=actions,
        resources=resources,
        effect=effect,
        conditions=conditions,
        groups=f.get("groups", _strings(), ()),
        where=f.scope.where,
    )


def _conditions(body: _Fields) -> list[dict[str, Any]]:
    result = []
    for index, item in body.items("conditions"):
        f = body.item_fields("conditions", index, item)
        if f is not None:
            result.append(_condition(f))
    return result


def _condition(f: _Fields) -> dict[str, Any]:
    """``{field, operator, value}`` or ``{field, operator, value_from}``.

    ``exists`` takes no value or a boolean one; it is stored with ``value`` (default
    true: the field must exist) so that evaluators need no special case.
    """
    condition: dict[str, Any] = {
        "field": f.need("field", _condition_field) or "",
        "operator": f.need("operator", _choice(*OPERATORS)) or "",
    }
    operator = condition["operator"]
    if operator == "exists":
        if f.present("value_from"):
            f.raw("value_from")  # known field, wrong here: one problem, not two
            f.report("exists takes no value_from", "value_from")
        condition["value"] = f.get("value", _boolean, True)
        return condition
    # `value: null` is a real value here (compare with null), hence present() not has().
    has_value, has_source = f.present("value"), f.present("value_from")
    if has_value == has_source:
        f.report("give exactly one of value and value_from", "value")
    if has_source:
        condition["value_from"] = f.get("value_from", _condition_field, "")
    if has_value:
        condition["value"] = _condition_value(f, operator)
    return condition


def _condition_value(f: _Fields, operator: str) -> Any:
    value = _plain(f.raw("value"))
    if operator == "in" and not isinstance(value, list):
        f.report(f"operator in needs a list value, got {_describe(value)}", "value")
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if operator in ("lt", "gt") and not (numeric or isinstance(value, str)):
        f.report(f"operator {operator} needs a number or string value, got {_describe(value)}", "value")
    if operator == "matches":
        try:
            re.compile(_string(value))
        except (ValueError, re.error) as exc:
            f.report(f"operator matches needs a regular expression: {exc}", "value")
    return value


# --------------------------------------------------------------------------- entries

_PARSERS: dict[str, Callable[[_Fields], _Spec]] = {
    MEMORY: _memory_driver,
    SQLITE: _sqlite_driver,
    AMQP: _amqp_driver,
    QUEUE: _queue,
    CONSUMER: _consumer,
    PYTHON_FUNCTION: _python_function,
    LUA_FUNCTION: _lua_function,
    POLICY: _policy,
}

KINDS: tuple[str, ...] = tuple(_PARSERS)


def _id(f: _Fields) -> str:
    # An entry whose name is a problem is still parsed, so that its field problems are
    # reported too; its spec carries the "entries[i]" label and is never returned.
    return f.scope.id or f.scope.label


def _load_entry(file: _FileCtx, load: _Load, index: int, raw: Any) -> None:
    """Phase one for ``entries[index]``: substitute, identify, declare, parse its kind."""
    scope = _Scope(load, file, ("entries", index), label=f"entries[{index}]")
    pending: list[tuple[_Path, str, int | None]] = [
        (path[2:], message, line)
        for path, message, line in file.duplicate_keys
        if path[:2] == ("entries", index)
    ]
    data = _substitute(raw, (), os.environ, lambda path, message: pending.append((path, message, None)))
    if not isinstance(data, Mapping):
        scope.report((), f"an entry must be a mapping, got {_describe(raw)}")
        return
    f = _Fields(scope, data)
    _identify(f)
    for path, message, line in pending:  # reported now that the entry's label is known
        scope.report(path, message, line)
    f.get("meta", _mapping, {})  # free-form and ignored, but must be a mapping
    _declare(scope)
    parser = _PARSERS.get(scope.kind or "")
    if parser is None:
        return  # the kind is a problem already; its fields cannot be checked
    if scope.kind == CONSUMER:
        _check_handler_fields(f)
    load.specs.append(parser(f))
    f.done()


def _identify(f: _Fields) -> None:
    """Set the scope's ID, label and kind from ``name``/``id`` and ``kind``."""
    scope = f.scope
    name = f.get("name", _string, None)
    alias = f.get("id", _string, None)
    if name is not None and alias is not None and name != alias:
        f.report(f"name {name!r} and id {alias!r} differ (id is a synonym of name)", "id")
    name = name or alias
    key = "name" if f.has("name") else "id"
    if name is None and not f.has("name") and not f.has("id"):
        f.report("required field is missing (name, or its synonym id)", "name")
    elif name is not None and ":" in name:
        f.report(f"name {name!r} must not contain ':' (the namespace comes from the file)", key)
    elif name is not None and not ids.is_valid_name(name):
        f.report(f"malformed name {name!r}: letters, digits, '_', '-', '.' only", key)
    elif name is not None:
        scope.id = scope.label = f"{scope.file.namespace}:{name}"
    kind = f.need("kind", _string)
    if kind is not None and kind not in _PARSERS:
        f.report(f"unknown kind {kind!r}{_suggest(kind, _PARSERS)}; known: {', '.join(_PARSERS)}", "kind")
    scope.kind = kind if kind in _PARSERS else None


def _declare(scope: _Scope) -> None:
    """Record the entry's ID for reference checks; a second declaration is a problem."""
    if scope.id is None:
        return
    line = scope.line_of(())
    where = f"{scope.file.path}" + (f" line {line}" if line else "")
    previous = scope.load.declared.get(scope.id)
    if previous is not None:
        scope.report((), f"duplicate ID {scope.id}: also declared at {previous.where}")
        return
    scope.load.declared[scope.id] = _Declared(scope.kind, where)
    scope.load.scopes[scope.id] = scope


# --------------------------------------------------------------------------- files


def _load_file(path: Path, load: _Load) -> None:
    """Phase one for one file: read, parse, check the top level, then each entry."""
    file = _FileCtx(path=path, base_dir=path.resolve().parent)
    load.files.append(path)
    top = _Scope(load, file, ())
    try:
        document = _parse_yaml(path.read_text(encoding="utf-8"), file)
    except (OSError, UnicodeDecodeError) as exc:
        top.report((), f"cannot read file: {exc}")
        return
    except yaml.YAMLError as exc:
        _report_yaml_error(top, exc)
        return
    for key_path, message, line in file.duplicate_keys:
        if key_path[:1] != ("entries",):
            top.report(key_path, message, line)
    _load_document(top, document)


def _report_yaml_error(top: _Scope, exc: yaml.YAMLError) -> None:
    """One problem for a file PyYAML cannot read, with the line where it stopped."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    if isinstance(exc, yaml.MarkedYAMLError):
        detail = " ".join(part for part in (exc.context, exc.problem) if part)
    else:
        detail = str(exc)
    where = f"line {line}, column {mark.column + 1}: " if mark is not None else ""
    top.report((), f"YAML syntax error: {where}{detail}", line)


def _load_document(top: _Scope, document: Any) -> None:
    if not isinstance(document, dict):
        top.report(
            (),
            "the file is empty: expected namespace and entries"
            if document is None
            else f"expected a mapping with namespace and entries, got {_describe(document)}",
        )
        return
    # Entries are substituted one by one later, so that their problems name the entry.
    top_level = {k: v for k, v in document.items() if k != "entries"}
    f = _Fields(top, _substitute(top_level, (), os.environ, top.report))
    _check_version(f)
    security = f.sub("security")
    if security is not None and security.get("strict", _boolean, False):
        top.load.strict_security = True
    namespace = f.need("namespace", _string)
    f.raw("entries")  # read below, unsubstituted; named here so that typos of it get a suggestion
    f.done()
    if namespace is not None and not ids.is_valid_namespace(namespace):
        f.report(f"malformed namespace {namespace!r}", "namespace")
    elif namespace is not None:
        top.file.namespace = namespace
        _load_entries(top, document.get("entries"))


def _check_version(f: _Fields) -> None:
    version = f.raw("version")
    # YAML reads an unquoted 1.0 as a float; both spellings mean the same version.
    if version is _Marker.ABSENT or version == "1.0" or (type(version) is float and version == 1.0):
        return
    if version is not _Marker.UNRESOLVED:
        f.report(f'unsupported version {version!r}: expected "1.0"', "version")


def _load_entries(top: _Scope, entries: Any) -> None:
    if entries is None:
        return
    if not isinstance(entries, list):
        top.report(("entries",), f"expected a list of entries, got {_describe(entries)}")
        return
    for index, raw in enumerate(entries):
        _load_entry(top.file, top.load, index, raw)


def _discover(path: Path) -> list[Path]:
    """The YAML files at ``path``: the file itself, or every ``*.yaml`` under it (SPEC §1).

    Hidden directories (``.git``, ``.github``, ...) are skipped: they hold other tools' YAML.
    """
    if path.is_dir():
        found = [
            p
            for p in path.rglob("*.yaml")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts[:-1])
        ]
        return sorted(found, key=lambda p: p.relative_to(path).parts)
    return [path] if path.exists() else []


# --------------------------------------------------------------------------- phase two


def _kinds_text(kinds: tuple[str, ...]) -> str:
    return "a queue.driver.* entry" if kinds == DRIVER_KINDS else f"a {' or '.join(kinds)} entry"


def _check_refs(load: _Load) -> None:
    for ref in load.refs:
        target = load.declared.get(ref.target)
        wanted = _kinds_text(ref.kinds)
        if target is None:
            ref.scope.report(
                ref.path, f"dangling reference {ref.target}: no entry has this ID (expected {wanted})"
            )
        elif target.kind is not None and target.kind not in ref.kinds:
            ref.scope.report(ref.path, f"{ref.target} is a {target.kind} entry, expected {wanted}")


def _resolve_method(spec: ConsumerSpec, load: _Load) -> ConsumerSpec:
    """``method: name``: a function entry ``ns:name`` if one exists, else a Lua function
    of that name in the consumer's ``source:`` file."""
    if spec.method is None or spec.func is not None or spec.handler is not None:
        return spec
    candidate = f"{ids.split_id(spec.id)[0]}:{spec.method}"
    declared = load.declared.get(candidate)
    if declared is not None and declared.kind in FUNCTION_KINDS:
        return dataclasses.replace(spec, func=candidate)
    source_reported = any(p["entry"] == spec.id and p["field"] == "source" for p in load.problems)
    if spec.lua_source is None and not source_reported:  # a bad source: is problem enough
        scope = load.scopes.get(spec.id)
        if scope is not None:
            scope.report(
                ("method",), f"method {spec.method}: no function entry {candidate} and no source: file"
            )
    return spec


def _check_security_groups(registry: Registry, load: _Load) -> None:
    """A consumer's ``security.groups`` must name groups some policy belongs to."""
    known = {group for policy in registry.policies.values() for group in policy.groups}
    for consumer in registry.consumers.values():
        block = consumer.security
        for index, group in enumerate(block.groups if block is not None else ()):
            scope = load.scopes.get(consumer.id)
            if group not in known and scope is not None:
                scope.report(
                    ("security", "groups", index),
                    f"unknown policy group {group!r}: no security.policy entry lists it in groups",
                )


def _check_cycles(consumers: Mapping[str, ConsumerSpec], load: _Load) -> None:
    """Report each ``depends_on`` cycle once, on the consumer where it is first entered."""
    state: dict[str, str] = {}  # "active" while on the DFS stack, then "done"

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "active"
        for target in consumers[node].depends_on if node in consumers else ():
            if state.get(target) == "active":
                cycle = [*stack[stack.index(target) :], target]
                scope = load.scopes.get(target)
                if scope is not None:
                    scope.report(("lifecycle", "depends_on"), f"depends_on cycle: {' -> '.join(cycle)}")
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = "done"

    for consumer_id in consumers:
        if consumer_id not in state:
            visit(consumer_id, [consumer_id])


def _warnings(registry: Registry) -> tuple[str, ...]:
    """Legal but risky configuration, for ``conveyor check`` and startup logs."""
    found: list[str] = []
    for consumer in registry.consumers.values():
        queue = registry.queues.get(consumer.queue)
        if queue is not None and queue.dead_letter is None:
            found.append(
                f"{consumer.where}: queue {queue.id} has no dead_letter: failing messages are retried forever"
            )
        if consumer.prefetch < consumer.concurrency:
            found.append(
                f"{consumer.where}: prefetch {consumer.prefetch} < concurrency {consumer.concurrency}: "
                "workers will idle"
            )
    shared: dict[tuple[str, str], str] = {}
    for queue in registry.queues.values():
        other = shared.setdefault((queue.driver, queue.queue_name), queue.id)
        if other != queue.id:
            found.append(
                f"{queue.where}: queue_name {queue.queue_name!r} on driver {queue.driver} is also used by "
                f"{other}: both entries share one physical queue"
            )
        if 0 < queue.retry.max_delay < queue.retry.delay:
            found.append(
                f"{queue.where}: retry.max_delay {queue.retry.max_delay:g}s is below retry.delay "
                f"{queue.retry.delay:g}s: every retry waits max_delay"
            )
    for queue in registry.queues.values():
        dead = registry.queues.get(queue.dead_letter.queue) if queue.dead_letter else None
        if dead is None:
            continue
        if dead.codec != queue.codec:
            found.append(
                f"{queue.where}: dead-letter queue {dead.id} uses codec {dead.codec}, not {queue.codec}: "
                "its consumers may not decode dead-lettered messages"
            )
        if dead.driver != queue.driver:
            found.append(
                f"{queue.where}: dead-letter queue {dead.id} is on driver {dead.driver}, not {queue.driver}: "
                "moving a message there is not atomic (it may be delivered twice)"
            )
    return tuple(found)


def _build(load: _Load) -> Registry:
    buckets: dict[type, dict[str, Any]] = {
        DriverSpec: {},
        QueueSpec: {},
        ConsumerSpec: {},
        FunctionSpec: {},
        PolicySpec: {},
    }
    for parsed in load.specs:
        spec = _resolve_method(parsed, load) if isinstance(parsed, ConsumerSpec) else parsed
        buckets[type(spec)].setdefault(spec.id, spec)  # a duplicate is a problem already
    registry = Registry(
        drivers=buckets[DriverSpec],
        queues=buckets[QueueSpec],
        consumers=buckets[ConsumerSpec],
        functions=buckets[FunctionSpec],
        policies=buckets[PolicySpec],
        strict_security=load.strict_security,
        files=tuple(load.files),
    )
    _check_cycles(registry.consumers, load)
    _check_security_groups(registry, load)
    return dataclasses.replace(registry, warnings=_warnings(registry))


# --------------------------------------------------------------------------- entry point


def load_registry(path: str | os.PathLike[str]) -> Registry:
    """Load, validate and cross-reference the YAML file or directory at ``path``.

    A directory means every ``*.yaml`` file under it, recursively (hidden directories
    skipped), in sorted order. ``${VAR}`` / ``${VAR:-default}`` are replaced from ``os.environ``
    (``$${`` writes a literal ``${``). Returns the :class:`Registry`; raises one
    INVALID :class:`errors.Error` listing every problem found in every file otherwise
    (``details["problems"]``: dicts with ``file``, ``entry``, ``field``, ``message``,
    ``line``). Nothing is imported, connected or started.
    """
    root = Path(path)
    files = _discover(root)
    if not files:
        reason = "no *.yaml files in this directory" if root.is_dir() else "no such file"
        problem = {"file": str(root), "entry": "", "field": "", "message": reason, "line": None}
        raise _invalid([problem])
    load = _Load()
    for file in files:
        _load_file(file, load)
    _check_refs(load)
    registry = _build(load)
    if load.problems:
        raise _invalid(load.problems)
    return registry
