"""Recovery with a Position (PROTOCOL.md "Subscribing and recovery")."""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.asyncio.client import ClientConnection

from guildcast import Server
from tests.support import gateway as gw
from tests.support.node import node
from tests.support.wait import until


async def next_events(ws: ClientConnection, n: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        m = await gw.recv(ws)
        assert m["op"] == gw.DISPATCH and "s" in m, m
        out.append(m)
    return out


async def assert_nothing_pending(ws: ClientConnection) -> None:
    """HEARTBEAT as a barrier: everything the server had written comes first."""
    await gw.send(ws, gw.HEARTBEAT)
    m = await gw.recv(ws)
    assert m == {"op": gw.HEARTBEAT_ACK, "d": None}, m


async def test_reconnect_gets_exactly_the_missed_events_then_live(server: Server) -> None:
    token = server.token("rita", guilds=["rec"])
    ws, subs = await gw.session(server.url, token, {"rec": None})
    epoch = subs["rec"]["epoch"]
    for i in range(5):
        await server.publish("rec", "EV", {"i": i})
    seen = await next_events(ws, 5)
    assert [m["s"] for m in seen] == [1, 2, 3, 4, 5]
    position = {"epoch": epoch, "s": seen[-1]["s"]}
    await ws.close()

    for i in range(5, 105):
        await server.publish("rec", "EV", {"i": i})

    ws = await gw.open_ws(server.url)
    await gw.identify(ws, token, {"rec": position})
    sub = await gw.recv(ws)
    assert sub == {
        "op": 0,
        "t": "SUBSCRIBED",
        "g": "rec",
        "d": {"epoch": epoch, "s": 105, "recovered": True},
    }
    replay = await next_events(ws, 100)
    assert replay == [
        {"op": 0, "t": "EV", "g": "rec", "s": s, "d": {"i": s - 1}} for s in range(6, 106)
    ]
    for i in range(105, 108):
        await server.publish("rec", "LIVE", {"i": i})
    live = await next_events(ws, 3)
    assert [(m["s"], m["t"]) for m in live] == [(106, "LIVE"), (107, "LIVE"), (108, "LIVE")]
    await assert_nothing_pending(ws)
    await ws.close()


async def test_recovery_through_subscribe_after_ready(server: Server) -> None:
    token = server.token("sam", guilds=["*"])
    s, epoch = await server.publish_ex("later", "EV", 1)
    for _ in range(9):
        s, epoch = await server.publish_ex("later", "EV", 1)
    assert s == 10
    ws, _ = await gw.session(server.url, token)
    await gw.send(ws, gw.SUBSCRIBE, {"guilds": {"later": {"epoch": epoch, "s": 7}}})
    sub = await gw.recv(ws)
    assert sub["t"] == "SUBSCRIBED" and sub["d"] == {"epoch": epoch, "s": 10, "recovered": True}
    assert [m["s"] for m in await next_events(ws, 3)] == [8, 9, 10]
    await assert_nothing_pending(ws)
    await ws.close()


async def _expect_unrecovered(srv: Server, gid: str, position: dict[str, Any], head: int) -> None:
    ws = await gw.open_ws(srv.url)
    await gw.identify(ws, srv.token("u", guilds=["*"]), {gid: position})
    sub = await gw.recv(ws)
    assert sub["t"] == "SUBSCRIBED" and sub["g"] == gid, sub
    assert sub["d"]["recovered"] is False and sub["d"]["s"] == head, sub
    await assert_nothing_pending(ws)  # no replay
    s = await srv.publish(gid, "LIVE", None)
    (live,) = await next_events(ws, 1)
    assert live["s"] == s == head + 1
    await ws.close()


async def test_position_too_old_is_not_recovered() -> None:
    async with node(history_size=10) as srv:
        epoch = ""
        for _ in range(50):
            _s, epoch = await srv.publish_ex("old", "EV", None)
        await _expect_unrecovered(srv, "old", {"epoch": epoch, "s": 5}, 50)
        await _expect_unrecovered(srv, "old", {"epoch": epoch, "s": 39}, 51)
        # Just inside the window (history holds the last 10) still recovers.
        ws = await gw.open_ws(srv.url)
        await gw.identify(ws, srv.token("u"), {"old": {"epoch": epoch, "s": 42}})
        sub = await gw.recv(ws)
        assert sub["d"] == {"epoch": epoch, "s": 52, "recovered": True}
        assert [m["s"] for m in await next_events(ws, 10)] == list(range(43, 53))
        await ws.close()


async def test_position_aged_out_is_not_recovered() -> None:
    async with node(history_ttl=0.1) as srv:
        epoch = ""
        for _ in range(5):
            _s, epoch = await srv.publish_ex("aged", "EV", None)
        await asyncio.sleep(0.3)  # the events age past history_ttl
        ws = await gw.open_ws(srv.url)
        await gw.identify(ws, srv.token("u"), {"aged": {"epoch": epoch, "s": 2}})
        sub = await gw.recv(ws)
        assert sub["t"] == "SUBSCRIBED" and sub["d"]["recovered"] is False, sub
        await assert_nothing_pending(ws)
        await ws.close()


async def test_position_of_another_epoch_is_not_recovered(server: Server) -> None:
    for _ in range(5):
        await server.publish("ep", "EV", None)
    await _expect_unrecovered(server, "ep", {"epoch": "not-the-epoch", "s": 2}, 5)
    await _expect_unrecovered(server, "ep", {"epoch": "not-the-epoch", "s": 0}, 6)


async def test_position_from_the_future_is_not_recovered(server: Server) -> None:
    _s, epoch = await server.publish_ex("fut", "EV", None)
    await _expect_unrecovered(server, "fut", {"epoch": epoch, "s": 99}, 1)


async def test_publishes_racing_subscribes_lose_and_double_nothing(server: Server) -> None:
    """A publisher runs flat out while clients subscribe, with and without a
    Position, through IDENTIFY and through SUBSCRIBE; each sees one unbroken
    run of ``s`` from where it started to the END event."""
    gid = "race"
    total = 1500
    progress: dict[str, Any] = {"s": 0, "epoch": ""}
    token = server.token("racer", guilds=[gid], pub=[gid], pub_rate=0)
    started = asyncio.Event()
    subscribed: list[int] = []

    readers_n = 24

    async def publisher() -> None:
        # Publish until every reader has subscribed, so each subscribe races
        # a publish in flight (bounded, in case a reader never gets there).
        i = 0
        while (i < total or len(subscribed) < readers_n) and i < 100_000:
            s, epoch = await server.publish_ex(gid, "EV", i)
            i += 1
            progress["s"], progress["epoch"] = s, epoch
            started.set()

    async def gateway_publisher() -> None:
        """A second writer through op 5, so the race has two publishers."""
        ws, _ = await gw.session(server.url, token)
        for j in range(200):
            await gw.send(ws, gw.PUBLISH, {"guild": gid, "t": "GW", "d": j, "nonce": str(j)})
        for j in range(200):
            ack = await gw.recv(ws)
            assert ack["op"] == gw.ACK and ack["d"]["nonce"] == str(j), ack
        await ws.close()

    async def subscriber(k: int) -> tuple[int, list[int], bool]:
        # Wait (on a condition) until the stream has gone past a point.
        await until(lambda: progress["s"] >= k * 60)
        position: dict[str, Any] | None = None
        if k % 3 != 2:
            position = {"epoch": progress["epoch"], "s": max(0, progress["s"] - k % 40)}
        if k % 2:
            ws = await gw.open_ws(server.url)
            await gw.identify(ws, token, {gid: position})
        else:
            ws, _ = await gw.session(server.url, token)
            await gw.send(ws, gw.SUBSCRIBE, {"guilds": {gid: position}})
        sub = await gw.recv(ws)
        assert sub["t"] == "SUBSCRIBED", sub
        subscribed.append(k)
        recovered = sub["d"]["recovered"]
        if position is not None:
            assert recovered is True, (position, sub)
            start = position["s"]
        else:
            assert recovered is False
            start = sub["d"]["s"]
        got: list[int] = []
        while True:
            m = await gw.recv(ws)
            assert m["op"] == gw.DISPATCH and m["g"] == gid, m
            if m["t"] == "END":
                got.append(m["s"])
                break
            got.append(m["s"])
        await ws.close()
        return start, got, recovered

    async with asyncio.timeout(60):
        pub_task = asyncio.create_task(publisher())
        gw_task = asyncio.create_task(gateway_publisher())
        await started.wait()
        readers = [asyncio.create_task(subscriber(k)) for k in range(readers_n)]
        await pub_task
        await gw_task
        assert len(subscribed) == readers_n
        # END goes last, so all readers see it.
        end = await server.publish(gid, "END", None)
        results = await asyncio.gather(*readers)
    assert end > total + 200
    for start, got, _rec in results:
        assert got == list(range(start + 1, end + 1)), (start, got[:5], got[-5:])
