"""A guild's shared stream (loadtest/streams.py): a subscriber's reads
checked against the bytes another subscriber read frame by frame count
exactly what the frame-by-frame path counts, whatever the cuts, extra
frames, gaps and laggards."""

from __future__ import annotations

import asyncio
import random
import socket

from guildcast.loadtest import fleet as fl
from guildcast.loadtest import streams as st
from guildcast.loadtest import wire
from tests.loadtest.test_runs import HEARTBEAT_ACK, NoRuns, event

#: A ts of the layout the harness writes (16 digits of microseconds).
T = 1_764_000_000_000_000


def test_stream_extend_offsets_and_trim() -> None:
    a = event("1", 5, ts=T) + event("1", 6, ts=T + 1)
    f = len(a) // 2
    s = st.Stream(b"1", "e")
    assert s.offset_of(5) is None  # empty
    assert s.extend(a, len(a), 5, [T, T + 1])
    assert (s.s0, s.next_s, s.end) == (5, 7, 2 * f)
    assert s.offset_of(5) == 0 and s.offset_of(6) == f and s.offset_of(7) == 2 * f
    assert s.offset_of(4) is None and s.offset_of(8) is None
    assert s.frame_start(f + 3) == f and s.frame_start(f) == f
    # Not the next frames: refused, nothing appended.
    b = event("1", 9, ts=T + 2)
    assert not s.extend(b, len(b), 9, [T + 2])
    assert s.end == 2 * f
    # Past twice the kept bytes, a trim: the laggard behind the cut leaves
    # with the part of its frame it has read; the stream's head is kept.

    class Laggard:
        def __init__(self, rpos: int) -> None:
            self.rpos = rpos
            self.left: bytes | None = None

        def unfollow(self, rest: bytes) -> None:
            self.left = rest
            s.followers.discard(self)

    slow = Laggard(f + 3)
    s.followers.add(slow)
    sn = 7
    while s.s0 == 5:
        e = event("1", sn, ts=T + 9)
        assert s.extend(e, len(e), sn, [T + 9])
        sn += 1
    assert slow.left == a[f : f + 3] and slow not in s.followers
    assert s.end - s.base >= st.KEEP_BYTES
    head = event("1", s.s0, ts=T + 9)
    assert s.offset_of(s.s0) == s.base and bytes(s.buf[: len(head)]) == head
    # A follower at the head keeps the stream from being cut past it.
    keep = Laggard(s.end - 2)
    s.followers.add(keep)
    s0 = s.s0
    while s.s0 == s0:
        e = event("1", sn, ts=T + 9)
        assert s.extend(e, len(e), sn, [T + 9])
        sn += 1
    assert keep.left is None and s.base == s.frame_start(keep.rpos) <= keep.rpos


def chunks_of(whole: bytes, rng: random.Random) -> list[bytes]:
    out: list[bytes] = []
    i = 0
    while i < len(whole):
        j = i + rng.choice([1, 3, 240, 271, 480, 1936, 4096, rng.randint(1, 9000)])
        out.append(whole[i:j])
        i = j
    return out


def streams_of(rng: random.Random, n: int) -> list[bytes]:
    """Each subscriber's bytes of guild 1: the same frames, with a few heartbeat
    ACKs, gaps, duplicates and frames of guild 3 of its own."""
    base: list[bytes] = []
    s = 0
    for _ in range(2500):
        k = rng.choice([1, 1, 4, 8, 30])
        base.extend(event("1", s + 1 + i, ts=T + s + i) for i in range(k))
        s += k
    out = []
    for c in range(n):
        frames = list(base)
        if c % 2:
            for _ in range(20):
                j = rng.randrange(len(frames))
                r = rng.random()
                if r < 0.4:
                    frames.insert(j, HEARTBEAT_ACK)
                elif r < 0.6:
                    del frames[j]  # a gap on this subscriber only
                elif r < 0.8:
                    frames.insert(j, frames[j])  # a duplicate
                else:
                    frames.insert(j, event("3", 1))  # unexpected
        out.append(b"".join(frames))
    return out


