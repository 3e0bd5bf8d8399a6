"""A plain WebSocket client for the integration tests.

It knows the gateway only as PROTOCOL.md describes it: JSON objects in text
frames over ``websockets``; nothing of the server's code. Every wait is
bounded by :data:`TIMEOUT` so a broken server fails a test instead of
hanging the suite.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

#: Generous bound on any single wait (a shared 2-core machine can be slow).
TIMEOUT = 30.0

HELLO, HEARTBEAT, IDENTIFY, SUBSCRIBE, UNSUBSCRIBE, PUBLISH = 10, 1, 2, 3, 4, 5
DISPATCH, RECONNECT, HEARTBEAT_ACK, ACK, ERROR = 0, 7, 11, 12, 13


async def open_ws(url: str, **kw: Any) -> ClientConnection:
    """Connect with no proxy, no compression and no client pings."""
    kw.setdefault("proxy", None)
    kw.setdefault("compression", None)
    kw.setdefault("ping_interval", None)
    kw.setdefault("open_timeout", TIMEOUT)
    kw.setdefault("close_timeout", TIMEOUT)
    return await connect(url, **kw)


async def send(ws: ClientConnection, op: int, d: Any = None) -> None:
    await ws.send(orjson.dumps({"op": op, "d": d}).decode())


async def recv(ws: ClientConnection, timeout: float = TIMEOUT) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        raw = await ws.recv()
    assert isinstance(raw, str), f"server sent a binary frame: {raw!r}"
    msg = orjson.loads(raw)
    assert isinstance(msg, dict)
    return msg


async def identify(
    ws: ClientConnection,
    token: str,
    guilds: dict[str, Any] | None = None,
    events: list[str] | None = None,
) -> dict[str, Any]:
    """HELLO, IDENTIFY, READY; returns READY. Replies to ``guilds`` are left unread."""
    hello = await recv(ws)
    assert hello["op"] == HELLO, hello
    d: dict[str, Any] = {"token": token, "guilds": guilds or {}}
    if events is not None:
        d["events"] = events
    await send(ws, IDENTIFY, d)
    ready = await recv(ws)
    assert ready["op"] == DISPATCH and ready["t"] == "READY", ready
    return ready


async def session(
    url: str,
    token: str,
    guilds: dict[str, Any] | None = None,
    events: list[str] | None = None,
    **kw: Any,
) -> tuple[ClientConnection, dict[str, dict[str, Any]]]:
    """Connect, identify and read every guild's SUBSCRIBED; returns
    ``(ws, {gid: SUBSCRIBED d})``. For guilds given without a Position (no
    replay); callers that recover use :func:`identify` and read themselves."""
    ws = await open_ws(url, **kw)
    await identify(ws, token, guilds, events)
    subs: dict[str, dict[str, Any]] = {}
    while len(subs) < len(guilds or {}):
        m = await recv(ws)
        assert m["op"] == DISPATCH and m.get("t") == "SUBSCRIBED", m
        subs[m["g"]] = m["d"]
    return ws, subs


async def close_code(
    ws: ClientConnection, timeout: float = TIMEOUT
) -> tuple[int | None, list[Any]]:
    """Read until the server closes; returns (close code, messages read before it)."""
    seen: list[Any] = []
    async with asyncio.timeout(timeout):
        try:
            while True:
                raw = await ws.recv()
                seen.append(orjson.loads(raw) if isinstance(raw, str) else raw)
        except ConnectionClosed:
            pass
    return ws.close_code, seen


async def expect_close(ws: ClientConnection, code: int, timeout: float = TIMEOUT) -> list[Any]:
    """Assert the server closes with ``code``; returns what came before."""
    got, seen = await close_code(ws, timeout)
    assert got == code, (got, ws.close_reason, seen)
    return seen


async def wait_until(pred: Any, timeout: float = TIMEOUT, step: float = 0.005) -> None:
    """Poll a condition on the server's state until it holds (bounded)."""
    async with asyncio.timeout(timeout):
        # The server's counters have no change notification to wait on.
        while not pred():  # noqa: ASYNC110
            await asyncio.sleep(step)
