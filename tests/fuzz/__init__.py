"""Property-based fuzz tests (hypothesis): bounded, deterministic and fast.

Every test runs a fixed number of derandomized examples with no example database, so
a run is the same on every machine and leaves nothing behind; the whole package takes
seconds. A failure prints the smallest input hypothesis found.

For a longer, random exploration set ``CONVEYOR_FUZZ_EXAMPLES`` (e.g. 5000): each test
then runs that many examples from a random seed (still without a database).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

__all__ = ["FUZZ"]

_EXPLORE = int(os.environ.get("CONVEYOR_FUZZ_EXAMPLES") or 0)

FUZZ = settings(
    max_examples=_EXPLORE or 150,
    deadline=None,
    derandomize=not _EXPLORE,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
