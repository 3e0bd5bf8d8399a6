"""The delivery cursor of one guild on one node, as a pure state machine.

No event loop, no I/O: records go in, and out come the records to deliver
now (in ``s`` order, each once), plus at most one next step: "read history
back after ``s``" (:class:`ReadBack`; the answer goes to :meth:`Cursor.page`)
or "history lost" (:class:`Lost`: the guild closes its local sessions with
4000). The guild actor (``guild.py``) does the reading and the writing.

Rules (docs/PROTOCOL.md, "Subscribing and recovering"): ``s`` is the last
event delivered. A record at or below it is a duplicate and dropped. A
record past ``s + 1`` means the feed skipped some: they are read back from
history first, and if history no longer has them the guild's history is
lost. A record carrying another epoch than the cursor's is never delivered:
history lost. A read-back answered under another epoch: history lost.

State: the epoch, ``s``, the feed records waiting behind a read-back
(bounded by what one feed message carried) and the read-back in flight.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

from guildcast.broker.base import Record

#: Records asked for per read-back (one broker round trip).
READ_PAGE = 1000


class ReadBack(NamedTuple):
    """Read history: up to ``limit`` records with ``s > after``; pass them to
    :meth:`Cursor.page`."""

    after: int
    limit: int


class Lost(NamedTuple):
    """The guild's history is lost on this node: why (for the log)."""

    why: str


#: What a call returns: the records to deliver now, then what comes next.
Step = tuple[list[Record], ReadBack | Lost | None]


class Cursor:
    """Where one guild's delivery is: ``epoch`` and the last delivered ``s``."""

    __slots__ = ("_upto", "_waiting", "epoch", "page_size", "s")

    def __init__(self, epoch: str, s: int, page_size: int = READ_PAGE) -> None:
        self.epoch = epoch
        self.s = s
        self.page_size = page_size
        #: Feed records behind the read-back in flight.
        self._waiting: deque[Record] = deque()
        #: The read-back in flight: read up to this ``s`` (None: to the end,
        #: after a "you may have missed some"); ``-1``: none in flight.
        self._upto: int | None = -1

    @property
    def reading(self) -> bool:
        """True while a :class:`ReadBack` is waiting for its :meth:`page`."""
        return self._upto != -1

    def feed(self, records: Sequence[Record]) -> Step:
        """Records from the live feed, in the order they came."""
        if self.reading:
            self._waiting.extend(records)
            return [], None  # delivered once the read-back is answered
        # The common case, taken without the queue: the next records, in order.
        s = self.s
        epoch = self.epoch
        n = 0
        for rec in records:
            if rec.s != s + 1 or (rec.epoch and rec.epoch != epoch):
                break
            s = rec.s
            n += 1
        self.s = s
        if n == len(records):
            return list(records), None
        out = list(records[:n])
        self._waiting.extend(records[n:])
        return self._run(out)

    def missed(self) -> Step:
        """The feed says records may have been missed: read back to the end."""
        if self.reading:
            return [], None  # the read-back in flight reads them too
        self._upto = None
        return [], ReadBack(self.s, self.page_size)

    def page(self, epoch: str, records: Sequence[Record]) -> Step:
        """The answer to the last :class:`ReadBack`: ``(epoch, records after s)``."""
        assert self.reading, "page() without a read-back in flight"
        upto = self._upto
        if epoch != self.epoch:
            return self._lost(f"epoch changed to {epoch}")
        if records and records[0].s > self.s + 1:
            return self._lost("events missing from history")
        out: list[Record] = []
        for rec in records:
            if rec.s == self.s + 1 and (upto is None or rec.s <= upto):
                out.append(rec)
                self.s = rec.s
        full = len(records) >= self.page_size
        if upto is None or self.s < upto:
            if full and out:
                return out, ReadBack(self.s, self.page_size)
            if upto is not None:
                self._waiting.clear()
                self._upto = -1
                return out, Lost("events missing from history")
        self._upto = -1
        return self._run(out)

    def _run(self, out: list[Record]) -> Step:
        waiting = self._waiting
        while waiting:
            rec = waiting[0]
            if rec.epoch and rec.epoch != self.epoch:
                # Never forward a record of another epoch as this one's.
                return out, self._lost(f"feed record of epoch {rec.epoch}")[1]
            if rec.s <= self.s:
                waiting.popleft()
                continue
            if rec.s > self.s + 1:
                self._upto = rec.s - 1
                return out, ReadBack(self.s, self.page_size)
            waiting.popleft()
            out.append(rec)
            self.s = rec.s
        return out, None

    def _lost(self, why: str) -> Step:
        self._waiting.clear()
        self._upto = -1
        return [], Lost(why)
