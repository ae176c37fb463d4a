"""A small consecutive-failure circuit breaker for the Redis store.

Closed: calls go through. After ``threshold`` consecutive failures it opens: calls
fail fast for ``reset_s``, so a dead Redis costs the request path nothing instead
of a socket timeout each. Then half-open: calls go through again; the first
success closes it, the first failure opens it for another ``reset_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(
        self, *, threshold: int = 5, reset_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if threshold < 1:
            raise ValueError("threshold must be >= 1")
        self.threshold = threshold
        self.reset_s = reset_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self.trips = 0

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at < self.reset_s:
            return "open"
        return "half_open"

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def allow(self) -> bool:
        """False while open (caller must fail fast)."""
        return self.state != "open"

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None

    def failure(self) -> None:
        self._failures += 1
        half_open = self._opened_at is not None
        if half_open or self._failures >= self.threshold:
            if self.state != "open":
                self.trips += 1
            self._opened_at = self._clock()
