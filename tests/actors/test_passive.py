"""The passive-notice board (actors/passive.py) driven tick by tick: a
notice only when a guild's head moved, built once per guild per tick and the
same bytes to each passive session, a session's notices of one tick in one
write; a session no longer passive when its write comes gets none."""

from __future__ import annotations

import asyncio

import pytest
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode

from guildcast.actors.passive import SEND_SLICE, PassiveBoard
from guildcast.protocol import wire
from guildcast.protocol.deflate import RSV1, Deflater
from guildcast.protocol.frames import scan_frames
from tests.actors.test_guild import FakeSink


def notices(sink: FakeSink) -> list[tuple[str, int]]:
    out = []
    for m in sink.messages():
        assert m["t"] == "GUILD_ACTIVITY" and "s" not in m, m
        out.append((m["g"], m["d"]["s"]))
    return out


async def test_a_notice_only_when_the_head_moved_one_write_per_session() -> None:
    board = PassiveBoard(1.0)
    a, b = FakeSink("a"), FakeSink("b")
    g1 = board.attach("g1", "e", 5)
    g2 = board.attach("g2", "e", 0)
    g1.sinks[a] = None
    g1.sinks[b] = None
    g2.sinks[a] = None
    assert await board.tick() == 0 and a.writes == 0  # nothing moved since attach
    g1.head, g2.head = 9, 3
    assert await board.tick() == 2
    assert notices(a) == [("g1", 9), ("g2", 3)] and a.writes == 1
    assert notices(b) == [("g1", 9)] and b.writes == 1
    # The same bytes to every passive session of a guild.
    frame = wire.activity_frame("g1", "e", 9)
    assert bytes(b.buf) == frame and bytes(a.buf).startswith(frame)
    assert frame.endswith(b'{"op":0,"d":{"s":9,"epoch":"e"},"t":"GUILD_ACTIVITY","g":"g1"}')
    # Not moved: no notice; one moved: only its own.
    assert await board.tick() == 0
    g2.head = 4
    await board.tick()
    assert notices(a)[-1] == ("g2", 4) and a.writes == 2 and b.writes == 1
    assert (board.notices_built, board.notices_sent, board.writes) == (3, 4, 3)


async def test_a_session_made_active_during_a_tick_gets_no_notice() -> None:
    board = PassiveBoard(1.0)
    sinks = [FakeSink(f"s{i}") for i in range(3 * SEND_SLICE)]
    e = board.attach("g", "e", 0)
    for s in sinks:
        e.sinks[s] = None
    e.head = 1
    tick = asyncio.create_task(board.tick())
    await asyncio.sleep(0)  # the tick has written its first slice and yielded
    assert sum(s.writes for s in sinks) == SEND_SLICE
    last = sinks[-1]
    del e.sinks[last]  # what Guild._unpassive does in a guild step
    assert await tick == 3 * SEND_SLICE - 1
    assert last.writes == 0


async def test_detached_and_closed_sessions_get_nothing() -> None:
    board = PassiveBoard(0.5)
    a, c = FakeSink("a"), FakeSink("c")
    e = board.attach("g", "e", 0)
    e.sinks[a] = None
    e.sinks[c] = None
    c.close(4000, "gone")
    board.detach(e)
    e.head = 1
    assert await board.tick() == 0 and a.writes == 0
    e2 = board.attach("g", "e", 1)
    assert e2 is not e
    e2.sinks[a] = None
    e2.head = 2
    await board.tick()
    assert notices(a) == [("g", 2)]


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PassiveBoard(0)


async def test_notices_are_compressed_once_per_guild_per_tick_for_deflate_sessions() -> None:
    """A tick's notice of a guild is compressed once for all the passive
    sessions that negotiated permessage-deflate (docs/PROTOCOL.md
    "Compression"); each decodes the very bytes an uncompressed one reads."""
    z = Deflater(16)  # a notice is ~85 bytes: under the default threshold
    board = PassiveBoard(1.0)
    zs = [FakeSink(f"z{i}") for i in range(5)]
    for s in zs:
        s.deflate = z
    plain = FakeSink("plain")
    epoch = "epoch-" * 12  # compressible: the notice shrinks, so it goes compressed
    g1 = board.attach("g1", epoch, 0)
    g2 = board.attach("g2", epoch, 0)
    for s in [*zs, plain]:
        g1.sinks[s] = None
        g2.sinks[s] = None
    g1.head, g2.head = 7, 3
    assert await board.tick() == 6
    assert z.compressed == 2  # one per guild, not one per session
    ext = PerMessageDeflate(True, True, 15, 15)
    spans, _, _ = scan_frames(bytes(zs[0].buf))
    texts = []
    for b0, p, q in spans:
        assert b0 & RSV1, "sent compressed"
        texts.append(ext.decode(Frame(Opcode.TEXT, bytes(zs[0].buf[p:q]), rsv1=True)).data)
    assert len(texts) == 2
    assert b"".join(wire.text_frame(t) for t in texts) == bytes(plain.buf)
    assert all(s.buf == zs[0].buf and s.writes == 1 for s in zs)


