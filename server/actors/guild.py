"""Guild actor: the one writer of a guild's sequence, history and fanout.

It owns the guild's ``s`` counter, epoch and :class:`History`, and its
partition actors. For each publish it assigns ``s``, encodes and frames the
event once, appends it to history and hands the same bytes to every
partition (DESIGN.md, "The path of one event"). It never writes to a socket.

Subscriptions arrive as :class:`Subscribe` messages in mailbox order with
publishes, so the head it reports in SUBSCRIBED, the replay it builds and
the moment the session joins its partition are one atomic step: no gap and
no duplicate however publishes race the subscribe (PROTOCOL.md,
"Subscribing and recovery"). Leaves come from its process group monitor:
a session that disconnects leaves the group by itself.

Mailbox: publishes are bounded (``mailbox_bound``; past it publishers get
"try again later"); Subscribe/Unsubscribe/Left are system messages.
Idle: with no session and no message for ``idle_timeout`` it stops, and
its in-memory history goes with it (a later start is a new epoch).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from server.actors.actor import Actor, MailboxFull, _Call
from server.actors.groups import GroupEvent, Groups
from server.actors.partition import Add, Frames, Partition, Remove
from server.core.history import Entry, History
from server.core.sink import Sink
from server.protocol import wire
from server.protocol.codes import Close

log = logging.getLogger("guildcast.guild")


@dataclass(frozen=True, slots=True)
class GuildSettings:
    history_size: int = 1000
    history_ttl: float = 300.0
    partition_size: int = 512
    idle_timeout: float = 300.0
    mailbox_bound: int = 10_000


class PublishMsg:
    """Call message: sequence event ``t`` with data ``d``; replies ``(s, epoch)``."""

    __slots__ = ("d", "t")

    def __init__(self, t: str, d: Any) -> None:
        self.t = t
        self.d = d


class Subscribe:
    __slots__ = ("position", "sink")

    def __init__(self, sink: Sink, position: tuple[str, int] | None) -> None:
        self.sink = sink
        self.position = position


class Unsubscribe:
    __slots__ = ("sink",)

    def __init__(self, sink: Sink) -> None:
        self.sink = sink


class Left:
    """The session left the guild's group (disconnected or unsubscribed)."""

    __slots__ = ("sink",)

    def __init__(self, sink: Sink) -> None:
        self.sink = sink


class InfoMsg:
    """Call message: replies a dict of head, epoch, subscribers, history bounds."""

    __slots__ = ()


class HistoryMsg:
    """Call message: replies the stored events with ``s > after`` (at most ``limit``)."""

    __slots__ = ("after", "limit")

    def __init__(self, after: int, limit: int) -> None:
        self.after = after
        self.limit = limit


