"""Which handler failures are retried.

A failed attempt is retried (until the queue's ``max_attempts``) unless the failure
says it is pointless: an :class:`~conveyor.errors.Error` raised with
``retryable=False`` stated (``retry_hint is False``), or a failure the consumer's
``retry.never_on`` names. ``retry.always_on`` wins over both. Each list holds error
kinds (``INVALID``) or exception classes (``ValueError``, ``pkg.mod:MyError``);
classes match their subclasses too.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from pathlib import Path

from conveyor import errors
from conveyor.functions import import_callable
from conveyor.registry.model import ConsumerSpec

__all__ = ["RetryRule", "resolve_failure"]

Match = tuple[frozenset[str], tuple[type[BaseException], ...]]


def resolve_failure(ref: str, base_dir: Path | None = None) -> str | type[BaseException]:
    """An error kind (returned as is) or the exception class ``ref`` names; INVALID otherwise."""
    if ref in errors.KINDS:
        return ref
    if ":" in ref:
        found: object = import_callable(ref, base_dir)
    else:
        found = getattr(builtins, ref, None)
        if found is None:
            raise errors.invalid(
                f"{ref!r} is not a built-in exception; name others as 'package.module:ClassName'"
            )
    if not (isinstance(found, type) and issubclass(found, BaseException)):
        raise errors.invalid(f"{ref!r} is not an exception class")
    return found


def _matcher(refs: tuple[str, ...], base_dir: Path | None) -> Match:
    kinds: set[str] = set()
    classes: list[type[BaseException]] = []
    for ref in refs:
        found = resolve_failure(ref, base_dir)
        if isinstance(found, str):
            kinds.add(found)
        else:
            classes.append(found)
    return frozenset(kinds), tuple(classes)


def _matches(match: Match, failure: BaseException) -> bool:
    kinds, classes = match
    if kinds and isinstance(failure, errors.Error) and failure.kind in kinds:
        return True
    return bool(classes) and isinstance(failure, classes)


@dataclass(frozen=True, slots=True)
class RetryRule:
    never: Match = (frozenset(), ())
    always: Match = (frozenset(), ())

    @classmethod
    def of(cls, spec: ConsumerSpec) -> RetryRule:
        """The consumer's rule; INVALID if a class it names cannot be imported."""
        return cls(_matcher(spec.never_retry, spec.base_dir), _matcher(spec.always_retry, spec.base_dir))

    def retries(self, failure: BaseException) -> bool:
        if _matches(self.always, failure):
            return True
        if _matches(self.never, failure):
            return False
        return not (isinstance(failure, errors.Error) and failure.retry_hint is False)
