"""Guild actor: one guild's subscriptions, delivery cursor and fanout on this node.

It sequences through the broker (``guildcast.broker``): publishes queued in its
mailbox are appended in one batch (the broker assigns ``s``; in memory mode
that is this actor's own log, in cluster mode one Redis script), and the
publishers are answered with ``(s, epoch)``. While the guild has local
subscribers it listens to the broker's feed: each record arrives in ``s``
order, is framed once (``wire.text_frame``) and the same bytes go to every
partition (docs/DESIGN.md, "The path of one event"); compressed once too,
for the sessions that negotiated permessage-deflate (``Frames.compressed``).
It never writes to a socket.

Delivery cursor: ``cursor.Cursor`` (a pure state machine, ``cursor.py``)
decides what is delivered: duplicates dropped, gaps read back from history,
another epoch or missing history: the guild's history is lost, and every
local session is closed with 4000 and recovers what it can on reconnect.
The guild carries out its steps (``_drive``). A catch-up that cannot read
history (the broker is still unreachable), or a broker reporting its feed
lost (``FEED_LOST``), closes the local sessions with 4000 too: a session
this node cannot serve recovers where it can, rather than wait here for
events that are not coming. With an in-process log (``LocalLog``) the
records a publish appended go to the cursor in the same step; a remote
feed's come as ``Feed`` messages (``feed.py``).

Subscriptions arrive as :class:`Subscribe` messages in mailbox order with
feed records, so the head a session is told in SUBSCRIBED, its replay and
the moment it joins its partition form one atomic step: no gap, no
duplicate, however publishes race the subscribe (PROTOCOL.md "Subscribing
and recovery"). Leaves come from the guild's process group monitor.

Mailbox: publishes are bounded (``mailbox_bound``; past it publishers get
"try again later"); Subscribe/Unsubscribe/Left/Feed are system messages.
Idle: with no session and no message for ``idle_timeout`` it stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from guildcast.actors.actor import Actor, MailboxFull, _Call
from guildcast.actors.cursor import Cursor, Lost, ReadBack, Step
from guildcast.actors.groups import GroupEvent, Groups
from guildcast.actors.partition import Add, Frames, Partition, PresenceFrame, Remove, Writer
from guildcast.broker.base import (
    FEED_LOST,
    Broker,
    BrokerUnavailable,
    LocalLog,
    Presence,
    Record,
)
from guildcast.core.metrics import NodeStats
from guildcast.core.sink import Sink
from guildcast.protocol import wire
from guildcast.protocol.codes import Close

log = logging.getLogger("guildcast.guild")

#: Records read back per broker round trip when catching up or replaying.
READ_PAGE = 1000


@dataclass(frozen=True, slots=True)
class GuildSettings:
    partition_size: int = 512
    idle_timeout: float = 300.0
    mailbox_bound: int = 10_000


class PublishMsg:
    """Call message: sequence event ``t`` with ``d_json`` (``d`` encoded once,
    at the edge that validated it); replies ``(s, epoch)``."""

    __slots__ = ("d_json", "t")

    def __init__(self, t: str, d_json: bytes) -> None:
        self.t = t
        self.d_json = d_json


class Subscribe:
    """Add ``sink`` (recovering from ``position``); ``member`` is its presence
    identity, ``presence`` whether it wants PRESENCE_JOIN/LEAVE dispatches."""

    __slots__ = ("member", "position", "presence", "sink")

    def __init__(
        self,
        sink: Sink,
        position: tuple[str, int] | None,
        member: Presence | None = None,
        presence: bool = False,
    ) -> None:
        self.sink = sink
        self.position = position
        self.member = member
        self.presence = presence


class Unsubscribe:
    __slots__ = ("sink",)

    def __init__(self, sink: Sink) -> None:
        self.sink = sink


class Left:
    """The session left the guild's group (disconnected or unsubscribed)."""

    __slots__ = ("sink",)

    def __init__(self, sink: Sink) -> None:
        self.sink = sink


