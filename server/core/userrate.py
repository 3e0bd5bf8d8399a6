"""Per-user publish volume: one token bucket of bytes per user, shared by
every connection of that user on this node (``Config.user_publish_bytes``,
docs/SECURITY.md "Resource limits"). Tokens with their own ``pub_rate`` are
not charged: that claim is the issuer's decision, as it overrides
``--publish-rate``.

A PUBLISH of ``n`` bytes (its whole message) takes ``n`` tokens; the bucket
refills continuously at ``rate`` bytes/s and holds one second's worth, so a
user who opens more connections gets no more volume. A PUBLISH that finds
fewer than ``n`` tokens is refused (ERROR 4429) and takes none.

Bound: one entry per user who published within the last second or so:
:meth:`UserBuckets.prune` (the gateway's sweeper calls it) drops buckets
that have refilled, which hold nothing a new bucket would not.
"""

from __future__ import annotations

#: Seconds between two prunes.
PRUNE_INTERVAL = 10.0


class UserBuckets:
    """Token buckets of bytes, keyed by user (token ``sub``)."""

    __slots__ = ("_buckets", "_next_prune", "rate", "refused")

    def __init__(self, rate: float) -> None:
        #: Bytes per second (and the burst); 0 or less: unlimited.
        self.rate = rate
        #: user -> [tokens, time of that count]
        self._buckets: dict[str, list[float]] = {}
        self._next_prune = 0.0
        #: PUBLISHes refused (``guildcast_user_publish_refused_total``).
        self.refused = 0

    def take(self, user: str, n: int, now: float) -> bool:
        """Take ``n`` bytes from ``user``'s bucket; False (nothing taken) if short."""
        rate = self.rate
        if rate <= 0:
            return True
        b = self._buckets.get(user)
        if b is None:
            tokens = rate
            b = self._buckets[user] = [tokens, now]
        else:
            tokens = min(rate, b[0] + (now - b[1]) * rate)
        b[1] = now
        if tokens < n:
            b[0] = tokens
            self.refused += 1
            return False
        b[0] = tokens - n
        return True

    def prune(self, now: float) -> int:
        """Forget buckets that are full again (at most once per interval)."""
        if now < self._next_prune or self.rate <= 0:
            return 0
        self._next_prune = now + PRUNE_INTERVAL
        rate = self.rate
        full = [u for u, (tok, t) in self._buckets.items() if tok + (now - t) * rate >= rate]
        for u in full:
            del self._buckets[u]
        return len(full)

    def __len__(self) -> int:
        return len(self._buckets)
