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

from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode

from guildcast.actors.partition import Frames, PresenceFrame, Writer, _write_runs
from guildcast.core.metrics import NodeStats
from guildcast.protocol.deflate import RSV1, Deflater
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
