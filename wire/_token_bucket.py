"""A token bucket fed the time: the one rate limit of the node.

Every limit in dmgn that says "so many a second, so many at once" is this bucket: new
connections per address (`wire.websocket`), bytes sent to strangers (the transport), the
storage service's meters, gossip's per-peer budgets and the DHT's answer allowance.

Sans-IO like the rest of `wire`'s core: it never reads a clock, callers pass ``now`` from the
clock they run on (Trio's, so tests and sims drive it with a ``MockClock``; the DHT's asyncio
thread passes `time.monotonic`). It lives here, in the lowest layer, because `wire.websocket`
paces connections with it and `wire` imports nothing of ours.

A bucket starts full, so the time of its first use is the time it is measured from: one made
before the clock runs (an actor built outside Trio) needs no time to be made.
"""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` tokens a second, refilled up to ``burst``; starts full.

    `take` spends only what is there; `overdraw` spends regardless and says how long the debt
    takes to refill (a pacer sleeps that long); `give` adds tokens that may lift the balance
    above ``burst`` and stay (earned credit, which refilling never takes away).
    Slotted because the storage service keeps thousands (one per metered owner, address and
    connection).
    """

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst, self.tokens = rate, burst, burst
        self.stamp: float | None = None

    def _refill(self, now: float) -> None:
        if self.stamp is not None:
            # max(): refilling stops at ``burst`` but never lowers credit `give` added above it.
            # For a balance at or below ``burst`` this is exactly min(burst, tokens + refill).
            self.tokens = max(
                self.tokens, min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            )
        self.stamp = now

    def take(self, amount: float, now: float) -> bool:
        """Spend ``amount`` tokens if there are that many; False (nothing spent) otherwise."""
        self._refill(now)
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True

    def overdraw(self, amount: float, now: float) -> float:
        """Spend ``amount`` even into debt; the seconds until the balance is back to zero."""
        self._refill(now)
        self.tokens -= amount
        return -self.tokens / self.rate if self.tokens < 0 else 0.0

    def give(self, amount: float, now: float) -> None:
        """Add ``amount`` tokens, beyond ``burst`` if it comes to that."""
        self._refill(now)
        self.tokens += amount
