"""The token bucket (PROTOCOL.md, "Rate limits"), Sans-I/O: time is passed in.

One implementation for every rate limit of the project: a gateway session's
PUBLISH bucket (:mod:`guildcast.protocol.session`) and the HTTP API's bucket
per key (:mod:`guildcast.transport.http_api`).

Consistency model: a :class:`TokenBucket` is owned by one caller (one
session, one API key) and never shared across threads. It refills
continuously at ``rate`` per second up to ``max(rate, 1)`` tokens (one
second's worth, but at least one whole event, so a rate below 1/s still
allows a burst of one) and starts full.
"""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` tokens per second (> 0), burst ``max(rate, 1)``, full at ``now``."""

    __slots__ = ("at", "cap", "rate", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        if rate <= 0:
            raise ValueError("a token bucket needs a rate > 0 (no bucket means no limit)")
        self.rate = rate
        self.cap = max(rate, 1.0)
        self.tokens = self.cap
        self.at = now

    def take(self, n: int, now: float) -> float:
        """Take ``n`` tokens: 0.0 if granted, else the seconds until they would be.

        A request for more than the burst (a big batch) is granted when the
        bucket is full and leaves it in debt, so the average rate still holds.
        A refused request takes nothing.
        """
        self.tokens = min(self.cap, self.tokens + (now - self.at) * self.rate)
        self.at = now
        need = min(float(n), self.cap)
        if self.tokens >= need:
            self.tokens -= n
            return 0.0
        return (need - self.tokens) / self.rate
