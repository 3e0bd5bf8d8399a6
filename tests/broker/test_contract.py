"""The broker contract (server/broker/base.py), run against every broker."""

from __future__ import annotations

import asyncio

import orjson

from guildcast.broker.base import Broker, Presence, Record
from tests.support.wait import until


async def test_append_assigns_consecutive_s_from_one(broker: Broker) -> None:
    epoch, ss = await broker.append("g1", [("A", b"1"), ("B", b"2")])
    assert ss == [1, 2]
    epoch2, ss2 = await broker.append("g1", [("C", b"3")])
    assert (epoch2, ss2) == (epoch, [3])
    assert await broker.head("g1") == (epoch, 3)
    # guilds are independent
    _, other = await broker.append("g2", [("A", b"null")])
    assert other == [1]


async def test_head_of_unknown_guild_is_zero_with_stable_epoch(broker: Broker) -> None:
    e1, s = await broker.head("fresh")
    assert s == 0 and e1
    assert (await broker.head("fresh"))[0] == e1
    e2, _ = await broker.append("fresh", [("A", b"{}")])
    assert e2 == e1


async def test_read_returns_envelopes_in_order(broker: Broker) -> None:
    await broker.append("g", [("EV", orjson.dumps({"i": i})) for i in range(1, 11)])
    _, recs = await broker.read("g", 3, 4)
    assert [r.s for r in recs] == [4, 5, 6, 7]
    r = recs[0]
    assert r.t == "EV"
    assert orjson.loads(r.payload) == {"op": 0, "t": "EV", "g": "g", "s": 4, "d": {"i": 4}}
    _, rest = await broker.read("g", 7, 100)
    assert [x.s for x in rest] == [8, 9, 10]
    _, none = await broker.read("g", 10, 100)
    assert none == []


async def test_history_bounded_by_count(broker: Broker) -> None:
    # the fixture's brokers keep 50 events
    for _ in range(6):
        await broker.append("big", [("E", b"0")] * 20)
    _, recs = await broker.read("big", 0, 1000)
    assert [r.s for r in recs] == list(range(71, 121))


async def test_concurrent_appends_never_share_an_s(broker: Broker) -> None:
    async def publisher(k: int) -> list[int]:
        out: list[int] = []
        for i in range(25):
            _, ss = await broker.append("race", [("E", orjson.dumps([k, i]))])
            out += ss
        return out

    results = await asyncio.gather(*(publisher(k) for k in range(4)))
    allss = sorted(s for r in results for s in r)
    assert allss == list(range(1, 101))
    for r in results:  # each publisher's own appends keep their order
        assert r == sorted(r)


async def test_listen_delivers_every_appended_record_in_order(broker: Broker) -> None:
    got: list[Record] = []
    done = asyncio.Event()

    def feed(gid: str, recs: list[Record] | None) -> None:
        assert gid == "live"
        if recs:
            got.extend(recs)
            if len(got) >= 30:
                done.set()

    broker.set_feed(feed)
    await broker.listen("live")
    await broker.append("not-listened", [("E", b"0")])
    for i in range(30):
        await broker.append("live", [("E", orjson.dumps(i))])
    async with asyncio.timeout(30):
        await done.wait()
    assert [r.s for r in got] == list(range(1, 31))
    await broker.unlisten("live")
    await broker.append("live", [("E", b"0")])
    _, recs = await broker.read("live", 30, 10)
    assert [r.s for r in recs] == [31]


async def test_presence_join_leave_and_feed(broker: Broker) -> None:
    seen: list[tuple[str, str, Presence]] = []
    got_two = asyncio.Event()

    def presence(gid: str, kind: str, m: Presence, v: int | None) -> None:
        seen.append((gid, kind, m))
        if len(seen) >= 3:
            got_two.set()

    broker.set_feed(lambda gid, recs: None, presence)
    await broker.listen("room")
    a = Presence("alice", "s1", broker.node_id)
    b = Presence("bob", "s2", broker.node_id)
    broker.presence_join("room", a)
    broker.presence_join("room", b)
    broker.presence_join("elsewhere", a)

    async def both_present() -> bool:
        return {m.user for m in await broker.presence("room")} == {"alice", "bob"}

    await until(both_present)
    broker.presence_leave("room", a)

    async def only_bob() -> bool:
        return [m.user for m in await broker.presence("room")] == ["bob"]

    await until(only_bob)
    async with asyncio.timeout(30):
        await got_two.wait()
    assert [(g, k, m.user) for g, k, m in seen] == [
        ("room", "join", "alice"),
        ("room", "join", "bob"),
        ("room", "leave", "alice"),
    ]
    assert [m.user for m in await broker.presence("elsewhere")] == ["alice"]


async def test_presence_versions_and_snapshot(broker: Broker) -> None:
    """Each change of a guild's presence takes the next version, in feed order;
    a snapshot is the presence at one version, its members listed up to the
    limit; a join of a member already present is no change."""
    seen: list[tuple[str, str, int | None]] = []

    def presence(gid: str, kind: str, m: Presence, v: int | None) -> None:
        if gid == "pv":
            seen.append((kind, m.session, v))

    broker.set_feed(lambda gid, recs: None, presence)
    await broker.listen("pv")
    empty = await broker.presence_snapshot("pv", 10)
    assert empty.total == 0 and empty.members == []
    v0 = empty.version
    members = [Presence(f"u{i}", f"s{i}", broker.node_id) for i in range(5)]
    for m in members:
        broker.presence_join("pv", m)
    broker.presence_join("pv", members[0])  # already present: nothing
    broker.presence_leave("pv", members[1])
    broker.presence_leave("pv", members[1])  # not present: nothing

    async def settled() -> bool:
        return (await broker.presence_snapshot("pv", 10)).version == v0 + 6

    await until(settled, "six presence changes")
    snap = await broker.presence_snapshot("pv", 10)
    assert snap.total == 4
    assert sorted(m.session for m in snap.members) == ["s0", "s2", "s3", "s4"]
    cut = await broker.presence_snapshot("pv", 2)
    assert cut.version == snap.version and cut.total == 4 and len(cut.members) == 2
    assert {m.session for m in cut.members} <= {"s0", "s2", "s3", "s4"}
    assert (await broker.presence_snapshot("pv", 0)).members == []

    async def fed() -> bool:
        return len(seen) == 6

    await until(fed, "the six changes on the feed")
    assert seen == [
        *[("join", f"s{i}", v0 + 1 + i) for i in range(5)],
        ("leave", "s1", v0 + 6),
    ]


async def test_listen_is_counted(broker: Broker) -> None:
    """An old listener's unlisten must not stop a newer listener's feed."""
    got: list[int] = []
    arrived = asyncio.Event()

    def feed(gid: str, recs: list[Record] | None) -> None:
        if recs:
            got.extend(r.s for r in recs)
            arrived.set()

    broker.set_feed(feed)
    await broker.listen("shared")  # the old guild actor
    await broker.listen("shared")  # its successor
    await broker.unlisten("shared")  # the old one finishes stopping
    await broker.append("shared", [("E", b"1")])
    async with asyncio.timeout(30):
        await arrived.wait()
    assert got == [1]


async def test_read_after_a_huge_s_returns_nothing(broker: Broker) -> None:
    """``after`` near 2**63 (an HTTP history query may carry it): no records,
    no exception (an islice bound past sys.maxsize crashed the guild actor)."""
    await broker.append("huge", [("E", b"1")])
    _, recs = await broker.read("huge", 2**63 - 2, 100)
    assert recs == []
