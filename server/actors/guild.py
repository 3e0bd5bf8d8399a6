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
feed's come through :meth:`Guild.feed` (``feed.py``): a step run at once
on the feed's read callback for a parked guild, else ``Feed`` messages. A
gateway PUBLISH to a parked guild whose log never waits (memory) is such a
step run at once on the publisher's stack (:meth:`Guild.publish_to`,
``Actor.step_now``): the guild is in no batch then, so it is the step its
next batch would be; with a broker that queues appends (Redis) that step
sends the append from there, answered by callback (one in flight per
guild: later publishes queue behind it).

Passive subscriptions (PROTOCOL.md "Passive subscriptions") are not in any
writer: the guild keeps them in its entry on the node's
:class:`~guildcast.actors.passive.PassiveBoard`, sets the entry's head after
each step, and the board's ticker sends the notices; switching a session
between the modes is a :class:`Subscribe` like any other, carried out in
mailbox order (``_passivate``, and ``_subscribe`` for the way back).

Subscriptions arrive as :class:`Subscribe` messages in mailbox order with
feed records, so the head a session is told in SUBSCRIBED, its replay and
the moment it joins its partition form one atomic step: no gap, no
duplicate, however publishes race the subscribe (PROTOCOL.md "Subscribing
and recovery"). Leaves come from the guild's process group monitor.

Presence (docs/RELIABILITY.md, "Presence snapshot and diffs"): a session
that asked for presence gets a PRESENCE_SNAPSHOT right after its SUBSCRIBED,
then the joins and leaves after it. Every presence change carries the
broker's version of the guild's presence; the snapshot is taken at one
version, in the same step that adds the session, and its writer sends it
only the changes of later versions, in mailbox order: no change is missed or
doubled however joins race the subscribe. A version out of step (a change
lost while the feed was down) or a feed reconnect resynchronises: a fresh
PRESENCE_SNAPSHOT to every presence session. The last snapshot read is kept
(at most ``presence_limit`` members) and reused while no later change has
been fanned out.

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

from guildcast.actors.actor import Actor, ActorExited, MailboxFull, Reply, _Call
from guildcast.actors.cursor import Cursor, Lost, ReadBack, Step
from guildcast.actors.groups import GroupEvent, Groups
from guildcast.actors.partition import Add, Frames, Partition, PresenceFrame, Remove, Writer
from guildcast.actors.passive import PassiveBoard, PassiveGuild
from guildcast.actors.replay import ReplayPages
from guildcast.broker.base import (
    FEED_LOST,
    AppendsNow,
    AppendsQueued,
    Broker,
    BrokerUnavailable,
    LocalLog,
    Presence,
    PresenceSnapshot,
    Record,
)
from guildcast.core.host import KeyConflict, PublishReply
from guildcast.core.idempotency import Replayed
from guildcast.core.metrics import NodeStats
from guildcast.core.sink import Sink
from guildcast.protocol import wire
from guildcast.protocol.codes import Close
from guildcast.protocol.deflate import SharedFrame

log = logging.getLogger("guildcast.guild")

#: Records read back per broker round trip when catching up or replaying.
READ_PAGE = 1000
#: Reads of a rewind whose history start moved under it (trimmed by another
#: node between finding the oldest event and reading it) before it gives up
#: and replays nothing: each retry starts at the new oldest event, so only
#: a history trimmed faster than one read round trip, three times, gets there.
REWIND_TRIES = 3


#: Members a PRESENCE_SNAPSHOT lists by default (``Config.presence_limit``;
#: past it: the count and ``truncated``). A member is about 75 bytes of JSON
#: (16-character session ids, a ``host:pid`` node id): 100 make a 7.5 KB
#: frame, well inside every client library's default message size and about
#: what one large event costs, so a reconnect storm of presence subscribers
#: costs 7.5 KB each; it is also the size of list a member UI shows at once,
#: and Pusher's presence-channel member limit.
PRESENCE_LIMIT = 100


@dataclass(frozen=True, slots=True)
class GuildSettings:
    partition_size: int = 512
    idle_timeout: float = 300.0
    mailbox_bound: int = 10_000
    #: The most events one rewind replays (``Config.max_rewind``).
    max_rewind: int = 100
    presence_limit: int = PRESENCE_LIMIT


class PublishMsg:
    """Call message: sequence event ``t`` with ``d_json`` (``d`` encoded once,
    at the edge that validated it) under idempotency ``key`` (or None);
    replies ``(s, epoch)``."""

    __slots__ = ("d_json", "key", "t")

    def __init__(self, t: str, d_json: bytes, key: str | None = None) -> None:
        self.t = t
        self.d_json = d_json
        self.key = key


class Subscribe:
    """Add ``sink`` (recovering from ``position``); ``member`` is its presence
    identity, ``presence`` whether it wants PRESENCE_JOIN/LEAVE dispatches;
    ``rewind`` (1.1, only without a ``position``): replay the guild's last
    this many events first (bounded by ``GuildSettings.max_rewind``);
    ``passive``: notices only, no events (``position`` is then not replayed,
    and a passive request never carries a ``rewind``)."""

    __slots__ = ("member", "passive", "position", "presence", "rewind", "sink")

    def __init__(
        self,
        sink: Sink,
        position: tuple[str, int] | None,
        member: Presence | None = None,
        presence: bool = False,
        rewind: int | None = None,
        passive: bool = False,
    ) -> None:
        self.sink = sink
        self.position = position
        self.member = member
        self.presence = presence
        self.rewind = rewind
        self.passive = passive


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
    """A partition's credit: it has written its first ``runs`` runs (every
    run sent to it, unless the guild has sent more since)."""

    __slots__ = ("partition", "runs")

    def __init__(self, partition: Partition, runs: int) -> None:
        self.partition = partition
        self.runs = runs


class Removed:
    """A partition has written a session's last messages (its ``Remove``)."""

    __slots__ = ("partition", "sink")

    def __init__(self, partition: Partition, sink: Sink) -> None:
        self.partition = partition
        self.sink = sink


#: Events a guild holds back while a partition still writes the previous run
#: (the cadence that makes partitions batch as one writer would); past it, or
#: past ``HOLD_BYTES``, the run goes out anyway and the partition's bounds
#: apply (``PARTITION_MAILBOX_BOUND`` runs, ``PARTITION_QUEUE_BYTES``).
HOLD_FRAMES = 4096
#: Bytes of events a guild holds back for the same reason: a run of 1 MiB
#: already spreads one write's fixed cost (a few microseconds) over more
#: bytes than batching can save, and held bytes wait for every session of
#: the guild. Without it 4,096 events of up to 32 KiB could be held.
HOLD_BYTES = 1024 * 1024


class PresenceMsg:
    """A presence change from the broker: ``kind`` is "join" or "leave", ``v``
    its version (None from a node of an earlier version)."""

    __slots__ = ("kind", "member", "v")

    def __init__(self, kind: str, member: Presence, v: int | None = None) -> None:
        self.kind = kind
        self.member = member
        self.v = v


class Drive:
    """The rest of a cursor step begun on the feed's read callback
    (``Guild._feed_now``): a read-back to make, or the history lost."""

    __slots__ = ("next",)

    def __init__(self, nxt: ReadBack | Lost) -> None:
        self.next = nxt


class EpochSeen:
    """An append sent from a publisher's stack was answered under ``epoch``
    (``Guild._queued_done``): if it is not the one this node delivers, the
    guild's history was lost, handled in the guild's own step."""

    __slots__ = ("epoch",)

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch


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
        board: PassiveBoard | None = None,
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
        #: ... and one that never waits lets a publish be a step of its own
        #: on the publisher's stack (:meth:`publish_to`).
        self._now: AppendsNow | None = broker if isinstance(broker, AppendsNow) else None
        #: ... and a remote log with an append pipeline (Redis) lets a publish
        #: be sent from the publisher's stack, answered by callback when the
        #: broker replies (:meth:`_publish_queued`).
        self._queued: AppendsQueued | None = (
            broker if self._local is None and isinstance(broker, AppendsQueued) else None
        )
        #: An append sent that way is unanswered: every later append of this
        #: guild waits for its answer (:meth:`_after_sent`), so the guild has
        #: at most one append in flight, as a batch's awaited append keeps it.
        self._sending = False
        self._sent_waiter: asyncio.Future[None] | None = None
        #: A fan-out of what such steps emitted is queued for the end of
        #: this loop turn (:meth:`_flush_now`): one run for all of them.
        self._flush_due = False
        #: The answers of those steps, given after that fan-out (so a
        #: publisher of a small guild still sees its DISPATCH before its
        #: ACK, as in a batch): at most one per publish since the last
        #: fan-out; given by :meth:`_answer_replies`, also at a crash.
        self._replies: list[tuple[Reply, tuple[int, str]]] = []
        #: Placement: ``partitions[0]`` is the :class:`Writer` this actor writes
        #: itself; every later one a :class:`Partition` actor (partition.py).
        self.partitions: list[Writer | Partition] = []
        self.where: dict[Sink, Writer | Partition] = {}
        #: Presence identity of each local session (announced on join/leave).
        self.members: dict[Sink, Presence] = {}
        #: Local sessions that asked for presence (snapshot and changes).
        self._watchers: set[Sink] = set()
        #: Version of the last presence change fanned out (None: none since
        #: this node listens), and the last snapshot read (reused while no
        #: later change was fanned out); both forgotten with the feed.
        self._pv: int | None = None
        self._psnap: PresenceSnapshot | None = None
        #: ``_psnap``'s PRESENCE_SNAPSHOT frame, built (and compressed, per
        #: parameter set) once for every session it is sent to.
        self._psnap_frame: tuple[PresenceSnapshot, SharedFrame] | None = None
        #: Sessions per partition, kept in step with ``where``.
        self.load: dict[Writer | Partition, int] = {}
        #: Partitions that have not yet written the last run sent to them,
        #: and the runs sent to each (a ``Written`` credit covers them all
        #: only when it counts as many: one ``runs_written`` per partition).
        self._writing: set[Partition] = set()
        self._runs_sent: dict[Partition, int] = {}
        #: Sessions removed from a partition actor whose ``Remove`` it has not
        #: handled yet (its mailbox still holds their last events and their
        #: UNSUBSCRIBED): one that subscribes again in that window goes back
        #: to that partition, so what it receives stays in order. An entry
        #: leaves with the partition's ``Removed``: bounded by its mailbox.
        self._parted: dict[Sink, Partition] = {}
        #: ``Remove`` messages cast for a session and not yet written (its
        #: ``_parted`` entry stays until they all are).
        self._unwritten: dict[Sink, int] = {}
        self.published = 0
        self.delivered = 0
        #: History read back for replays in this batch (replay.py), and the
        #: broker reads replays made since start.
        self._pages: ReplayPages | None = None
        self.replay_reads = 0
        self._frames: list[bytes] = []
        self._names: list[str] = []
        #: Publish times of ``_frames`` (for the latency metric).
        self._stamps: list[float] = []
        #: Bytes of ``_frames`` (``HOLD_BYTES``).
        self._held = 0
        #: The node's counters (``/metrics``), shared with the partitions.
        self.stats = stats if stats is not None else NodeStats()
        #: The node's passive-notice board (passive.py) and this guild's entry
        #: on it while it has passive sessions; ``passive`` is that entry's
        #: ``sinks``: the sessions receiving notices.
        self._board = board if board is not None else PassiveBoard()
        self._entry: PassiveGuild | None = None
        self.passive: dict[Sink, None] = {}
        #: Sessions switched to passive while a partition actor still writes
        #: their last events and their passive SUBSCRIBED: they join
        #: ``passive`` at the partition's ``Removed`` (no notice overtakes
        #: those). Bounded like ``_parted``.
        self._passivating: set[Sink] = set()
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

    @property
    def has_sessions(self) -> bool:
        """True while any local session, active or passive, is subscribed."""
        return bool(self.where or self.passive or self._passivating)

    @property
    def subscribers(self) -> int:
        """Local sessions subscribed, active and passive."""
        return len(self.where) + len(self.passive) + len(self._passivating)

    def on_idle(self) -> bool:
        return not self.has_sessions and not self._sending

    async def on_stop(self, reason: BaseException | None) -> None:
        self._demonitor()
        if reason is None:
            try:
                self._fan_out(force=True)  # what inline steps held (_flush_now)
            except Exception as e:
                # As a batch that fails: a crash, so the rest of the stop
                # still runs (answers, partitions, presence, unlisten) and
                # the sessions are closed to recover from history.
                log.exception("guild %s: writing held events at stop failed", self.gid)
                reason = e
        self._answer_replies()  # sequenced: answered, even in a crash
        for p in self.partitions:
            if type(p) is Partition:
                p.stop()
        if reason is not None:
            # Let it crash: the sessions reconnect and recover what they can.
            for sink in [*self.where, *self.passive, *self._passivating]:
                sink.close(Close.UNKNOWN_ERROR, "guild failed")
        self.where.clear()
        self._watchers.clear()
        self._drop_passive()
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

    def publish_to(
        self,
        t: str,
        d_json: bytes,
        key: str | None,
        fn: PublishReply,
    ) -> None:
        """Sequence one event and answer ``fn(result, error)`` in this actor's
        step (``Hub.publish_to``). When the actor is parked, listening, with
        an in-process log that never waits (``AppendsNow``) at its cursor,
        and no idempotency key, that step is run now on the caller's stack
        (``Actor.step_now``): the same append, emit, fan-out and answer as
        :meth:`handle_batch` would do for it, without the task's wake.
        With a broker that queues appends (``AppendsQueued``: Redis), a
        parked guild with no append in flight sends it from here instead
        (:meth:`_publish_queued`). Otherwise the publish is queued as a
        call. Raises as ``call_nowait`` does (``MailboxFull``, ``ActorExited``)."""
        if key is None:
            if self._now is not None:
                if self._cur is not None:
                    reply = Reply(fn)
                    if self.step_now(lambda: self._publish_now(t, d_json, reply)):
                        return
            elif self._queued is not None and not self._sending:
                reply = Reply(fn)
                if self.step_now(lambda: self._publish_queued(t, d_json, reply)):
                    return
        self.call_with(PublishMsg(t, d_json, key), fn)

    def _publish_queued(self, t: str, d_json: bytes, reply: Reply) -> bool:
        """One publish as a whole step (:meth:`publish_to`) with a remote
        log: the append is queued on the broker's pipeline now, and
        answered in :meth:`_queued_done` when the broker replies; its
        records come back by the feed, as every Redis append's do. False,
        with nothing done, while an earlier such append is unanswered."""
        q = self._queued
        if q is None or self._sending:
            return False
        try:
            q.append_queued(self.gid, [(t, d_json)], lambda r, e: self._queued_done(reply, r, e))
        except BrokerUnavailable as e:
            reply.set_exception(e)  # nothing queued: not published
            return True
        except Exception:
            reply.set_exception(ActorExited(self.name))  # the guild crashes with it
            raise
        self._sending = True
        return True

    def _queued_done(
        self, reply: Reply, result: tuple[str, list[int]] | None, exc: BaseException | None
    ) -> None:
        """The broker's answer to :meth:`_publish_queued`'s append (in the
        broker's step, not this actor's): answer the publisher, and let
        the appends waiting behind it go."""
        self._sending = False
        w = self._sent_waiter
        if w is not None:
            self._sent_waiter = None
            if not w.done():
                w.set_result(None)
        if exc is not None or result is None:
            reply.set_exception(exc if exc is not None else BrokerUnavailable("no answer"))
            return
        epoch, ss = result
        if self.listening and epoch != self.epoch:
            # The broker lost this guild's history: in the guild's own step.
            self.cast_system(EpochSeen(epoch))
        self.published += len(ss)
        self.stats.published += len(ss)
        reply.set_result((ss[0], epoch))

    def feed(self, records: list[Record] | str | None) -> None:
        """A remote feed's records (``FeedRouter``), or its None or
        ``FEED_LOST``: records for a parked guild are a step run now, on
        the feed's read callback (``Actor.step_now``, :meth:`_feed_now`),
        with no wake of the guild's task; anything else is a ``Feed``
        message, handled in mailbox order."""
        if type(records) is list and self._cur is not None:
            recs = records
            if self.step_now(lambda: self._feed_now(recs)):
                return
        self.cast_system(Feed(records))

    def _feed_now(self, records: list[Record]) -> bool:
        """:meth:`_on_feed` of a list of records as a whole step: the same
        cursor step, emit and fan-out as a batch of one ``Feed`` does. A
        cursor step that needs the broker (a read-back, history lost) is
        carried on in the guild's own step (``Drive``), first in its
        mailbox; so is everything before it. False, with nothing done,
        unless listening."""
        cur = self._cur
        if cur is None or not self.listening:
            return False
        self._pages = None
        out, nxt = cur.feed(records)
        for rec in out:
            self._emit(rec)
        if nxt is not None:
            self.cast_system(Drive(nxt))
            return True
        self._fan_out()
        entry = self._entry
        if entry is not None:
            entry.head = cur.s
        return True

    async def _after_sent(self) -> None:
        """Wait until no append sent by :meth:`_publish_queued` is in flight:
        this batch's append is then sequenced after it (order per guild)."""
        while self._sending:
            w = self._sent_waiter
            if w is None:
                w = self._sent_waiter = asyncio.get_running_loop().create_future()
            await w

    def _publish_now(self, t: str, d_json: bytes, reply: Reply) -> bool:
        """One publish as a whole step (:meth:`publish_to`); False, with
        nothing done, unless the log is where the cursor is.

        Its frame is held for one loop turn, not written at once: the
        publishes one read brings to this guild go out as one run, one
        write per session, as one batch of queued publishes would
        (:meth:`_flush_now`); past ``HOLD_FRAMES``/``HOLD_BYTES`` held,
        at once. Its answer follows that fan-out (:attr:`_replies`)."""
        cur = self._cur
        now = self._now
        if cur is None or now is None or not self.listening or cur.reading:
            return False
        try:
            recs = now.append_local_now(self.gid, [(t, d_json)], cur.epoch, cur.s)
        except Exception:
            reply.set_exception(ActorExited(self.name))  # the guild crashes with it
            raise
        if recs is None:
            return False  # the log moved on (another epoch): the awaited path
        self._pages = None
        self.published += len(recs)
        self.stats.published += len(recs)
        self._replies.append((reply, (recs[0].s, cur.epoch)))
        out, nxt = cur.feed(recs)
        assert nxt is None, "records that follow the cursor need no read-back"
        for rec in out:
            self._emit(rec)
        if len(self._frames) >= HOLD_FRAMES or self._held >= HOLD_BYTES:
            self._fan_out()
            self._answer_replies()
        elif not self._flush_due:
            self._flush_due = True
            w = self._waiter  # set: a step runs only on a parked actor
            assert w is not None
            w.get_loop().call_soon(self._flush_now)
        entry = self._entry
        if entry is not None:
            entry.head = cur.s
        return True

    def _flush_now(self) -> None:
        """Write what inline steps emitted this loop turn, as a step of its
        own if the guild is still parked; else its task is in a batch or
        about to run one, and every batch ends with this same fan-out."""
        self._flush_due = False
        self.step_now(self._flush_step)

    def _flush_step(self) -> bool:
        self._fan_out()
        self._answer_replies()
        return True

    def _answer_replies(self) -> None:
        """Answer the inline publishes sequenced so far: ``(s, epoch)``."""
        replies = self._replies
        if replies:
            self._replies = []
            for reply, result in replies:
                reply.set_result(result)

    async def handle_batch(self, batch: deque[Any]) -> None:
        self._pages = None
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
                if item.runs >= self._runs_sent.get(item.partition, 0):
                    self._writing.discard(item.partition)
            elif tp is Removed:
                self._removed(item.partition, item.sink)
            elif tp is PresenceMsg:
                await self._on_presence(item.kind, item.member, item.v)
            elif tp is Drive:
                await self._drive(([], item.next))
            elif tp is EpochSeen:
                if self.listening and item.epoch != self.epoch:
                    await self._history_lost(f"epoch changed to {item.epoch}")
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
        self._answer_replies()
        entry = self._entry
        if entry is not None and self._cur is not None:
            entry.head = self._cur.s
        self._pages = None  # the batch's replays are served (replay.py)

    async def _append(self, pubs: list[_Call], items: list[tuple[str, bytes]]) -> None:
        if self._sending:
            await self._after_sent()
        if any(call.msg.key is not None for call in pubs):
            await self._append_keyed(pubs, items)
            return
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

    async def _append_keyed(self, pubs: list[_Call], items: list[tuple[str, bytes]]) -> None:
        """:meth:`_append` for a batch holding idempotency keys: the broker
        sequences only what its window does not hold (PROTOCOL.md
        "Idempotent publish"); the others get the original's answer."""
        keys = [call.msg.key for call in pubs]
        local = self._local
        recs: list[Record] | None = None
        try:
            if local is not None:
                epoch, recs, out = await local.append_local_keyed(self.gid, items, keys)
            else:
                epoch, out = await self.broker.append_keyed(self.gid, items, keys)
        except BrokerUnavailable as e:
            for call in pubs:
                if not call.future.done():
                    call.future.set_exception(e)
            return
        if self.listening and epoch != self.epoch:
            await self._history_lost(f"epoch changed to {epoch}")
        new = sum(1 for r in out if type(r) is int)
        self.published += new
        self.stats.published += new
        for call, r in zip(pubs, out, strict=True):
            if call.future.done():
                continue
            if type(r) is int:
                call.future.set_result((r, epoch))
            else:
                assert isinstance(r, Replayed)
                if r.conflict:
                    self.stats.publish_conflicts += 1
                    call.future.set_exception(KeyConflict(r.s, epoch))
                else:
                    self.stats.publish_replays += 1
                    call.future.set_result((r.s, epoch))
        if recs and self.listening:
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
            if self.listening:
                # Presence changes may have been lost with the feed too.
                await self._presence_resync()
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
        frame = wire.text_frame(rec.payload)
        self._frames.append(frame)
        self._names.append(rec.t)
        self._stamps.append(rec.ts)
        self._held += len(frame)

    def _fan_out(self, force: bool = False) -> None:
        """Send the events emitted so far to every writer: now if ``force``
        (a membership change or presence dispatch comes next), else once
        every partition has written the previous run (``Written``) or
        ``HOLD_FRAMES`` are held: a big guild's partitions then get runs as
        long as one writer would (docs/ARCHITECTURE.md, "Placement")."""
        if not self._frames:
            return
        if (
            self._writing
            and not force
            and len(self._frames) < HOLD_FRAMES
            and self._held < HOLD_BYTES
        ):
            return
        run = Frames(self._frames, self._names, self._stamps)
        self._frames = []
        self._names = []
        self._stamps = []
        self._held = 0
        self.delivered += len(run.frames)
        for p in self.partitions:
            if type(p) is Writer:
                p.write(run.frames, run.names, run.stamps, run.data, run.compressed)
                continue
            assert type(p) is Partition
            try:
                p.cast_run(run)
            except MailboxFull:
                self._shed(p)
                continue
            self._writing.add(p)
            self._runs_sent[p] = self._runs_sent.get(p, 0) + 1

    async def _on_presence(self, kind: str, member: Presence, v: int | None) -> None:
        """PRESENCE_JOIN/LEAVE to the local sessions that asked (no ``s``: presence
        is not part of the guild's event sequence and is not replayed), each
        only to the sessions whose snapshot is older than its version."""
        if not self.listening:
            return  # queued before the feed stopped: no session is served from it
        if v is not None:
            snap = self._psnap
            base = self._pv if self._pv is not None else (snap.version if snap else None)
            if base is not None and v <= base:
                return  # in every snapshot sent (a resync's, or the one served since)
            if base is not None and v > base + 1:
                await self._presence_resync()  # versions base+1 .. v-1 were lost
                return
            self._pv = v
        if not self._watchers:
            return
        t = "PRESENCE_JOIN" if kind == "join" else "PRESENCE_LEAVE"
        self._fan_out(force=True)  # keep the order of what came before
        self._send_presence(PresenceFrame(wire.message(0, member.as_dict(), t=t, g=self.gid), v=v))

    def _send_presence(self, msg: PresenceFrame) -> None:
        for p in self.partitions:
            if type(p) is Writer:
                p.send_presence(msg)
            else:
                assert type(p) is Partition
                p.cast_system(msg)

    async def _presence_snapshot(self) -> PresenceSnapshot:
        """The guild's presence for a session subscribing now: the last one
        read while no later change has been fanned out, else a fresh one."""
        snap = self._psnap
        if snap is None or (self._pv is not None and snap.version < self._pv):
            snap = self._psnap = await self.broker.presence_snapshot(
                self.gid, self.settings.presence_limit
            )
        return snap

    def _snapshot_frame(self, snap: PresenceSnapshot) -> bytes:
        members = [m.as_dict() for m in snap.members]
        return wire.presence_snapshot_frame(
            self.gid, members, snap.total, self.settings.presence_limit
        )

    def _snapshot_shared(self, snap: PresenceSnapshot) -> SharedFrame:
        """``snap``'s frame, built once for every subscriber it is served to."""
        got = self._psnap_frame
        if got is None or got[0] is not snap:
            got = self._psnap_frame = (snap, SharedFrame(self._snapshot_frame(snap)))
        return got[1]

    async def _presence_resync(self) -> None:
        """Presence changes may have been lost: read the presence afresh and,
        unless nothing changed, send every presence session a new
        PRESENCE_SNAPSHOT (it replaces theirs) at that version."""
        base = self._pv if self._pv is not None else (self._psnap.version if self._psnap else None)
        self._psnap = None
        self._psnap_frame = None
        if not self._watchers:
            self._pv = None
            return
        try:
            snap = await self.broker.presence_snapshot(self.gid, self.settings.presence_limit)
        except BrokerUnavailable:
            self._pv = None
            for sink in list(self._watchers):
                sink.close(Close.UNKNOWN_ERROR, "presence resync failed; reconnect")
            return
        self._psnap = snap
        self._pv = snap.version
        if snap.version == base:
            return  # nothing changed: every session is up to date
        self._fan_out(force=True)
        msg = PresenceFrame(self._snapshot_frame(snap), reset=snap.version)
        self._psnap_frame = (snap, msg)  # later subscribers share it
        self._send_presence(msg)

    async def _history_lost(self, why: str, reason: str = "guild history lost; reconnect") -> None:
        """This node cannot go on serving the guild's sessions from its feed
        (history gone, epoch changed, feed lost): they must reconnect and
        recover (close 4000); frames not yet fanned out are dropped."""
        log.warning("guild %s: %s; closing its local sessions", self.gid, why)
        self._frames = []
        self._names = []
        self._stamps = []
        self._held = 0
        for sink in [*self.where, *self.passive, *self._passivating]:
            sink.close(Close.UNKNOWN_ERROR, reason)
        # Passive ones too: their notices would name an epoch they never saw.
        self._drop_passive()
        # Listen afresh at the next subscribe: it reads the new epoch and head.
        await self._unlisten()

    def _shed(self, p: Partition) -> None:
        """A partition fell hopelessly behind: its sessions are slow consumers."""
        shed = [s for s, where in self.where.items() if where is p and not s.is_closed]
        if shed:  # once per overflow, not per run while it drains
            log.warning("guild %s: partition %s overflowed; closing its sessions", self.gid, p.name)
        for sink in shed:
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
        if msg.passive:
            # No replay, no rewind (the parser refuses one), no presence
            # dispatch: a passive session gets notices only. It stays a member;
            # an activation sends it a fresh PRESENCE_SNAPSHOT.
            self._watchers.discard(sink)
            self._passivate(sink)
            if msg.member is not None and sink not in self.members:
                self.members[sink] = msg.member
                self.broker.presence_join(self.gid, msg.member)
            return
        # Active again (or still): no notice after the SUBSCRIBED below.
        self._unpassive(sink)
        head = self.cursor
        recovered = False
        replay: list[SharedFrame] = []
        rewound: int | None = None
        try:
            if position is not None:
                epoch, after = position
                if epoch == self.epoch and after <= head:
                    got = await self._replay(after, head, sink.events)
                    if got is not None:
                        recovered = True
                        replay = got
            elif msg.rewind is not None:
                rewound, replay = await self._rewind(msg.rewind, head, sink.events)
                # Recovered: every event asked for follows (min(N, head) of them).
                recovered = rewound == min(msg.rewind, head)
        except BrokerUnavailable:
            # History could not be read now: not "recovered: false", which
            # tells the client its events are gone and it must reload. It
            # comes back with the same Position (1013, as for the head).
            sink.close(Close.TRY_AGAIN_LATER, "broker unavailable")
            if not self.has_sessions:
                await self._unlisten()
            return
        # SUBSCRIBED is this session's own; the snapshot and the replay are
        # shared, compressed once per parameter set (partition.Preamble).
        preamble: list[bytes | SharedFrame] = [
            wire.subscribed_frame(self.gid, self.epoch, head, recovered, rewound)
        ]
        since = -1
        if msg.presence:
            try:
                snap = await self._presence_snapshot()
            except BrokerUnavailable:
                sink.close(Close.TRY_AGAIN_LATER, "broker unavailable")
                if not self.has_sessions:
                    await self._unlisten()
                return
            since = snap.version
            preamble.append(self._snapshot_shared(snap))
            self._watchers.add(sink)
        else:
            self._watchers.discard(sink)
        preamble.extend(replay)
        p = self.where.get(sink)
        if p is None:
            p = self._parted.pop(sink, None) or self._partition_with_room()
            self.where[sink] = p
            self.load[p] += 1
        if type(p) is Writer:
            p.add(sink, preamble, msg.presence, since)
        else:
            assert type(p) is Partition
            p.cast_system(Add(sink, preamble, msg.presence, since))
        if msg.member is not None and sink not in self.members:
            self.members[sink] = msg.member
            self.broker.presence_join(self.gid, msg.member)

    async def _replay(
        self, after: int, head: int, want: frozenset[str] | None
    ) -> list[SharedFrame] | None:
        """Frames of events ``after+1 .. head`` (filtered), or None if history
        lacks some: read once per batch for every session it replays to
        (replay.py)."""
        assert self.epoch is not None
        pages = self._pages
        if pages is None or not pages.fits(self.epoch, head):
            pages = self._pages = ReplayPages(self.gid, self.epoch, head, READ_PAGE)
        reads = pages.reads
        got = await pages.replay(self.broker, after, want)
        self.replay_reads += pages.reads - reads
        return got

    async def _rewind(
        self, n: int, head: int, want: frozenset[str] | None
    ) -> tuple[int, list[SharedFrame]]:
        """A rewind (PROTOCOL.md "Rewind"): ``(k, frames)``, the last ``k`` events
        ``head-k+1 .. head`` (filtered), ``k`` at most ``n``, ``max_rewind``
        and what history holds. A replay from a Position ``k`` back
        (:meth:`_replay`); history that moved under the read (trimmed by
        another node) is read again from its new start, at most
        ``REWIND_TRIES`` times, then nothing is replayed (``k`` = 0). Raises
        BrokerUnavailable if history cannot be read now."""
        after = max(0, head - min(n, self.settings.max_rewind))
        for _ in range(REWIND_TRIES):
            if after >= head:
                return 0, []
            first = await self.broker.first(self.gid)  # BrokerUnavailable: the caller's
            if first is None or first > head:
                return 0, []  # nothing at or below the head is left
            after = max(after, first - 1)
            got = await self._replay(after, head, want)
            if got is not None:
                return head - after, got
        return 0, []

    async def _remove(self, sink: Sink, farewell: bytes | None) -> None:
        self._watchers.discard(sink)
        member = self.members.pop(sink, None)
        if member is not None:
            self.broker.presence_leave(self.gid, member)
        if self._unpassive(sink):
            if farewell is not None:
                self._send_after_partition(sink, farewell)
            if not self.has_sessions:
                await self._unlisten()
            return
        p = self.where.pop(sink, None)
        if p is None:
            return
        self.load[p] -= 1
        if type(p) is Writer:
            p.remove(sink, farewell)
        else:
            assert type(p) is Partition
            self._remove_via(p, sink, farewell)
        if not self.has_sessions:
            # Nodes listen to a guild only while they have local subscribers.
            await self._unlisten()

    # --- passive subscriptions (passive.py) -------------------------------------

    def _passivate(self, sink: Sink) -> None:
        """Make ``sink`` passive: SUBSCRIBED ``passive`` after every event it
        was sent, then notices only. From active, its writer writes that
        SUBSCRIBED last (a partition actor: the session joins ``passive`` at
        the partition's ``Removed``)."""
        assert self.epoch is not None
        frame = wire.subscribed_frame(self.gid, self.epoch, self.cursor, False, passive=True)
        p = self.where.pop(sink, None)
        if p is not None:
            self.load[p] -= 1
            if type(p) is Writer:
                p.remove(sink, frame)
                self._notice_to(sink)
                return
            assert type(p) is Partition
            self._remove_via(p, sink, frame)
            self.passive.pop(sink, None)
            self._passivating.add(sink)
            return
        if self._send_after_partition(sink, frame):
            self.passive.pop(sink, None)
            self._passivating.add(sink)
        elif sink not in self._passivating:
            self._notice_to(sink)

    def _send_after_partition(self, sink: Sink, frame: bytes) -> bool:
        """Send ``frame`` to a session no writer holds: through the partition
        that still writes its last messages if there is one (order; returns
        True), else now."""
        part = self._parted.get(sink)
        if part is not None:
            self._remove_via(part, sink, frame)
            return True
        sink.send(frame)
        return False

    def _remove_via(self, p: Partition, sink: Sink, farewell: bytes | None) -> None:
        """Cast ``Remove(sink, farewell)`` to partition ``p``: until ``p`` has
        written every such Remove (``_removed``), what this guild sends the
        session goes through ``p`` too (``_parted``)."""
        p.cast_system(Remove(sink, farewell))
        self._parted[sink] = p
        self._unwritten[sink] = self._unwritten.get(sink, 0) + 1

    def _removed(self, p: Partition, sink: Sink) -> None:
        """Partition ``p`` has written one ``Remove`` of ``sink``."""
        n = self._unwritten.get(sink, 0) - 1
        if n > 0:
            self._unwritten[sink] = n
            return
        self._unwritten.pop(sink, None)
        if self._parted.get(sink) is p:
            del self._parted[sink]
        if sink in self._passivating:
            self._passivating.discard(sink)
            self._notice_to(sink)

    def _notice_to(self, sink: Sink) -> None:
        """``sink`` receives this guild's notices from now on."""
        if sink.is_closed:
            return
        entry = self._entry
        if entry is None:
            assert self.epoch is not None
            entry = self._entry = self._board.attach(self.gid, self.epoch, self.cursor)
            entry.sinks = self.passive
        self.passive[sink] = None

    def _unpassive(self, sink: Sink) -> bool:
        """``sink`` is passive no more; True if it was."""
        was = sink in self.passive or sink in self._passivating
        self.passive.pop(sink, None)
        self._passivating.discard(sink)
        if not self.passive and self._entry is not None:
            self._board.detach(self._entry)
            self._entry = None
        return was

    def _drop_passive(self) -> None:
        """Forget every passive session (they are closed or the guild stops)."""
        self.passive.clear()
        self._passivating.clear()
        if self._entry is not None:
            self._board.detach(self._entry)
            self._entry = None

    async def _unlisten(self) -> None:
        """Stop listening to the guild's feed, forgetting its epoch and cursor."""
        if not self.listening:
            return
        self.listening = False
        self.epoch = None
        self._cur = None
        self._pv = None
        self._psnap = None
        self._psnap_frame = None
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
        # The credit reaches this mailbox one loop turn later, after the loop
        # has read its sockets: partitions write back to back in one turn, and
        # the events published meanwhile are only read then. Cast at once, it
        # met a guild step queued behind the partitions in that same turn (by
        # a publish read just before it), which sent only that publish as the
        # next run and held the rest behind it for a whole round of writes:
        # at 5,000 sessions (ten writers) 5 in 6 runs went out that way,
        # 2.8 events each against 3.8 (docs/ARCHITECTURE.md "Placement").
        loop = asyncio.get_running_loop()

        def credit() -> None:
            loop.call_soon(self.cast_system, Written(p, p.runs_written))

        p.on_written = credit
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
            "subscribers": self.subscribers,
            "history": {"first": first, "last": head if first is not None else None},
        }
