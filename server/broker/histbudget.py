"""The node-wide byte budget of in-memory guild history (single node brokers).

A guild's history is bounded by count (``history_size``) and age
(``history_ttl``); this adds two bounds by bytes, so that no mix of event
sizes and guilds can take the node's memory:

- ``history_guild_bytes``: one guild's history; past it that guild's oldest
  events leave first.
- ``history_node_bytes``: the history of every guild of the node; past it
  the oldest events of the whole node leave first (whichever guild they
  belong to), down to :data:`LOW_WATER` of the bound, so that one eviction
  pass pays for many appends.

An event costs ``len(payload) + RECORD_OVERHEAD``: the overhead is what the
record, its tuple and its deque slot cost in CPython, so the budget bounds
memory, not just payload bytes. Evicted events are gone from recovery:
``first()`` moves past them and a subscriber whose Position falls there gets
``recovered: false`` (PROTOCOL.md), never other events.

Consistency model: one event loop; every add and removal of a history
record goes through :meth:`HistoryBudget.added` / :meth:`removed` (the
brokers call them), so :attr:`HistoryBudget.total` is exact.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from typing import Protocol

from guildcast.broker.base import Record

#: Bytes one history record costs beyond its payload: the ``Record`` tuple
#: (72), the payload ``bytes`` header (33), the event name (about 50) and
#: its share of the deque's blocks (8), rounded up.
RECORD_OVERHEAD = 200
#: A node-wide eviction pass stops at this share of the bound.
LOW_WATER = 0.9


class HasHistory(Protocol):
    records: deque[Record]
    nbytes: int


def cost(rec: Record) -> int:
    return len(rec.payload) + RECORD_OVERHEAD


class HistoryBudget:
    """Counts history bytes and evicts the oldest when a bound is passed."""

    __slots__ = ("evicted", "guild_bytes", "node_bytes", "total")

    def __init__(self, guild_bytes: int, node_bytes: int) -> None:
        if guild_bytes <= 0 or node_bytes <= 0:
            raise ValueError("history byte bounds must be > 0")
        self.guild_bytes = guild_bytes
        self.node_bytes = node_bytes
        #: Bytes of every guild's history (``guildcast_history_bytes``).
        self.total = 0
        #: Events evicted by the byte bounds (``guildcast_history_evictions_total``).
        self.evicted = 0

    def added(self, log: HasHistory, recs: Iterable[Record]) -> None:
        """``recs`` were appended to ``log.records``; applies the guild bound."""
        n = sum(cost(r) for r in recs)
        log.nbytes += n
        self.total += n
        records = log.records
        while log.nbytes > self.guild_bytes and records:
            self._pop(log)
            self.evicted += 1

    def popleft(self, log: HasHistory) -> Record:
        """Remove ``log``'s oldest record (the count or age bound) and count it."""
        return self._pop(log)

    def _pop(self, log: HasHistory) -> Record:
        rec = log.records.popleft()
        c = cost(rec)
        log.nbytes -= c
        self.total -= c
        return rec

    def dropped(self, log: HasHistory) -> None:
        """``log`` leaves memory with all its records (forgotten or evicted)."""
        self.total -= log.nbytes
        log.nbytes = 0

    @property
    def over(self) -> bool:
        return self.total > self.node_bytes

    def enforce(self, logs: Iterable[HasHistory]) -> int:
        """If the node is over its bound, evict the node's oldest events
        (by publish time, across guilds) down to :data:`LOW_WATER` of it.

        O(G log G) for G guilds with history, once per
        ``(1 - LOW_WATER) * node_bytes`` of new history at most. Returns
        the number of events evicted.
        """
        if not self.over:
            return 0
        target = int(self.node_bytes * LOW_WATER)
        heap = [(log.records[0].ts, i, log) for i, log in enumerate(logs) if log.records]
        heapq.heapify(heap)
        n = 0
        while heap and self.total > target:
            _, i, log = heap[0]
            self._pop(log)
            n += 1
            if log.records:
                heapq.heapreplace(heap, (log.records[0].ts, i, log))
            else:
                heapq.heappop(heap)
        self.evicted += n
        return n
