"""Per-connection and per-address limits (pure, clock injected)."""

from __future__ import annotations

import time
from collections import Counter


class TokenBucket:
    """`rate` messages per second sustained, `burst` at once."""

    def __init__(self, rate: float, burst: int, now: float | None = None):
        self.rate, self.burst = rate, float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic() if now is None else now

    def allow(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class AddressCounter:
    """Concurrent connections per client address."""

    def __init__(self, cap: int):
        self.cap = cap
        self.open: Counter[str] = Counter()

    def acquire(self, address: str) -> bool:
        if self.open[address] >= self.cap:
            return False
        self.open[address] += 1
        return True

    def release(self, address: str) -> None:
        self.open[address] -= 1
        if self.open[address] <= 0:
            del self.open[address]