class Feed:
    """Records from the broker's live feed, None: "you may have missed some",
    or ``FEED_LOST``: "nothing is reaching you"."""

    __slots__ = ("records",)

    def __init__(self, records: list[Record] | str | None) -> None:
        self.records = records


class Written:
    """A partition's credit: it has written every run sent to it so far."""

    __slots__ = ("partition",)

    def __init__(self, partition: Partition) -> None:
        self.partition = partition


class Removed:
    """A partition has written a session's last messages (its ``Remove``)."""

    __slots__ = ("partition", "sink")

    def __init__(self, partition: Partition, sink: Sink) -> None:
        self.partition = partition
        self.sink = sink


#: Events a guild holds back while a partition still writes the previous run
#: (the cadence that makes partitions batch as one writer would); past it the
#: run goes out anyway and the partition's mailbox bound applies.
HOLD_FRAMES = 4096


class PresenceMsg:
    """A presence change from the broker: ``kind`` is "join" or "leave"."""

    __slots__ = ("kind", "member")

    def __init__(self, kind: str, member: Presence) -> None:
        self.kind = kind
        self.member = member


class InfoMsg:
    """Call message: replies a dict of head, epoch, subscribers, history bounds."""

    __slots__ = ()


class HistoryMsg:
    """Call message: replies ``(epoch, records with s > after)``, at most ``limit``."""

    __slots__ = ("after", "limit")

    def __init__(self, after: int, limit: int) -> None:
        self.after = after
        self.limit = limit


