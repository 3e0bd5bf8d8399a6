"""Operations: graceful drain on SIGTERM (RECONNECT, 1001, exit 0, history
flushed), readiness false while draining, and structured JSON logs for the
events an operator needs (refusals, auth failures), never one per message."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from guildcast.core.tokens import make_token
from tests.support.api import Api
from tests.support.gateway import recv, subscribe
from tests.support.node import SECRET, api_server, serve_process
from tests.support.wait import TIMEOUT, until

TOKEN = make_token(SECRET, "ops", ["*"], [], None, 3600)


async def stalled_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket client that completes the handshake and then never reads or
    answers again (so a drain has to wait for it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /gateway HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await writer.drain()
    async with asyncio.timeout(TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def test_sigterm_drains_and_exits_zero(tmp_path: Any) -> None:
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--drain-timeout", "10", "--log-format", "json"]
    async with serve_process(args, tmp_path / "run1.log") as node:
        async with Api(node.api_url) as api:
            for n in range(3):
                assert (await api.publish({"guild": "d", "t": "N", "d": n}))[0] == 200
        ws, sub = await subscribe(node.url, TOKEN, "d")
        t0 = time.monotonic()
        assert node.proc is not None
        node.proc.terminate()
        got = await recv(ws)
        assert got == {"op": 7, "d": None}  # RECONNECT
        try:
            async with asyncio.timeout(TIMEOUT):
                await ws.recv()
        except ConnectionClosed:
            pass
        assert ws.close_code == 1001
        assert await node.wait() == 0
        # Bounded: the client closed at once, so well before the drain timeout
        # (10 s) plus the interpreter's exit, even on a loaded machine.
        assert time.monotonic() - t0 < 25
        assert "guildcast: stopped\n" in node.stdout
        msgs = [r["msg"] for r in node.log_json()]
        assert any(m.startswith("draining") for m in msgs) and "node stopped" in msgs
    # the history was flushed: a restart continues it
    async with serve_process(args, tmp_path / "run2.log") as node:
        async with Api(node.api_url) as api:
            status, info, _ = await api.get("/v1/guilds/d")
        assert status == 200 and info["s"] == 3 and info["epoch"] == sub["epoch"]


async def test_not_ready_while_draining() -> None:
    async with api_server(drain_timeout=TIMEOUT) as srv, Api(srv.api_url) as api:
        assert (await api.get("/readyz"))[0] == 200
        _, writer = await stalled_client(srv.port)
        stopping = asyncio.create_task(srv.stop())
        await until(lambda: srv.draining, "the drain to start")
        status, body, _ = await api.get("/readyz")
        assert (status, body["ready"]) == (503, False)
        status, err, _ = await api.publish({"guild": "g", "t": "E"})
        assert (status, err["error"]) == (503, "unavailable")
        assert "draining" in err["detail"]
        assert (await api.get("/healthz"))[0] == 200  # alive, just not ready
        assert not stopping.done()  # it waits for the stalled client
        writer.close()  # the client goes: the drain ends
        async with asyncio.timeout(TIMEOUT):
            await stopping


async def test_json_logs_for_refusals_and_auth_failures(tmp_path: Any) -> None:
    args = ["--log-format", "json", "--max-connections", "1"]
    async with serve_process(args, tmp_path / "run.log") as node:
        # three refused API calls: one line, then they are counted, not logged
        async with Api(node.api_url, key="wrong") as api:
            for _ in range(3):
                assert (await api.publish({"guild": "g", "t": "E"}))[0] == 403
        # a bad token on the gateway: 4004
        ws = await connect(node.url, proxy=None, open_timeout=TIMEOUT)
        await recv(ws)
        await ws.send(orjson.dumps({"op": 2, "d": {"token": "bad", "guilds": {}}}).decode())
        async with asyncio.timeout(TIMEOUT):
            await ws.wait_closed()
        assert ws.close_code == 4004
        # max_connections=1: a second connection gets 1013
        first, _ = await subscribe(node.url, TOKEN, "g")
        second = await connect(node.url, proxy=None, open_timeout=TIMEOUT)
        async with asyncio.timeout(TIMEOUT):
            await second.wait_closed()
        assert second.close_code == 1013
        await first.close()
        assert await node.terminate() == 0
        records = node.log_json()
    for r in records:
        assert {"ts", "level", "logger", "msg"} <= set(r)
        assert r["ts"].endswith("Z") and "T" in r["ts"]
    by_event: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if "event" in r:
            by_event.setdefault(r["event"], []).append(r)
    api_auth = by_event["api_auth_failed"]
    assert len(api_auth) == 1 and api_auth[0]["level"] == "INFO"
    assert api_auth[0]["logger"] == "guildcast.api" and api_auth[0]["path"] == "/v1/publish"
    gw_auth = by_event["auth_failed"]
    assert len(gw_auth) == 1 and gw_auth[0]["code"] == 4004
    refused = by_event["connection_refused"]
    assert len(refused) == 1 and refused[0]["level"] == "WARNING" and refused[0]["code"] == 1013
