"""The handshake fast path (server/transport/upgrade.py) against websockets'
own ``ServerProtocol``: every request the fast path accepts, websockets
accepts too with the same ``Sec-WebSocket-Accept``, subprotocol and 101
bytes (but the ``Date``); the plain requests real clients send do take the
fast path; and on real sockets both paths serve a session, including a
request whose first frames arrive in the same read."""

from __future__ import annotations

import base64
import os
import re

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.exceptions import NegotiationError
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from guildcast import Server
from guildcast.transport import upgrade
from guildcast.transport.gateway import GATEWAY_PATHS, _select_subprotocol
from tests.integration.raw import RawWs
from tests.support import gateway as gw

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
BASE = (
    "GET /gateway HTTP/1.1\r\nHost: 127.0.0.1:9000\r\nUpgrade: websocket\r\n"
    f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
)


def websockets_answer(data: bytes) -> Response | None:
    """What websockets answers ``data`` with (None: no complete request)."""
    proto = ServerProtocol(
        subprotocols=[Subprotocol("guildcast.v1")],
        select_subprotocol=_select_subprotocol,
    )
    proto.receive_data(data)
    for ev in proto.events_received():
        if isinstance(ev, Request):
            path = ev.path.split("?", 1)[0]
            if path not in GATEWAY_PATHS:
                return None
            return proto.accept(ev)
    return None


def check_agrees(data: bytes) -> upgrade.Handshake | None:
    """The fast path's verdict on ``data``, checked against websockets'."""
    hs = upgrade.parse(data, GATEWAY_PATHS)
    if hs is None:
        return None
    resp = websockets_answer(data)
    assert resp is not None, data
    try:
        sp = _select_subprotocol(None, hs.offered)  # type: ignore[arg-type]
    except NegotiationError:  # the gateway gives way: websockets writes its 400
        assert resp.status_code == 400
        return hs
    assert resp.status_code == 101, (data, resp)
    assert resp.headers["Sec-WebSocket-Accept"] == hs.accept
    assert resp.headers.get("Sec-WebSocket-Protocol") == sp
    ours = upgrade.response(hs.accept, sp)
    theirs = resp.serialize()
    date = re.compile(rb"Date: [^\r]*\r\n")
    assert date.sub(b"", ours) == date.sub(b"", theirs)
    assert date.search(ours) is not None
    return hs


FAST = [
    BASE + "\r\n",
    BASE + "Sec-WebSocket-Protocol: guildcast.v1\r\n\r\n",
    BASE + "Sec-WebSocket-Protocol: chat, guildcast.v1\r\n\r\n",
    BASE.replace("/gateway ", "/gateway/?v=1 ") + "\r\n",
    BASE.replace("Connection: Upgrade", "Connection: keep-alive, Upgrade") + "\r\n",
    BASE.replace("Upgrade: websocket", "Upgrade: WebSocket") + "\r\n",
    BASE.replace("Sec-WebSocket-Key:", "sec-websocket-key:") + "\r\n",
    BASE + "Origin: http://example.com\r\nUser-Agent: x/1\r\nCookie: a=b; c=\xe9\r\n\r\n",
    BASE + "X-Long: " + "a" * 8000 + "\r\n\r\n",
]

SLOW = [
    BASE,  # head incomplete in this read
    BASE + "Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
    BASE + "Content-Length: 0\r\n\r\n",
    BASE + "Transfer-Encoding: chunked\r\n\r\n",
    BASE + "Origin: a\r\nOrigin: b\r\n\r\n",
    BASE + "Sec-WebSocket-Key: " + KEY + "\r\n\r\n",
    BASE + "Sec-WebSocket-Protocol: a,,b\r\n\r\n",
    BASE + "Bad Name: x\r\n\r\n",
    BASE + "NoColon\r\n\r\n",
    BASE + "X: a\x01b\r\n\r\n",
    BASE + "X: a\nb\r\n\r\n",
    BASE + "X-Long: " + "a" * 8190 + "\r\n\r\n",
    BASE + "".join(f"X-{i}: v\r\n" for i in range(130)) + "\r\n",
    BASE.replace("HTTP/1.1", "HTTP/1.0") + "\r\n",
    BASE.replace("GET", "POST") + "\r\n",
    BASE.replace("/gateway", "/other") + "\r\n",
    BASE.replace("Upgrade: websocket", "Upgrade: websocket, h2c") + "\r\n",
    BASE.replace("Connection: Upgrade", "Connection: keep-alive") + "\r\n",
    BASE.replace("Version: 13", "Version: 8") + "\r\n",
    BASE.replace(KEY, "c2hvcnQ=") + "\r\n",
    BASE.replace(KEY, "not base64!") + "\r\n",
]


