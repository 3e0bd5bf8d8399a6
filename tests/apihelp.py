"""Helpers for tests of the HTTP API, durability and operations: an embedded
node with its API, a node as a real ``guildcast serve`` process, an HTTP
client and a minimal gateway subscriber. Every wait is bounded."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from websockets.asyncio.client import ClientConnection, connect

from guildcast import Config, Server

SECRET = "api-test-secret-0123456789abcdef0123456789"
KEY = "test-api-key-1"
#: Generous bound on any single wait (a shared 2-core machine can be slow).
TIMEOUT = 30.0
ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def api_server(**cfg: Any) -> AsyncIterator[Server]:
    """An embedded node on 127.0.0.1 with its HTTP API on a free port."""
    cfg.setdefault("api_keys", (KEY,))
    async with Server(Config(host="127.0.0.1", port=0, api_port=0, secret=SECRET, **cfg)) as srv:
        yield srv


class Api:
    """An HTTP client for one node's API; answers are ``(status, body, headers)``."""

    def __init__(self, base: str, key: str | None = KEY) -> None:
        self.base = base
        self.key = key
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT))

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    def _headers(self, headers: dict[str, str] | None) -> dict[str, str]:
        out = {} if self.key is None else {"Authorization": f"Bearer {self.key}"}
        out.update(headers or {})
        return out

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        h = self._headers(headers)
        if json is not None:
            data = orjson.dumps(json)
            h.setdefault("Content-Type", "application/json")
        async with self.session.request(method, self.base + path, data=data, headers=h) as r:
            raw = await r.read()
            ctype = r.headers.get("Content-Type", "")
            body: Any = orjson.loads(raw) if ctype.startswith("application/json") else raw
            return r.status, body, dict(r.headers)

    async def publish(self, body: Any, **kw: Any) -> tuple[int, Any, dict[str, str]]:
        return await self.request("POST", "/v1/publish", json=body, **kw)

    async def get(self, path: str, **kw: Any) -> tuple[int, Any, dict[str, str]]:
        return await self.request("GET", path, **kw)


async def until(pred: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Wait until ``pred()`` holds, polling; fails after ``timeout`` seconds."""
    step = 0.01
    for _ in range(int(timeout / step)):
        if pred():
            return
        await asyncio.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def recv_json(ws: ClientConnection, timeout: float = TIMEOUT) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        raw = await ws.recv()
    assert isinstance(raw, str), raw
    msg = orjson.loads(raw)
    assert isinstance(msg, dict)
    return msg


async def subscribe(
    url: str, token: str, gid: str, position: dict[str, Any] | None = None
) -> tuple[ClientConnection, dict[str, Any]]:
    """Connect, IDENTIFY with ``gid`` (at ``position``); returns the socket and
    the SUBSCRIBED payload. Replayed events are left to read."""
    ws = await connect(url, proxy=None, open_timeout=TIMEOUT, ping_interval=None)
    hello = await recv_json(ws)
    assert hello["op"] == 10
    ident = {"op": 2, "d": {"token": token, "guilds": {gid: position}}}
    await ws.send(orjson.dumps(ident).decode())
    ready = await recv_json(ws)
    assert ready["t"] == "READY", ready
    sub = await recv_json(ws)
    assert sub["t"] == "SUBSCRIBED" and sub["g"] == gid, sub
    return ws, sub["d"]


class ServeProcess:
    """``python -m guildcast.cli serve`` as a child process, ports learned from its output.

    stderr (the log) goes to ``log_path``; stdout is read for the
    ``guildcast: gateway on ...`` and ``guildcast: api on ...`` lines.
    """

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.api_url = ""
        self.stdout: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> ServeProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GUILDCAST_")}
        env["PYTHONUNBUFFERED"] = "1"
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "guildcast.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--api-port",
                "0",
                "--secret",
                SECRET,
                "--api-key",
                KEY,
                *self.args,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                cwd=ROOT,
                env=env,
            )
        finally:
            os.close(log)
        assert self.proc.stdout is not None
        async with asyncio.timeout(TIMEOUT):
            while not (self.url and self.api_url):
                line = (await self.proc.stdout.readline()).decode()
                assert line, f"serve exited early; log:\n{self.log()}"
                self.stdout.append(line)
                if m := re.match(r"guildcast: gateway on (\S+)", line):
                    self.url = m.group(1)
                elif m := re.match(r"guildcast: api on (\S+)", line):
                    self.api_url = m.group(1)
        self._reader = asyncio.create_task(self._drain_stdout())
        return self

    async def _drain_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.stdout.append(line.decode())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_json(self) -> list[dict[str, Any]]:
        """The log as JSON lines (start it with ``--log-format json``)."""
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                out.append(orjson.loads(line))
        return out

    async def kill(self) -> None:
        """SIGKILL: no drain, no flush; what is on disk is what the kernel has."""
        assert self.proc is not None
        self.proc.kill()
        await self.wait()

    async def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait()

    async def wait(self) -> int:
        assert self.proc is not None
        async with asyncio.timeout(TIMEOUT):
            rc = await self.proc.wait()
        if self._reader is not None:
            async with asyncio.timeout(TIMEOUT):
                await self._reader
        return rc

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()


@asynccontextmanager
async def serve_process(args: list[str], log_path: Path) -> AsyncIterator[ServeProcess]:
    p = ServeProcess(args, log_path)
    try:
        yield await p.start()
    finally:
        await p.close()
