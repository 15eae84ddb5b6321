"""A declared queue bound to its running driver and codec."""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.drivers.base import Driver
from conveyor.queue.codecs import Codec
from conveyor.registry.model import QueueSpec

__all__ = ["BoundQueue"]


@dataclass(slots=True)
class BoundQueue:
    spec: QueueSpec
    codec: Codec
    driver: Driver

    @property
    def id(self) -> str:
        return self.spec.id