@pytest.mark.parametrize("request_", FAST)
def test_plain_requests_take_the_fast_path(request_: str) -> None:
    data = request_.encode("latin-1")
    hs = check_agrees(data)
    assert hs is not None
    assert hs.rest == b""


@pytest.mark.parametrize("request_", SLOW)
def test_other_requests_go_to_websockets(request_: str) -> None:
    assert upgrade.parse(request_.encode("latin-1"), GATEWAY_PATHS) is None


def test_bytes_after_the_head_are_kept() -> None:
    hs = check_agrees((BASE + "\r\n").encode() + b"\x81\x80abcd")
    assert hs is not None and hs.rest == b"\x81\x80abcd"


# Mutations of a plain request: whatever the fast path accepts, websockets
# accepts the same way.
_PIECES = st.sampled_from(
    [" ", "\t", ",", ":", "\r", "\n", "\r\n", "a", "Upgrade", "websocket", "13", "=", "\x00", "é"]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(BASE) + 2), st.integers(0, 3), _PIECES), max_size=4))
def test_mutated_requests_agree_with_websockets(edits: list[tuple[int, int, str]]) -> None:
    text = BASE + "Sec-WebSocket-Protocol: guildcast.v1\r\n\r\n"
    for at, drop, piece in edits:
        text = text[:at] + piece + text[at + drop :]
    check_agrees(text.encode("utf-8"))


def _request(extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (BASE.replace(KEY, key) + extra + "\r\n").encode()


async def _serves(c: RawWs, server: Server) -> None:
    hello = await c.next_json()
    assert hello["op"] == gw.HELLO
    await c.send_json({"op": gw.IDENTIFY, "d": {"token": server.token("u"), "guilds": {"g": None}}})
    ready = await c.next_json()
    assert ready["t"] == "READY"
    assert (await c.next_json())["t"] == "SUBSCRIBED"


@pytest.mark.parametrize(
    "extra", ["", "Sec-WebSocket-Extensions: permessage-deflate\r\n"], ids=["fast", "websockets"]
)
async def test_both_paths_serve_a_session(server: Server, extra: str) -> None:
    c = await RawWs.open(server.port)
    try:
        await c.sendall(_request(extra))
        status, _head = await c.http_response()
        assert status == 101
        await _serves(c, server)
    finally:
        c.close()


async def test_request_and_first_frames_in_one_read(server: Server) -> None:
    """A client that sends its IDENTIFY right behind the request (before
    HELLO) is answered as one that waited."""
    c = await RawWs.open(server.port)
    try:
        identify = Frame(
            Opcode.TEXT,
            orjson.dumps(
                {"op": gw.IDENTIFY, "d": {"token": server.token("u"), "guilds": {"g": None}}}
            ),
        ).serialize(mask=True)
        await c.sendall(_request() + identify)
        status, _head = await c.http_response()
        assert status == 101
        assert (await c.next_json())["op"] == gw.HELLO
        assert (await c.next_json())["t"] == "READY"
        assert (await c.next_json())["t"] == "SUBSCRIBED"
    finally:
        c.close()


async def test_request_in_two_writes_is_served(server: Server) -> None:
    """Two writes, most often two reads: websockets assembles the head."""
    c = await RawWs.open(server.port)
    try:
        data = _request()
        await c.sendall(data[:20])
        await c.sendall(data[20:])
        status, _head = await c.http_response()
        assert status == 101
        await _serves(c, server)
    finally:
        c.close()


async def test_an_offer_of_other_subprotocols_gets_websockets_400(server: Server) -> None:
    c = await RawWs.open(server.port)
    try:
        await c.sendall(_request("Sec-WebSocket-Protocol: chat\r\n"))
        status, _head = await c.http_response()
        assert status == 400
        assert b"guildcast.v1" in bytes(c.buf) or b"guildcast.v1" in await c.recv_some()
    finally:
        c.close()


async def test_identify_then_close_in_one_write_answers_ready_before_the_close(
    server: Server,
) -> None:
    """READY held for SUBSCRIBED (gateway.py ``_held``) still goes out before
    the close frame, and nothing follows the close frame."""
    c = await RawWs.open(server.port)
    try:
        await c.sendall(_request())
        status, _head = await c.http_response()
        assert status == 101
        assert (await c.next_json())["op"] == gw.HELLO
        identify = {"op": gw.IDENTIFY, "d": {"token": server.token("u"), "guilds": {"g": None}}}
        await c.sendall(
            Frame(Opcode.TEXT, orjson.dumps(identify)).serialize(mask=True)
            + Frame(Opcode.CLOSE, (1000).to_bytes(2, "big")).serialize(mask=True)
        )
        code, before = await c.read_until_close()
        assert code == 1000
        texts = [orjson.loads(p) for op, p in before if op == Opcode.TEXT.value]
        assert texts and texts[0]["t"] == "READY", texts
        assert c.frames() == []  # nothing after the close frame
    finally:
        c.close()
