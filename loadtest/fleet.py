"""Simulated subscribers: many cheap connections in one event loop (a worker).

Owns every subscriber connection of one worker, their delivery checks and
their latency samples. A :class:`Fleet` runs either inside the controller's
loop (``--workers 1``) or in a spawned worker process (:func:`worker_main`),
driven by the same commands and reporting the same counters.

Consistency model: the fleet is single-threaded (one event loop); counters
are cumulative and only grow, except the latency histogram, which is an
interval: each :meth:`Fleet.report` hands over what was recorded since the
previous one, so the controller can merge intervals from every worker
without double counting.

Per-delivery work is kept to a few bytecodes (the harness must not be the
bottleneck before the server is). A read that starts with a run of
load-test DISPATCHes of one length (a server batch, usually the whole read)
is read in bulk by ``wire.RunReader``: one cached whole-frame pattern finds
every frame's guild, ``s`` and publish time, and the same chunk arriving on
another connection of the guild is answered from memory; the run's ``s``
are checked with one comparison when they are one guild's and follow one
another (else one by one, as below), and its latencies are counted by C's
counting loop (raw microseconds: the dict is bounded by ``LAT_KEYS``, a read
that leaves more folds it into the histogram at once). What follows a run,
or a read that is none, takes the per-frame loop: each read chunk is split
into frames in one call (``guildcast.protocol.frames.scan_frames``, which locates frames
without copying them), a DISPATCH of a load-test event has its guild, ``s``
and publish time read at the offsets ``guildcast.loadtest.wire`` measures on
the server's envelope builder, ``s`` is checked against the last one seen for that
guild on this connection, and the latency goes into a plain dict keyed by
microseconds, reduced to the HDR histogram's precision (3 significant
digits: exact below 2048 us); the dict is folded into the histogram once
per report, or at once when a run leaves more than ``LAT_KEYS`` keys in it
(its memory bound).

Every delivery's ``s`` is checked per client and guild (PROTOCOL.md
"Subscribing and recovery"): the next event must be ``last + 1``. A higher
one is a gap (the missing events are counted), a lower or equal one a
duplicate. After a reconnect with a Position the check continues from the
Position; a SUBSCRIBED with ``recovered: false`` after a Position counts as
unrecovered and the missing events as lost.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import logging
import operator
import os
import random
import signal
import socket
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, cast

import orjson
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from guildcast.client.backoff import DEFAULT_BASE, DEFAULT_CAP, full_jitter
from guildcast.loadtest import wire
from guildcast.loadtest.streams import Stream
from guildcast.protocol import hints
from guildcast.protocol.client import Position, refused_delay
from guildcast.protocol.codes import ACTIVITY_EVENT, Op
from guildcast.protocol.frames import (
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    client_frame,
    close_code,
    scan_frames,
)

log = logging.getLogger("guildcast.loadtest.fleet")

#: HDR histogram range in microseconds: 1 us to 60 s, 3 significant digits.
HIST_MIN_US, HIST_MAX_US, HIST_DIGITS = 1, 60_000_000, 3
#: Most distinct latencies (keys of the latency counter) held between two
#: folds into the histogram: a read that leaves more folds them at once. Runs
#: (``wire.regular_run``) count exact microseconds, reduced only at the fold.
LAT_KEYS = 1 << 15
#: Fewest subscribers of a guild in one worker for them to read through its
#: stream (loadtest/streams.py): a stream pays when many share it and their
#: reads are cut at different places; a small guild's reads are mostly whole
#: server batches, which ``wire.RunReader`` answers from memory for less.
STREAM_MIN = 32
#: Linux IP_BIND_ADDRESS_NO_PORT: bind the source address now but pick the
#: port at connect(), so (src, dst) pairs, not src alone, must be unique.
IP_BIND_ADDRESS_NO_PORT = 24
#: Seconds a connection may take from TCP connect to the last SUBSCRIBED.
OPEN_TIMEOUT = 30.0
#: Seconds a client keeps retrying to reconnect (server restarts included).
RECONNECT_DEADLINE = 60.0
#: The reconnect backoff of our clients (clients/backoff.py), which the
#: simulated ones follow: full jitter from 0.5 s, at most 30 s.
BACKOFF_BASE, BACKOFF_CAP = DEFAULT_BASE, DEFAULT_CAP

# Client states.
IDLE, CONNECTING, OPENING, LIVE, SUBSCRIBING, CLOSING = range(6)


_and, _sub = operator.and_, operator.sub


def _count_py(counts: dict[int, int], values: Iterable[int]) -> None:
    for v in values:
        counts[v] = counts.get(v, 0) + 1


#: ``counts[v] += 1`` for every value: the C loop behind ``Counter.update``
#: (CPython's ``collections._count_elements``), without ``update``'s checks.
count_into: Callable[[dict[int, int], Iterable[int]], None] = getattr(
    collections, "_count_elements", _count_py
)


def new_hist() -> HdrHistogram:
    return HdrHistogram(HIST_MIN_US, HIST_MAX_US, HIST_DIGITS)


def fold_latencies(lat: dict[int, int], hist: HdrHistogram) -> int:
    """Record a ``{microseconds: count}`` dict into ``hist``; returns values clamped.

    Values are first reduced to the histogram's precision (above 2048 us, the
    low bits are dropped), so the number of ``record_value`` calls is bounded
    by the histogram's bucket count, not by the number of distinct values.
    """
    q: dict[int, int] = {}
    clamped = 0
    for v, c in lat.items():
        if v < HIST_MIN_US:
            v = HIST_MIN_US
            clamped += c
        elif v > HIST_MAX_US:
            v = HIST_MAX_US
            clamped += c
        elif v >= 2048:
            sh = v.bit_length() - 11
            v = (v >> sh) << sh
        q[v] = q.get(v, 0) + c
    for v, c in q.items():
        hist.record_value(v, c)
    lat.clear()
    return clamped


@dataclass(slots=True)
class ClientSpec:
    cid: int
    gids: tuple[str, ...]
    #: "stay" (connected throughout), "slow" (stops reading), "churn" (comes and goes).
    role: str = "stay"
    #: Records end-to-end latency (``--lat-sample`` picks a fraction of clients).
    lat: bool = True
    #: Guilds of ``gids`` subscribed passively (the ``passive`` scenario):
    #: no events expected from them, only GUILD_ACTIVITY notices.
    passive: tuple[str, ...] = ()
    #: Ask for a tick's notices in one GUILD_ACTIVITY (IDENTIFY ``activity_batch``).
    activity_batch: bool = False


@dataclass(slots=True)
class FleetSpec:
    """Everything a worker needs; picklable (it crosses the spawn boundary)."""

    wid: int
    host: str
    port: int
    path: str
    #: The token every client presents, unless ``secret`` is given.
    token: str
    clients: list[ClientSpec]
    #: With the server's secret, each client gets its own token (``sub`` =
    #: ``lt-<cid>``, minted once, at its first connect).
    secret: str | None = None
    #: Source addresses connections are spread over (IPv4 loopback only).
    src_addrs: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    #: Connections opening at once (TCP connect to last SUBSCRIBED).
    connect_concurrency: int = 256
    #: Reconnect after a server close or drop (with the client's Positions).
    reconnect: bool = True
    #: SO_RCVBUF of slow clients (bytes; 0 keeps the kernel default).
    slow_rcvbuf: int = 0
    #: Seconds a churning client stays subscribed, drawn uniformly.
    churn_life: tuple[float, float] = (0.5, 2.0)
    seed: int = 0
    cpus: list[int] | None = None
    report_interval: float = 0.5
    #: Offer permessage-deflate and inflate compressed events (``--deflate``).
    deflate: bool = False


class Sub(asyncio.Protocol):
    """One simulated subscriber: a WebSocket client speaking the gateway protocol."""

    __slots__ = (
        "_frag",
        "_gone",
        "_ready",
        "_upgrade",
        "closing_by_us",
        "cycle",
        "epochs",
        "fleet",
        "gids",
        "gids_b",
        "hb_due",
        "hb_interval",
        "hint",
        "last",
        "lat",
        "leave_at",
        "passive",
        "paused",
        "pos",
        "ref",
        "refused",
        "refused_since",
        "rejoin",
        "replay_to",
        "rest",
        "restart",
        "retry_since",
        "role",
        "rpos",
        "shares",
        "spec",
        "src",
        "state",
        "subscribed",
        "token",
        "transport",
        "unsub_pending",
        "was_live",
    )

    def __init__(self, fleet: Fleet, spec: ClientSpec, src: str) -> None:
        self.fleet = fleet
        self.spec = spec
        self.role = spec.role
        self.gids = spec.gids
        self.gids_b = tuple(g.encode() for g in spec.gids)
        self.passive = frozenset(spec.passive)
        self.src = src
        self.transport: asyncio.Transport | None = None
        self.state = IDLE
        self.rest = b""
        #: The guild's shared stream this client's reads are checked against
        #: (loadtest/streams.py), and its offset in it; None: frame by frame.
        self.ref: Stream | None = None
        self.rpos = 0
        #: Whether this client reads through its guild's stream at all (set
        #: by the fleet: one guild, one with enough members here).
        self.shares = False
        self._upgrade: wire.Upgrade | None = None
        self._frag: list[bytes] | None = None
        self._ready: asyncio.Future[bool] | None = None
        #: Live tracking: guild -> last ``s`` seen on this connection.
        self.last: dict[bytes, int] = {}
        #: Guild -> epoch from its last SUBSCRIBED.
        self.epochs: dict[bytes, str] = {}
        #: Positions to resume from on the next subscribe (guild -> last ``s``).
        self.pos: dict[bytes, int] = {}
        self.subscribed = 0
        self.unsub_pending = 0
        self.hb_interval = 0.0
        self.hb_due = float("inf")
        self.paused = False
        self.closing_by_us = False
        self.was_live = False
        self.leave_at = float("inf")
        self.cycle = 0
        #: Set by :meth:`leave`: the fleet reconnects this client once it is gone.
        self.rejoin = False
        #: The server's pacing hint for the next connect, ms (PROTOCOL.md
        #: "Pacing"): a RECONNECT's delay range or a 1013's retry hint.
        self.hint: tuple[int, int] | None = None
        #: When this client's current run of failed connects began.
        self.retry_since: float | None = None
        #: The last attempt's TCP connect was refused (nothing listening);
        #: the delay range of the RECONNECT that ended the last connection;
        #: when the refusals in a row began (PROTOCOL.md "Pacing", as
        #: ``ClientSession.connect_refused``).
        self.refused = False
        self.restart: tuple[int, int] | None = None
        self.refused_since: float | None = None
        #: Guild -> the last replayed ``s`` after a recovery: replayed events
        #: are not live ones, so their age is not recorded as latency.
        self.replay_to: dict[bytes, int] | None = None
        self._gone: asyncio.Future[None] | None = None
        self.token: str | None = None
        #: The fleet's latency dict, or None for clients whose latency is not
        #: representative (slow consumers).
        self.lat: dict[int, int] | None = fleet.lat if spec.lat and spec.role != "slow" else None

    # --- opening ---------------------------------------------------------------

    async def open(self) -> bool:
        """Connect, identify and subscribe; True once every guild is SUBSCRIBED."""
        fleet = self.fleet
        loop = asyncio.get_running_loop()
        v6 = ":" in fleet.spec.host
        sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
        self.refused = False
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.role == "slow" and fleet.spec.slow_rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, fleet.spec.slow_rcvbuf)
            if not v6:  # ::1 is one address: nothing to spread over
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((self.src, 0))
            self.state = CONNECTING
            async with asyncio.timeout(OPEN_TIMEOUT):
                await loop.sock_connect(sock, (fleet.spec.host, fleet.spec.port))
                self._ready = loop.create_future()
                await loop.create_connection(lambda: self, sock=sock)
                return await self._ready
        except (OSError, TimeoutError) as e:
            self.refused = isinstance(e, ConnectionRefusedError)
            name = type(e).__name__
            fleet.connect_errors[name] = fleet.connect_errors.get(name, 0) + 1
            if self.transport is not None:
                gone = self._gone = loop.create_future()
                self.transport.abort()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await gone
            else:
                # uvloop can leave this socket's descriptor closed under it
                # (MagicStack/uvloop#653: sock_connect fails with EBADF, and
                # so does close): the attempt failed, the client retries; an
                # escaping OSError here ended the worker and hung the run.
                with contextlib.suppress(OSError):
                    sock.close()
                self.state = IDLE
            return False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.restart = None
        self.refused_since = None
        self.rest = b""
        self._frag = None
        self.closing_by_us = False
        self.subscribed = 0
        self.unsub_pending = 0
        self.paused = False
        spec = self.fleet.spec
        self._upgrade = upgrade = wire.Upgrade(spec.host, spec.port, spec.path, spec.deflate)
        self.state = CONNECTING
        transport.write(upgrade.request)

    def _handshake(self, data: bytes) -> None:
        upgrade = self._upgrade
        assert upgrade is not None
        done, err, rest = upgrade.receive(data)
        if not done:
            return
        self._upgrade = None
        if err is not None:
            self._fail(err)
            return
        self.state = OPENING
        if rest:
            self._frames(rest)

    def _fail(self, why: str) -> None:
        f = self.fleet
        f.protocol_errors += 1
        if len(f.error_samples) < 10:
            f.error_samples.append(why)
        if self.transport is not None:
            self.transport.abort()

    # --- receiving -------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.fleet.wire_bytes += len(data)
        self.fleet.bytes_in += len(data)
        if self.state == CONNECTING:
            self._handshake(data)
        else:
            self._frames(data)

    def _frames(self, data: bytes) -> None:
        # The hot loop: see the module docstring. Locals only, no calls per
        # delivery except bytes methods and dict get/set.
        ref = self.ref
        if ref is not None:
            data = self._follow(ref, data)
            if not data:
                return
        rest = self.rest
        if rest:
            data = rest + data
            self.rest = b""
        now = time.time_ns() // 1000
        n = len(data)
        f = self.fleet
        # A batch of one guild's events, as most reads are: read in bulk.
        run = f.runs.read(data)
        start = 0
        delivered = 0
        if run is not None:
            start = run[0]
            delivered = self._run(run, now)
            if self.shares and run[1] is not None and self._can_follow():
                self._extend(run, data)
            if start == n:
                f.delivered += delivered
                if f.shared is not None:
                    f.shared.value = f.delivered
                if self.shares and self._can_follow():
                    self._try_follow()
                return
        last = self.last
        lat = self.lat
        replay_to = self.replay_to
        pfx = wire.DISPATCH_PREFIX
        pl = len(pfx)
        g2s = wire.GID_TO_S
        s2t = wire.S_TO_TS
        tsd = wire.TS_DIGITS
        spans, i, err = scan_frames(data, start)
        whole = data
        for b0, p, end in spans:
            span_end = end
            if b0 == 0xC1:  # final text frame, compressed: inflate, then as any
                data = self.fleet.inflater.inflate(whole[p:end])
                b0, p, end = 0x81, 0, len(data)
            else:
                data = whole
            if b0 == 0x81 and data.startswith(pfx, p):
                q = data.find(b'"', p + pl)
                gid = data[p + pl : q]
                st = q + g2s
                se = data.find(b",", st)
                s = int(data[st:se])
                prev = last.get(gid)
                if prev is not None and s == prev + 1:
                    last[gid] = s
                else:
                    self._irregular(gid, s, prev)
                delivered += 1
                if lat is not None and (replay_to is None or s > replay_to.get(gid, 0)):
                    t0 = se + s2t
                    k = now - int(data[t0 : t0 + tsd])
                    if k > 2047:  # the histogram's precision: bounds the dict
                        sh = k.bit_length() - 11
                        k = k >> sh << sh
                    lat[k] = lat.get(k, 0) + 1
            else:
                self._frame(b0, data[p:end], now)
                # A SUBSCRIBED in this chunk marks its replay, which follows.
                replay_to = self.replay_to
                if self.transport is None or self.state == CLOSING:
                    i = span_end
                    break
        if err is not None and self.transport is not None and self.state != CLOSING:
            self._fail(err)
        else:
            if i < n and self.transport is not None:
                self.rest = whole[i:]
            if self.shares and self._can_follow():
                self._try_follow()
        f = self.fleet
        f.delivered += delivered
        if f.shared is not None:
            f.shared.value = f.delivered

    # --- the shared stream (loadtest/streams.py) ------------------------------

    def _can_follow(self) -> bool:
        return (
            self.shares
            and self.state == LIVE
            and self.replay_to is None
            and self._frag is None
            and self.transport is not None
        )

    def _extend(self, run: wire.Run, data: bytes) -> None:
        """Offer a run this client just read whole to its guild's stream."""
        streams = self.fleet.streams
        assert streams is not None
        end, gid, _, ints, tsv = run
        epoch = self.epochs.get(gid) if gid is not None else None
        if gid is None or epoch is None or gid != self.gids_b[0]:
            return
        ref = streams.get(gid)
        if ref is None or ref.epoch != epoch:
            if ref is not None:
                ref.drop()
            ref = streams[gid] = Stream(gid, epoch)
        ref.extend(data, end, ints[0], tsv)

    def _try_follow(self) -> None:
        """Follow the guild's stream from the next ``s``, if it holds it (and
        the part of a frame in ``rest``, read at a frame boundary, is its)."""
        streams = self.fleet.streams
        assert streams is not None
        gid = self.gids_b[0]
        ref = streams.get(gid)
        s = self.last.get(gid)
        if ref is None or s is None or ref.epoch != self.epochs.get(gid):
            return
        pos = ref.offset_of(s + 1)
        if pos is None:
            return
        rest = self.rest
        if rest:
            if not ref.buf.startswith(rest, pos - ref.base):
                return
            pos += len(rest)
            self.rest = b""
        self.ref = ref
        self.rpos = pos
        ref.followers.add(self)

    def unfollow(self, rest: bytes) -> None:
        """Leave the stream; ``rest`` (the part of a frame read) is read on."""
        ref = self.ref
        if ref is not None:
            ref.followers.discard(self)
            self.ref = None
        self.rest = rest

    def _follow(self, ref: Stream, data: bytes) -> bytes:
        """Check a read against the stream: count and time the frames it
        completes; returns what the frame-by-frame path must read (all of a
        read that is not the stream's bytes, from the start of its frame;
        what runs past the stream's newest frame), or b""."""
        pos = self.rpos
        base = ref.base
        off = pos - base
        buf = ref.buf
        n = len(data)
        avail = len(buf) - off
        extra = b""
        if n <= avail and self.state == LIVE:
            ok = buf.startswith(data, off)
            new = pos + n
        elif self.state == LIVE:
            ok = not avail or buf.startswith(data[:avail], off)
            new = base + len(buf)
            extra = data[avail:]
        else:
            ok = False
        if not ok:
            start = ref.frame_start(pos)
            head = bytes(buf[start - base : off])
            self.unfollow(b"")
            return head + data if head else data
        self.rpos = new
        # The frames completed: from the one after ``last`` to the last
        # whose end is at or before ``new``.
        last = self.last
        gid = ref.gid
        s0 = ref.s0
        ends = ref.ends
        i0 = last[gid] + 1 - s0
        if i0 < len(ends) and ends[i0] <= new:
            i1 = bisect_right(ends, new, i0)
            k = i1 - i0
            last[gid] = s0 + i1 - 1
            lat = self.lat
            if lat is not None:
                now = time.time_ns() // 1000
                if k == 1:
                    v = now - ref.ts[i0]
                    if v > 2047:
                        v &= -1 << (v.bit_length() - 11)
                    lat[v] = lat.get(v, 0) + 1
                else:
                    tsv = ref.ts[i0:i1]
                    lo = now - max(tsv)
                    if lo > 2047:
                        cut = -1 << (lo.bit_length() - 11)  # as in _run
                        count_into(lat, map(_and, map(_sub, repeat(now), tsv), repeat(cut)))
                    else:
                        count_into(lat, map(_sub, repeat(now), tsv))
                    if len(lat) > LAT_KEYS:
                        self.fleet.fold()
            f = self.fleet
            f.delivered += k
            f.followed += k
            if f.shared is not None:
                f.shared.value = f.delivered
        if extra:
            # Past the newest frame, at a frame boundary (``last`` is the
            # stream's newest ``s``): the next frames whole, as a run, are
            # checked as the frame path checks them and appended; anything
            # else is read frame by frame (which offers a run to the stream
            # and follows on).
            f = self.fleet
            run = f.runs.read(extra)
            if run is None or run[0] != len(extra) or run[1] != gid:
                self.unfollow(b"")
                return extra
            k = self._run(run, time.time_ns() // 1000)
            f.delivered += k
            f.followed += k
            if f.shared is not None:
                f.shared.value = f.delivered
            if not ref.extend(extra, run[0], run[3][0], run[4]):
                self.unfollow(b"")  # not the stream's next frames: counted above
            elif self.ref is ref:
                self.rpos = ref.end
            else:  # moved off by the trim the extension made
                self._try_follow()
        return b""

    def _run(self, run: wire.Run, now: int) -> int:
        """The checks and latencies of a run's events (:class:`wire.RunReader`),
        the same as the per-frame loop's, in bulk; returns how many."""
        _, gid, gids, ints, tsv = run
        k = len(ints)
        last = self.last
        prev = last.get(gid) if gid is not None else None
        if prev is not None and gid is not None and ints[0] == prev + 1:
            last[gid] = prev + k
        else:
            for g, s in zip(gids, ints, strict=True):  # one by one, exactly
                prev = last.get(g)
                if prev is not None and s == prev + 1:
                    last[g] = s
                else:
                    self._irregular(g, s, prev)
        lat = self.lat
        if lat is not None:
            replay_to = self.replay_to
            if replay_to is None:
                # Reduced to the histogram's precision here, in C, as the
                # frame loop does one by one: exact microseconds would make
                # nearly every delivery a new key to fold in Python. Every
                # value keeps at least the 11 bits of the run's smallest
                # latency, so the fold's own cut gives what it would on the
                # exact values.
                lo = now - max(tsv)
                if k == 1:
                    if lo > 2047:
                        lo &= -1 << (lo.bit_length() - 11)
                    lat[lo] = lat.get(lo, 0) + 1
                elif lo > 2047:
                    cut = -1 << (lo.bit_length() - 11)  # v & cut == v >> sh << sh
                    count_into(lat, map(_and, map(_sub, repeat(now), tsv), repeat(cut)))
                else:
                    count_into(lat, map(_sub, repeat(now), tsv))
            else:
                count_into(
                    lat,
                    (
                        now - t
                        for g, s, t in zip(gids, ints, tsv, strict=True)
                        if s > replay_to.get(g, 0)
                    ),
                )
            if len(lat) > LAT_KEYS:
                self.fleet.fold()
        return k

    def _irregular(self, gid: bytes, s: int, prev: int | None) -> None:
        f = self.fleet
        if prev is None:
            f.unexpected += 1
        elif s <= prev:
            f.dups += 1
        else:
            f.gaps += 1
            f.gap_events += s - prev - 1
            self.last[gid] = s

    def _frame(self, b0: int, payload: bytes, now: int) -> None:
        # ``now``: microseconds since the epoch, as the events' ``ts``.
        op = b0 & 0x0F
        fin = b0 & 0x80
        if op == OP_TEXT:
            if fin:
                self._message(payload, now)
            else:
                self._frag = [payload]
        elif op == OP_CONT:
            if self._frag is None:
                self._fail("stray continuation frame")
                return
            self._frag.append(payload)
            if fin:
                whole = b"".join(self._frag)
                self._frag = None
                self._message(whole, now)
        elif op == OP_CLOSE:
            code, reason = close_code(payload)
            if code == 1013:
                self.hint = hints.parse_retry(reason)
            self._closed_by_server(code)
        elif op == OP_PING:
            self.send_raw(client_frame(OP_PONG, payload))
        elif op == OP_PONG:
            pass
        else:
            self._fail(f"unexpected opcode {op}")

    def _message(self, payload: bytes, now: int) -> None:
        f = self.fleet
        try:
            msg = orjson.loads(payload)
            op = msg["op"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._fail("undecodable message")
            return
        d = msg.get("d")
        if op == Op.DISPATCH:
            t = msg.get("t")
            g = msg.get("g")
            if t == wire.EVENT and isinstance(g, str):
                # A load-test event the fast path did not match (other key
                # order or a fragmented frame): same checks, slower.
                gb = g.encode()
                s = msg["s"]
                prev = self.last.get(gb)
                if prev is not None and s == prev + 1:
                    self.last[gb] = s
                else:
                    self._irregular(gb, s, prev)
                f.delivered += 1
                if self.lat is not None and isinstance(d, dict) and "ts" in d:
                    k = now - int(d["ts"])
                    if k > 2047:
                        sh = k.bit_length() - 11
                        k = k >> sh << sh
                    self.lat[k] = self.lat.get(k, 0) + 1
            elif t == "READY":
                pass
            elif t == "SUBSCRIBED" and isinstance(g, str) and isinstance(d, dict):
                self._subscribed(g.encode(), d)
            elif t == "UNSUBSCRIBED" and isinstance(g, str):
                self._unsubscribed(g.encode())
            elif t == ACTIVITY_EVENT and isinstance(g, str) and g in self.passive:
                f.notices += 1
            elif t == ACTIVITY_EVENT and g is None and isinstance(d, dict):
                # A batch (activity_batch): one notice per passive guild in it.
                f.notices += sum(1 for gid in d if gid in self.passive)
            else:
                f.other_dispatches += 1
        elif op == Op.HELLO:
            self.hb_interval = float(d["heartbeat_interval"]) / 1000.0 if d else 30.0
            self.hb_due = time.monotonic() + self.hb_interval * random.uniform(0.5, 0.9)
            guilds = {g: self._position(gb) for g, gb in zip(self.gids, self.gids_b, strict=True)}
            self.send_raw(
                wire.identify(self._token(), guilds, self.passive, self.spec.activity_batch)
            )
        elif op == Op.HEARTBEAT_ACK:
            pass
        elif op == Op.RECONNECT:  # the close (1001) follows
            f.reconnect_requests += 1
            self.hint = self.restart = hints.parse_reconnect(d)
        elif op == Op.ERROR:
            code = d.get("code") if isinstance(d, dict) else None
            f.errors[code] = f.errors.get(code, 0) + 1
            if len(f.error_samples) < 10:
                f.error_samples.append(repr(d)[:200])
        else:
            f.other_dispatches += 1

    def _token(self) -> str:
        if self.token is None:
            spec = self.fleet.spec
            if spec.secret:
                self.token = wire.mint(
                    spec.secret, f"lt-{self.spec.cid}", list(self.gids), [], None
                )
            else:
                self.token = spec.token
        return self.token

    def _position(self, gb: bytes) -> Position | None:
        s = self.pos.get(gb)
        epoch = self.epochs.get(gb)
        if s is None or epoch is None:
            return None
        return Position(epoch, s)

    def _subscribed(self, gb: bytes, d: dict[str, Any]) -> None:
        f = self.fleet
        head = int(d["s"])
        epoch = str(d["epoch"])
        asked = self.pos.pop(gb, None)
        if d.get("passive"):
            # No events come from a passive guild: nothing to track, so a
            # reconnect subscribes it from now on.
            self.epochs[gb] = epoch
        elif asked is not None and self.epochs.get(gb) is not None:
            if d.get("recovered") and epoch == self.epochs[gb]:
                f.recovered += 1
                self.last[gb] = asked  # the replay asked + 1 .. head follows
                if head > asked:
                    f.replayed += head - asked
                    if self.replay_to is None:
                        self.replay_to = {}
                    self.replay_to[gb] = head
            else:
                f.unrecovered += 1
                if epoch == self.epochs[gb] and head > asked:
                    f.gaps += 1
                    f.gap_events += head - asked
                self.last[gb] = head
        else:
            self.last[gb] = head
        self.epochs[gb] = epoch
        self.subscribed += 1
        if self.subscribed >= len(self.gids_b):
            self._go_live()

    def _unsubscribed(self, gb: bytes) -> None:
        s = self.last.pop(gb, None)
        if s is not None:
            self.pos[gb] = s
        self.unsub_pending -= 1
        if self.unsub_pending == 0 and self.state == SUBSCRIBING:
            guilds = {g: self._position(gb) for g, gb in zip(self.gids, self.gids_b, strict=True)}
            self.send_raw(wire.subscribe(guilds, self.passive))

    def _go_live(self) -> None:
        f = self.fleet
        if self.state != LIVE:
            self.state = LIVE
            f.live += 1
            if f.live == len(f.clients):
                f.full_at = time.monotonic()
            if not self.was_live:
                self.was_live = True
                f.ever_live += 1
                if f.ever_live == len(f.clients):
                    f.all_live_at = time.time()
            if self.role == "churn":
                lo, hi = f.spec.churn_life
                self.leave_at = time.monotonic() + f.rng.uniform(lo, hi)
            if f.slow_paused and self.role == "slow":
                self.pause()
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_result(True)

    def _closed_by_server(self, code: int) -> None:
        f = self.fleet
        f.closes[code] = f.closes.get(code, 0) + 1
        if self.role == "slow":
            f.slow_closed[code] = f.slow_closed.get(code, 0) + 1
        t = self.transport
        if t is not None and not self.closing_by_us:
            with contextlib.suppress(RuntimeError):
                t.write(wire.close_frame(code if code < 5000 and code != 1005 else 1000))
        self._set_closing()
        if t is not None:
            t.close()

    def _set_closing(self) -> None:
        if self.state == LIVE:
            self.fleet.live -= 1
        self.state = CLOSING

    def connection_lost(self, exc: Exception | None) -> None:
        f = self.fleet
        was_closing = self.state == CLOSING
        if self.state == LIVE:
            f.live -= 1
        if self.was_live and not self.closing_by_us:
            f.ended_at = time.monotonic()
        if not was_closing:
            # Dropped without a close frame: 1006 in RFC 6455 terms.
            f.closes[1006] = f.closes.get(1006, 0) + 1
            if self.role == "slow":
                f.slow_closed[1006] = f.slow_closed.get(1006, 0) + 1
        self.unfollow(b"")
        self.state = IDLE
        self.transport = None
        self.hb_due = float("inf")
        # Keep a Position for every guild tracked on this connection.
        for gb, s in self.last.items():
            self.pos[gb] = s
        self.last.clear()
        self.replay_to = None
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_result(False)
        gone = self._gone
        if gone is not None and not gone.done():
            gone.set_result(None)
        f.lost(self)

    # --- sending ---------------------------------------------------------------

    def send_raw(self, frame: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(frame)

    def heartbeat(self, now: float) -> None:
        self.send_raw(wire.text(wire.HEARTBEAT))
        self.hb_due = now + self.hb_interval

    def pause(self) -> None:
        if self.transport is not None and not self.paused:
            self.transport.pause_reading()
            self.paused = True

    def resume(self) -> None:
        if self.transport is not None and self.paused:
            self.transport.resume_reading()
            self.paused = False

    def leave(self, fresh: bool) -> None:
        """Close from our side (code 1000) and rejoin once gone; ``fresh``
        forgets the Positions (a new subscriber), else it recovers."""
        self.closing_by_us = True
        self.rejoin = True
        self.send_raw(wire.close_frame(1000, "bye"))
        if fresh:
            self.pos.clear()
            self.last.clear()
        self._set_closing()
        if self.transport is not None:
            self.transport.close()

    def resubscribe(self) -> None:
        """UNSUBSCRIBE every guild, then SUBSCRIBE again from the Positions."""
        self._set_closing_sub()
        self.unsub_pending = len(self.gids)
        self.subscribed = 0
        self.send_raw(wire.unsubscribe(list(self.gids)))

    def _set_closing_sub(self) -> None:
        if self.state == LIVE:
            self.fleet.live -= 1
        self.state = SUBSCRIBING

    def drop(self) -> None:
        """Abort the TCP connection (no close frame): the client reconnects."""
        if self.transport is not None:
            self.transport.abort()


class Fleet:
    """All subscribers of one worker, their connector pool and their timers."""

    def __init__(self, spec: FleetSpec, shared: Any = None) -> None:
        self.spec = spec
        #: A ``multiprocessing.RawValue("q")`` mirroring ``delivered`` for the
        #: controller's flow control (spawned workers only; None inline).
        self.shared = shared
        self.rng = random.Random(spec.seed * 1_000_003 + spec.wid)
        self.lat: dict[int, int] = {}
        #: Parses runs of load-test events, remembering recent chunks.
        self.runs = wire.RunReader()
        #: Guild -> its shared stream (loadtest/streams.py); None: every read
        #: is read frame by frame (compressed frames are never shared here).
        self.streams: dict[bytes, Stream] | None = None if spec.deflate else {}
        #: Deliveries checked against a stream (of ``delivered``).
        self.followed = 0
        self.hist = new_hist()
        self.lat_clamped = 0
        addrs = spec.src_addrs or ["127.0.0.1"]
        self.clients = [Sub(self, c, addrs[c.cid % len(addrs)]) for c in spec.clients]
        if self.streams is not None:
            members = collections.Counter(c.gids_b[0] for c in self.clients if len(c.gids_b) == 1)
            for c in self.clients:
                c.shares = (
                    len(c.gids_b) == 1 and not c.passive and members[c.gids_b[0]] >= STREAM_MIN
                )
        self.churners = [c for c in self.clients if c.role == "churn"]
        # Counters (cumulative).
        self.delivered = 0
        #: GUILD_ACTIVITY notices received, and every byte read (frames,
        #: handshake), for bytes per session.
        self.notices = 0
        self.bytes_in = 0
        self.gaps = 0
        self.gap_events = 0
        self.dups = 0
        self.unexpected = 0
        self.recovered = 0
        self.unrecovered = 0
        self.live = 0
        self.ever_live = 0
        self.all_live_at: float | None = None
        #: When (monotonic, the controller's clock too) the last connection
        #: this fleet did not close itself ended: when it noticed a drop.
        self.ended_at: float | None = None
        #: When (monotonic) every client of this fleet was last live at once.
        self.full_at: float | None = None
        self.connects = 0
        self.connect_failures = 0
        self.reconnects = 0
        self.reconnect_requests = 0
        #: Waits that followed a server hint; waits after a refused connect
        #: (``refused_delay``); events replayed on recovery.
        self.hinted_waits = 0
        self.refused_waits = 0
        self.replayed = 0
        self.protocol_errors = 0
        self.other_dispatches = 0
        self.closes: dict[int, int] = {}
        self.slow_closed: dict[int, int] = {}
        self.errors: dict[Any, int] = {}
        self.connect_errors: dict[str, int] = {}
        self.error_samples: list[str] = []
        self.churn_leaves = 0
        self.churn_resubscribes = 0
        #: Bytes received by every subscriber, as on the wire (compressed or
        #: not); compressed payloads and what they inflated to (``--deflate``).
        self.wire_bytes = 0
        self.inflater = wire.Inflater()
        # Control state.
        self.churn_on = False
        self.slow_paused = False
        self.heads: dict[bytes, int] | None = None
        self.stopping = False
        #: Clients waiting to (re)connect. Bounded by the number of clients:
        #: a client is queued at most once at a time (``_queued``).
        self._queue: deque[Sub] = deque()
        self._queued: set[int] = set()
        self._wake = asyncio.Event()
        self._timers: set[asyncio.TimerHandle] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Fleet:
        tg = self._tg = asyncio.TaskGroup()
        await tg.__aenter__()
        for k in range(max(1, self.spec.connect_concurrency)):
            self._tasks.append(tg.create_task(self._connector(), name=f"connector-{k}"))
        self._tasks.append(tg.create_task(self._ticker(), name="ticker"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
        """Close every connection and stop every task this fleet owns."""
        if self._tg is None:
            return
        self.stopping = True
        for h in self._timers:
            h.cancel()
        self._timers.clear()
        for c in self.clients:
            if c.transport is not None:
                c.closing_by_us = True
                c._set_closing()
                c.transport.abort()
        tg, self._tg = self._tg, None
        for task in self._tasks:
            task.cancel()
        await tg.__aexit__(None, None, None)

    def connect_all(self) -> None:
        for c in self.clients:
            self._enqueue(c)

    def _enqueue(self, c: Sub) -> None:
        if self.stopping or c.spec.cid in self._queued:
            return
        self._queued.add(c.spec.cid)
        self._queue.append(c)
        self._wake.set()

    def _enqueue_later(self, c: Sub, delay: float) -> None:
        loop = asyncio.get_running_loop()
        h: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(h)
            self._enqueue(c)

        h = loop.call_later(delay, fire)
        self._timers.add(h)

    async def _connector(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            c = self._queue.popleft()
            if c.retry_since is None:
                c.retry_since = time.monotonic()
            attempt = 0
            later: float | None = None
            while not self.stopping:
                if c.state != IDLE:
                    break
                if await c.open():
                    self.connects += 1
                    c.retry_since = None
                    break
                now = time.monotonic()
                if not self.spec.reconnect or now - c.retry_since > RECONNECT_DEADLINE:
                    self.connect_failures += 1
                    c.retry_since = None
                    break
                if c.hint is not None:
                    # Refused with a retry hint (1013): come back within it,
                    # from a timer, so this connector serves the next client.
                    later = self._hinted(c)
                    break
                if c.refused:
                    # Nothing listening: soon and not growing, or the width
                    # of the restart's RECONNECT range (as our clients,
                    # ``ClientSession.connect_refused``), from a timer.
                    if c.refused_since is None:
                        c.refused_since = now
                    later = refused_delay(c.restart, now - c.refused_since, self.rng.random())
                    if later is not None:
                        self.refused_waits += 1
                        break
                attempt += 1
                # As our clients back off (guildcast.client.backoff): full
                # jitter, so a crowd cut off at once does not come back at once.
                await asyncio.sleep(full_jitter(attempt, BACKOFF_BASE, BACKOFF_CAP, self.rng))
            self._queued.discard(c.spec.cid)
            if later is not None:
                self._enqueue_later(c, later)

    def lost(self, c: Sub) -> None:
        """A connection ended; reconnect it if the policy says so."""
        if self.stopping or not c.was_live or c.spec.cid in self._queued:
            return  # (queued: a connector is opening it and retries itself)
        if c.rejoin:
            c.rejoin = False
            self._enqueue_later(c, self.rng.uniform(0.0, 0.3))
            return
        if c.closing_by_us:
            return  # churn or shutdown: whoever closed it decides
        if c.role == "slow":
            return  # slow consumers stay closed: their loss is expected
        if self.spec.reconnect:
            self.reconnects += 1
            delay = (
                self._hinted(c)
                if c.hint is not None
                else full_jitter(0, BACKOFF_BASE, BACKOFF_CAP, self.rng)
            )
            self._enqueue_later(c, delay)

    def _hinted(self, c: Sub) -> float:
        """The wait the server's hint asks for (uniform in its range), once."""
        assert c.hint is not None
        lo, hi = c.hint
        c.hint = None
        self.hinted_waits += 1
        return self.rng.uniform(lo, hi) / 1000.0

    async def _ticker(self) -> None:
        """Churn every 50 ms; heartbeats every second.
        One task for all clients: no timer per connection."""
        tick = 0
        while True:
            await asyncio.sleep(0.05)
            tick += 1
            now = time.monotonic()
            if self.churn_on:
                for c in self.churners:
                    if c.state == LIVE and c.leave_at <= now:
                        self._churn(c)
            if tick % 20 == 0:
                for c in self.clients:
                    if c.hb_due <= now and c.transport is not None:
                        c.heartbeat(now)

    def _churn(self, c: Sub) -> None:
        c.cycle += 1
        kind = c.cycle % 3
        if kind == 0:
            self.churn_resubscribes += 1
            c.leave_at = float("inf")
            c.resubscribe()
            return
        self.churn_leaves += 1
        c.leave(fresh=kind == 1)

    # --- control ---------------------------------------------------------------

    def command(self, cmd: dict[str, Any]) -> None:
        name = cmd["cmd"]
        if name == "connect":
            self.connect_all()
        elif name == "slow_pause":
            self.slow_paused = True
            for c in self.clients:
                if c.role == "slow":
                    c.pause()
        elif name == "slow_resume":
            self.slow_paused = False
            for c in self.clients:
                if c.role == "slow":
                    c.resume()
        elif name == "churn":
            self.churn_on = bool(cmd["on"])
        elif name == "drop":
            for c in self.clients:
                if c.state == LIVE:
                    c.drop()
        elif name == "expect":
            self.heads = {g.encode(): int(s) for g, s in cmd["heads"].items()}
        else:
            raise ValueError(f"unknown command {name!r}")

    def lagging(self) -> int:
        """(client, guild) pairs behind the expected heads, among non-slow clients."""
        heads = self.heads
        if heads is None:
            return -1
        n = 0
        for c in self.clients:
            if c.role == "slow":
                continue
            if c.state != LIVE:
                n += len(c.gids_b)
                continue
            for gb, s in c.last.items():
                if s < heads.get(gb, 0):
                    n += 1
        return n

    def fold(self) -> None:
        """Move the latencies counted so far into the interval's histogram."""
        self.lat_clamped += fold_latencies(self.lat, self.hist)

    def report(self) -> dict[str, Any]:
        """Cumulative counters plus the latency histogram of the last interval."""
        self.fold()
        hist = self.hist
        self.hist = new_hist()
        slow = [c for c in self.clients if c.role == "slow"]
        return {
            "wid": self.spec.wid,
            "pid": os.getpid(),
            "clients": len(self.clients),
            "live": self.live,
            "ever_live": self.ever_live,
            "all_live_at": self.all_live_at,
            "ended_at": self.ended_at,
            "full_at": self.full_at,
            "connects": self.connects,
            "connect_failures": self.connect_failures,
            "connect_errors": dict(self.connect_errors),
            "reconnects": self.reconnects,
            "reconnect_requests": self.reconnect_requests,
            "hinted_waits": self.hinted_waits,
            "refused_waits": self.refused_waits,
            "replayed": self.replayed,
            "delivered": self.delivered,
            "notices": self.notices,
            "bytes_in": self.bytes_in,
            "gaps": self.gaps,
            "gap_events": self.gap_events,
            "dups": self.dups,
            "unexpected": self.unexpected,
            "recovered": self.recovered,
            "unrecovered": self.unrecovered,
            "protocol_errors": self.protocol_errors,
            "other_dispatches": self.other_dispatches,
            "closes": {str(k): v for k, v in self.closes.items()},
            "errors": {str(k): v for k, v in self.errors.items()},
            "error_samples": list(self.error_samples),
            "churn_leaves": self.churn_leaves,
            "churn_resubscribes": self.churn_resubscribes,
            "wire_bytes": self.wire_bytes,
            "inflated_in": self.inflater.bytes_in,
            "inflated_out": self.inflater.bytes_out,
            "slow_clients": len(slow),
            "slow_live": sum(1 for c in slow if c.state == LIVE),
            "slow_closed": {str(k): v for k, v in self.slow_closed.items()},
            "lagging": self.lagging() if self.heads is not None else None,
            "lat_clamped": self.lat_clamped,
            "hist": base64.b64encode(hist.encode()).decode() if hist.get_total_count() else "",
        }


# --- worker process ------------------------------------------------------------


def pin_and_raise_limits(cpus: list[int] | None) -> None:
    """Pin this process to ``cpus`` and raise its open-files soft limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if cpus:
        os.sched_setaffinity(0, cpus)


def worker_main(conn: Any, spec: FleetSpec, shared: Any = None) -> None:
    """Entry point of a spawned worker: run a fleet, obey the controller's pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller owns Ctrl-C
    pin_and_raise_limits(spec.cpus)
    import uvloop

    uvloop.run(_worker(conn, spec, shared))


async def _worker(conn: Any, spec: FleetSpec, shared: Any) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    fleet = Fleet(spec, shared)

    def readable() -> None:
        try:
            while conn.poll():
                cmd = conn.recv()
                if cmd["cmd"] == "close":
                    stop.set()
                else:
                    fleet.command(cmd)
        except (EOFError, OSError):
            stop.set()  # the controller is gone: clean up and exit

    loop.add_reader(conn.fileno(), readable)
    try:
        async with fleet:
            conn.send({"cmd": "started", "pid": os.getpid()})
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), spec.report_interval)
                if not stop.is_set():
                    conn.send(fleet.report())
            await fleet.shutdown()
            final = fleet.report()
            final["final"] = True
            conn.send(final)
    except (BrokenPipeError, EOFError, OSError):
        pass
    finally:
        loop.remove_reader(conn.fileno())


#: Type of the callable the controller gets reports through.
ReportSink = Callable[[dict[str, Any]], None]
