"""Per-key token buckets in process memory (each replica limits on its own)."""

from __future__ import annotations

import math
import time
import uuid


class RateLimiter:
    """A token bucket per key: `rate` tokens per second, holding at most one second's worth.

    A request costs its number of events. A request larger than the bucket is let through when the
    bucket is full and leaves it in debt, so a small limit never blocks a valid batch forever.
    """

    def __init__(self) -> None:
        self._buckets: dict[uuid.UUID, tuple[float, float]] = {}

    def _level(self, key_id: uuid.UUID, rate: float, now: float) -> float:
        tokens, last = self._buckets.get(key_id, (rate, now))
        return min(rate, tokens + (now - last) * rate)

    def retry_after(self, key_id: uuid.UUID, rate: float, cost: float = 1) -> int | None:
        """Take `cost` tokens and return None, or return the seconds to wait (nothing taken)."""
        now = time.monotonic()
        tokens = self._level(key_id, rate, now)
        need = min(cost, rate)
        if tokens < need:
            self._buckets[key_id] = (tokens, now)
            return max(1, math.ceil((need - tokens) / rate))
        self._buckets[key_id] = (tokens - cost, now)
        return None

    def exhausted(self, key_id: uuid.UUID, rate: float) -> int | None:
        """Seconds to wait if the bucket is empty (checked before reading a body), else None."""
        now = time.monotonic()
        tokens = self._level(key_id, rate, now)
        # A bucket holds one second's worth, so below one event per second it never holds a whole
        # token: a full bucket is enough then (as in `retry_after`), or such a key is refused forever.
        need = min(1.0, rate)
        if tokens < need:
            return max(1, math.ceil((need - tokens) / rate))
        return None
