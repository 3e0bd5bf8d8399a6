"""The idempotency window of the single-node brokers (memory, ``--data-dir``).

A publish may carry an idempotency key (PROTOCOL.md "Publishing",
"Idempotent publish"). Within a guild's window, a publish whose key is
already there is not sequenced again: it is answered with the original
``s`` (and the guild's epoch) when its content (``t`` and ``d``) is the
same, and refused as a conflict when it is not. This module owns the
window: which keys are remembered, for how long, and which leave first.

Bounds (every one of them a setting, ``Config.idempotency_*``):

- ``ttl`` seconds: a key is remembered that long after the publish that
  sequenced it (300 s by default: a client timing out after 30 s and
  retrying with backoff is well inside it).
- ``guild_keys`` per guild: past it the guild's oldest key leaves first.
- ``node_keys`` for all guilds of the node: past it the node's oldest key
  leaves first, whichever guild holds it.

An entry remembers the epoch it was sequenced under: a key of another
epoch than the guild's current one is not in the window (the history it
named is lost, and the window with it).

Consistency model: one event loop, no lock. Lookups and additions are made
by the one appender of each guild (its actor, through the broker) between
the broker's reading of the guild's ``seq`` and its writing of the new one,
so a key added by one append is seen by the next; keys repeated within one
batch are resolved by the caller (:func:`resolve`). Eviction is oldest
first by insertion (which is publish order); the clock only decides when an
entry expires.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from typing import NamedTuple

#: Defaults of the window (``Config.idempotency_ttl`` and friends; docs/PROTOCOL.md
#: "Idempotent publish"). 300 s: Centrifugo's window, ten times the HTTP API's
#: 30 s publish timeout, room for retries with backoff. 10,000 keys per guild:
#: a guild publishing 30 keyed events/s keeps every key for the whole TTL.
#: 200,000 per node: about 92 MiB (:data:`ENTRY_BYTES` each), a third of
#: what history may take by default (``history_node_bytes``, 256 MiB).
IDEMPOTENCY_TTL = 300.0
IDEMPOTENCY_GUILD_KEYS = 10_000
IDEMPOTENCY_NODE_KEYS = 200_000
#: Bytes one entry costs in CPython with a 36-character key (a UUID):
#: the key string (85), its digest (41), the entry tuple and its numbers,
#: the guild's ordered-dict slot and the node order's tuple (330),
#: measured with tracemalloc over 100,000 entries, rounded up.
ENTRY_BYTES = 480
#: Bytes of the content digest: enough that two different events of one
#: guild's window never collide by accident (it guards against a client bug,
#: not an adversary, who may publish to the guild anyway).
DIGEST_BYTES = 8


class Seen(NamedTuple):
    """A key in the window: the event it sequenced."""

    s: int
    epoch: str
    digest: bytes
    #: When it was added (``time.time()``), for the TTL.
    ts: float


class Replayed(NamedTuple):
    """A keyed publish the window already holds: answer ``s``; ``conflict``
    when the content differs from the original's."""

    s: int
    conflict: bool


def digest(t: str, d_json: bytes) -> bytes:
    """The content digest of an event (its name and its data as encoded once)."""
    h = hashlib.blake2b(t.encode("ascii"), digest_size=DIGEST_BYTES)
    h.update(b"\0")
    h.update(d_json)
    return h.digest()


