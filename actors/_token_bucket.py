"""A token bucket on Trio's clock: the rate limit the storage service and gossip both use.

On Trio's clock rather than the wall clock so that tests and sims can drive it with a
``MockClock``; slotted because the storage service keeps thousands (one per metered owner,
address and connection).
"""

from __future__ import annotations

import trio

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst, self.tokens = rate, burst, burst
        self.stamp = trio.current_time()

    def take(self, amount: float) -> bool:
        """Spend ``amount`` tokens if there are that many; False (nothing spent) otherwise."""
        now = trio.current_time()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True
