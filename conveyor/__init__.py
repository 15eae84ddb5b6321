"""conveyor: message queues for Python.

app = conveyor.load("app.yaml")
with app:
    queue.publish("app:tasks", {"action": "send_email"})
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from conveyor import errors, queue, security
from conveyor.app import App
from conveyor.registry.loader import load_registry

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

__all__ = ["App", "__version__", "errors", "load", "queue", "security"]

__version__ = "0.1.0.dev0"


def load(
    path: str | os.PathLike[str],
    *,
    log_bodies: bool = False,
    tracing: bool | None = None,
    tracer_provider: TracerProvider | None = None,
) -> App:
    """Load and validate a YAML file or directory of them; starts nothing.

    Raises ``errors.Error`` (INVALID) listing every configuration problem at once.
    ``log_bodies`` lets failure logs include message bodies (off by default).
    ``tracing``: OpenTelemetry spans for publishes and deliveries; None (the default)
    turns them on when a tracer provider is configured when the app starts (or
    ``tracer_provider`` is given), True/False force them on/off.
    """
    return App(load_registry(path), log_bodies=log_bodies, tracing=tracing, tracer_provider=tracer_provider)
