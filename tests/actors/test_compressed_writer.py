"""Property: for random event sequences, every session decodes exactly the
messages it would have received uncompressed.

A writer (server/actors/partition.py) with sessions of every kind (plain,
filtered, presence; with and without permessage-deflate) is driven through
random runs of events of random sizes, joined runs as a partition writes
them, preambles with replays, presence frames and farewells. Each deflate
session's bytes are decoded as a client would (websockets' own
permessage-deflate decoder, no context takeover) and compared with the bytes
of its uncompressed twin; compressed frames are built once per run, not once
per session, and the node's counters add up.
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode

from guildcast.actors.partition import Frames, PresenceFrame, Writer, _write_runs
from guildcast.actors.replay import ReplayPages
from guildcast.broker.memory import MemoryBroker
from guildcast.core.metrics import NodeStats
from guildcast.protocol.deflate import RSV1, Deflater, SharedFrame
from guildcast.protocol.frames import scan_frames, text_frame

NAMES = ["A", "B", "C"]


class Sink:
    """A connection as the writer sees it: it records the bytes it is sent."""

    def __init__(self, events: frozenset[str] | None, deflate: Deflater | None) -> None:
        self.events = events
        self.deflate = deflate
        self.buf = bytearray()
        self.is_closed = False

    def send(self, data: bytes) -> None:
        self.buf += data

    def close(self, code: int, reason: str) -> None:
        self.is_closed = True


def decoded(buf: bytes, compressed: bool) -> list[bytes]:
    """The messages a client reads from ``buf``."""
    ext = PerMessageDeflate(True, True, 15, 15)
    spans, end, err = scan_frames(buf)
    assert err is None and end == len(buf)
    out = []
    for b0, p, q in spans:
        rsv1 = bool(b0 & RSV1)
        assert compressed or not rsv1
        frame = Frame(Opcode(b0 & 0x0F), bytes(buf[p:q]), fin=bool(b0 & 0x80), rsv1=rsv1)
        out.append(ext.decode(frame).data if compressed else frame.data)
    return out


def chat_body(k: int) -> dict[str, Any]:
    """A chat message of a few hundred bytes (compressible)."""
    return {
        "id": k,
        "author": "alice",
        "text": "the deploy went fine, cache is cold " * (k % 9 + 2),
    }


def event(name: str, size: int, s: int) -> bytes:
    body = f'{{"op":0,"t":"{name}","g":"g","s":{s},"d":{{"text":"'.encode()
    words = b"lorem ipsum dolor sit amet %d " % s
    return body + (words * (size // len(words) + 1))[:size] + b'"}}'


step = st.one_of(
    st.tuples(
        st.just("run"),
        st.lists(
            st.lists(st.tuples(st.sampled_from(NAMES), st.integers(0, 5000)), min_size=1),
            min_size=1,
            max_size=3,
        ),
    ),
    st.tuples(st.just("presence"), st.integers(0, 400)),
    st.tuples(st.just("join"), st.integers(0, 3000)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(step, min_size=1, max_size=12), st.sampled_from([1, 128, 1024]))
def test_every_session_decodes_what_it_would_have_received(
    steps: list[tuple[str, Any]], threshold: int
) -> None:
    stats = NodeStats()
    w = Writer(stats)
    z = Deflater(threshold)
    kinds = [None, frozenset({"A"}), frozenset({"A", "C"})]
    pairs = [(Sink(k, None), Sink(k, z)) for k in kinds for _ in range(2)]
    late: list[tuple[Sink, Sink]] = []
    s = 0
    for i, (sink, zsink) in enumerate(pairs):
        pre = text_frame(b'{"op":0,"t":"SUBSCRIBED","g":"g","s":0}')
        w.add(sink, pre, presence=i % 2 == 0)
        w.add(zsink, pre, presence=i % 2 == 0)
    for kind, arg in steps:
        if kind == "run":
            runs = []
            for batch in arg:
                frames, names = [], []
                for name, size in batch:
                    s += 1
                    frames.append(text_frame(event(name, size, s)))
                    names.append(name)
                runs.append(Frames(frames, names))
            before = z.compressed
            _write_runs(w, runs)
            # Once per event at most, whatever the number of deflate sessions.
            assert z.compressed - before <= sum(len(r.frames) for r in runs)
        elif kind == "presence":
            w.send_presence(PresenceFrame(text_frame(event("PRESENCE_JOIN", arg, 0))))
        else:  # a session joins with a replay (its preamble holds events)
            pre = text_frame(b'{"op":0,"t":"SUBSCRIBED"}') + text_frame(event("A", arg, s))
            pair = (Sink(None, None), Sink(None, z))
            for one in pair:
                w.add(one, pre)
            late.append(pair)
    for sink, zsink in pairs + late:
        w.remove(sink, text_frame(b'{"op":0,"t":"UNSUBSCRIBED","g":"g"}'))
        w.remove(zsink, text_frame(b'{"op":0,"t":"UNSUBSCRIBED","g":"g"}'))
        assert decoded(bytes(zsink.buf), True) == decoded(bytes(sink.buf), False)
    assert stats.bytes_out <= stats.bytes_uncompressed
    assert stats.deliveries_compressed <= stats.deliveries


def test_compressed_frames_are_shared_and_counted() -> None:
    """Two deflate sessions get the very same compressed bytes, made once."""
    stats = NodeStats()
    w = Writer(stats)
    z = Deflater()
    a, b, plain = Sink(None, z), Sink(None, z), Sink(None, None)
    for one in (a, b, plain):
        w.add(one, b"")
    big = text_frame(event("A", 600, 1))
    small = text_frame(b'{"op":0,"t":"A","s":2,"d":1}')
    run = Frames([big, small], ["A", "A"])
    w.write(run.frames, run.names, None, run.data, run.compressed)
    assert a.buf == b.buf and a.buf[0] == 0xC1 and a.buf.endswith(small)
    assert plain.buf == big + small
    assert z.compressed == 1
    assert stats.deliveries == 6 and stats.deliveries_compressed == 2
    assert stats.bytes_uncompressed == 3 * len(big + small)
    assert stats.bytes_out == len(big + small) + 2 * len(a.buf)


def test_shared_preamble_parts_are_compressed_once_per_deflater() -> None:
    """A preamble's shared parts (a presence snapshot, replayed events: the
    guild hands every subscriber of a batch the same SharedFrames) are
    compressed once for all the deflate sessions; its own SUBSCRIBED once
    for each. Every session decodes exactly its uncompressed twin's bytes."""
    w = Writer(NodeStats())
    z = Deflater(16)
    snap = SharedFrame(text_frame(event("PRESENCE_SNAPSHOT", 700, 0)))
    replay = [SharedFrame(text_frame(event("A", 300 + k, k))) for k in range(1, 6)]
    sinks = [Sink(None, z) for _ in range(4)] + [Sink(None, None)]
    before = z.compressed
    for i, one in enumerate(sinks):
        own = text_frame(b'{"op":0,"t":"SUBSCRIBED","g":"g","d":{"s":%d}}' % i)
        w.add(one, [own, snap, *replay], presence=True)
    # 4 SUBSCRIBEDs (one per deflate session) + 1 snapshot + 5 events.
    assert z.compressed - before == 4 + 1 + len(replay)
    plain = sinks[-1]
    for i, one in enumerate(sinks[:-1]):
        got = decoded(bytes(one.buf), True)
        want = decoded(bytes(plain.buf), False)
        assert got[1:] == want[1:] and got[0] == want[0].replace(b":4}", b":%d}" % i)
        assert bytes(one.buf).count(snap.compressed(z)) == 1
    # A plain preamble of bytes still works as before.
    late = Sink(None, z)
    w.add(late, text_frame(b'{"op":0,"t":"SUBSCRIBED","g":"g","d":{"s":9}}'))
    assert decoded(bytes(late.buf), True)[0].endswith(b":9}}")


