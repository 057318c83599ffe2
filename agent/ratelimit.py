"""Token buckets: per client address for signaling, per room for data-channel messages."""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; ``take`` says whether one was there."""

    __slots__ = ("rate", "burst", "tokens", "stamp", "_clock")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self._clock = rate, burst, clock
        self.tokens, self.stamp = burst, clock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self) -> bool:
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def retry_after_s(self) -> float:
        """Seconds until the next token."""
        self._refill()
        return max(0.0, (1.0 - self.tokens) / self.rate) if self.rate > 0 else float("inf")


class KeyedLimiter:
    """One bucket per key (a client address). The least recently seen keys are forgotten beyond
    ``max_keys``, so a flood from many addresses costs bounded memory; a forgotten key starts
    again with a full bucket, which errs towards letting people in."""

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.max_keys, self._clock = rate, burst, max_keys, clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def check(self, key: str) -> float | None:
        """None when allowed; otherwise the seconds to wait (for Retry-After)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self._clock)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return None if bucket.take() else bucket.retry_after_s()
