"""Limits that keep one client from hurting the rest: a token bucket, and one for each
address that opens connections."""

from __future__ import annotations

import time
from typing import Final

__all__ = ["AddressRates", "TokenBucket"]

#: Addresses tracked before the idle ones (their buckets full again) are forgotten.
_PRUNE_AT: Final = 10_000


class TokenBucket:
    """``rate`` a second, in bursts of up to ``burst``."""

    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.at = float(burst), time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def idle(self, now: float) -> bool:
        """Whether it has filled up again: forgetting it changes nothing."""
        return self.tokens + (now - self.at) * self.rate >= self.burst


class AddressRates:
    """New connections a second from each address (``rate`` 0: no limit)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, TokenBucket] = {}
        self._pruned_at = time.monotonic()

    def allow(self, address: str) -> bool:
        if self.rate <= 0:
            return True
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= _PRUNE_AT:
                self._prune()
            bucket = self._buckets[address] = TokenBucket(self.rate, self.burst)
        return bucket.allow()

    def _prune(self) -> None:
        now = time.monotonic()
        if now - self._pruned_at < 1.0:
            return  # at most once a second, however many addresses arrive
        self._pruned_at = now
        self._buckets = {a: b for a, b in self._buckets.items() if not b.idle(now)}
