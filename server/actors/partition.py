"""Session writers: one slice of a guild's sessions and the writes to them.

:class:`Writer` is the plain structure: the sessions of the slice (plain,
filtered, presence) and ``write``, which joins a run of event frames into one
``bytes`` and writes it with one ``send`` per session (docs/DESIGN.md rules 2-4);
per-recipient work is one call (the buffer-bound check lives in
``Sink.send``); nothing awaits a client. Sessions with an ``events`` filter
get the frames their filter passes, joined once per distinct filter per run.

Compression (docs/PROTOCOL.md "Compression"): sessions that negotiated
permessage-deflate carry their parameter set's
:class:`~guildcast.protocol.deflate.Deflater` as ``Sink.deflate``. A run's
compressed frames are made once per node (cached on the :class:`Frames`
the guild hands every writer, and on each :class:`PresenceFrame`) and the
same bytes go to every such session. A preamble is a :data:`Preamble`: its
own SUBSCRIBED (built for one session) is compressed for it by the same
shared compressor, and its shared parts (the presence snapshot, the replayed
events of the batch's ``ReplayPages``) are
:class:`~guildcast.protocol.deflate.SharedFrame` s, compressed once per
parameter set for every session that gets them. A farewell is built for one
session and compressed for it. Small frames stay uncompressed (the
deflater's threshold).

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

Mailbox: event runs are bounded in count (``mailbox_bound``) and in bytes
(``queue_bytes``: the runs cast and not yet written, :meth:`Partition.cast_run`);
past either the cast raises :class:`~guildcast.actors.actor.MailboxFull` to
the guild, which sheds this partition's sessions with 4010 (slow consumers:
they reconnect and recover from history), and the guild's other writers go
on. Add/Remove are system messages, never dropped.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from guildcast.actors.actor import Actor, MailboxFull
from guildcast.core.metrics import NodeStats
from guildcast.core.sink import Sink
from guildcast.protocol.deflate import RSV1, Deflater, SharedFrame

#: A run's frames compressed by one deflater: ``(frames, joined, compressed)``,
#: the last the number of frames sent compressed (RSV1 set; the rest were small).
Compressed = tuple[list[bytes], bytes, int]


def compress_frames(frames: list[bytes], deflater: Deflater) -> Compressed:
    """``frames`` (built by ``text_frame``) as ``deflater`` writes them."""
    zf = [deflater.frame(f) for f in frames]
    n = sum(1 for f in zf if f[0] & RSV1)
    return zf, zf[0] if len(zf) == 1 else b"".join(zf), n


class Frames:
    """A run of framed events, in ``s`` order, shared by every partition.

    ``stamps`` are the events' publish times (``Record.ts``), for the
    publish-to-write latency metric; None when unknown.
    """

    __slots__ = ("_z", "data", "frames", "names", "stamps")

    def __init__(
        self, frames: list[bytes], names: list[str], stamps: list[float] | None = None
    ) -> None:
        self.frames = frames
        self.names = names
        self.stamps = stamps
        #: ``frames`` joined, once for every writer (what plain sessions get).
        self.data = frames[0] if len(frames) == 1 else b"".join(frames)
        #: The run compressed, per parameter set, made by the first writer
        #: with a session that negotiated it (one entry per node in practice).
        self._z: dict[Deflater, Compressed] | None = None

    def compressed(self, deflater: Deflater) -> Compressed:
        """This run as ``deflater``'s sessions get it, compressed once."""
        z = self._z
        if z is None:
            z = self._z = {}
        hit = z.get(deflater)
        if hit is None:
            hit = z[deflater] = compress_frames(self.frames, deflater)
        return hit


#: What a session is written before its events: whole frames, either one
#: ``bytes`` built for it alone, or parts in order where ``bytes`` parts are
#: its own (its SUBSCRIBED) and :class:`SharedFrame` parts are shared with
#: other sessions (a presence snapshot, replayed events).
Preamble = bytes | list[bytes | SharedFrame]


def preamble_bytes(preamble: Preamble, z: Deflater | None) -> bytes:
    """``preamble`` as a session with deflater ``z`` (None: none) is sent it:
    its own parts compressed for it, the shared ones once per deflater."""
    if isinstance(preamble, bytes):
        return preamble if z is None else z.frames(preamble)
    parts: list[bytes] = []
    for p in preamble:
        if isinstance(p, SharedFrame):
            parts.append(p.frame if z is None else p.compressed(z))
        else:
            parts.append(p if z is None else z.frames(p))
    return b"".join(parts)


class Add:
    """Start writing to ``sink`` after writing ``preamble`` (SUBSCRIBED + replay);
    ``since``: the presence version of the snapshot in its preamble."""

    __slots__ = ("preamble", "presence", "since", "sink")

    def __init__(
        self, sink: Sink, preamble: Preamble, presence: bool = False, since: int = -1
    ) -> None:
        self.sink = sink
        self.preamble = preamble
        self.presence = presence
        self.since = since


