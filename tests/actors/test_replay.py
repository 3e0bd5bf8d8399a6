"""Replays of one mailbox batch (server/actors/replay.py): a storm of
recoveries on one guild reads history once per page, not once per session,
and every session gets exactly its events, framed once."""

from __future__ import annotations

import random

from guildcast.actors.replay import ReplayPages
from guildcast.broker.memory import MemoryBroker
from guildcast.protocol import wire


async def _broker(n: int) -> tuple[MemoryBroker, str, int]:
    b = MemoryBroker(history_size=5000, history_ttl=300)
    for _ in range(n // 100):
        await b.append_local("g", [("E" if k % 3 else "F", b'{"k":%d}' % k) for k in range(100)])
    epoch, head = await b.head("g")
    return b, epoch, head


async def test_a_storm_of_recoveries_reads_each_page_once() -> None:
    b, epoch, head = await _broker(2500)
    _, recs = await b.read("g", 0, 5000)
    want = {r.s: wire.text_frame(r.payload) for r in recs}
    pages = ReplayPages("g", epoch, head, page=1000)
    rng = random.Random(7)
    afters = [rng.randint(0, head) for _ in range(500)] + [0, head]
    for after in afters:
        got = await pages.replay(b, after, None)
        assert got is not None
        assert [f.frame for f in got] == [want[s] for s in range(after + 1, head + 1)]
    # 502 sessions, the oldest Position at 0: 2,500 events in pages of
    # 1,000 are read in at most 3 reads plus the first replay's part page,
    # never one per session.
    assert pages.reads <= 4
    assert pages.first == 1


async def test_filtered_replay_and_lost_history() -> None:
    b, epoch, head = await _broker(300)
    _, recs = await b.read("g", 0, 5000)
    pages = ReplayPages("g", epoch, head, page=1000)
    got = await pages.replay(b, 100, frozenset({"F"}))
    assert got is not None
    assert [f.frame for f in got] == [
        wire.text_frame(r.payload) for r in recs if r.s > 100 and r.t == "F"
    ]
    # Another epoch's pages do not fit; history that no longer holds the
    # start of a replay answers None (the session is told recovered: false).
    assert not pages.fits("other", head) and not pages.fits(epoch, head + 1)
    small = MemoryBroker(history_size=50, history_ttl=300)
    await small.append_local("g", [("E", b"1")] * 200)
    e2, h2 = await small.head("g")
    assert await ReplayPages("g", e2, h2, 1000).replay(small, 10, None) is None