async def test_followers_count_what_the_frame_loop_counts() -> None:
    rng = random.Random(3)
    n = 6
    per = [chunks_of(b, rng) for b in streams_of(rng, n)]
    results = []
    for shared in (False, True):
        pairs = [socket.socketpair() for _ in range(n)]
        spec = fl.FleetSpec(
            wid=0,
            host="127.0.0.1",
            port=1,
            path="/gateway",
            token="t",
            clients=[fl.ClientSpec(i, ("1",)) for i in range(n)],
        )
        f = fl.Fleet(spec)
        # Six members are fewer than a stream is made for: asked for here.
        assert not any(c.shares for c in f.clients)
        if shared:
            for c in f.clients:
                c.shares = True
        else:
            f.runs = NoRuns()
            f.streams = None
        try:
            loop = asyncio.get_running_loop()
            for c in f.clients:
                await loop.create_connection(lambda c=c: c, sock=pairs[c.spec.cid][0])  # type: ignore[misc]
                c.state = fl.LIVE
                c.last = {b"1": 0}
                c.epochs = {b"1": "e"}
            # As a fleet reads: the server's writes reach the subscribers in
            # turn, each behind the first by its own lag, cut at its own
            # places; the last reads only after the others are done (far
            # behind: off the trimmed stream).
            idx = [0] * n
            read = [0] * n
            lag = [0] + [rng.choice([0, 300, 2000, 20000]) for _ in range(n - 2)]
            mark = 0
            while any(idx[i] < len(per[i]) for i in range(n - 1)):
                mark += 5000
                for i in range(n - 1):
                    while idx[i] < len(per[i]) and read[i] < mark - lag[i]:
                        read[i] += len(per[i][idx[i]])
                        f.clients[i].data_received(per[i][idx[i]])
                        idx[i] += 1
                if mark > 10 * len(per[0][0]) + 10**7:
                    break
            for chunk in per[n - 1]:
                f.clients[n - 1].data_received(chunk)
            f.fold()
            results.append(
                (
                    f.delivered,
                    f.gaps,
                    f.gap_events,
                    f.dups,
                    f.unexpected,
                    f.protocol_errors,
                    [dict(c.last) for c in f.clients],
                    [c.rest for c in f.clients],
                    f.hist.get_total_count(),
                )
            )
            if shared:
                assert f.followed > f.delivered // 2, (f.followed, f.delivered)
            else:
                assert f.followed == 0
        finally:
            for c in f.clients:
                if c.transport is not None:
                    c.transport.abort()
            for _, far in pairs:
                far.close()
    ref, fast = results
    assert ref == fast
    assert ref[1] and ref[3] and ref[4]  # gaps, duplicates, unexpected were met
    assert ref[6][0][b"1"] == ref[6][2][b"1"]  # two clean subscribers end alike


def test_a_big_guild_shares_its_stream_a_small_one_does_not() -> None:
    n = fl.STREAM_MIN
    clients = [fl.ClientSpec(i, ("big",)) for i in range(n)]
    clients += [fl.ClientSpec(n + i, ("small",)) for i in range(n - 1)]
    clients.append(fl.ClientSpec(2 * n, ("big", "small")))
    spec = fl.FleetSpec(
        wid=0, host="127.0.0.1", port=1, path="/gateway", token="t", clients=clients
    )
    f = fl.Fleet(spec)
    assert [c.shares for c in f.clients] == [True] * n + [False] * n
    spec.deflate = True  # compressed frames are never shared
    assert not any(c.shares for c in fl.Fleet(spec).clients)


def test_a_run_offered_is_appended_only_in_order() -> None:
    a = event("1", 1) + event("1", 2)
    run = wire.regular_run(a)
    assert run is not None
    s = st.Stream(b"1", "e")
    assert s.extend(a, run[0], 1, [1, 2])
    assert not s.extend(a, run[0], 1, [1, 2])  # the same frames again
    assert s.next_s == 3