class Guild(Actor):
    """One guild on this node. Started on demand by the registry."""

    def __init__(
        self,
        gid: str,
        settings: GuildSettings,
        groups: Groups,
        tg: asyncio.TaskGroup,
        broker: Broker,
        stats: NodeStats | None = None,
    ) -> None:
        super().__init__(
            gid, mailbox_bound=settings.mailbox_bound, idle_timeout=settings.idle_timeout
        )
        self.gid = gid
        self.settings = settings
        self._groups = groups
        self._tg = tg
        self.broker = broker
        #: The epoch of what this node delivers (None until it listens).
        self.epoch: str | None = None
        #: The delivery cursor while listening (``cursor.py``).
        self._cur: Cursor | None = None
        self.listening = False
        #: An in-process log hands appended records back (one step per publish).
        self._local: LocalLog | None = broker if isinstance(broker, LocalLog) else None
        #: Placement: ``partitions[0]`` is the :class:`Writer` this actor writes
        #: itself; every later one a :class:`Partition` actor (partition.py).
        self.partitions: list[Writer | Partition] = []
        self.where: dict[Sink, Writer | Partition] = {}
        #: Presence identity of each local session (announced on join/leave).
        self.members: dict[Sink, Presence] = {}
        #: Sessions per partition, kept in step with ``where``.
        self.load: dict[Writer | Partition, int] = {}
        #: Partitions that have not yet written the last run sent to them.
        self._writing: set[Partition] = set()
        #: Sessions removed from a partition actor whose ``Remove`` it has not
        #: handled yet (its mailbox still holds their last events and their
        #: UNSUBSCRIBED): one that subscribes again in that window goes back
        #: to that partition, so what it receives stays in order. An entry
        #: leaves with the partition's ``Removed``: bounded by its mailbox.
        self._parted: dict[Sink, Partition] = {}
        self.published = 0
        self.delivered = 0
        self._frames: list[bytes] = []
        self._names: list[str] = []
        #: Publish times of ``_frames`` (for the latency metric).
        self._stamps: list[float] = []
        #: The node's counters (``/metrics``), shared with the partitions.
        self.stats = stats if stats is not None else NodeStats()
        self._demonitor = groups.monitor(gid, self._on_group_event)

    @property
    def cursor(self) -> int:
        """The last ``s`` fanned out on this node (0 while not listening)."""
        return self._cur.s if self._cur is not None else 0

    # --- group monitor (runs synchronously inside Groups.leave) -------------

    def _on_group_event(self, event: GroupEvent, group: str, member: Any) -> None:
        if event is GroupEvent.LEAVE:
            self.cast_system(Left(member))

    # --- life cycle ----------------------------------------------------------

    def on_idle(self) -> bool:
        return not self.where

    async def on_stop(self, reason: BaseException | None) -> None:
        self._demonitor()
        for p in self.partitions:
            if type(p) is Partition:
                p.stop()
        if reason is not None:
            # Let it crash: the sessions reconnect and recover what they can.
            for sink in list(self.where):
                sink.close(Close.UNKNOWN_ERROR, "guild failed")
        self.where.clear()
        for member in self.members.values():
            self.broker.presence_leave(self.gid, member)
        self.members.clear()
        if self.listening:
            self.listening = False
            try:
                await self.broker.unlisten(self.gid)
            except BrokerUnavailable:
                pass

    # --- messages ------------------------------------------------------------

    async def handle_batch(self, batch: deque[Any]) -> None:
        pubs: list[_Call] = []
        items: list[tuple[str, bytes]] = []
        for item in batch:
            tp = type(item)
            if tp is _Call:
                msg = item.msg
                if type(msg) is PublishMsg:
                    pubs.append(item)
                    items.append((msg.t, msg.d_json))
                    continue
                if pubs:
                    await self._append(pubs, items)
                    pubs, items = [], []
                await self._answer(item)
            elif tp is Feed:
                await self._on_feed(item.records)
            elif tp is Written:
                self._writing.discard(item.partition)
            elif tp is Removed:
                if self._parted.get(item.sink) is item.partition:
                    del self._parted[item.sink]
            elif tp is PresenceMsg:
                self._on_presence(item.kind, item.member)
            else:
                if pubs:
                    await self._append(pubs, items)
                    pubs, items = [], []
                self._fan_out(force=True)
                if tp is Subscribe:
                    await self._subscribe(item)
                elif tp is Unsubscribe:
                    await self._remove(item.sink, wire.unsubscribed_frame(self.gid))
                elif tp is Left:
                    await self._remove(item.sink, None)
                else:
                    raise TypeError(f"guild got {item!r}")
        if pubs:
            await self._append(pubs, items)
        self._fan_out()

    async def _append(self, pubs: list[_Call], items: list[tuple[str, bytes]]) -> None:
        local = self._local
        recs: list[Record] | None = None
        try:
            if local is not None:
                epoch, recs = await local.append_local(self.gid, items)
                ss = [r.s for r in recs]
            else:
                epoch, ss = await self.broker.append(self.gid, items)
        except BrokerUnavailable as e:
            for call in pubs:
                if not call.future.done():
                    call.future.set_exception(e)
            return
        if self.listening and epoch != self.epoch:
            # The broker lost this guild's history (say, Redis restarted empty).
            await self._history_lost(f"epoch changed to {epoch}")
        self.published += len(ss)
        self.stats.published += len(ss)
        for call, s in zip(pubs, ss, strict=True):
            if not call.future.done():
                call.future.set_result((s, epoch))
        if recs is not None and self.listening:
            # The log is in this process and this actor its one listener:
            # emit in this step, no feed message (docs/ARCHITECTURE.md).
            await self._on_feed(recs)

    async def _answer(self, call: _Call) -> None:
        msg = call.msg
        try:
            if type(msg) is InfoMsg:
                result: Any = await self._info()
            elif type(msg) is HistoryMsg:
                result = await self.broker.read(self.gid, msg.after, msg.limit)
            else:
                raise TypeError(f"unknown call {msg!r}")
        except BrokerUnavailable as e:
            if not call.future.done():
                call.future.set_exception(e)
            return
        if not call.future.done():  # a caller that timed out is gone
            call.future.set_result(result)

    # --- delivery --------------------------------------------------------------

    async def _on_feed(self, records: list[Record] | str | None) -> None:
        cur = self._cur
        if not self.listening or cur is None:
            return
        if records is None:
            await self._drive(cur.missed())
        elif isinstance(records, str):
            assert records == FEED_LOST
            await self._history_lost("the broker's feed is lost", "guild feed lost; reconnect")
        else:
            await self._drive(cur.feed(records))

    async def _drive(self, step: Step) -> None:
        """Carry out what the delivery cursor (``cursor.py``) says: emit its
        records, read history back for it, or give the history up."""
        out, nxt = step
        while True:
            for rec in out:
                self._emit(rec)
            if nxt is None:
                return
            if type(nxt) is Lost:
                await self._history_lost(nxt.why)
                return
            assert type(nxt) is ReadBack
            try:
                epoch, recs = await self.broker.read(self.gid, nxt.after, nxt.limit)
            except BrokerUnavailable as e:
                # Whether records were missed is unknown: never wait silently.
                why = f"catch-up failed: {e}"
                await self._history_lost(why, "guild catch-up failed; reconnect")
                return
            cur = self._cur
            if not self.listening or cur is None:
                return
            out, nxt = cur.page(epoch, recs)

    def _emit(self, rec: Record) -> None:
        self._frames.append(wire.text_frame(rec.payload))
        self._names.append(rec.t)
        self._stamps.append(rec.ts)

    def _fan_out(self, force: bool = False) -> None:
        """Send the events emitted so far to every writer: now if ``force``
        (a membership change or presence dispatch comes next), else once
        every partition has written the previous run (``Written``) or
        ``HOLD_FRAMES`` are held: a big guild's partitions then get runs as
        long as one writer would (docs/ARCHITECTURE.md, "Placement")."""
        if not self._frames:
            return
        if self._writing and not force and len(self._frames) < HOLD_FRAMES:
            return
        run = Frames(self._frames, self._names, self._stamps)
        self._frames = []
        self._names = []
        self._stamps = []
        self.delivered += len(run.frames)
        for p in self.partitions:
            if type(p) is Writer:
                p.write(run.frames, run.names, run.stamps, run.data, run.compressed)
                continue
            assert type(p) is Partition
            try:
                p.cast(run)
            except MailboxFull:
                self._shed(p)
                continue
            self._writing.add(p)

    def _on_presence(self, kind: str, member: Presence) -> None:
        """PRESENCE_JOIN/LEAVE to the local sessions that asked (no ``s``: presence
        is not part of the guild's event sequence and is not replayed)."""
        if not self.partitions:
            return
        t = "PRESENCE_JOIN" if kind == "join" else "PRESENCE_LEAVE"
        self._fan_out(force=True)  # keep the order of what came before
        msg = PresenceFrame(wire.message(0, member.as_dict(), t=t, g=self.gid))
        for p in self.partitions:
            if type(p) is Writer:
                p.send_presence(msg)
            else:
                assert type(p) is Partition
                p.cast_system(msg)

    async def _history_lost(self, why: str, reason: str = "guild history lost; reconnect") -> None:
        """This node cannot go on serving the guild's sessions from its feed
        (history gone, epoch changed, feed lost): they must reconnect and
        recover (close 4000); frames not yet fanned out are dropped."""
        log.warning("guild %s: %s; closing its local sessions", self.gid, why)
        self._frames = []
        self._names = []
        self._stamps = []
        for sink in list(self.where):
            sink.close(Close.UNKNOWN_ERROR, reason)
        # Listen afresh at the next subscribe: it reads the new epoch and head.
        await self._unlisten()

    def _shed(self, p: Partition) -> None:
        """A partition fell hopelessly behind: its sessions are slow consumers."""
        log.warning("guild %s: partition %s overflowed; closing its sessions", self.gid, p.name)
        for sink, where in list(self.where.items()):
            if where is p:
                sink.close(Close.SLOW_CONSUMER, "partition overflow")

    # --- membership ----------------------------------------------------------

    async def _subscribe(self, msg: Subscribe) -> None:
        sink, position = msg.sink, msg.position
        if sink.is_closed:
            return
        if not self.listening:
            try:
                await self.broker.listen(self.gid)
                epoch, head = await self.broker.head(self.gid)
            except BrokerUnavailable:
                sink.close(Close.TRY_AGAIN_LATER, "broker unavailable")
                return
            self.listening = True
            self.epoch = epoch
            self._cur = Cursor(epoch, head, READ_PAGE)
        assert self.epoch is not None
        head = self.cursor
        recovered = False
        replay: list[bytes] = []
        if position is not None:
            epoch, after = position
            if epoch == self.epoch and after <= head:
                got = await self._replay(after, head, sink.events)
                if got is not None:
                    recovered = True
                    replay = got
        preamble = wire.subscribed_frame(self.gid, self.epoch, head, recovered)
        if replay:
            preamble = b"".join([preamble, *replay])
        p = self.where.get(sink)
        if p is None:
            p = self._parted.pop(sink, None) or self._partition_with_room()
            self.where[sink] = p
            self.load[p] += 1
        if type(p) is Writer:
            p.add(sink, preamble, msg.presence)
        else:
            assert type(p) is Partition
            p.cast_system(Add(sink, preamble, msg.presence))
        if msg.member is not None and sink not in self.members:
            self.members[sink] = msg.member
            self.broker.presence_join(self.gid, msg.member)

    async def _replay(
        self, after: int, head: int, want: frozenset[str] | None
    ) -> list[bytes] | None:
        """Frames of events ``after+1 .. head`` (filtered), or None if history lacks some."""
        out: list[bytes] = []
        nxt = after + 1
        while nxt <= head:
            try:
                epoch, recs = await self.broker.read(
                    self.gid, nxt - 1, min(READ_PAGE, head - nxt + 1)
                )
            except BrokerUnavailable:
                return None
            if epoch != self.epoch or not recs or recs[0].s != nxt:
                return None
            for rec in recs:
                if rec.s > head:
                    break
                if want is None or rec.t in want:
                    out.append(wire.text_frame(rec.payload))
                nxt = rec.s + 1
        return out

    async def _remove(self, sink: Sink, farewell: bytes | None) -> None:
        member = self.members.pop(sink, None)
        if member is not None:
            self.broker.presence_leave(self.gid, member)
        p = self.where.pop(sink, None)
        if p is None:
            return
        self.load[p] -= 1
        if type(p) is Writer:
            p.remove(sink, farewell)
        else:
            assert type(p) is Partition
            p.cast_system(Remove(sink, farewell))
            self._parted[sink] = p
        if not self.where:
            # Nodes listen to a guild only while they have local subscribers.
            await self._unlisten()

    async def _unlisten(self) -> None:
        """Stop listening to the guild's feed, forgetting its epoch and cursor."""
        if not self.listening:
            return
        self.listening = False
        self.epoch = None
        self._cur = None
        try:
            await self.broker.unlisten(self.gid)
        except BrokerUnavailable:
            pass

    def _partition_with_room(self) -> Writer | Partition:
        """The placement rule, the one place it is made: the first writer below
        ``partition_size`` sessions, or a new one: the guild's own
        :class:`Writer` first, then a :class:`Partition` actor per further
        ``partition_size`` sessions (docs/ARCHITECTURE.md, "Placement")."""
        size = self.settings.partition_size
        for w, n in self.load.items():
            if n < size:
                return w
        if not self.partitions:
            w = Writer(self.stats)
            self.partitions.append(w)
            self.load[w] = 0
            return w
        p = Partition(f"{self.gid}/{len(self.partitions)}", stats=self.stats)
        p.on_written = lambda: self.cast_system(Written(p))
        p.on_removed = lambda sink: self.cast_system(Removed(p, sink))
        p.monitor(self._partition_exited)
        p.start(self._tg)
        self.partitions.append(p)
        self.load[p] = 0
        return p

    def _partition_exited(self, p: Any, reason: BaseException | None) -> None:
        if reason is not None:
            self.kill(reason)  # linked: a partition's crash is the guild's crash

    async def _info(self) -> dict[str, Any]:
        epoch, head = await self.broker.head(self.gid)
        first = await self.broker.first(self.gid)
        return {
            "guild": self.gid,
            "epoch": epoch,
            "s": head,
            "subscribers": len(self.where),
            "history": {"first": first, "last": head if first is not None else None},
        }
