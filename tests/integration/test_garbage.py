"""Garbage never crashes the server and never disturbs a well-behaved client
that is receiving a stream at the same time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import orjson
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from guildcast import Server
from guildcast.protocol.frames import client_frame
from tests.integration.raw import RawWs
from tests.support import gateway as gw
from tests.support.wait import until

EVENTS = 600

#: One garbage client, start to finish.
Case = Callable[[], Coroutine[Any, Any, None]]


async def _ws_garbage(srv: Server, identify: bool, payload: Any, codes: set[int]) -> None:
    ws = await gw.open_ws(srv.url)
    await gw.recv(ws)
    if identify:
        await gw.send(ws, gw.IDENTIFY, {"token": srv.token("junk"), "guilds": {"stream": None}})
    await ws.send(payload)
    # Some garbage is only a refused command (the connection stays): end
    # those with a message that must close, so every case ends in a close.
    with contextlib.suppress(ConnectionClosed):
        await ws.send("}")
    code, _seen = await gw.close_code(ws)
    assert code in codes, (payload if len(str(payload)) < 200 else "big", code)


def ws_cases(srv: Server) -> list[Case]:
    huge = "h" * (70 * 1024)
    cases: list[tuple[Any, set[int]]] = [
        ("not json at all", {4002}),
        ("\x00\x01\x02", {4002}),
        ("{" * 1000, {4002}),
        ("[" * 30_000 + "]" * 30_000, {4002}),  # nested past the decoder's depth limit
        ("[]", {4002}),
        ('{"op": {"nested": true}}', {4002}),
        ('{"op": 2, "d": {"token": ["list"]}}', {4002}),
        ('{"op": 99}', {4001}),
        ('{"op": 0, "t": "READY", "d": {}}', {4001}),
        ('{"op": 3, "d": {"guilds": {"\\u0000": null}}}', {4002, 4003}),
        (b"\x00binary\xff", {4002}),
        (huge, {1009}),
        (["a" * 50_000, "b" * 50_000], {1009}),
        (["{", '"op": 1}'], {4003, 4002}),  # a fragmented, valid JSON message
        (orjson.dumps({"op": 5, "d": {"guild": "stream", "t": "X", "d": 1}}).decode(), {4003}),
    ]
    out: list[Case] = []
    for identify in (False, True):
        for payload, codes in cases:
            if identify:
                # After IDENTIFY the "before identify" cases become an IDENTIFY
                # twice (4005), or commands that are answered and the
                # connection stays (ended by the "}" that follows: 4002).
                codes = codes | {4002, 4005}
            out.append(partial(_ws_garbage, srv, identify, payload, codes))
    return out


async def _raw(srv: Server, data: bytes, codes: set[int | None], handshake: bool = True) -> None:
    c = await RawWs.open(srv.port)
    try:
        if handshake:
            assert await c.handshake() == 101
        await c.sendall(data)
        code, _frames = await c.read_until_close()
        assert code in codes, (data[:40], code)
    finally:
        c.close()


async def _raw_http_garbage(srv: Server, data: bytes) -> None:
    c = await RawWs.open(srv.port)
    try:
        await c.sendall(data)
        body = b""
        while True:
            try:
                chunk = await c.recv_some()
            except ConnectionError:
                break
            if not chunk:
                break
            body += chunk
        assert body == b"" or body.startswith(b"HTTP/1.1 4"), body[:80]
    finally:
        c.close()


async def _raw_hangup(srv: Server, data: bytes, handshake: bool) -> None:
    """Send part of something, then vanish."""
    c = await RawWs.open(srv.port)
    if handshake:
        assert await c.handshake() == 101
    await c.sendall(data)
    c.close()


def raw_cases(srv: Server) -> list[Case]:
    def frame(op: Opcode, data: bytes, fin: bool = True, mask: bool = True) -> bytes:
        return Frame(op, data, fin=fin).serialize(mask=mask)

    def bad(b0: int, data: bytes) -> bytes:
        """A frame websockets would refuse to build: first byte ``b0``, masked
        with a zero key (so the payload is sent as is), under 126 bytes."""
        return client_frame(b0 & 0x0F, data, fin=bool(b0 & 0x80), rsv=b0 >> 4 & 7, key=b"\0" * 4)

    cases: list[tuple[bytes, set[int | None]]] = [
        # An unmasked client frame (RFC 6455 5.1: the server must close).
        (frame(Opcode.TEXT, b'{"op":1}', mask=False), {1002}),
        # A continuation with nothing to continue.
        (frame(Opcode.CONT, b"x"), {1002}),
        # A new text frame in the middle of a fragmented message.
        (frame(Opcode.TEXT, b"{", fin=False) + frame(Opcode.TEXT, b"}"), {1002}),
        # Invalid UTF-8 in a text frame: RFC 6455's 1007, or PROTOCOL.md's
        # decode error (the JSON decoder checks UTF-8 too).
        (frame(Opcode.TEXT, b'{"op":1,"d":"\xff\xfe"}'), {1007, 4002}),
        # A control frame longer than 125 bytes, a fragmented control frame.
        (b"\x89\xfe\x00\xc8" + b"\x00" * 4 + b"p" * 200, {1002}),
        (bad(0x09, b"p"), {1002}),
        # Reserved bits without an extension, a reserved opcode.
        (bad(0xC1, b"{}"), {1002}),
        (bad(0x83, b""), {1002}),
        # A frame announcing 2**62 bytes.
        (b"\x81\xff" + (2**62).to_bytes(8, "big") + b"\x00" * 4, {1002, 1009}),
        # Random bytes.
        (os.urandom(4096), {1002, 1007, 1009, 4002, 4003, 4001, None}),
    ]
    out: list[Case] = [partial(_raw, srv, data, codes) for data, codes in cases]
    http_garbage = [
        os.urandom(2000) + b"\r\n\r\n",
        b"GET /gateway HTTP/1.1\r\nHost: x\r\n\r\n",  # no upgrade
        b"POST /gateway HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /gateway HTTP/1.1\r\n" + b"X-Junk: " + b"j" * 20_000 + b"\r\n\r\n",
        b"\r\n\r\n",
    ]
    out += [partial(_raw_http_garbage, srv, data) for data in http_garbage]
    out += [
        partial(_raw_hangup, srv, b"GET /gatew", False),
        partial(_raw_hangup, srv, b"", False),
        partial(_raw_hangup, srv, frame(Opcode.TEXT, b'{"op":2,"d":{"token"')[:9], True),
        partial(_raw_hangup, srv, frame(Opcode.TEXT, b"{", fin=False), True),
    ]
    return out


async def test_garbage_does_not_disturb_a_streaming_client(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    token = server.token("good")
    good, subs = await gw.session(server.url, token, {"stream": None})
    assert subs["stream"]["s"] == 0

    async def publisher() -> int:
        last = 0
        for i in range(EVENTS):
            last = await server.publish("stream", "TICK", {"i": i})
            if i % 20 == 0:
                await asyncio.sleep(0.001)  # spread the stream over the garbage
        return last

    async def reader() -> list[int]:
        got: list[int] = []
        while len(got) < EVENTS:
            m = await gw.recv(good)
            assert m["op"] == gw.DISPATCH and m["g"] == "stream", m
            assert m["d"] == {"i": m["s"] - 1}
            got.append(m["s"])
        return got

    async with asyncio.timeout(90):
        pub = asyncio.create_task(publisher())
        rd = asyncio.create_task(reader())
        garbage = ws_cases(server) + raw_cases(server)
        # Several rounds, many at once.
        for _round in range(2):
            async with asyncio.TaskGroup() as tg:
                for case in garbage:
                    tg.create_task(case())
        last = await pub
        got = await rd
    assert got == list(range(1, last + 1)) and last == EVENTS
    # The good client is still fine, and new clients are served.
    await gw.send(good, gw.HEARTBEAT)
    assert await gw.recv(good) == {"op": gw.HEARTBEAT_ACK, "d": None}
    fresh, subs = await gw.session(server.url, token, {"stream": None})
    assert subs["stream"]["s"] == EVENTS
    # Nothing leaked: only the good and the fresh client remain.
    await until(
        lambda: (
            server.gateway.stats()["connections"] == 2 and server.gateway.stats()["pending"] == 0
        )
    )
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    await good.close()
    await fresh.close()
