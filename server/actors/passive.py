"""Passive subscriptions' activity notices: one board per node, one ticker.

A passive subscriber of a guild (PROTOCOL.md "Passive subscriptions")
receives no events, only a GUILD_ACTIVITY notice carrying the guild's head
``s``, at most once per ``interval`` and only when the head moved. The
board owns the notice schedule; the guild actors own who is passive:

- A guild with passive sessions holds one :class:`PassiveGuild` entry on
  the board (:meth:`PassiveBoard.attach`), whose ``sinks`` dict *is* the
  guild's set of passive sessions (the guild adds and removes them in its
  own steps) and whose ``head`` the guild sets after each step. The guild
  never loops over its passive sessions per event: a passive session costs
  nothing per published event.
- Every ``interval`` the ticker (:meth:`PassiveBoard.run`, a task of the
  node's TaskGroup) visits the entries; for each whose head moved since its
  last notice it builds the notice **once** (``wire.activity_frame``) and
  hands the same bytes to each of the guild's passive sessions (to those
  that negotiated permessage-deflate, the same bytes compressed once per
  parameter set: a :class:`~guildcast.protocol.deflate.SharedFrame`,
  docs/PROTOCOL.md "Compression"); a session
  passive in several guilds gets all of its notices of the tick joined into
  **one** write (a write costs far more than joining bytes). So the cost is
  per interval: the moved guilds' passive subscriptions plus one write per
  session, never per event.
- A session that asked for it (1.1, IDENTIFY ``activity_batch``) gets its
  notices of a tick as **one** GUILD_ACTIVITY of several guilds
  (``wire.activity_batch_frame``): each guild's ``"gid":s`` entry is built
  once per tick and shared like the notice; only the envelope around a
  session's entries is its own. A notice is ~82 bytes and a session in 19
  moving passive guilds gets ~12 a second at 1 event/s per guild, against
  ~16 bytes an entry: the passive mix's notice bytes fall by about 4x. The
  batch frame is never compressed (RFC 7692 lets any message go
  uncompressed; one deflate per session would cost what the shared frames
  save), so a deflate session gets it as it is.

Consistency model: single-threaded (the event loop). A tick is spread over
several loop steps (``VISIT_SLICE``, ``SEND_SLICE``) so that 10,000
sessions in 19 passive guilds each do not stall the loop for a whole tick;
guild steps run in between. A notice is written only if, at the moment it
is written, the session is still in that guild's passive set: a session the
guild has made active again (it sent the active SUBSCRIBED first) gets no
notice after it. A session made passive during a tick may miss that tick
(its SUBSCRIBED told it the head). A notice says only "the head was at least
``s`` when the tick built it"; it may repeat the ``s`` a session's
SUBSCRIBED gave it.

Bounds: one entry per guild with passive sessions on this node (guild
actors are bounded by ``max_guilds``); one tick's work and its per-session
lists are bounded by the passive subscriptions on this node (sessions x
``max_subscriptions``) and are dropped when the tick ends. Notices go
through ``Sink.send``, so the slow-consumer bound (4010) applies to them.

Garbage collection: a tick holds one list per passive session until its
writes are done (10,000 lists for 10,000 sessions), and each 700 of them
that are still alive run the cyclic collector, which promotes them towards
the old generation and so brings the next full collection of the whole
heap nearer (a py-spy profile of the issue's passive mix had 16% of the
server's samples in the collector, 95% of them inside the tick:
docs/BENCHMARKS.md "Passive subscriptions"). Those lists hold no cycles
and are freed by reference counting when the tick ends, so a tick pauses
the collector while it runs (:func:`_gc_paused`, shared by every board of
the process) and lets it run again after: collecting any garbage made
meanwhile waits at most one tick.
"""

from __future__ import annotations

import asyncio
import gc
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from guildcast.core.metrics import MetricsSnapshot
from guildcast.core.sink import Sink
from guildcast.protocol import wire
from guildcast.protocol.deflate import SharedFrame

#: The default ``passive_interval`` (seconds): how often a passive
#: subscriber may hear about a guild (PROTOCOL.md "Passive subscriptions").
DEFAULT_INTERVAL = 1.0
#: Passive subscriptions a tick visits, and sessions it writes, per loop
#: step: about 1 ms and 5-10 ms of one step on this class of machine (a
#: write is 10-15 us here), instead of ~150 ms for 10,000 sessions in 19
#: passive guilds in one step.
VISIT_SLICE = 8192
SEND_SLICE = 512


