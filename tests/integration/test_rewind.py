"""Rewind (protocol 1.1, PROTOCOL.md "Rewind") end to end with a plain
``websockets`` client: a fresh subscriber asks for a guild's last N events
and gets SUBSCRIBED with the head and ``rewound``, those events in order,
then live ones, with no gap and no duplicate, on the memory broker, the disk
broker (``--data-dir``, across a restart) and a cluster of two nodes over a
real redis-server; bounded by the history and ``max_rewind``; bad values
close with 4002 as every bad SUBSCRIBE field does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from guildcast import Server
from guildcast.client import Backoff, Client, Event, Position
from tests.support import gateway as gw
from tests.support.node import node, restartable
from tests.support.redis import RedisProc
from tests.support.wait import until

Publish = Callable[[str, str, Any], Awaitable[int]]


async def publish_n(publish: Publish, gid: str, n: int, t: str = "EV") -> None:
    for i in range(n):
        await publish(gid, t, {"i": i})


async def read_events(ws: Any, n: int) -> list[dict[str, Any]]:
    """The next ``n`` guild events (messages with an ``s``)."""
    out: list[dict[str, Any]] = []
    while len(out) < n:
        m = await gw.recv(ws)
        if m["op"] == gw.DISPATCH and "s" in m:
            out.append(m)
    return out


async def rewind_session(
    url: str, token: str, gid: str, n: Any, events: list[str] | None = None
) -> tuple[Any, dict[str, Any]]:
    """IDENTIFY asking for ``gid``'s last ``n`` events; returns (ws, SUBSCRIBED d)."""
    ws = await gw.open_ws(url)
    await gw.identify(ws, token, {gid: {"rewind": n}}, events)
    m = await gw.recv(ws)
    assert m["t"] == "SUBSCRIBED" and m["g"] == gid, m
    return ws, m["d"]


# --- one node, memory broker ---------------------------------------------------------


async def test_rewind_replays_the_last_n_then_live(server: Server) -> None:
    await publish_n(server.publish, "g", 10)
    epoch, _ = await server.head("g")
    ws, sub = await rewind_session(server.url, server.token("u"), "g", 3)
    assert sub == {"epoch": epoch, "s": 10, "recovered": True, "rewound": 3}
    got = await read_events(ws, 3)
    assert [m["s"] for m in got] == [8, 9, 10]
    assert [m["d"] for m in got] == [{"i": 7}, {"i": 8}, {"i": 9}]
    await server.publish("g", "EV", {"i": 10})
    (live,) = await read_events(ws, 1)
    assert live["s"] == 11
    await ws.close()


async def test_rewind_by_subscribe_and_beside_plain_guilds(server: Server) -> None:
    """SUBSCRIBE takes a rewind as IDENTIFY does; guilds without one are answered as in 1.0."""
    await publish_n(server.publish, "a", 4)
    await publish_n(server.publish, "b", 4)
    ws, subs = await gw.session(server.url, server.token("u"), {"b": None})
    assert subs["b"] == {"epoch": subs["b"]["epoch"], "s": 4, "recovered": False}
    await gw.send(ws, gw.SUBSCRIBE, {"guilds": {"a": {"rewind": 2}}})
    m = await gw.recv(ws)
    assert m["t"] == "SUBSCRIBED" and m["g"] == "a"
    assert m["d"]["rewound"] == 2 and m["d"]["recovered"] is True
    assert [e["s"] for e in await read_events(ws, 2)] == [3, 4]
    await ws.close()


async def test_rewind_of_an_empty_guild(server: Server) -> None:
    ws, sub = await rewind_session(server.url, server.token("u"), "empty", 5)
    assert sub["s"] == 0 and sub["rewound"] == 0 and sub["recovered"] is True
    await server.publish("empty", "EV", 1)
    assert [e["s"] for e in await read_events(ws, 1)] == [1]
    await ws.close()


async def test_rewind_longer_than_the_guild_sends_all_of_it(server: Server) -> None:
    await publish_n(server.publish, "g", 3)
    ws, sub = await rewind_session(server.url, server.token("u"), "g", 50)
    assert sub["s"] == 3 and sub["rewound"] == 3 and sub["recovered"] is True
    assert [e["s"] for e in await read_events(ws, 3)] == [1, 2, 3]
    await ws.close()


async def test_rewind_longer_than_the_history_sends_what_there_is() -> None:
    """History holds 5 of 12 events: the 5 come, and ``recovered: false`` with
    ``rewound: 5`` says the rest of the 10 asked for are gone."""
    async with node(history_size=5) as srv:
        await publish_n(srv.publish, "g", 12)
        ws, sub = await rewind_session(srv.url, srv.token("u"), "g", 10)
        assert sub["s"] == 12 and sub["rewound"] == 5 and sub["recovered"] is False
        assert [e["s"] for e in await read_events(ws, 5)] == [8, 9, 10, 11, 12]
        await srv.publish("g", "EV", None)
        assert [e["s"] for e in await read_events(ws, 1)] == [13]
        await ws.close()


