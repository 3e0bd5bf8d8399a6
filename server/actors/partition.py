"""Session writers: one slice of a guild's sessions and the writes to them.

:class:`Writer` is the plain structure: the sessions of the slice (plain,
filtered, presence) and ``write``, which joins a run of event frames into one
``bytes`` and writes it with one ``send`` per session (docs/DESIGN.md rules 2-4);
per-recipient work is one call (the buffer-bound check lives in
``Sink.send``); nothing awaits a client. Sessions with an ``events`` filter
get the frames their filter passes, joined once per distinct filter per run.

Placement (the guild decides, once, in ``Guild._writer_with_room``; see
docs/ARCHITECTURE.md "Placement"): a guild's first ``partition_size``
sessions are in a :class:`Writer` the guild writes itself, in the step that
sequenced the events; each further ``partition_size`` sessions get a
:class:`Partition` actor, which owns a :class:`Writer` and writes in its own
steps. A session never moves, so its order is its writer's order. Partitions
exist to bound how much one loop step writes.

Order: a partition applies its messages strictly in mailbox order, so an
``Add`` queued by the guild after event ``s`` means the session gets exactly
the events after ``s``, right behind its preamble (SUBSCRIBED and any replay).

Mailbox: event runs are bounded (``mailbox_bound``, overflow raises to the
guild, which sheds this partition's sessions with 4010); Add/Remove are
system messages, never dropped.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from guildcast.actors.actor import Actor
from guildcast.core.metrics import NodeStats
from guildcast.core.sink import Sink


class Frames:
    """A run of framed events, in ``s`` order, shared by every partition.

    ``stamps`` are the events' publish times (``Record.ts``), for the
    publish-to-write latency metric; None when unknown.
    """

    __slots__ = ("data", "frames", "names", "stamps")

    def __init__(
        self, frames: list[bytes], names: list[str], stamps: list[float] | None = None
    ) -> None:
        self.frames = frames
        self.names = names
        self.stamps = stamps
        #: ``frames`` joined, once for every writer (what plain sessions get).
        self.data = frames[0] if len(frames) == 1 else b"".join(frames)


class Add:
    """Start writing to ``sink`` after writing ``preamble`` (SUBSCRIBED + replay);
    ``since``: the presence version of the snapshot in its preamble."""

    __slots__ = ("preamble", "presence", "since", "sink")

    def __init__(
        self, sink: Sink, preamble: bytes, presence: bool = False, since: int = -1
    ) -> None:
        self.sink = sink
        self.preamble = preamble
        self.presence = presence
        self.since = since


class PresenceFrame:
    """A presence dispatch for the sessions that asked for presence: a
    PRESENCE_JOIN/LEAVE of version ``v`` (written to the sessions whose
    snapshot is older; None: to all), or, with ``reset``, a PRESENCE_SNAPSHOT
    at that version replacing every session's (docs/RELIABILITY.md,
    "Presence snapshot and diffs")."""

    __slots__ = ("frame", "reset", "v")

    def __init__(self, frame: bytes, v: int | None = None, reset: int | None = None) -> None:
        self.frame = frame
        self.v = v
        self.reset = reset


class Remove:
    """Stop writing to ``sink``; write ``farewell`` (UNSUBSCRIBED) last, if given."""

    __slots__ = ("farewell", "sink")

    def __init__(self, sink: Sink, farewell: bytes | None) -> None:
        self.sink = sink
        self.farewell = farewell


#: Event runs a partition may have queued. It drains everything each batch
#: and shares the loop fairly with its guild, so a healthy one holds 1-2.
PARTITION_MAILBOX_BOUND = 4096


class Writer:
    """At most ``partition_size`` sessions of one guild and the writes to them."""

    __slots__ = ("bytes_out", "deliveries", "filtered", "plain", "presence", "stats")

    def __init__(self, stats: NodeStats | None = None) -> None:
        self.plain: dict[Sink, None] = {}
        self.filtered: dict[Sink, frozenset[str]] = {}
        #: Sessions that asked for presence (a subset of the above), each with
        #: the version of the presence snapshot it was sent: it gets the
        #: changes of later versions only.
        self.presence: dict[Sink, int] = {}
        self.deliveries = 0
        self.bytes_out = 0
        #: The node's counters (``/metrics``): added to once per write.
        self.stats = stats

    def __len__(self) -> int:
        return len(self.plain) + len(self.filtered)

    def add(self, sink: Sink, preamble: bytes, presence: bool = False, since: int = -1) -> None:
        self.presence.pop(sink, None)
        self.plain.pop(sink, None)
        self.filtered.pop(sink, None)
        if sink.is_closed:
            return
        sink.send(preamble)
        if presence:
            self.presence[sink] = since
        if sink.events is None:
            self.plain[sink] = None
        else:
            self.filtered[sink] = sink.events

    def remove(self, sink: Sink, farewell: bytes | None) -> None:
        self.presence.pop(sink, None)
        self.plain.pop(sink, None)
        self.filtered.pop(sink, None)
        if farewell is not None:
            sink.send(farewell)

    def send_presence(self, frame: bytes, v: int | None = None, reset: int | None = None) -> None:
        """A change of version ``v`` to the sessions whose snapshot is older
        (None: to all); with ``reset``, a snapshot to all, now at that version."""
        presence = self.presence
        if reset is not None:
            for sink in presence:
                presence[sink] = reset
                sink.send(frame)
            return
        for sink, since in presence.items():
            if v is None or v > since:
                sink.send(frame)

    def write(
        self,
        frames: list[bytes],
        names: list[str],
        stamps: list[float] | None,
        data: bytes | None = None,
    ) -> None:
        """Write a run of event frames (``stamps``: their publish times, or
        None; ``data``: ``frames`` already joined, if the caller has it)."""
        if data is None:
            data = frames[0] if len(frames) == 1 else b"".join(frames)
        plain = self.plain
        for sink in plain:
            sink.send(data)
        n = len(plain)
        out = n * len(data)
        deliveries = n * len(frames)
        if self.filtered:
            # One join per distinct filter in this run, not per session.
            cache: dict[frozenset[str], tuple[bytes, int]] = {}
            for sink, want in self.filtered.items():
                hit = cache.get(want)
                if hit is None:
                    passed = [f for f, t in zip(frames, names, strict=True) if t in want]
                    hit = cache[want] = (b"".join(passed), len(passed))
                chunk, count = hit
                if count:
                    sink.send(chunk)
                    out += len(chunk)
                    deliveries += count
        self.deliveries += deliveries
        self.bytes_out += out
        stats = self.stats
        if stats is not None:
            stats.deliveries += deliveries
            stats.bytes_out += out
            if deliveries and stamps:
                # Once per event per writer that wrote it, never per recipient.
                now = time.time()
                observe = stats.latency.observe
                for ts in stamps:
                    observe(now - ts)

    def sinks(self) -> list[Sink]:
        return [*self.plain, *self.filtered]


class Partition(Actor):
    """A :class:`Writer` in its own actor: writes a big guild's further sessions."""

    def __init__(
        self,
        name: str,
        mailbox_bound: int = PARTITION_MAILBOX_BOUND,
        stats: NodeStats | None = None,
    ) -> None:
        super().__init__(name, mailbox_bound=mailbox_bound)
        self.writer = Writer(stats)
        #: Called after each batch that wrote events: the guild's credit
        #: (it sends the next run once every partition has written this one).
        self.on_written: Callable[[], None] | None = None
        #: Called after a session's ``Remove`` is written (the guild may then
        #: place that session anywhere again).
        self.on_removed: Callable[[Sink], None] | None = None

    def __len__(self) -> int:
        return len(self.writer)

    @property
    def deliveries(self) -> int:
        return self.writer.deliveries

    @property
    def bytes_out(self) -> int:
        return self.writer.bytes_out

    def sinks(self) -> list[Sink]:
        return self.writer.sinks()

    async def handle_batch(self, batch: deque[Any]) -> None:
        w = self.writer
        runs: list[Frames] = []
        wrote = False
        for item in batch:
            tp = type(item)
            if tp is Frames:
                runs.append(item)
            else:
                if runs:
                    _write_runs(w, runs)
                    runs = []
                    wrote = True
                if tp is Add:
                    w.add(item.sink, item.preamble, item.presence, item.since)
                elif tp is PresenceFrame:
                    w.send_presence(item.frame, item.v, item.reset)
                elif tp is Remove:
                    w.remove(item.sink, item.farewell)
                    if self.on_removed is not None:
                        self.on_removed(item.sink)
                else:
                    raise TypeError(f"partition got {item!r}")
        if runs:
            _write_runs(w, runs)
            wrote = True
        if wrote and self.on_written is not None:
            self.on_written()


def _write_runs(w: Writer, runs: list[Frames]) -> None:
    """Write consecutive runs as one (one ``send`` per session for all of them)."""
    if len(runs) == 1:
        run = runs[0]
        w.write(run.frames, run.names, run.stamps, run.data)
        return
    frames: list[bytes] = []
    names: list[str] = []
    stamps: list[float] = []
    for run in runs:
        frames += run.frames
        names += run.names
        if run.stamps:
            stamps += run.stamps
    w.write(frames, names, stamps, b"".join([run.data for run in runs]))