#: Ticks in progress in this process (boards of several nodes may share one
#: process, in tests): the collector runs again when the last one ends, and
#: only if it was running when the first began.
_paused = 0
_resume = False


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for the body (module docstring)."""
    global _paused, _resume
    if _paused == 0:
        _resume = gc.isenabled()
        gc.disable()
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1
        if _paused == 0 and _resume:
            gc.enable()


#: One moved guild's notice in a tick: its passive sessions (the guild's
#: dict, checked again at write time), the uncompressed frame, the same as
#: a SharedFrame for deflate sessions, and its ``"gid":s`` batch entry.
_Note = tuple[dict[Sink, None], bytes, SharedFrame, bytes]


@dataclass(slots=True, eq=False)
class PassiveGuild:
    """One guild's passive sessions on this node and its notice state."""

    gid: str
    #: The guild's epoch on this node (set by the guild when it listens).
    epoch: str
    #: The guild's last ``s`` on this node (set by the guild after each step).
    head: int
    #: The guild's passive sessions: owned and changed by the guild actor.
    sinks: dict[Sink, None] = field(default_factory=dict)
    #: The ``s`` of the last notice built (0: none yet).
    noticed: int = 0


class PassiveBoard:
    """Every guild's passive sessions on this node, and the notice ticker."""

    def __init__(self, interval: float = DEFAULT_INTERVAL) -> None:
        if not interval > 0:
            raise ValueError("passive_interval must be > 0 seconds")
        self.interval = interval
        self.entries: dict[str, PassiveGuild] = {}
        #: Counters: ticks run, notices built (one per moved guild per tick),
        #: notices delivered (one per moved guild per passive session), the
        #: WebSocket messages carrying them (a batch carries several), the
        #: writes carrying those (one per session per tick) and their bytes.
        self.ticks = 0
        self.notices_built = 0
        self.notices_sent = 0
        self.frames = 0
        self.writes = 0
        self.bytes_out = 0

    def attach(self, gid: str, epoch: str, head: int) -> PassiveGuild:
        """The entry of ``gid`` (made if needed); the guild fills its ``sinks``."""
        entry = self.entries.get(gid)
        if entry is None:
            entry = self.entries[gid] = PassiveGuild(gid, epoch, head, noticed=head)
        else:
            entry.epoch = epoch
            entry.head = head
        return entry

    def detach(self, entry: PassiveGuild) -> None:
        """The guild has no passive session left (or stopped)."""
        if self.entries.get(entry.gid) is entry:
            del self.entries[entry.gid]

    async def tick(self) -> int:
        """Send the notices due now; returns how many sessions were written."""
        self.ticks += 1
        with _gc_paused():
            return await self._tick()

    def report_metrics(self, m: MetricsSnapshot) -> None:
        """``ReportsMetrics``: the notice counters and the passive sessions
        now (summed over guilds: a scrape costs one step per guild with
        passive sessions, not one per session)."""
        m.passive_guilds = len(self.entries)
        m.passive_subscriptions = sum(len(e.sinks) for e in self.entries.values())
        m.notice_ticks = self.ticks
        m.notices_built = self.notices_built
        m.notices_sent = self.notices_sent
        m.notice_frames = self.frames
        m.notice_writes = self.writes
        m.notice_bytes = self.bytes_out

    async def _tick(self) -> int:
        # The tick visits ~120,000 passive subscriptions a second in the
        # issue's passive mix: its loops are kept to C-level steps (a
        # defaultdict's append, tuple unpacking, the uncompressed frame
        # carried in the note rather than a method call per notice).
        due: defaultdict[Sink, list[_Note]] = defaultdict(list)
        built = 0
        visited = 0
        for e in list(self.entries.values()):
            sinks = e.sinks  # the guild's own dict, the same object for its life
            if e.head == e.noticed or not sinks:
                continue
            e.noticed = e.head
            frame = wire.activity_frame(e.gid, e.epoch, e.head)
            note = (sinks, frame, SharedFrame(frame), wire.activity_entry(e.gid, e.head))
            built += 1
            for sink in sinks:  # no await inside: the guild cannot change it here
                due[sink].append(note)
            visited += len(sinks)
            if visited >= VISIT_SLICE:
                visited = 0
                await asyncio.sleep(0)
        out = sent = nframes = writes = 0
        for sink, notes in due.items():
            # Still passive there now (a guild step may have run since).
            if sink.activity_batch:
                entries = [entry for sinks, _, _, entry in notes if sink in sinks]
                if not entries:
                    continue
                data = wire.activity_batch_frame(entries)
                sent += len(entries)
                nframes += 1
            else:
                z = sink.deflate
                if z is None:
                    frames = [f for sinks, f, _, _ in notes if sink in sinks]
                else:
                    frames = [sh.compressed(z) for sinks, _, sh, _ in notes if sink in sinks]
                if not frames:
                    continue
                data = frames[0] if len(frames) == 1 else b"".join(frames)
                sent += len(frames)
                nframes += len(frames)
            sink.send(data)
            out += len(data)
            writes += 1
            if writes % SEND_SLICE == 0:
                await asyncio.sleep(0)
        self.notices_built += built
        self.notices_sent += sent
        self.frames += nframes
        self.writes += writes
        self.bytes_out += out
        return writes

    async def run(self) -> None:
        """Tick every ``interval`` until cancelled (the node's TaskGroup owns it).

        Sleeping a whole interval after each tick keeps two notices of one
        guild at least ``interval`` apart, however late the loop runs.
        """
        while True:
            await asyncio.sleep(self.interval)
            await self.tick()