def test_presence_snapshot_reset_compressed_once_for_every_writer() -> None:
    """A PRESENCE_SNAPSHOT resync (reset) shared by two writers is compressed
    once; every presence session gets it and decodes its uncompressed bytes."""
    z = Deflater(16)
    writers = [Writer(NodeStats()), Writer(NodeStats())]
    pairs = [(Sink(None, None), Sink(None, z)) for _ in writers]
    for w, pair in zip(writers, pairs, strict=True):
        for one in pair:
            w.add(one, b"", presence=True, since=3)
    msg = PresenceFrame(text_frame(event("PRESENCE_SNAPSHOT", 900, 0)), reset=7)
    before = z.compressed
    for w in writers:
        w.send_presence(msg)
    assert z.compressed - before == 1
    for w, (plain, zs) in zip(writers, pairs, strict=True):
        assert decoded(bytes(zs.buf), True) == decoded(bytes(plain.buf), False)
        assert set(w.presence.values()) == {7}
    # Changes at or below the snapshot's version are not written; later ones are.
    old = PresenceFrame(text_frame(event("PRESENCE_JOIN", 200, 0)), v=7)
    new = PresenceFrame(text_frame(event("PRESENCE_JOIN", 200, 1)), v=8)
    for w in writers:
        w.send_presence(old)
        w.send_presence(new)
    for plain, zs in pairs:
        assert decoded(bytes(zs.buf), True) == decoded(bytes(plain.buf), False)
        assert len(decoded(bytes(plain.buf), False)) == 2


async def test_a_paged_replay_is_compressed_once_per_event_for_the_batch() -> None:
    """ReplayPages (actors/replay.py) frames a batch's replays once; through a
    writer they are compressed once per event for every deflate session that
    recovers in the batch, from any Position, filtered or not."""
    b = MemoryBroker(history_size=5000, history_ttl=300)
    await b.append_local(
        "g", [("A" if k % 3 else "B", orjson.dumps(chat_body(k))) for k in range(1, 301)]
    )
    epoch, head = await b.head("g")
    pages = ReplayPages("g", epoch, head, page=100)
    z = Deflater()
    w = Writer(NodeStats())
    before = z.compressed
    first = head + 1
    for after, want in [(250, None), (10, None), (100, frozenset({"B"})), (0, None)]:
        got = await pages.replay(b, after, want)
        assert got is not None
        first = min(first, after + 1)
        plain, zs = Sink(want, None), Sink(want, z)
        for one in (plain, zs):
            w.add(one, [text_frame(b'{"op":0,"t":"SUBSCRIBED"}'), *got])
        texts = decoded(bytes(zs.buf), True)
        assert texts == decoded(bytes(plain.buf), False)
        assert len(texts) == 1 + sum(
            1 for k in range(after + 1, head + 1) if want is None or k % 3 == 0
        )
    # Each replayed event at most once (the SUBSCRIBEDs are under the threshold).
    assert 0 < z.compressed - before <= head - first + 1
    assert z.compressed - before == sum(1 for f in pages.frames if f._z)
