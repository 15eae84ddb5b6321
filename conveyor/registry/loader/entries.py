"""Phase one: files, their top level, and each entry on its own.

A file is read and parsed, its top level checked (``version``, ``namespace``,
``security``), then each item of ``entries`` is substituted, identified (ID and
kind), declared for the reference checks of phase two and parsed by the parser of
its kind into a spec.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from conveyor.registry import ids
from conveyor.registry.convert import Marker, boolean, describe, mapping, string
from conveyor.registry.loader.consumers import CONSUMER, parse_consumer
from conveyor.registry.loader.drivers import driver_parsers
from conveyor.registry.loader.fields import Declared, Fields, FileCtx, Load, Scope, Spec
from conveyor.registry.loader.functions import LUA_FUNCTION, PYTHON_FUNCTION, parse_lua, parse_python
from conveyor.registry.loader.policies import POLICY, parse_policy
from conveyor.registry.loader.queues import QUEUE, parse_queue
from conveyor.registry.loader.source import KeyPath, LineIndex, ShapeError, parse_yaml, substitute
from conveyor.registry.problems import suggest

__all__ = ["load_file"]

# Entry kind -> parser. A parser returns None when the entry yields no spec (a driver
# entry whose options have a problem); the load fails then anyway.
_OWN_PARSERS: dict[str, Callable[[Fields], Spec | None]] = {
    QUEUE: parse_queue,
    CONSUMER: parse_consumer,
    PYTHON_FUNCTION: parse_python,
    LUA_FUNCTION: parse_lua,
    POLICY: parse_policy,
}


def _parsers() -> dict[str, Callable[[Fields], Spec | None]]:
    """Every entry kind's parser: one per row of the driver kind table, then the rest."""
    return {**driver_parsers(), **_OWN_PARSERS}


def load_file(path: Path, load: Load) -> None:
    """Phase one for one file: read, parse, check the top level, then each entry."""
    file = FileCtx(path=path, base_dir=path.resolve().parent, index=LineIndex())
    load.files.append(path)
    top = Scope(load, file, ())
    try:
        document = parse_yaml(path.read_text(encoding="utf-8"), file.index)
    except (OSError, UnicodeDecodeError) as exc:
        top.report((), f"cannot read file: {exc}")
        return
    except ShapeError as exc:
        top.report((), f"YAML document refused: {exc}", exc.line)
        return
    except yaml.YAMLError as exc:
        _report_yaml_error(top, exc)
        return
    for key_path, message, line in file.index.duplicate_keys:
        if key_path[:1] != ("entries",):
            top.report(key_path, message, line)
    _load_document(top, document)


def _report_yaml_error(top: Scope, exc: yaml.YAMLError) -> None:
    """One problem for a file PyYAML cannot read, with the line where it stopped."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    if isinstance(exc, yaml.MarkedYAMLError):
        detail = " ".join(part for part in (exc.context, exc.problem) if part)
    else:
        detail = str(exc)
    where = f"line {line}, column {mark.column + 1}: " if mark is not None else ""
    top.report((), f"YAML syntax error: {where}{detail}", line)


def _load_document(top: Scope, document: Any) -> None:
    if not isinstance(document, dict):
        top.report(
            (),
            "the file is empty: expected namespace and entries"
            if document is None
            else f"expected a mapping with namespace and entries, got {describe(document)}",
        )
        return
    # Entries are substituted one by one later, so that their problems name the entry.
    top_level = {k: v for k, v in document.items() if k != "entries"}
    f = Fields(top, substitute(top_level, (), os.environ, top.report))
    _check_version(f)
    security = f.sub("security")
    if security is not None and security.get("strict", boolean, False):
        top.load.strict_security = True
    namespace = f.need("namespace", string)
    f.raw("entries")  # read below, unsubstituted; named here so that typos of it get a suggestion
    f.done()
    if namespace is not None and not ids.is_valid_namespace(namespace):
        f.report(f"malformed namespace {namespace!r}", "namespace")
    elif namespace is not None:
        top.file.namespace = namespace
        _load_entries(top, document.get("entries"))


def _check_version(f: Fields) -> None:
    version = f.raw("version")
    # YAML reads an unquoted 1.0 as a float; both spellings mean the same version.
    if version is Marker.ABSENT or version == "1.0" or (type(version) is float and version == 1.0):
        return
    if version is not Marker.UNRESOLVED:
        f.report(f'unsupported version {version!r}: expected "1.0"', "version")


def _load_entries(top: Scope, entries: Any) -> None:
    if entries is None:
        return
    if not isinstance(entries, list):
        top.report(("entries",), f"expected a list of entries, got {describe(entries)}")
        return
    for index, raw in enumerate(entries):
        _load_entry(top.file, top.load, index, raw)


def _load_entry(file: FileCtx, load: Load, index: int, raw: Any) -> None:
    """Phase one for ``entries[index]``: substitute, identify, declare, parse its kind."""
    scope = Scope(load, file, ("entries", index), label=f"entries[{index}]")
    pending: list[tuple[KeyPath, str, int | None]] = [
        (path[2:], message, line)
        for path, message, line in file.index.duplicate_keys
        if path[:2] == ("entries", index)
    ]
    data = substitute(raw, (), os.environ, lambda path, message: pending.append((path, message, None)))
    if not isinstance(data, Mapping):
        scope.report((), f"an entry must be a mapping, got {describe(raw)}")
        return
    f = Fields(scope, data)
    _identify(f)
    for path, message, line in pending:  # reported now that the entry's label is known
        scope.report(path, message, line)
    f.get("meta", mapping, {})  # free-form and ignored, but must be a mapping
    _declare(scope)
    parser = _parsers().get(scope.kind or "")
    if parser is None:
        return  # the kind is a problem already; its fields cannot be checked
    spec = parser(f)
    if spec is not None:
        load.specs.append(spec)
    f.done()


def _identify(f: Fields) -> None:
    """Set the scope's ID, label and kind from ``name``/``id`` and ``kind``."""
    scope = f.scope
    name = f.get("name", string, None)
    alias = f.get("id", string, None)
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
    kind = f.need("kind", string)
    parsers = _parsers()
    if kind is not None and kind not in parsers:
        f.report(f"unknown kind {kind!r}{suggest(kind, parsers)}; known: {', '.join(parsers)}", "kind")
    scope.kind = kind if kind in parsers else None


def _declare(scope: Scope) -> None:
    """Record the entry's ID for reference checks; a second declaration is a problem."""
    if scope.id is None:
        return
    line = scope.line_of(())
    where = f"{scope.file.path}" + (f" line {line}" if line else "")
    previous = scope.load.declared.get(scope.id)
    if previous is not None:
        scope.report((), f"duplicate ID {scope.id}: also declared at {previous.where}")
        return
    scope.load.declared[scope.id] = Declared(scope.kind, where)
    scope.load.scopes[scope.id] = scope
