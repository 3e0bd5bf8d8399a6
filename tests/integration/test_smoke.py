"""End to end: a plain websockets client identifies, subscribes, receives."""

from __future__ import annotations

import orjson
import websockets

from guildcast import Server


async def recv_json(ws: websockets.ClientConnection) -> dict:  # type: ignore[type-arg]
    return orjson.loads(await ws.recv())  # type: ignore[no-any-return]


async def test_identify_subscribe_publish(server: Server) -> None:
    token = server.token("alice", guilds=["g-*"], pub=["g-*"])
    async with websockets.connect(server.url) as ws:
        hello = await recv_json(ws)
        assert hello["op"] == 10 and hello["d"]["heartbeat_interval"] > 0
        await ws.send(
            orjson.dumps({"op": 2, "d": {"token": token, "guilds": {"g-1": None}}}).decode()
        )
        ready = await recv_json(ws)
        assert ready["t"] == "READY" and ready["d"]["user"] == "alice"
        sub = await recv_json(ws)
        assert sub["t"] == "SUBSCRIBED" and sub["g"] == "g-1"
        assert sub["d"]["s"] == 0 and sub["d"]["recovered"] is False
        s = await server.publish("g-1", "CARD_ADDED", {"title": "x"})
        ev = await recv_json(ws)
        assert ev == {"op": 0, "t": "CARD_ADDED", "g": "g-1", "s": s, "d": {"title": "x"}}