class PresenceFrame(SharedFrame):
    """A presence dispatch for the sessions that asked for presence: a
    PRESENCE_JOIN/LEAVE of version ``v`` (written to the sessions whose
    snapshot is older; None: to all), or, with ``reset``, a PRESENCE_SNAPSHOT
    at that version replacing every session's (docs/RELIABILITY.md,
    "Presence snapshot and diffs"). Compressed once per parameter set for
    every writer that shares it (:class:`SharedFrame`)."""

    __slots__ = ("reset", "v")

    def __init__(self, frame: bytes, v: int | None = None, reset: int | None = None) -> None:
        super().__init__(frame)
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
#: Bytes of event runs a partition may have queued and not yet written
#: before the next run sheds its sessions (4010). Runs are built once and
#: shared by all of a guild's writers, so this is what one lagging partition
#: pins beyond its guild's own writes. Four times the default ``max_buffer``
#: (4 MiB, the most a session may have unsent): a partition that far behind
#: holds its every session further behind than a slow consumer may be, only
#: in another queue. In runs alone the bound was 4,096 runs of up to
#: ``HOLD_FRAMES`` frames of up to 32 KiB each, far past any memory budget.
PARTITION_QUEUE_BYTES = 16 * 1024 * 1024


class Writer:
    """At most ``partition_size`` sessions of one guild and the writes to them."""

    __slots__ = (
        "bytes_out",
        "deliveries",
        "filtered",
        "plain",
        "presence",
        "stats",
        "zplain",
    )

    def __init__(self, stats: NodeStats | None = None) -> None:
        self.plain: dict[Sink, None] = {}
        #: Unfiltered sessions that negotiated permessage-deflate, by their
        #: parameter set's deflater (one in practice): written like ``plain``.
        self.zplain: dict[Deflater, dict[Sink, None]] = {}
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
        return len(self.plain) + sum(map(len, self.zplain.values())) + len(self.filtered)

    def _forget(self, sink: Sink) -> None:
        self.presence.pop(sink, None)
        self.plain.pop(sink, None)
        self.filtered.pop(sink, None)
        z = sink.deflate
        if z is not None and (group := self.zplain.get(z)) is not None:
            group.pop(sink, None)
            if not group:
                del self.zplain[z]

    def add(self, sink: Sink, preamble: Preamble, presence: bool = False, since: int = -1) -> None:
        self._forget(sink)
        if sink.is_closed:
            return
        z = sink.deflate
        sink.send(preamble_bytes(preamble, z))
        if presence:
            self.presence[sink] = since
        if sink.events is not None:
            self.filtered[sink] = sink.events
        elif z is not None:
            self.zplain.setdefault(z, {})[sink] = None
        else:
            self.plain[sink] = None

    def remove(self, sink: Sink, farewell: bytes | None) -> None:
        self._forget(sink)
        if farewell is not None:
            z = sink.deflate
            sink.send(farewell if z is None else z.frames(farewell))

    def send_presence(
        self, frame: bytes | PresenceFrame, v: int | None = None, reset: int | None = None
    ) -> None:
        """A change of version ``v`` to the sessions whose snapshot is older
        (None: to all); with ``reset``, a snapshot to all, now at that version.
        A :class:`PresenceFrame` carries its own ``v``/``reset`` and is
        compressed once per deflater however many writers share it."""
        if isinstance(frame, PresenceFrame):
            msg, v, reset = frame, frame.v, frame.reset
        else:
            msg = PresenceFrame(frame, v, reset)
        plain = msg.frame
        presence = self.presence
        if reset is not None:
            for sink in presence:
                presence[sink] = reset
                z = sink.deflate
                sink.send(plain if z is None else msg.compressed(z))
            return
        for sink, since in presence.items():
            if v is None or v > since:
                z = sink.deflate
                sink.send(plain if z is None else msg.compressed(z))

    def write(
        self,
        frames: list[bytes],
        names: list[str],
        stamps: list[float] | None,
        data: bytes | None = None,
        compressed: Callable[[Deflater], Compressed] | None = None,
    ) -> None:
        """Write a run of event frames (``stamps``: their publish times, or
        None; ``data``: ``frames`` already joined, if the caller has it;
        ``compressed``: the run's compressed frames per deflater, made once
        for every writer, if the caller has them: ``Frames.compressed``)."""
        if data is None:
            data = frames[0] if len(frames) == 1 else b"".join(frames)
        plain = self.plain
        for sink in plain:
            sink.send(data)
        n = len(plain)
        out = n * len(data)
        deliveries = n * len(frames)
        before = out
        zcount = 0
        if self.zplain:
            if compressed is None:
                compressed = _local_compressor(frames)
            for zp, group in self.zplain.items():
                _, zdata, zn = compressed(zp)
                for sink in group:
                    sink.send(zdata)
                n = len(group)
                out += n * len(zdata)
                zcount += n * zn
                deliveries += n * len(frames)
                before += n * len(data)
        if self.filtered:
            # One join per distinct filter (and parameter set) in this run,
            # not per session.
            cache: dict[tuple[frozenset[str], Deflater | None], tuple[bytes, int, int, int]] = {}
            for sink, want in self.filtered.items():
                z: Deflater | None = sink.deflate
                hit = cache.get((want, z))
                if hit is None:
                    keep = [i for i, t in enumerate(names) if t in want]
                    plain_len = sum(len(frames[i]) for i in keep)
                    if z is None:
                        passed = [frames[i] for i in keep]
                        nz = 0
                    else:
                        if compressed is None:
                            compressed = _local_compressor(frames)
                        zf = compressed(z)[0]
                        passed = [zf[i] for i in keep]
                        nz = sum(1 for f in passed if f[0] & RSV1)
                    hit = cache[(want, z)] = (b"".join(passed), len(passed), plain_len, nz)
                chunk, count, plain_len, nz = hit
                if count:
                    sink.send(chunk)
                    out += len(chunk)
                    before += plain_len
                    deliveries += count
                    zcount += nz
        self.deliveries += deliveries
        self.bytes_out += out
        stats = self.stats
        if stats is not None:
            stats.deliveries += deliveries
            stats.bytes_out += out
            stats.bytes_uncompressed += before
            stats.deliveries_compressed += zcount
            if deliveries and stamps:
                # Once per event per writer that wrote it, never per recipient.
                now = time.time()
                observe = stats.latency.observe
                for ts in stamps:
                    observe(now - ts)

    def sinks(self) -> list[Sink]:
        return [*self.plain, *(s for g in self.zplain.values() for s in g), *self.filtered]