class Guild(Actor):
    """One guild: sequence, history, partitions. Started by the registry."""

    def __init__(
        self, gid: str, settings: GuildSettings, groups: Groups, tg: asyncio.TaskGroup
    ) -> None:
        super().__init__(
            gid, mailbox_bound=settings.mailbox_bound, idle_timeout=settings.idle_timeout
        )
        self.gid = gid
        self.settings = settings
        self._groups = groups
        self._tg = tg
        self.epoch = secrets.token_hex(8)
        self.head = 0
        self.history = History(settings.history_size, settings.history_ttl)
        self.partitions: list[Partition] = []
        self.where: dict[Sink, Partition] = {}
        #: Sessions per partition, kept in step with ``where``.
        self.load: dict[Partition, int] = {}
        self.published = 0
        self._demonitor = groups.monitor(gid, self._on_group_event)

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
            p.stop()
        if reason is not None:
            # Let it crash: the sessions reconnect and recover what they can.
            for sink in list(self.where):
                sink.close(Close.UNKNOWN_ERROR, "guild failed")
        self.where.clear()

    # --- messages ------------------------------------------------------------

    async def handle_batch(self, batch: deque[Any]) -> None:
        frames: list[bytes] = []
        names: list[str] = []
        now = time.time()
        history = self.history
        gid = self.gid
        for item in batch:
            tp = type(item)
            if tp is _Call:
                msg = item.msg
                if type(msg) is PublishMsg:
                    s = self.head + 1
                    try:
                        payload = wire.dispatch_payload(gid, msg.t, s, msg.d)
                    except TypeError as e:
                        if not item.future.done():
                            item.future.set_exception(ValueError(f"d is not JSON: {e}"))
                        continue
                    frame = wire.text_frame(payload)
                    self.head = s
                    history.append(Entry(s, msg.t, now, frame))
                    frames.append(frame)
                    names.append(msg.t)
                    if not item.future.done():
                        item.future.set_result((s, self.epoch))
                elif not item.future.done():  # a caller that timed out is gone
                    if type(msg) is InfoMsg:
                        item.future.set_result(self._info())
                    elif type(msg) is HistoryMsg:
                        item.future.set_result(list(history.since(msg.after, msg.limit)))
                    else:
                        item.future.set_exception(TypeError(f"unknown call {msg!r}"))
                continue
            if frames:
                self._fan_out(frames, names)
                frames = []
                names = []
            if tp is Subscribe:
                self._subscribe(item.sink, item.position)
            elif tp is Unsubscribe:
                self._remove(item.sink, wire.unsubscribed_frame(gid))
            elif tp is Left:
                self._remove(item.sink, None)
            else:
                raise TypeError(f"guild got {item!r}")
        if frames:
            self._fan_out(frames, names)
        history.prune(now)

    def _remove(self, sink: Sink, farewell: bytes | None) -> None:
        p = self.where.pop(sink, None)
        if p is not None:
            self.load[p] -= 1
            p.cast_system(Remove(sink, farewell))

    def _fan_out(self, frames: list[bytes], names: list[str]) -> None:
        self.published += len(frames)
        run = Frames(frames, names)
        for p in self.partitions:
            try:
                p.cast(run)
            except MailboxFull:
                self._shed(p)

    def _shed(self, p: Partition) -> None:
        """A partition fell hopelessly behind: its sessions are slow consumers."""
        log.warning("guild %s: partition %s overflowed; closing its sessions", self.gid, p.name)
        for sink, where in list(self.where.items()):
            if where is p:
                sink.close(Close.SLOW_CONSUMER, "partition overflow")

    def _subscribe(self, sink: Sink, position: tuple[str, int] | None) -> None:
        if sink.is_closed:
            return
        head = self.head
        recovered = False
        replay: list[bytes] = []
        if position is not None:
            epoch, after = position
            if epoch == self.epoch and self.history.covers(after, head):
                recovered = True
                want = sink.events
                replay = [e.frame for e in self.history.since(after) if want is None or e.t in want]
        preamble = wire.subscribed_frame(self.gid, self.epoch, head, recovered)
        if replay:
            preamble = b"".join([preamble, *replay])
        p = self.where.get(sink)
        if p is None:
            p = self._partition_with_room()
            self.where[sink] = p
            self.load[p] += 1
        p.cast_system(Add(sink, preamble))

    def _partition_with_room(self) -> Partition:
        """The first partition below ``partition_size`` sessions, or a new one."""
        size = self.settings.partition_size
        for p, n in self.load.items():
            if n < size:
                return p
        p = Partition(f"{self.gid}/{len(self.partitions)}")
        p.monitor(self._partition_exited)
        p.start(self._tg)
        self.partitions.append(p)
        self.load[p] = 0
        return p

    def _partition_exited(self, p: Any, reason: BaseException | None) -> None:
        if reason is not None:
            self.kill(reason)  # linked: a partition's crash is the guild's crash

    def _info(self) -> dict[str, Any]:
        return {
            "guild": self.gid,
            "epoch": self.epoch,
            "s": self.head,
            "subscribers": len(self.where),
            "history": {
                "first": self.history.first,
                "last": self.history.last,
                "count": len(self.history),
                "max_count": self.history.max_count,
                "max_age": self.history.max_age,
            },
        }
