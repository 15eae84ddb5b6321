"""Load registry YAML files into a validated :class:`~conveyor.registry.model.Registry`.

Loading happens in two phases. Phase one reads every file and every entry on its own:
YAML syntax, ``${VAR}`` substitution, the entry's ID and kind, and every field of the
kind (type, range, default; unknown fields are problems). Phase two checks what needs
the whole set of entries: duplicate IDs, references, ``method:`` resolution and
``depends_on`` cycles. Problems never stop the load early: all of them are collected
and raised together as one INVALID :class:`~conveyor.errors.Error` whose
``details["problems"]`` lists ``{"file", "entry", "field", "message", "line"}`` dicts
(see :mod:`conveyor.registry.problems`).

The modules of this package, in the order a load uses them: ``source`` (one YAML
document and ``${VAR}``), ``fields`` (the load state and the field reader),
``entries`` (files, their top level, each entry), the parsers of each kind
(``drivers``, ``queues``, ``consumers``, ``functions``, ``policies``) and
``crossref`` (phase two).
"""

from __future__ import annotations

import os
from pathlib import Path

from conveyor.registry.loader.crossref import build, check_refs
from conveyor.registry.loader.entries import load_file
from conveyor.registry.loader.fields import Load
from conveyor.registry.model import Registry
from conveyor.registry.problems import Problem, problems_error

__all__ = ["load_registry"]

# The files a directory load reads (a file given by its path loads whatever its name).
_PATTERNS = ("*.yaml", "*.yml")


def load_registry(path: str | os.PathLike[str]) -> Registry:
    """Load, validate and cross-reference the YAML file or directory at ``path``.

    A directory means every ``*.yaml`` and ``*.yml`` file under it, recursively (hidden directories
    skipped), in sorted order. ``${VAR}`` / ``${VAR:-default}`` are replaced from ``os.environ``
    (``$${`` writes a literal ``${``). Returns the :class:`Registry`; raises one
    INVALID :class:`errors.Error` listing every problem found in every file otherwise
    (``details["problems"]``: dicts with ``file``, ``entry``, ``field``, ``message``,
    ``line``). Nothing is imported, connected or started.
    """
    root = Path(path)
    files = _discover(root)
    if not files:
        reason = "no *.yaml or *.yml files in this directory" if root.is_dir() else "no such file"
        raise _invalid([Problem(str(root), "", "", reason)])
    load = Load()
    for file in files:
        load_file(file, load)
    check_refs(load)
    registry = build(load)
    if load.problems:
        raise _invalid(load.problems)
    return registry


def _invalid(problems: list[Problem]) -> Exception:
    count = len(problems)
    return problems_error(f"{count} {'problem' if count == 1 else 'problems'} in configuration", problems)


def _discover(path: Path) -> list[Path]:
    """The YAML files at ``path``: the file itself, or every ``*.yaml`` / ``*.yml`` under it.

    Hidden directories (``.git``, ``.github``, ...) are skipped: they hold other tools' YAML.
    """
    if path.is_dir():
        found = [
            p
            for pattern in _PATTERNS
            for p in path.rglob(pattern)
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts[:-1])
        ]
        return sorted(found, key=lambda p: p.relative_to(path).parts)
    return [path] if path.exists() else []