@pytest.mark.parametrize("asked", [7, 2**63 - 1])
async def test_rewind_is_capped_by_max_rewind(asked: int) -> None:
    async with node(max_rewind=4) as srv:
        await publish_n(srv.publish, "g", 10)
        ws, sub = await rewind_session(srv.url, srv.token("u"), "g", asked)
        assert sub["s"] == 10 and sub["rewound"] == 4 and sub["recovered"] is False
        assert [e["s"] for e in await read_events(ws, 4)] == [7, 8, 9, 10]
        await ws.close()


async def test_max_rewind_zero_turns_rewinds_off() -> None:
    async with node(max_rewind=0) as srv:
        await publish_n(srv.publish, "g", 3)
        ws, sub = await rewind_session(srv.url, srv.token("u"), "g", 2)
        assert sub == {"epoch": sub["epoch"], "s": 3, "recovered": False, "rewound": 0}
        await srv.publish("g", "EV", None)
        assert [e["s"] for e in await read_events(ws, 1)] == [4]  # live, nothing before
        await ws.close()


async def test_rewind_with_an_events_filter_counts_guild_events(server: Server) -> None:
    """``rewind`` counts the guild's events (``s`` values); the IDENTIFY
    ``events`` filter then applies to them as to any replay."""
    for t in ["A", "B", "A", "B", "A"]:
        await server.publish("g", t, None)
    ws, sub = await rewind_session(server.url, server.token("u"), "g", 4, events=["A"])
    assert sub["rewound"] == 4 and sub["recovered"] is True
    got = await read_events(ws, 2)
    assert [(e["s"], e["t"]) for e in got] == [(3, "A"), (5, "A")]
    await ws.close()


BAD_REWINDS: list[Any] = [
    {"rewind": 0},
    {"rewind": -1},
    {"rewind": 1.5},
    {"rewind": "3"},
    {"rewind": True},
    {"rewind": None},
    {"rewind": [3]},
    {"rewind": 3, "epoch": "e", "s": 1},
    {"rewind": 3, "s": 1},
    {},
]


@pytest.mark.parametrize("value", BAD_REWINDS, ids=repr)
@pytest.mark.parametrize("op", ["identify", "subscribe"])
async def test_bad_rewind_closes_4002(server: Server, value: Any, op: str) -> None:
    ws = await gw.open_ws(server.url)
    if op == "identify":
        await gw.recv(ws)  # HELLO
        await gw.send(ws, gw.IDENTIFY, {"token": server.token("u"), "guilds": {"g": value}})
    else:
        await gw.identify(ws, server.token("u"))
        await gw.send(ws, gw.SUBSCRIBE, {"guilds": {"g": value}})
    seen = await gw.expect_close(ws, 4002)
    assert not any(m.get("t") == "SUBSCRIBED" for m in seen if isinstance(m, dict)), seen
    # The server is fine: the next session is served.
    ws2, sub = await rewind_session(server.url, server.token("u"), "g", 1)
    assert sub["rewound"] == 0
    await ws2.close()


# --- no gap, no duplicate across the SUBSCRIBED boundary, while publishing -------------


#: Events the boundary test's publisher may run ahead of what the subscriber
#: has read before it waits: far more than one handshake's worth, so the
#: publishing goes on across the subscribe, yet never runs away.
AHEAD = 5000


async def check_boundary(pub: Publish, url: str, token: str, gid: str) -> None:
    """Publish without pause while a fresh session rewinds 50: it gets
    ``head-49 .. head`` and then ``head+1 ..`` live, each ``s`` once, in order."""
    stop = asyncio.Event()
    room = asyncio.Event()
    published = 0
    got: list[int] = []

    async def publisher() -> None:
        nonlocal published
        for i in range(50_000):  # bounded: the test stops it long before
            if stop.is_set():
                return
            if published - len(got) > AHEAD:
                room.clear()
                await room.wait()
            await pub(gid, "EV", {"i": i})
            published += 1

    task = asyncio.create_task(publisher())
    try:
        await until(lambda: published >= 80, "80 events published")
        start = published
        ws, sub = await rewind_session(url, token, gid, 50)
        head = sub["s"]
        assert sub["rewound"] == 50 and sub["recovered"] is True, sub
        while len(got) < 150:  # 50 replayed, then 100 live
            (m,) = await read_events(ws, 1)
            got.append(m["s"])
            room.set()
        assert published > start, "nothing was published while subscribing"
    finally:
        stop.set()
        room.set()
        await task
    assert got == list(range(head - 49, head + 101)), got
    await ws.close()


async def test_boundary_memory(server: Server) -> None:
    await check_boundary(server.publish, server.url, server.token("u"), "busy")


async def test_boundary_disk(tmp_path: Path) -> None:
    async with node(data_dir=str(tmp_path / "data")) as srv:
        await check_boundary(srv.publish, srv.url, srv.token("u"), "busy")


