"""Handlers that tests install at run time and reference from YAML by import path.

A test does ``ref = install(fn)`` and writes ``handler: <ref>`` in its YAML.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

H = SimpleNamespace()
_ids = itertools.count()


def install(fn: Callable[..., Any]) -> str:
    name = f"h{next(_ids)}"
    setattr(H, name, fn)
    return f"tests.support.handlers:H.{name}"
