"""A plain WebSocket client of the gateway, for every end-to-end test.

It knows the gateway only as docs/PROTOCOL.md describes it: JSON objects in
text frames over ``websockets``; nothing of the server's code. Every wait
is bounded by :data:`~tests.support.wait.TIMEOUT` so a broken server fails
a test instead of hanging the suite.

Besides the one-call helpers (:func:`open_ws`, :func:`identify`,
:func:`session`, :func:`subscribe`, :func:`expect_close`), two clients the
cluster tests drive across node deaths: a :class:`Follower` that
reconnects and recovers by Position, and a :class:`Publisher` (op 5,
waiting for each answer).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.support.wait import TIMEOUT

__all__ = ["TIMEOUT"]

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
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """HELLO, IDENTIFY, READY; returns READY. Replies to ``guilds`` are left
    unread. ``extra``: more IDENTIFY fields (``{"activity_batch": True}``)."""
    hello = await recv(ws)
    assert hello["op"] == HELLO, hello
    d: dict[str, Any] = {"token": token, "guilds": guilds or {}}
    if events is not None:
        d["events"] = events
    if extra:
        d.update(extra)
    await send(ws, IDENTIFY, d)
    ready = await recv(ws)
    assert ready["op"] == DISPATCH and ready["t"] == "READY", ready
    return ready


async def session(
    url: str,
    token: str,
    guilds: dict[str, Any] | None = None,
    events: list[str] | None = None,
    extra: dict[str, Any] | None = None,
    **kw: Any,
) -> tuple[ClientConnection, dict[str, dict[str, Any]]]:
    """Connect, identify (``extra``: more IDENTIFY fields) and read every
    guild's SUBSCRIBED; returns ``(ws, {gid: SUBSCRIBED d})``. For guilds
    given without a Position (no replay); callers that recover use
    :func:`identify` and read themselves."""
    ws = await open_ws(url, **kw)
    await identify(ws, token, guilds, events, extra)
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


async def subscribe(
    url: str, token: str, gid: str, position: dict[str, Any] | None = None
) -> tuple[ClientConnection, dict[str, Any]]:
    """Connect, IDENTIFY with ``gid`` (at ``position``); returns the socket and
    the SUBSCRIBED payload. Replayed events are left to read."""
    ws, subs = await session(url, token, {gid: position})
    return ws, subs[gid]


async def still_open(ws: ClientConnection) -> None:
    """HEARTBEAT is answered: the connection is alive and served."""
    await send(ws, HEARTBEAT)
    while True:
        m = await recv(ws)
        if m["op"] == HEARTBEAT_ACK:
            return


@dataclass
class Follower:
    """A client that follows guilds across reconnects, recovering by Position.

    It records every event as ``(s, d)`` per guild and checks order as it
    goes; ``violations`` lists any gap or duplicate it saw.
    """

    urls: list[str]
    token: str
    guilds: list[str]
    events: dict[str, list[tuple[int, Any]]] = field(default_factory=dict)
    epochs: dict[str, str] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    reconnects: int = 0
    unrecovered: int = 0
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    def last(self, gid: str) -> int:
        ev = self.events.get(gid)
        return ev[-1][0] if ev else 0

    def count(self, gid: str) -> int:
        return len(self.events.get(gid, ()))

    async def run(self) -> None:
        i = 0
        while True:
            url = self.urls[i % len(self.urls)]
            try:
                async with websockets.connect(url, open_timeout=10) as ws:
                    await self._session(ws)
            except (
                OSError,
                websockets.ConnectionClosed,
                websockets.InvalidHandshake,
                TimeoutError,
            ):
                pass
            self.reconnects += 1
            i += 1
            await asyncio.sleep(0.05)

    async def _session(self, ws: ClientConnection) -> None:
        hello = orjson.loads(await ws.recv())
        interval = hello["d"]["heartbeat_interval"] / 1000.0
        positions = {
            g: ({"epoch": self.epochs[g], "s": self.last(g)} if g in self.epochs else None)
            for g in self.guilds
        }
        await send(ws, IDENTIFY, {"token": self.token, "guilds": positions})

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval / 2)
                await send(ws, HEARTBEAT)

        hb = asyncio.create_task(beat())
        try:
            pending = set(self.guilds)
            async for raw in ws:
                m = orjson.loads(raw)
                if m["op"] != 0:
                    continue
                t = m["t"]
                if t == "SUBSCRIBED":
                    g = m["g"]
                    d = m["d"]
                    if positions.get(g) is not None and not d["recovered"]:
                        self.unrecovered += 1
                        self.violations.append(f"{g}: not recovered at {positions[g]}")
                    self.epochs[g] = d["epoch"]
                    pending.discard(g)
                    if not pending:
                        self.subscribed.set()
                elif "s" in m:
                    g, s = m["g"], m["s"]
                    last = self.last(g)
                    if s != last + 1 and last != 0:
                        self.violations.append(f"{g}: got {s} after {last}")
                    if s > last:
                        self.events.setdefault(g, []).append((s, m["d"]))
                    self.progress.set()
        finally:
            hb.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hb


class Publisher:
    """Publishes over one gateway connection with op 5, waiting for each answer."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.acked: list[tuple[str, int, Any]] = []
        self.failed: list[dict[str, Any]] = []
        self.ws: ClientConnection | None = None

    async def __aenter__(self) -> Publisher:
        self.ws = await open_ws(self.url)
        await identify(self.ws, self.token)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()

    async def publish(self, gid: str, d: Any) -> int | None:
        """Returns the ACKed ``s``, or None after an ERROR (recorded in ``failed``)."""
        assert self.ws is not None
        nonce = f"n{len(self.acked) + len(self.failed)}"
        await send(self.ws, PUBLISH, {"guild": gid, "t": "EV", "d": d, "nonce": nonce})
        while True:
            m = await recv(self.ws)
            if m["op"] == ACK and m["d"].get("nonce") == nonce:
                self.acked.append((gid, m["d"]["s"], d))
                return int(m["d"]["s"])
            if m["op"] == ERROR and m["d"].get("nonce") == nonce:
                self.failed.append(m["d"])
                return None
