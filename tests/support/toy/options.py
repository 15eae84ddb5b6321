"""Options of the toy driver: one required field, a default, a cross-field rule."""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.registry.convert import integer, string
from conveyor.registry.options import DriverSchema, Options, option

__all__ = ["SCHEMA", "ToyConsumerOptions", "ToyOptions", "ToyQueueOptions"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ToyOptions(Options):
    label: str = option(string)
    chunk: int = option(integer(1, 100), 10)


@dataclass(frozen=True, slots=True, kw_only=True)
class ToyQueueOptions(Options):
    max_length: int | None = option(integer(1), None)

    def problems(self) -> list[tuple[str, str]]:
        return [("max_length", "13 is unlucky")] if self.max_length == 13 else []


@dataclass(frozen=True, slots=True, kw_only=True)
class ToyConsumerOptions(Options):
    tag: str | None = option(string, None)


SCHEMA: DriverSchema[ToyOptions, ToyQueueOptions, ToyConsumerOptions] = DriverSchema(
    "toy", ToyOptions, ToyQueueOptions, ToyConsumerOptions
)
