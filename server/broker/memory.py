"""Memory broker: one node's sequencing, history and feed, in process.

Per guild it keeps the epoch, the last ``s`` and the history (bounded by
count and by age) and hands each appended record to the listener of that
guild on this node. Only the guild's actor appends (the registry keeps one
actor per guild), so each guild log has one writer and needs no lock.

A guild whose history has emptied (every event aged out) and that nobody
listens to is forgotten by :meth:`sweep`; its next use starts a new epoch,
which is what the protocol asks when history is lost. History is bounded by
count and age per guild and by bytes per guild and per node
(``guildcast.broker.histbudget``: the oldest events leave first), so memory
is bounded by those limits plus one small log per guild in use.

Idempotency keys (``append_keyed``): the node's window of keys
(``guildcast.core.idempotency``), consulted and updated in the same
synchronous step that assigns ``s``, so two publishes with one key never
both sequence.

Parts: a :class:`GuildLog` per guild (epoch, last ``s``, the history ring of
``broker/history.py``), which the disk broker composes with a journal, and
a :class:`~guildcast.broker.local.LocalFeed` (listeners, feed, presence),
which the disk broker holds too (with the presence versions).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence

from guildcast.broker.base import (
    Broker,
    Feed,
    LocalLog,
    Presence,
    PresenceFeed,
    PresenceSnapshot,
    Record,
    ReportsMetrics,
    Sweeps,
)
from guildcast.broker.histbudget import HistoryBudget
from guildcast.broker.history import History
from guildcast.broker.local import LocalFeed
from guildcast.core.idempotency import KeyWindows, Replayed, Seen, settle
from guildcast.core.metrics import MetricsSnapshot
from guildcast.protocol import wire

#: Defaults of the history byte bounds (``Config.history_guild_bytes`` and
#: ``history_node_bytes``, docs/SECURITY.md).
HISTORY_GUILD_BYTES = 4 * 1024 * 1024
HISTORY_NODE_BYTES = 256 * 1024 * 1024


class GuildLog:
    """One guild's log in memory: its epoch, last ``s`` and history ring.

    Appending is two steps so that a durable log (``broker/disk.py``) can
    write the records between them: :meth:`next_records` builds them (``s``
    assigned, the DISPATCH envelope built once with ``wire.dispatch_json``)
    without changing the log; :meth:`commit` makes them the log's.
    """

    __slots__ = ("epoch", "history", "seq")

    def __init__(self, epoch: str, seq: int, history: History) -> None:
        self.epoch = epoch
        self.seq = seq
        self.history = history

    def next_records(
        self, gid: str, items: Sequence[tuple[str, bytes]], now: float
    ) -> list[Record]:
        """The records ``items`` become after the last ``s`` (not committed)."""
        s = self.seq
        out: list[Record] = []
        for t, d in items:
            s += 1
            out.append(Record(s, t, now, wire.dispatch_json(gid, t, s, d)))
        return out

    def commit(self, recs: list[Record], now: float) -> None:
        """``recs`` (from :meth:`next_records`) are the log's: head and history."""
        if recs:
            self.seq = recs[-1].s
        self.history.add(recs, now)


