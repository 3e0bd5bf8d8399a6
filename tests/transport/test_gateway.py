"""The gateway transport on real sockets: HTTP upgrade handling, fragmented
messages, control frames and the close handshake (RFC 6455 as websockets'
Sans-I/O protocol implements it, driven by server/transport/gateway.py)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from websockets.frames import Opcode

from guildcast import Server
from tests.integration.raw import RawWs
from tests.support import gateway as gw
from tests.support.wait import until


async def http(server: Server, request: bytes) -> tuple[int, bytes]:
    c = await RawWs.open(server.port)
    try:
        await c.sendall(request)
        return await c.http_response()
    finally:
        c.close()


async def assert_serving(server: Server) -> None:
    ws, _subs = await gw.session(server.url, server.token("u"), {"check": None})
    s = await server.publish("check", "E", None)
    assert (await gw.recv(ws))["s"] == s
    await ws.close()


@pytest.mark.parametrize("path", ["/", "/other", "/gateway/x", "/gatewayy", "/v1/publish"])
async def test_other_paths_get_404(server: Server, path: str) -> None:
    c = await RawWs.open(server.port)
    try:
        assert await c.handshake(path) == 404
    finally:
        c.close()
    await assert_serving(server)


async def test_gateway_path_with_query_string_upgrades(server: Server) -> None:
    c = await RawWs.open(server.port)
    try:
        assert await c.handshake("/gateway?v=1&encoding=json") == 101
        assert (await c.next_json())["op"] == gw.HELLO
    finally:
        c.close()


@pytest.mark.parametrize(
    "request_",
    [
        b"GET /gateway HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /no/such/page HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /gateway HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    ],
)
async def test_plain_http_gets_an_error_status(server: Server, request_: bytes) -> None:
    status, head = await http(server, request_)
    assert 400 <= status < 500, head
    await assert_serving(server)


async def test_not_http_at_all(server: Server) -> None:
    c = await RawWs.open(server.port)
    try:
        await c.sendall(b"HELLO SERVER\r\n\r\n")
        data = b""
        while chunk := await c.recv_some():
            data += chunk
        assert data == b"" or data.startswith(b"HTTP/1.1 400"), data[:60]
    finally:
        c.close()
    await assert_serving(server)


async def test_fragmented_message_with_a_ping_inside(server: Server) -> None:
    c = await RawWs.open(server.port)
    try:
        assert await c.handshake() == 101
        assert (await c.next_json())["op"] == gw.HELLO
        msg = orjson.dumps(
            {"op": gw.IDENTIFY, "d": {"token": server.token("frag"), "guilds": {"fg": None}}}
        )
        third = len(msg) // 3
        await c.send_frame(Opcode.TEXT, msg[:third], fin=False)
        await c.send_frame(Opcode.PING, b"are you there")  # allowed between fragments
        await c.send_frame(Opcode.CONT, msg[third : 2 * third], fin=False)
        await c.send_frame(Opcode.CONT, msg[2 * third :], fin=True)
        # The pong (control frames may come between messages), READY and
        # SUBSCRIBED.
        got: list[tuple[int, bytes]] = []
        while len(got) < 3:
            got += c.frames()
            if len(got) < 3:
                c.buf += await c.recv_some()
        assert (Opcode.PONG.value, b"are you there") in got
        texts = [orjson.loads(p) for op, p in got if op == Opcode.TEXT.value]
        assert [m["t"] for m in texts] == ["READY", "SUBSCRIBED"]
        assert texts[0]["d"]["user"] == "frag"
        # The subscription made by the fragmented IDENTIFY works.
        s = await server.publish("fg", "E", {"x": 1})
        assert await c.next_json() == {"op": 0, "t": "E", "g": "fg", "s": s, "d": {"x": 1}}
    finally:
        c.close()


async def test_client_close_handshake(server: Server) -> None:
    ws, _ = await gw.session(server.url, server.token("u"), {"cl": None})
    await ws.close(1000, "bye")
    assert ws.close_code == 1000
    await until(lambda: server.gateway.stats()["connections"] == 0)
    # Its subscription is gone with it.
    info = await server.hub.info("cl")
    assert info["subscribers"] == 0


async def test_abrupt_disconnect_cleans_up(server: Server) -> None:
    c = await RawWs.open(server.port)
    assert await c.handshake() == 101
    await c.send_json(
        {"op": gw.IDENTIFY, "d": {"token": server.token("u"), "guilds": {"ab": None}}}
    )
    await c.next_json()  # HELLO
    await c.next_json()  # READY
    await c.next_json()  # SUBSCRIBED
    c.close()  # no close frame
    await until(lambda: server.gateway.stats()["connections"] == 0)
    await until(lambda: not server.groups.members("ab"))
    await assert_serving(server)


async def test_server_answers_pings(server: Server) -> None:
    ws, _ = await gw.session(server.url, server.token("u"))
    pong = await ws.ping(b"abc")
    async with asyncio.timeout(gw.TIMEOUT):
        await pong
    await ws.close()
