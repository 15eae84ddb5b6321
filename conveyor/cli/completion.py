"""Shell completion (argcomplete): command names and options, and the app's own IDs.

``conveyor dlq list -c app.yaml <TAB>`` offers the app's dead-letter queues: the
completers below read the configuration named on the command line so far (or
``$CONVEYOR_CONFIG``, or ``./conveyor.yaml``) without starting anything. argcomplete
is imported only when the shell asks for completions (``_ARGCOMPLETE`` is set), so
an ordinary run of the command never pays for it. How to enable it: docs/cli.md.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from typing import Any

from conveyor.cli.inputs import CONFIG_ENV, default_config
from conveyor.registry.loader import load_registry
from conveyor.registry.model import Registry

__all__ = ["complete", "dead_letter_queues", "functions", "queues", "wants_completion"]

Completer = Callable[..., Iterable[str]]


def wants_completion() -> bool:
    """True when the shell runs the command to ask for completions."""
    return "_ARGCOMPLETE" in os.environ


def complete(parser: argparse.ArgumentParser) -> None:
    """Answer the shell's completion request and exit; return at once when there is none."""
    if not wants_completion():
        return
    import argcomplete  # noqa: PLC0415 - only when the shell asks: it costs ~8 ms

    argcomplete.autocomplete(parser)


def _registry(parsed: argparse.Namespace) -> Registry | None:
    path = getattr(parsed, "config", None) or getattr(parsed, "path", None) or os.environ.get(CONFIG_ENV)
    path = path or default_config()
    if not path or not os.path.exists(path):
        return None
    try:
        return load_registry(path)
    except Exception:  # a broken configuration completes nothing; `conveyor check` explains it
        return None


def _matching(ids: Iterable[str], prefix: str) -> list[str]:
    return [i for i in ids if i.startswith(prefix)]


def queues(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    registry = _registry(parsed_args)
    return _matching(registry.queues, prefix) if registry else []


def dead_letter_queues(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    registry = _registry(parsed_args)
    if registry is None:
        return []
    found = {spec.dead_letter.queue for spec in registry.queues.values() if spec.dead_letter}
    return _matching((q for q in registry.queues if q in found), prefix)


def functions(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    registry = _registry(parsed_args)
    return _matching(registry.functions, prefix) if registry else []
