"""Session flow end to end (PROTOCOL.md "Session flow"): HELLO, READY,
heartbeats, the ``events`` filter, and graceful shutdown (op 7 then 1001)."""

from __future__ import annotations

import asyncio

from guildcast import Server
from tests.support import gateway as gw
from tests.support.node import node


async def test_hello_ready_and_heartbeat(server: Server) -> None:
    ws = await gw.open_ws(server.url)
    hello = await gw.recv(ws)
    assert hello == {"op": gw.HELLO, "d": {"heartbeat_interval": 30_000}}
    # HEARTBEAT is answered even before IDENTIFY.
    await gw.send(ws, gw.HEARTBEAT)
    assert await gw.recv(ws) == {"op": gw.HEARTBEAT_ACK, "d": None}
    await gw.send(ws, gw.IDENTIFY, {"token": server.token("heidi"), "guilds": {}})
    ready = await gw.recv(ws)
    assert ready["op"] == gw.DISPATCH and ready["t"] == "READY"
    assert ready["d"]["user"] == "heidi" and isinstance(ready["d"]["session_id"], str)
    assert "g" not in ready and "s" not in ready
    for _ in range(5):
        await gw.send(ws, gw.HEARTBEAT, None)
        assert await gw.recv(ws) == {"op": gw.HEARTBEAT_ACK, "d": None}
    await ws.close()


async def test_session_ids_differ(server: Server) -> None:
    ids = set()
    for _ in range(5):
        ws = await gw.open_ws(server.url)
        ids.add((await gw.identify(ws, server.token("u")))["d"]["session_id"])
        await ws.close()
    assert len(ids) == 5


async def test_identify_subscribes_like_subscribe(server: Server) -> None:
    token = server.token("ivy", guilds=["a", "b"])
    ws, subs = await gw.session(server.url, token, {"a": None, "b": None})
    assert set(subs) == {"a", "b"}
    for d in subs.values():
        assert d["s"] == 0 and d["recovered"] is False and isinstance(d["epoch"], str)
    sa = await server.publish("a", "EV", "for a")
    sb = await server.publish("b", "EV", "for b")
    got = sorted([await gw.recv(ws), await gw.recv(ws)], key=lambda m: m["g"])
    assert got == [
        {"op": 0, "t": "EV", "g": "a", "s": sa, "d": "for a"},
        {"op": 0, "t": "EV", "g": "b", "s": sb, "d": "for b"},
    ]
    await ws.close()


async def test_events_filter(server: Server) -> None:
    token = server.token("fay")
    picky = await gw.open_ws(server.url)
    await gw.identify(picky, token, {"f": None}, events=["WANTED", "ALSO"])
    assert (await gw.recv(picky))["t"] == "SUBSCRIBED"
    everyone, _ = await gw.session(server.url, token, {"f": None})
    names = ["WANTED", "NOISE", "ALSO", "NOISE", "OTHER", "WANTED"] * 10
    for i, t in enumerate(names):
        await server.publish("f", t, i)
    await server.publish("f", "ALSO", "last")
    names.append("ALSO")
    want = [(s, t) for s, t in enumerate(names, start=1) if t in ("WANTED", "ALSO")]
    got: list[tuple[int, str]] = []
    while len(got) < len(want):
        m = await gw.recv(picky)
        got.append((m["s"], m["t"]))
    # Filtered events never arrive; the gaps in s are exactly the filtered names.
    assert got == want
    assert all(names[s - 1] in ("WANTED", "ALSO") for s, _t in got)
    everything = [(await gw.recv(everyone))["s"] for _ in names]
    assert everything == list(range(1, len(names) + 1))
    # Nothing else is on its way to the picky client.
    await gw.send(picky, gw.HEARTBEAT)
    assert await gw.recv(picky) == {"op": gw.HEARTBEAT_ACK, "d": None}
    await picky.close()
    await everyone.close()


async def test_events_filter_applies_to_replay(server: Server) -> None:
    epoch = ""
    for t in ("A", "B", "A", "C"):
        _s, epoch = await server.publish_ex("fr", t, None)
    ws = await gw.open_ws(server.url)
    await gw.identify(ws, server.token("u"), {"fr": {"epoch": epoch, "s": 0}}, events=["A"])
    sub = await gw.recv(ws)
    assert sub["d"] == {"epoch": epoch, "s": 4, "recovered": True}
    assert [(await gw.recv(ws))["s"] for _ in range(2)] == [1, 3]
    await gw.send(ws, gw.HEARTBEAT)
    assert (await gw.recv(ws))["op"] == gw.HEARTBEAT_ACK
    await ws.close()


async def test_graceful_shutdown_sends_reconnect_then_1001() -> None:
    clients = []
    async with asyncio.timeout(60):
        async with node() as srv:
            token = srv.token("u")
            for i in range(5):
                ws, _ = await gw.session(srv.url, token, {f"g{i % 2}": None})
                clients.append(ws)
            # One connected but not yet identified.
            bare = await gw.open_ws(srv.url)
            assert (await gw.recv(bare))["op"] == gw.HELLO
            clients.append(bare)
            readers = [asyncio.create_task(gw.close_code(ws)) for ws in clients]
            await asyncio.sleep(0)
        # The context has exited: every client was told, then closed.
        for task in readers:
            code, seen = await task
            assert seen == [{"op": gw.RECONNECT, "d": None}]
            assert code == 1001
