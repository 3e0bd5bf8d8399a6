"""One guild's history ring: the records still kept for recovery, oldest
first, bounded by count (``size``), age (``ttl`` seconds) and bytes (the
node's :class:`~guildcast.broker.histbudget.HistoryBudget`: the guild's bound
here, the node's bound enforced by the ring's owner across every ring).

The in-process logs keep one each: the memory broker's guild log and,
through it, the disk broker's (``broker/memory.py`` ``GuildLog``). Records
arrive in ``s`` order with no gap; so a read after ``s`` is one index
computation, ``after + 1 - first``.

Consistency model: one event loop, one writer per ring (the guild's log);
every record that enters or leaves goes through the budget, so its byte
count is exact. :meth:`restore` is the one exception, for a ring filled in
a thread before it is shared: :meth:`count_restored` counts it on the loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from itertools import islice

from guildcast.broker.base import Record
from guildcast.broker.histbudget import HistoryBudget


class History:
    """A bounded ring of one guild's records, oldest first."""

    __slots__ = ("budget", "nbytes", "records", "size", "ttl")

    def __init__(self, size: int, ttl: float, budget: HistoryBudget) -> None:
        #: Most records kept (0: none, history off).
        self.size = size
        #: Seconds a record is kept after its publish time.
        self.ttl = ttl
        self.budget = budget
        #: Bounded by ``size``, ``ttl`` and the budget, not by the deque.
        self.records: deque[Record] = deque()
        #: Bytes of ``records`` as the budget counts them.
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.records)

    def add(self, recs: Sequence[Record], now: float) -> None:
        """Keep ``recs`` (the next records, in ``s`` order) within the count,
        byte and age bounds. The node's byte bound is the owner's to enforce
        (:attr:`HistoryBudget.over`), across every ring."""
        if self.size > 0:
            self.records.extend(recs)
            budget = self.budget
            budget.added(self, recs)
            while len(self.records) > self.size:
                budget.popleft(self)
        self.prune(now)

    def prune(self, now: float) -> None:
        """Drop the records older than ``ttl``."""
        cutoff = now - self.ttl
        recs = self.records
        while recs and recs[0].ts < cutoff:
            self.budget.popleft(self)

    def read(self, after: int, limit: int, now: float) -> list[Record]:
        """At most ``limit`` kept records with ``s > after``, oldest first."""
        self.prune(now)
        recs = self.records
        if not recs:
            return []
        start = min(len(recs), max(0, after + 1 - recs[0].s))  # after may be near 2**63
        return list(islice(recs, start, start + limit))

    def first(self, now: float) -> int | None:
        """The oldest kept ``s``, or None when nothing is kept."""
        self.prune(now)
        return self.records[0].s if self.records else None

    def clear(self) -> None:
        """Forget every record (the budget is told)."""
        self.records.clear()
        self.budget.dropped(self)

    def restore(self, recs: Iterable[Record], now: float) -> None:
        """Fill a ring not yet shared (a journal loaded in a thread) within the
        count and age bounds, without touching the budget (not thread-safe):
        :meth:`count_restored` counts it, on the loop."""
        if self.size <= 0:
            return
        records = self.records
        records.extend(recs)
        while len(records) > self.size:
            records.popleft()
        cutoff = now - self.ttl
        while records and records[0].ts < cutoff:
            records.popleft()

    def count_restored(self) -> None:
        """Count a :meth:`restore` d ring in the budget (the guild's bound applies)."""
        if self.records:
            self.budget.added(self, list(self.records))
