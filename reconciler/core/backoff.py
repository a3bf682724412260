"""Retry delays: exponential from a base, jittered, capped, and never shorter than the base.

One helper for every retry loop that waits between attempts: the daemon after a failed run (base:
the interval, cap: backoff_max) and a revision that hit the DDL lock timeout within a run (base:
`[apply] lock_timeout_backoff`). No imports beyond the standard library: one-shot commands use it.
"""

from __future__ import annotations

import random
from typing import Protocol


class _Uniform(Protocol):
    def uniform(self, a: float, b: float) -> float: ...


def retry_window(attempt: int, base: float, cap: float) -> tuple[float, float]:
    """The range retry number `attempt` (1, 2, ...) is drawn from: never below `base`.

    The top doubles with each attempt (2 * `base`, 4 * `base`, ...) up to `cap` (or `base`, when
    `cap` is smaller); the bottom is half the top, but at least `base`.
    """
    base = max(base, 0.0)
    exponent = min(max(attempt, 1), 60)  # 2.0 ** 60 already exceeds any sensible cap
    top = max(base, min(cap, base * 2.0**exponent))
    return max(base, top / 2), top


def backoff(attempt: int, base: float, cap: float, rng: _Uniform = random) -> float:
    """Seconds to wait before retry number `attempt`: exponential from `base`, jittered, capped.

    Drawn uniformly from `retry_window` (the first retry from [base, 2 * base], the next from
    [2 * base, 4 * base], ... up to [cap / 2, cap]), so replicas that failed together retry apart
    and a retry never comes sooner than `base` (the daemon passes its interval: a failing
    replica never queries more often than a healthy one).
    """
    low, top = retry_window(attempt, base, cap)
    return rng.uniform(low, top)