def _local_compressor(frames: list[bytes]) -> Callable[[Deflater], Compressed]:
    """``Frames.compressed`` for a run written without a :class:`Frames`."""
    cache: dict[Deflater, Compressed] = {}

    def get(z: Deflater) -> Compressed:
        hit = cache.get(z)
        if hit is None:
            hit = cache[z] = compress_frames(frames, z)
        return hit

    return get


class Partition(Actor):
    """A :class:`Writer` in its own actor: writes a big guild's further sessions."""

    def __init__(
        self,
        name: str,
        mailbox_bound: int = PARTITION_MAILBOX_BOUND,
        stats: NodeStats | None = None,
        queue_bytes: int = PARTITION_QUEUE_BYTES,
    ) -> None:
        super().__init__(name, mailbox_bound=mailbox_bound)
        self.writer = Writer(stats)
        #: Bytes of the runs cast and not yet written, and their bound.
        self.queued_bytes = 0
        self.queue_bytes = queue_bytes
        #: Runs written since start (what ``on_written``'s credit counts).
        self.runs_written = 0
        #: Called after each batch that wrote events: the guild's credit
        #: (it sends the next run once every partition has written this one;
        #: ``runs_written`` says how many runs the credit covers).
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

    def cast_run(self, run: Frames) -> None:
        """Queue a run of events. Raises :class:`MailboxFull` when the runs
        queued and not yet written already hold more than ``queue_bytes``
        (so a run of any size finds room in a partition that keeps up, as it
        does in the guild's own writer) or ``mailbox_bound`` messages."""
        if self.queued_bytes > self.queue_bytes:
            raise MailboxFull(
                f"{self.name}: {self.queued_bytes} bytes of events not yet written"
                f" (bound {self.queue_bytes})"
            )
        self.cast(run)
        self.queued_bytes += len(run.data)

    async def handle_batch(self, batch: deque[Any]) -> None:
        w = self.writer
        runs: list[Frames] = []
        wrote = False
        for item in batch:
            tp = type(item)
            if tp is Frames:
                runs.append(item)
                self.queued_bytes -= len(item.data)
                self.runs_written += 1
            else:
                if runs:
                    _write_runs(w, runs)
                    runs = []
                    wrote = True
                if tp is Add:
                    w.add(item.sink, item.preamble, item.presence, item.since)
                elif tp is PresenceFrame:
                    w.send_presence(item)
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
        w.write(run.frames, run.names, run.stamps, run.data, run.compressed)
        return
    frames: list[bytes] = []
    names: list[str] = []
    stamps: list[float] = []
    for run in runs:
        frames += run.frames
        names += run.names
        if run.stamps:
            stamps += run.stamps

    def compressed(z: Deflater) -> Compressed:
        # Each run's compressed frames are shared with the other writers.
        parts = [run.compressed(z) for run in runs]
        zf = [f for part in parts for f in part[0]]
        return zf, b"".join([part[1] for part in parts]), sum(part[2] for part in parts)

    w.write(frames, names, stamps, b"".join([run.data for run in runs]), compressed)