class KeyWindows:
    """Every guild's window on this node, bounded per guild, per node and by age."""

    def __init__(
        self,
        ttl: float = IDEMPOTENCY_TTL,
        guild_keys: int = IDEMPOTENCY_GUILD_KEYS,
        node_keys: int = IDEMPOTENCY_NODE_KEYS,
    ) -> None:
        if ttl < 0 or guild_keys < 0 or node_keys < 0:
            raise ValueError("idempotency bounds must be >= 0")
        self.ttl = ttl
        self.guild_keys = guild_keys
        self.node_keys = node_keys
        #: Per guild: key -> entry, oldest first.
        self._guilds: dict[str, OrderedDict[str, Seen]] = {}
        #: The node's insertion order, oldest first: ``(gid, key, entry)``.
        #: It may hold entries already gone from their guild (evicted by the
        #: guild bound); it never holds more than ``node_keys``, so neither
        #: does the window.
        self._order: deque[tuple[str, str, Seen]] = deque()
        #: Keys evicted before their TTL by a count bound (a metric).
        self.evicted = 0

    @property
    def enabled(self) -> bool:
        return self.ttl > 0 and self.guild_keys > 0 and self.node_keys > 0

    def __len__(self) -> int:
        return sum(len(w) for w in self._guilds.values())

    def lookup(self, gid: str, key: str, epoch: str, now: float | None = None) -> Seen | None:
        """The entry of ``key`` in ``gid``'s window under ``epoch``, or None."""
        w = self._guilds.get(gid)
        if w is None:
            return None
        seen = w.get(key)
        if seen is None:
            return None
        now = time.time() if now is None else now
        if seen.epoch != epoch or seen.ts < now - self.ttl:
            return None
        return seen

    def add(self, gid: str, key: str, seen: Seen) -> None:
        """Remember ``key`` as ``seen``; the oldest keys leave past the bounds."""
        if not self.enabled:
            return
        w = self._guilds.get(gid)
        if w is None:
            w = self._guilds[gid] = OrderedDict()
        w.pop(key, None)  # re-added (a new epoch): now the newest
        w[key] = seen
        self._order.append((gid, key, seen))
        while len(w) > self.guild_keys:
            w.popitem(last=False)
            self.evicted += 1
        while len(self._order) > self.node_keys:
            if self._drop(*self._order.popleft()):
                self.evicted += 1
        self.expire(seen.ts)

    def restore(self, gid: str, key: str, seen: Seen, now: float | None = None) -> None:
        """Add an entry read back from storage (a journal), unless expired or
        already known: used when a guild's log is loaded."""
        now = time.time() if now is None else now
        if seen.ts < now - self.ttl:
            return
        w = self._guilds.get(gid)
        known = w.get(key) if w is not None else None
        if known is not None and known.epoch == seen.epoch:
            return
        self.add(gid, key, seen)

    def expire(self, now: float) -> int:
        """Forget every entry older than the TTL (oldest first); returns how many."""
        cutoff = now - self.ttl
        order = self._order
        n = 0
        while order and order[0][2].ts < cutoff:
            if self._drop(*order.popleft()):
                n += 1
        return n

    def _drop(self, gid: str, key: str, seen: Seen) -> bool:
        """Remove ``key`` from ``gid``'s window if it still holds ``seen``."""
        w = self._guilds.get(gid)
        if w is None or w.get(key) is not seen:
            return False
        del w[key]
        if not w:
            del self._guilds[gid]
        return True

    def entries(self, gid: str, epoch: str, now: float | None = None) -> Iterator[tuple[str, Seen]]:
        """``gid``'s live entries under ``epoch``, oldest first (to persist them)."""
        now = time.time() if now is None else now
        cutoff = now - self.ttl
        for key, seen in list(self._guilds.get(gid, {}).items()):
            if seen.epoch == epoch and seen.ts >= cutoff:
                yield key, seen

    def forget(self, gid: str) -> None:
        """Drop ``gid``'s window (its log is gone); its entries in the node
        order become stale and leave with it."""
        self._guilds.pop(gid, None)

    def resolve(
        self,
        gid: str,
        epoch: str,
        items: Sequence[tuple[str, bytes]],
        keys: Sequence[str | None],
        now: float,
    ) -> tuple[list[int], list[Replayed | None], list[bytes | None]]:
        """Split one append batch: which items are new and which the window
        (or an earlier item of the same batch) already sequenced.

        Returns ``(fresh, replayed, digests)``: ``fresh`` the indices of the
        items to sequence, in order; ``replayed[i]`` the answer of item ``i``
        when it is not to be sequenced (for a repeat within the batch, ``s``
        is the index of the first item with the key, negated minus one, for
        :func:`settle` to fill in); ``digests[i]`` the digest of each keyed
        item.
        """
        fresh: list[int] = []
        replayed: list[Replayed | None] = [None] * len(items)
        digests: list[bytes | None] = [None] * len(items)
        first: dict[str, int] = {}
        for i, ((t, d), key) in enumerate(zip(items, keys, strict=True)):
            if key is None:
                fresh.append(i)
                continue
            dg = digests[i] = digest(t, d)
            seen = self.lookup(gid, key, epoch, now)
            if seen is not None:
                replayed[i] = Replayed(seen.s, seen.digest != dg)
                continue
            j = first.get(key)
            if j is not None:
                replayed[i] = Replayed(-1 - j, digests[j] != dg)
                continue
            first[key] = i
            fresh.append(i)
        return fresh, replayed, digests


def settle(
    fresh: list[int], ss: Sequence[int], replayed: list[Replayed | None]
) -> list[int | Replayed]:
    """Each item's answer once ``fresh`` items got ``ss``: its new ``s``, or
    its :class:`Replayed` (repeats within the batch get their first's ``s``)."""
    out: list[int | Replayed] = [0] * len(replayed)
    for i, s in zip(fresh, ss, strict=True):
        out[i] = s
    for i, r in enumerate(replayed):
        if r is None:
            continue
        if r.s < 0:
            first = out[-1 - r.s]
            assert isinstance(first, int)
            r = Replayed(first, r.conflict)
        out[i] = r
    return out
