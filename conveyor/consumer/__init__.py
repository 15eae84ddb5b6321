"""Consumer runtime: worker pools, settlement, retries and dead letters."""

from conveyor.consumer.runtime import Consumer, ConsumerStats

__all__ = ["Consumer", "ConsumerStats"]