class MemoryBroker:
    """Broker for a single node (no cross-node delivery)."""

    def __init__(
        self,
        history_size: int,
        history_ttl: float,
        node_id: str = "local",
        history_guild_bytes: int = HISTORY_GUILD_BYTES,
        history_node_bytes: int = HISTORY_NODE_BYTES,
        idempotency: KeyWindows | None = None,
    ) -> None:
        self.node_id = node_id
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.budget = HistoryBudget(history_guild_bytes, history_node_bytes)
        #: The idempotency window of every guild (``append_keyed``).
        self.keys = idempotency if idempotency is not None else KeyWindows()
        self._logs: dict[str, GuildLog] = {}
        self.local = LocalFeed()

    @property
    def healthy(self) -> bool:
        return True

    async def start(self, tg: asyncio.TaskGroup | None = None) -> None:
        pass  # no background task: the node's sweeper calls ``sweep``

    async def close(self) -> None:
        self.local.clear()

    def set_feed(self, feed: Feed, presence: PresenceFeed | None = None) -> None:
        self.local.set_feed(feed, presence)

    def presence_join(self, gid: str, member: Presence) -> None:
        self.local.join(gid, member)

    def presence_leave(self, gid: str, member: Presence) -> None:
        self.local.leave(gid, member)

    async def presence(self, gid: str) -> list[Presence]:
        return self.local.members(gid)

    async def presence_snapshot(self, gid: str, limit: int) -> PresenceSnapshot:
        return self.local.snapshot(gid, limit)

    def _log(self, gid: str) -> GuildLog:
        log = self._logs.get(gid)
        if log is None:
            history = History(self.history_size, self.history_ttl, self.budget)
            log = self._logs[gid] = GuildLog(secrets.token_hex(8), 0, history)
        return log

    def _sequence(self, gid: str, items: Sequence[tuple[str, bytes]]) -> tuple[str, list[Record]]:
        """Sequence and store ``items`` (the memory broker never waits)."""
        log = self._log(gid)
        now = time.time()
        out = log.next_records(gid, items, now)
        log.commit(out, now)
        budget = self.budget
        if budget.over:
            budget.enforce(lg.history for lg in self._logs.values())
        return log.epoch, out

    async def append_local(
        self, gid: str, items: Sequence[tuple[str, bytes]]
    ) -> tuple[str, list[Record]]:
        """``LocalLog``: the records go back to the appender, not to the feed."""
        return self._sequence(gid, items)

    def append_local_now(
        self, gid: str, items: Sequence[tuple[str, bytes]], epoch: str, head: int
    ) -> list[Record] | None:
        """``AppendsNow``: :meth:`append_local` when the log is at ``(epoch, head)``."""
        log = self._logs.get(gid)
        if log is None or log.epoch != epoch or log.seq != head:
            return None
        return self._sequence(gid, items)[1]

    async def append(self, gid: str, items: Sequence[tuple[str, bytes]]) -> tuple[str, list[int]]:
        epoch, recs = self._sequence(gid, items)
        self.local.records(gid, recs)
        return epoch, [r.s for r in recs]

    def _sequence_keyed(
        self, gid: str, items: Sequence[tuple[str, bytes]], keys: Sequence[str | None]
    ) -> tuple[str, list[Record], list[int | Replayed]]:
        """Sequence the items the window does not already hold, remember their keys."""
        now = time.time()
        fresh, replayed, digests = self.keys.resolve(gid, self._log(gid).epoch, items, keys, now)
        epoch, recs = self._sequence(gid, [items[i] for i in fresh])
        remember(self.keys, gid, epoch, fresh, recs, keys, digests, now)
        return epoch, recs, settle(fresh, [r.s for r in recs], replayed)

    async def append_local_keyed(
        self, gid: str, items: Sequence[tuple[str, bytes]], keys: Sequence[str | None]
    ) -> tuple[str, list[Record], list[int | Replayed]]:
        """``LocalLog``: keyed, the new records back to the appender."""
        return self._sequence_keyed(gid, items, keys)

    async def append_keyed(
        self, gid: str, items: Sequence[tuple[str, bytes]], keys: Sequence[str | None]
    ) -> tuple[str, list[int | Replayed]]:
        epoch, recs, out = self._sequence_keyed(gid, items, keys)
        if recs:
            self.local.records(gid, recs)
        return epoch, out

    async def head(self, gid: str) -> tuple[str, int]:
        log = self._log(gid)
        return log.epoch, log.seq

    async def read(self, gid: str, after: int, limit: int) -> tuple[str, list[Record]]:
        log = self._log(gid)
        return log.epoch, log.history.read(after, limit, time.time())

    async def first(self, gid: str) -> int | None:
        return self._log(gid).history.first(time.time())

    async def listen(self, gid: str) -> None:
        self.local.listen(gid)

    async def unlisten(self, gid: str) -> None:
        self.local.unlisten(gid)

    def report_metrics(self, m: MetricsSnapshot) -> None:
        """``ReportsMetrics``: the history byte budget."""
        m.history_bytes = self.budget.total
        m.history_evictions = self.budget.evicted

    def sweep(self) -> int:
        """Forget guilds with no history left and no listener; returns how many."""
        now = time.time()
        gone = []
        for gid, log in self._logs.items():
            log.history.prune(now)
            if not log.history and not self.local.listening(gid):
                gone.append(gid)
        for gid in gone:
            del self._logs[gid]
            self.keys.forget(gid)  # its next use is a new epoch: the window goes too
        self.keys.expire(now)
        return len(gone)


def remember(
    window: KeyWindows,
    gid: str,
    epoch: str,
    fresh: list[int],
    recs: Sequence[Record],
    keys: Sequence[str | None],
    digests: Sequence[bytes | None],
    now: float,
) -> None:
    """Add the keys of the items that were just sequenced (``fresh[i]`` got
    ``recs[i]``) to ``gid``'s window."""
    for i, rec in zip(fresh, recs, strict=True):
        key = keys[i]
        if key is not None:
            dg = digests[i]
            assert dg is not None
            window.add(gid, key, Seen(rec.s, epoch, dg, now))


def _conforms() -> None:
    """mypy checks the implementation against the contract (docs/DESIGN.md house style)."""
    _: type[Broker] = MemoryBroker
    _local: type[LocalLog] = MemoryBroker
    _sweeps: type[Sweeps] = MemoryBroker
    _report: type[ReportsMetrics] = MemoryBroker
