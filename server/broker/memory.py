"""Memory broker: one node's sequencing, history and feed, in process.

Per guild it keeps the epoch, the last ``s`` and the history (bounded by
count and by age) and hands each appended record to the listener of that
guild on this node. Only the guild's actor appends (the registry keeps one
actor per guild), so each guild log has one writer and needs no lock.

A guild whose history has emptied (every event aged out) and that nobody
listens to is forgotten by :meth:`sweep`; its next use starts a new epoch,
which is what the protocol asks when history is lost. History is bounded by
count and age per guild and by bytes per guild and per node
(``guildcast.core.histbudget``: the oldest events leave first), so memory
is bounded by those limits plus one small log per guild in use.

Idempotency keys (``append_keyed``): the node's window of keys
(``guildcast.core.idempotency``), consulted and updated in the same
synchronous step that assigns ``s``, so two publishes with one key never
both sequence.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Sequence
from itertools import islice

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
from guildcast.core.histbudget import HistoryBudget
from guildcast.core.idempotency import KeyWindows, Replayed, Seen, settle
from guildcast.core.metrics import MetricsSnapshot
from guildcast.protocol import wire

#: Defaults of the history byte bounds (``Config.history_guild_bytes`` and
#: ``history_node_bytes``, docs/SECURITY.md).
HISTORY_GUILD_BYTES = 4 * 1024 * 1024
HISTORY_NODE_BYTES = 256 * 1024 * 1024


class _Log:
    __slots__ = ("epoch", "nbytes", "records", "seq")

    def __init__(self, epoch: str, seq: int) -> None:
        self.epoch = epoch
        self.seq = seq
        #: Bounded by the broker (count, age, bytes), not by the deque.
        self.records: deque[Record] = deque()
        #: Bytes of ``records`` as the budget counts them.
        self.nbytes = 0


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
        self._logs: dict[str, _Log] = {}
        #: Listeners per guild: an old guild actor still stopping and its
        #: successor may overlap, so listen/unlisten are counted.
        self._listening: dict[str, int] = {}
        self._feed: Feed | None = None
        self._presence_feed: PresenceFeed | None = None
        #: Presence of each guild: member key -> member, in join order.
        self._presence: dict[str, dict[str, Presence]] = {}
        #: The version of each guild's presence (``PresenceSnapshot``): kept
        #: while the guild has members or a listener, forgotten after. A
        #: version never repeats: a guild's versions start again above every
        #: version forgotten (``_pfloor``), so a change still queued from
        #: before is always older than a snapshot taken after.
        self._pversion: dict[str, int] = {}
        self._pfloor = 0

    @property
    def healthy(self) -> bool:
        return True

    async def start(self, tg: asyncio.TaskGroup | None = None) -> None:
        pass  # no background task: the node's sweeper calls ``sweep``

    async def close(self) -> None:
        self._listening.clear()

    def set_feed(self, feed: Feed, presence: PresenceFeed | None = None) -> None:
        self._feed = feed
        self._presence_feed = presence

    def presence_join(self, gid: str, member: Presence) -> None:
        members = self._presence.setdefault(gid, {})
        if members.get(member.key) == member:
            return  # already present: no change, nothing to tell
        members[member.key] = member
        v = self._pversion[gid] = self._pversion.get(gid, self._pfloor) + 1
        if self._presence_feed is not None and gid in self._listening:
            self._presence_feed(gid, "join", member, v)

    def presence_leave(self, gid: str, member: Presence) -> None:
        members = self._presence.get(gid)
        if members is None or members.pop(member.key, None) is None:
            return
        v = self._pversion[gid] = self._pversion.get(gid, self._pfloor) + 1
        if not members:
            del self._presence[gid]
        if self._presence_feed is not None and gid in self._listening:
            self._presence_feed(gid, "leave", member, v)
        self._forget_version(gid)

    def _forget_version(self, gid: str) -> None:
        """Forget the presence version of a guild nobody holds one of."""
        if gid not in self._presence and gid not in self._listening:
            self._pfloor = max(self._pfloor, self._pversion.pop(gid, 0))

    async def presence(self, gid: str) -> list[Presence]:
        return list(self._presence.get(gid, {}).values())

    async def presence_snapshot(self, gid: str, limit: int) -> PresenceSnapshot:
        members = self._presence.get(gid, {})
        listed = list(islice(members.values(), max(0, limit)))
        return PresenceSnapshot(self._pversion.get(gid, self._pfloor), len(members), listed)

    def _log(self, gid: str) -> _Log:
        log = self._logs.get(gid)
        if log is None:
            log = self._logs[gid] = _Log(secrets.token_hex(8), 0)
        return log

    def _prune(self, log: _Log, now: float) -> None:
        cutoff = now - self.history_ttl
        recs = log.records
        while recs and recs[0].ts < cutoff:
            self.budget.popleft(log)

    def _keep(self, log: _Log, recs: list[Record]) -> None:
        """Add ``recs`` to ``log``'s history within every bound."""
        log.records.extend(recs)
        budget = self.budget
        budget.added(log, recs)
        while len(log.records) > self.history_size:
            budget.popleft(log)
        if budget.over:
            budget.enforce(self._logs.values())

    def _sequence(self, gid: str, items: Sequence[tuple[str, bytes]]) -> tuple[str, list[Record]]:
        """Sequence and store ``items`` (the memory broker never waits)."""
        log = self._log(gid)
        now = time.time()
        out: list[Record] = []
        s = log.seq
        for t, d in items:
            s += 1
            out.append(Record(s, t, now, wire.dispatch_json(gid, t, s, d)))
        log.seq = s
        if self.history_size > 0:
            self._keep(log, out)
        self._prune(log, now)
        return log.epoch, out

    async def append_local(
        self, gid: str, items: Sequence[tuple[str, bytes]]
    ) -> tuple[str, list[Record]]:
        """``LocalLog``: the records go back to the appender, not to the feed."""
        return self._sequence(gid, items)

    async def append(self, gid: str, items: Sequence[tuple[str, bytes]]) -> tuple[str, list[int]]:
        epoch, recs = self._sequence(gid, items)
        if gid in self._listening and self._feed is not None:
            self._feed(gid, recs)
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
        if recs and gid in self._listening and self._feed is not None:
            self._feed(gid, recs)
        return epoch, out

    async def head(self, gid: str) -> tuple[str, int]:
        log = self._log(gid)
        return log.epoch, log.seq

    async def read(self, gid: str, after: int, limit: int) -> tuple[str, list[Record]]:
        log = self._log(gid)
        self._prune(log, time.time())
        recs = log.records
        if not recs:
            return log.epoch, []
        start = min(len(recs), max(0, after + 1 - recs[0].s))  # after may be near 2**63
        return log.epoch, list(islice(recs, start, start + limit))

    async def first(self, gid: str) -> int | None:
        log = self._log(gid)
        self._prune(log, time.time())
        return log.records[0].s if log.records else None

    async def listen(self, gid: str) -> None:
        self._listening[gid] = self._listening.get(gid, 0) + 1

    async def unlisten(self, gid: str) -> None:
        n = self._listening.get(gid, 0) - 1
        if n > 0:
            self._listening[gid] = n
        else:
            self._listening.pop(gid, None)
            self._forget_version(gid)

    def report_metrics(self, m: MetricsSnapshot) -> None:
        """``ReportsMetrics``: the history byte budget."""
        m.history_bytes = self.budget.total
        m.history_evictions = self.budget.evicted

    def sweep(self) -> int:
        """Forget guilds with no history left and no listener; returns how many."""
        now = time.time()
        gone = []
        for gid, log in self._logs.items():
            self._prune(log, now)
            if not log.records and gid not in self._listening:
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
