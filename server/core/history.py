"""A guild's recent events, bounded by count and by age.

Owned by exactly one guild actor (single writer, no locks). Entries are kept
in ``s`` order with no gaps: entry ``i`` holds ``s == first + i``. Each entry
keeps the framed bytes so a replay writes exactly what live subscribers got.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from itertools import islice
from typing import NamedTuple


class Entry(NamedTuple):
    s: int
    t: str
    #: Wall-clock publish time (seconds since the epoch), for the age bound.
    ts: float
    #: The framed DISPATCH (a text frame around the JSON envelope).
    frame: bytes


class History:
    """Bounded event history: at most ``max_count`` entries, none older than ``max_age``."""

    __slots__ = ("_entries", "max_age", "max_count")

    def __init__(self, max_count: int, max_age: float) -> None:
        if max_count < 0 or max_age < 0:
            raise ValueError("history bounds must be >= 0")
        self.max_count = max_count
        self.max_age = max_age
        self._entries: deque[Entry] = deque(maxlen=max_count)

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, entry: Entry) -> None:
        """Add the next event; ``entry.s`` must be one more than the last."""
        e = self._entries
        if e and entry.s != e[-1].s + 1:
            raise ValueError(f"history gap: {e[-1].s} then {entry.s}")
        if self.max_count:
            e.append(entry)

    def prune(self, now: float) -> None:
        """Drop entries older than ``max_age`` seconds at wall time ``now``."""
        e = self._entries
        cutoff = now - self.max_age
        while e and e[0].ts < cutoff:
            e.popleft()

    @property
    def first(self) -> int | None:
        """The oldest ``s`` still held, or None when empty."""
        return self._entries[0].s if self._entries else None

    @property
    def last(self) -> int | None:
        return self._entries[-1].s if self._entries else None

    def covers(self, after: int, head: int) -> bool:
        """True if every event ``after+1 .. head`` is held (trivially so when after == head)."""
        if after == head:
            return True
        if after > head:
            return False
        first = self.first
        return first is not None and first <= after + 1 and self._entries[-1].s >= head

    def since(self, after: int, limit: int | None = None) -> Iterator[Entry]:
        """Entries with ``s > after`` in order (from the oldest held if ``after`` is older)."""
        e = self._entries
        if not e:
            return iter(())
        start = max(0, after + 1 - e[0].s)
        stop = None if limit is None else start + limit
        return islice(e, start, stop)