# --- disk: the history survives a restart, and so does a rewind of it --------------------


async def test_rewind_after_a_restart_with_data_dir(tmp_path: Path) -> None:
    async with restartable(data_dir=str(tmp_path / "data")) as r:
        await publish_n(r.srv.publish, "g", 6)
        epoch, _ = await r.srv.head("g")
        await r.restart()
        ws, sub = await rewind_session(r.url, r.srv.token("u"), "g", 4)
        assert sub == {"epoch": epoch, "s": 6, "recovered": True, "rewound": 4}
        got = await read_events(ws, 4)
        assert [(e["s"], e["d"]) for e in got] == [(i + 1, {"i": i}) for i in range(2, 6)]
        await r.srv.publish("g", "EV", None)
        assert [e["s"] for e in await read_events(ws, 1)] == [7]
        await ws.close()


# --- cluster: two nodes over a real redis-server -------------------------------------------


@contextlib.asynccontextmanager
async def two_nodes(redis: RedisProc) -> AsyncIterator[tuple[Server, Server]]:
    async with (
        node(redis=redis.url, node_id="a") as a,
        node(redis=redis.url, node_id="b") as b,
    ):
        yield a, b


async def test_rewind_in_a_cluster(redis_proc: RedisProc) -> None:
    """Published on node a, rewound on node b (from the Redis stream), then live."""
    async with two_nodes(redis_proc) as (a, b):
        await publish_n(a.publish, "g", 8)
        epoch, _ = await a.head("g")
        ws, sub = await rewind_session(b.url, b.token("u"), "g", 5)
        assert sub == {"epoch": epoch, "s": 8, "recovered": True, "rewound": 5}
        assert [e["s"] for e in await read_events(ws, 5)] == [4, 5, 6, 7, 8]
        await a.publish("g", "EV", None)
        assert [e["s"] for e in await read_events(ws, 1)] == [9]
        await ws.close()


async def test_rewind_in_a_cluster_longer_than_the_stream(redis_proc: RedisProc) -> None:
    async with (
        node(redis=redis_proc.url, node_id="a", history_size=5) as a,
        node(redis=redis_proc.url, node_id="b", history_size=5) as b,
    ):
        await publish_n(a.publish, "g", 9)
        ws, sub = await rewind_session(b.url, b.token("u"), "g", 8)
        # The stream holds the last history_size events (XADD MAXLEN, exact).
        assert sub["s"] == 9 and sub["rewound"] == 5 and sub["recovered"] is False
        assert [e["s"] for e in await read_events(ws, 5)] == [5, 6, 7, 8, 9]
        await ws.close()


async def test_boundary_cluster(redis_proc: RedisProc) -> None:
    async with two_nodes(redis_proc) as (a, b):
        await check_boundary(a.publish, b.url, b.token("u"), "busy")


# --- our Python client -----------------------------------------------------------------


async def next_events(c: Client, n: int) -> list[Event]:
    out: list[Event] = []
    async with asyncio.timeout(gw.TIMEOUT):
        async for item in c.events():
            assert isinstance(item, Event), item  # no Resync: nothing was lost
            out.append(item)
            if len(out) == n:
                return out
    raise AssertionError("the client stopped")


async def test_python_client_rewinds_once_then_recovers(server: Server) -> None:
    """``Client(rewind=)`` gets the last events, then live; after a reconnect
    it recovers from its Position: nothing is sent twice (no duplicate to
    drop) and nothing is missed."""
    await publish_n(server.publish, "g", 6)
    await publish_n(server.publish, "h", 3)
    epoch, _ = await server.head("g")
    backoff = Backoff(base=0.02, cap=0.2)
    async with Client(
        server.url, server.token("app"), guilds=["g"], rewind=4, backoff=backoff
    ) as c:
        assert [e.s for e in await next_events(c, 4)] == [3, 4, 5, 6]
        await server.publish("g", "EV", {"i": 6})
        assert [e.s for e in await next_events(c, 1)] == [7]
        assert c.positions == {"g": Position(epoch, 7)}
        assert server.disconnect_all(4000, "test") == 1
        await server.publish("g", "EV", {"i": 7})  # while it is away
        assert [(e.s, e.data) for e in await next_events(c, 1)] == [(8, {"i": 7})]
        assert c.sessions == 2 and c.duplicates_dropped == 0

        # subscribe(rewind=): the Position returned is the one before the replay.
        h_epoch, _ = await server.head("h")
        assert await c.subscribe("h", rewind=2) == Position(h_epoch, 1)
        assert [(e.guild, e.s) for e in await next_events(c, 2)] == [("h", 2), ("h", 3)]
        with pytest.raises(ValueError):
            await c.subscribe("k", Position(h_epoch, 1), rewind=2)
        with pytest.raises(ValueError):
            await c.subscribe("k", rewind=0)
