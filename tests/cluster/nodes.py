"""Cluster test kit: node processes and a recovering gateway follower."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import websockets
from websockets.asyncio.client import ClientConnection

from tests.redisproc import free_port

API_KEY = "cluster-test-api-key"


class NodeProc:
    """``guildcast serve --redis …`` as a real process on free loopback ports."""

    def __init__(self, redis_url: str, secret: str, node_id: str, *extra: str) -> None:
        self.redis_url = redis_url
        self.secret = secret
        self.node_id = node_id
        self.port = free_port()
        self.api_port = free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "guildcast.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--api-port",
            str(self.api_port),
            "--redis",
            self.redis_url,
            "--secret",
            self.secret,
            "--node-id",
            self.node_id,
            "--presence-timeout",
            "2",
            "--api-key",
            API_KEY,
            "--log-level",
            "WARNING",
            *self.extra,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GUILDCAST_")}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.node_id} exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"node {self.node_id} did not listen within 60 s")

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    async def get(self, path: str) -> tuple[int, Any]:
        """GET an API path with the test key; returns (status, JSON or text body)."""
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with aiohttp.ClientSession() as http, http.get(self.api + path, headers=headers) as r:
            if r.content_type == "application/json":
                return r.status, await r.json()
            return r.status, await r.text()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def send(ws: ClientConnection, op: int, d: Any) -> None:
    await ws.send(orjson.dumps({"op": op, "d": d}).decode())


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
        await send(ws, 2, {"token": self.token, "guilds": positions})

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval / 2)
                await send(ws, 1, None)

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
        self.ws = await websockets.connect(self.url, open_timeout=10)
        await self.ws.recv()
        await send(self.ws, 2, {"token": self.token, "guilds": {}})
        ready = orjson.loads(await self.ws.recv())
        assert ready["t"] == "READY", ready
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()

    async def publish(self, gid: str, d: Any) -> int | None:
        """Returns the ACKed ``s``, or None after an ERROR (recorded in ``failed``)."""
        assert self.ws is not None
        nonce = f"n{len(self.acked) + len(self.failed)}"
        await send(self.ws, 5, {"guild": gid, "t": "EV", "d": d, "nonce": nonce})
        while True:
            m = orjson.loads(await self.ws.recv())
            if m["op"] == 12 and m["d"].get("nonce") == nonce:
                self.acked.append((gid, m["d"]["s"], d))
                return int(m["d"]["s"])
            if m["op"] == 13 and m["d"].get("nonce") == nonce:
                self.failed.append(m["d"])
                return None
