"""What the user gives: values and headers on the command line, and the configuration path."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import conveyor
from conveyor import errors
from conveyor.app import App
from conveyor.cli.output import UsageError
from conveyor.registry.ids import canonical_id

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG",
    "declared_function",
    "declared_queue",
    "default_config",
    "load_app",
    "parse_header",
    "parse_headers",
    "parse_value",
    "resolve_config",
]

CONFIG_ENV = "CONVEYOR_CONFIG"

DEFAULT_CONFIG = "conveyor.yaml"

DEFAULT_CONFIGS = (DEFAULT_CONFIG, "conveyor.yml")  # looked for in this order


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value here")


def parse_value(text: str) -> Any:
    """``text`` as JSON when it is valid (finite) JSON, else the string itself."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return text
    if isinstance(value, float) and not math.isfinite(value):
        return text
    return value


def parse_header(text: str) -> tuple[str, Any]:
    """``key=value``; the value is a JSON scalar when it parses as one, else the literal text."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise UsageError(f"header {text!r} is not key=value")
    value = parse_value(raw)
    if value is None or isinstance(value, (dict, list)):
        value = raw
    return key, value


def parse_headers(items: Sequence[str]) -> dict[str, Any]:
    return dict(parse_header(item) for item in items)


def default_config() -> str:
    """``./conveyor.yaml``, else ``./conveyor.yml`` if only that one exists."""
    for name in DEFAULT_CONFIGS:
        if os.path.exists(name):
            return name
    return DEFAULT_CONFIG


def resolve_config(given: str | None) -> str:
    """The configuration path: ``given``, else ``$CONVEYOR_CONFIG``, else ``./conveyor.yaml``
    (or ``./conveyor.yml``)."""
    if given:
        path, origin = given, ""
    elif os.environ.get(CONFIG_ENV):
        path, origin = os.environ[CONFIG_ENV], f" (from ${CONFIG_ENV})"
    else:
        path = default_config()
        origin = f" (the default, or conveyor.yml; pass -c PATH or set ${CONFIG_ENV})"
    if not os.path.exists(path):
        raise UsageError(f"configuration not found: {os.path.abspath(path)}{origin}")
    return path


def load_app(given: str | None, *, log_bodies: bool = False) -> App:
    return conveyor.load(resolve_config(given), log_bodies=log_bodies)


def declared_queue(app: App, queue_id: str) -> str:
    """``queue_id`` checked: well-formed (INVALID) and declared by the app (NOT_FOUND)."""
    qid = canonical_id(queue_id)
    if qid not in app.registry.queues:
        raise errors.not_found(f"queue {qid} is not declared", queue=qid)
    return qid


def declared_function(app: App, func_id: str) -> str:
    fid = canonical_id(func_id, what="function ID")
    if fid not in app.registry.functions:
        raise errors.not_found(f"function {fid} is not declared", function=fid)
    return fid
