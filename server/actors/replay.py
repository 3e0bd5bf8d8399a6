"""The replays of one guild step (docs/ARCHITECTURE.md "Subscribing";
docs/OPERATIONS.md "Deploying without a reconnect storm").

A reconnect storm brings many sessions of one guild back at once, each
with a Position a few events behind the head. Served one by one, every
session costs its own history reads and frames every replayed event again.
A :class:`ReplayPages` is what the guild has read back during one mailbox
batch: the events ``first .. head`` of one epoch, each framed once
(``wire.text_frame``) as a :class:`~guildcast.protocol.deflate.SharedFrame`,
so that it is also compressed at most once per permessage-deflate parameter
set for every session of the batch it is replayed to (docs/PROTOCOL.md
"Compression"). A replay that starts at or after ``first`` is a
slice of it; one that starts earlier reads only the missing pages
(``page`` records per broker read, whole pages back from what it holds) in
front of it. So a storm of
recoveries on one guild costs one history read per page per batch, not
one per session, and the frames are built once.

Consistency model: owned by the guild actor and used only inside one
``handle_batch`` between two fan-outs, when the guild's head cannot move
(feed records wait in the mailbox); the guild drops it at the end of the
batch, or earlier if head or epoch moved. Bound: at most ``head - after``
frames for the oldest Position of the batch, which the broker's history
bound (``history_size``) already caps.
"""

from __future__ import annotations

from guildcast.broker.base import Broker
from guildcast.protocol import wire
from guildcast.protocol.deflate import SharedFrame

__all__ = ["ReplayPages"]


class ReplayPages:
    """Events ``first .. head`` of ``epoch`` read back in this batch, framed once."""

    __slots__ = ("epoch", "first", "frames", "gid", "head", "names", "page", "reads")

    def __init__(self, gid: str, epoch: str, head: int, page: int) -> None:
        self.gid = gid
        self.epoch = epoch
        self.head = head
        self.page = page
        #: ``frames[i]`` is event ``first + i``; empty: nothing read yet.
        self.first = head + 1
        self.frames: list[SharedFrame] = []
        self.names: list[str] = []
        #: Broker reads this instance made (the storm's cost; tests read it).
        self.reads = 0

    def fits(self, epoch: str, head: int) -> bool:
        return epoch == self.epoch and head == self.head

    async def replay(
        self, broker: Broker, after: int, want: frozenset[str] | None
    ) -> list[SharedFrame] | None:
        """Frames of events ``after+1 .. head`` (filtered by ``want``), or
        None if history no longer holds some of them; raises
        BrokerUnavailable if history cannot be read now (nothing is known
        then about what it holds)."""
        if after + 1 < self.first and not await self._read_front(broker, after):
            return None
        i = after + 1 - self.first
        if want is None:
            return self.frames[i:]
        names = self.names
        return [f for k, f in enumerate(self.frames[i:], i) if names[k] in want]

    async def _read_front(self, broker: Broker, after: int) -> bool:
        """Read at least ``after+1 .. first-1`` and put it in front; False if
        history no longer holds ``after+1`` (BrokerUnavailable if it cannot
        be read now). It reads whole pages back from
        ``first`` (as far as history goes), so replays arriving from newest
        to oldest Position still cost one read per page."""
        frames: list[SharedFrame] = []
        names: list[str] = []
        end = self.first - 1
        start = max(1, min(after + 1, self.first - self.page))
        nxt = start
        while nxt <= end:
            # BrokerUnavailable propagates: history that cannot be read now
            # is not history that lacks the events (the guild answers 1013).
            epoch, recs = await broker.read(self.gid, nxt - 1, min(self.page, end - nxt + 1))
            self.reads += 1
            if epoch != self.epoch or not recs:
                return False
            if recs[0].s != nxt:
                # History begins later than the page asked for: fine as long
                # as it still holds the replay's first event.
                if frames or recs[0].s > after + 1:
                    return False
                start = nxt = recs[0].s
            for rec in recs:
                if rec.s > end:
                    break
                frames.append(SharedFrame(wire.text_frame(rec.payload)))
                names.append(rec.t)
                nxt = rec.s + 1
        self.frames[:0] = frames
        self.names[:0] = names
        self.first = start
        return True
