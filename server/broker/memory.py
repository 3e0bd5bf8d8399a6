"""Memory broker: one node's sequencing, history and feed, in process.

Per guild it keeps the epoch, the last ``s`` and the history (bounded by
count and by age) and hands each appended record to the listener of that
guild on this node. Only the guild's actor appends (the registry keeps one
actor per guild), so each guild log has one writer and needs no lock.

A guild whose history has emptied (every event aged out) and that nobody
listens to is forgotten by :meth:`sweep`; its next use starts a new epoch,
which is what the protocol asks when history is lost. Memory is therefore
bounded by the live guilds' history limits.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Sequence
from itertools import islice

from guildcast.broker.base import Broker, Feed, Presence, PresenceFeed, Record
from guildcast.protocol import wire


class _Log:
    __slots__ = ("epoch", "records", "seq")

    def __init__(self, epoch: str, seq: int, history_size: int) -> None:
        self.epoch = epoch
        self.seq = seq
        self.records: deque[Record] = deque(maxlen=history_size or 1)


class MemoryBroker:
    """Broker for a single node (no cross-node delivery)."""

    def __init__(self, history_size: int, history_ttl: float, node_id: str = "local") -> None:
        self.node_id = node_id
        self.history_size = history_size
        self.history_ttl = history_ttl
        self._logs: dict[str, _Log] = {}
        #: Listeners per guild: an old guild actor still stopping and its
        #: successor may overlap, so listen/unlisten are counted.
        self._listening: dict[str, int] = {}
        self._feed: Feed | None = None
        self._presence_feed: PresenceFeed | None = None
        #: Presence of each guild: member key -> member, in join order.
        self._presence: dict[str, dict[str, Presence]] = {}

    @property
    def healthy(self) -> bool:
        return True

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._listening.clear()

    def set_feed(self, feed: Feed, presence: PresenceFeed | None = None) -> None:
        self._feed = feed
        self._presence_feed = presence

    def presence_join(self, gid: str, member: Presence) -> None:
        self._presence.setdefault(gid, {})[member.key] = member
        if self._presence_feed is not None and gid in self._listening:
            self._presence_feed(gid, "join", member)

    def presence_leave(self, gid: str, member: Presence) -> None:
        members = self._presence.get(gid)
        if members is None or members.pop(member.key, None) is None:
            return
        if not members:
            del self._presence[gid]
        if self._presence_feed is not None and gid in self._listening:
            self._presence_feed(gid, "leave", member)

    async def presence(self, gid: str) -> list[Presence]:
        return list(self._presence.get(gid, {}).values())

    def _log(self, gid: str) -> _Log:
        log = self._logs.get(gid)
        if log is None:
            log = self._logs[gid] = _Log(secrets.token_hex(8), 0, self.history_size)
        return log

    def _prune(self, log: _Log, now: float) -> None:
        cutoff = now - self.history_ttl
        recs = log.records
        while recs and recs[0].ts < cutoff:
            recs.popleft()

    def append_now(self, gid: str, items: Sequence[tuple[str, bytes]]) -> tuple[str, list[Record]]:
        """Synchronous append (the memory broker never waits)."""
        log = self._log(gid)
        now = time.time()
        out: list[Record] = []
        s = log.seq
        keep = self.history_size > 0
        for t, d in items:
            s += 1
            rec = Record(s, t, now, wire.dispatch_json(gid, t, s, d))
            out.append(rec)
            if keep:
                log.records.append(rec)
        log.seq = s
        self._prune(log, now)
        if gid in self._listening and self._feed is not None:
            self._feed(gid, out)
        return log.epoch, out

    async def append(self, gid: str, items: Sequence[tuple[str, bytes]]) -> tuple[str, list[int]]:
        epoch, recs = self.append_now(gid, items)
        return epoch, [r.s for r in recs]

    async def head(self, gid: str) -> tuple[str, int]:
        log = self._log(gid)
        return log.epoch, log.seq

    async def read(self, gid: str, after: int, limit: int) -> tuple[str, list[Record]]:
        log = self._log(gid)
        self._prune(log, time.time())
        recs = log.records
        if not recs:
            return log.epoch, []
        start = max(0, after + 1 - recs[0].s)
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
        return len(gone)


def _conforms() -> None:
    """mypy checks the implementation against the contract (DESIGN.md house style)."""
    _: type[Broker] = MemoryBroker
