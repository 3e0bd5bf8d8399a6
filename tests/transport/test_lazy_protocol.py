"""websockets' protocol object is made only when a connection needs it
(server/transport/gateway.py ``Connection._ws``): after a handshake the
fast path answered (server/transport/upgrade.py), a session that only
sends plain text frames never gets one; the first frame the gateway does
not read itself (a ping here) makes one, in OPEN state, with the
subprotocol the handshake chose, and is answered as before; a close
begun by either side is websockets' close handshake."""

from __future__ import annotations

import asyncio

from websockets.typing import Subprotocol

from guildcast import Server
from guildcast.protocol.codes import SUBPROTOCOL
from guildcast.transport.gateway import Connection
from tests.support.gateway import HEARTBEAT, HEARTBEAT_ACK, close_code, recv, send, session
from tests.support.wait import TIMEOUT, until


def _only(srv: Server) -> Connection:
    (conn,) = srv.gateway.connections
    return conn


async def test_plain_frames_need_no_protocol_and_a_ping_makes_one(server: Server) -> None:
    tok = server.token("u", guilds=["*"])
    ws, subs = await session(server.url, tok, {"g": None}, subprotocols=[Subprotocol(SUBPROTOCOL)])
    try:
        assert ws.subprotocol == SUBPROTOCOL and set(subs) == {"g"}
        await send(ws, HEARTBEAT)
        assert (await recv(ws))["op"] == HEARTBEAT_ACK
        conn = _only(server)
        assert conn.proto is None  # IDENTIFY, SUBSCRIBED, HEARTBEAT: none needed
        assert conn.subprotocol == SUBPROTOCOL
        pong = await ws.ping(b"p")
        async with asyncio.timeout(TIMEOUT):
            await pong  # answered by websockets, made for it
        assert conn.proto is not None and conn.proto.subprotocol == SUBPROTOCOL
        await send(ws, HEARTBEAT)  # plain frames still served after it
        assert (await recv(ws))["op"] == HEARTBEAT_ACK
    finally:
        await ws.close()


async def test_a_server_close_without_a_protocol_is_a_close_handshake(server: Server) -> None:
    tok = server.token("u", guilds=["*"])
    ws, _ = await session(server.url, tok, {"g": None})
    conn = _only(server)
    assert conn.proto is None and conn.subprotocol is None  # protocol 1.0: none offered
    conn.close(4000, "test close")
    code, seen = await close_code(ws)
    assert code == 4000 and ws.close_reason == "test close" and seen == []
    await until(lambda: not server.gateway.connections, "the connection gone")


async def test_a_client_close_without_a_protocol_is_answered(server: Server) -> None:
    tok = server.token("u", guilds=["*"])
    ws, _ = await session(server.url, tok, {"g": None})
    assert _only(server).proto is None
    async with asyncio.timeout(TIMEOUT):
        await ws.close(1000, "bye")  # waits for the server's close frame
    rcvd = ws.protocol.close_rcvd
    assert rcvd is not None and rcvd.code == 1000  # the server answered the close
    await until(lambda: not server.gateway.connections, "the connection gone")