async def test_a_tick_pauses_the_cyclic_collector_and_restores_it() -> None:
    """A tick holds one list per session across loop steps: the collector is
    paused while two boards' ticks overlap and runs again after the last one
    (and stays off after them if it was off before)."""
    import gc

    assert gc.isenabled()
    boards = []
    for _ in range(2):
        board = PassiveBoard(1.0)
        e = board.attach("g", "e", 0)
        for i in range(3 * SEND_SLICE):
            e.sinks[FakeSink(f"s{i}")] = None
        e.head = 1
        boards.append(board)
    first = asyncio.create_task(boards[0].tick())
    await asyncio.sleep(0)  # the first tick has yielded after a slice
    assert not gc.isenabled()
    second = asyncio.create_task(boards[1].tick())
    await asyncio.sleep(0)
    assert await first == 3 * SEND_SLICE
    assert not gc.isenabled()  # the second tick is still running
    assert await second == 3 * SEND_SLICE
    assert gc.isenabled()
    gc.disable()
    try:
        boards[0].entries["g"].head = 2
        assert await boards[0].tick() == 3 * SEND_SLICE
        assert not gc.isenabled()
    finally:
        gc.enable()


async def test_an_activity_batch_session_gets_its_tick_in_one_message() -> None:
    """1.1 ``activity_batch``: a session's notices of a tick are one
    GUILD_ACTIVITY of several guilds (no ``g``, no epoch) built from one
    ``"gid":s`` entry per guild per tick; a session that did not ask gets
    one notice per guild as before, in the same tick; the counters tell
    notices delivered from messages and writes (docs/OPERATIONS.md)."""
    board = PassiveBoard(1.0)
    batch, plain = FakeSink("batch"), FakeSink("plain")
    batch.activity_batch = True
    g1 = board.attach("g1", "e1", 0)
    g2 = board.attach("g2", "e2", 0)
    g3 = board.attach("g3", "e3", 0)
    for e in (g1, g2):
        e.sinks[batch] = None
        e.sinks[plain] = None
    g3.sinks[plain] = None
    g1.head, g2.head, g3.head = 9, 4, 2
    assert await board.tick() == 2
    assert bytes(batch.buf) == wire.text_frame(b'{"op":0,"t":"GUILD_ACTIVITY","d":{"g1":9,"g2":4}}')
    assert batch.messages() == [{"op": 0, "t": "GUILD_ACTIVITY", "d": {"g1": 9, "g2": 4}}]
    assert notices(plain) == [("g1", 9), ("g2", 4), ("g3", 2)]
    assert batch.writes == plain.writes == 1
    # Built once per guild per tick for both kinds of session; 5 heads
    # delivered in 4 messages and 2 writes.
    assert (board.notices_built, board.notices_sent, board.frames, board.writes) == (3, 5, 4, 2)
    assert board.bytes_out == len(batch.buf) + len(plain.buf)
    # One guild moved: a batch of one; a session no longer passive in a
    # guild gets none of it.
    g2.head = 5
    del g1.sinks[batch]
    g1.head = 10
    await board.tick()
    assert batch.messages()[-1] == {"op": 0, "t": "GUILD_ACTIVITY", "d": {"g2": 5}}
    del g2.sinks[batch]
    g2.head = 6
    await board.tick()
    assert batch.writes == 2  # nothing left for it: no empty batch


async def test_a_batch_goes_uncompressed_to_a_deflate_session() -> None:
    """The batch is a session's own message: it is sent uncompressed (RSV1
    clear, which permessage-deflate allows for any message) rather than
    deflated once per session; the shared per-guild notices stay shared."""
    z = Deflater(16)
    board = PassiveBoard(1.0)
    s = FakeSink("z")
    s.deflate = z
    s.activity_batch = True
    e = board.attach("g", "epoch-" * 12, 0)
    e.sinks[s] = None
    e.head = 3
    await board.tick()
    (span,) = scan_frames(bytes(s.buf))[0]
    assert not span[0] & RSV1 and z.compressed == 0
    assert s.messages() == [{"op": 0, "t": "GUILD_ACTIVITY", "d": {"g": 3}}]


async def test_the_board_reports_its_metrics() -> None:
    """``ReportsMetrics``: passive guilds and subscriptions now, and the notice
    counters (/metrics, docs/OPERATIONS.md)."""
    from guildcast.core.metrics import MetricsSnapshot, ReportsMetrics

    board = PassiveBoard(1.0)
    assert isinstance(board, ReportsMetrics)
    a, b = FakeSink("a"), FakeSink("b")
    b.activity_batch = True
    g1 = board.attach("g1", "e", 0)
    g2 = board.attach("g2", "e", 0)
    g1.sinks[a] = None
    g1.sinks[b] = None
    g2.sinks[b] = None
    g1.head = g2.head = 1
    await board.tick()
    m = MetricsSnapshot()
    board.report_metrics(m)
    assert (m.passive_guilds, m.passive_subscriptions) == (2, 3)
    assert (m.notice_ticks, m.notices_built, m.notices_sent) == (1, 2, 3)
    assert (m.notice_frames, m.notice_writes) == (2, 2)
    assert m.notice_bytes == len(a.buf) + len(b.buf) > 0
