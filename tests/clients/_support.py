"""Helpers for the client tests: a server that can be restarted on the same
port, and a tiny HTTP control endpoint so out-of-process tests (Node) can ask
the test's server to publish, disconnect everyone or restart."""

from __future__ import annotations

import asyncio
import contextlib
import io
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import orjson

from guildcast import Config, Server
from guildcast.cli import build_parser

SECRET = "client-tests-secret-0123456789abcdef0123"
#: Polling step of :func:`until` (seconds).
_STEP = 0.01


async def until(pred: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait until ``pred()`` holds: a bounded poll (at least ``timeout`` s)."""
    for _ in range(int(timeout / _STEP)):
        if pred():
            return
        await asyncio.sleep(_STEP)
    if not pred():
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def serve_accepts(*args: str) -> bool:
    """True if ``guildcast serve`` accepts these arguments (for flags that
    other work may not have landed yet)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(["serve", *args])
    except SystemExit:
        return False
    return True


class Restartable:
    """An embedded server that :meth:`restart` stops (drain: RECONNECT + 1001)
    and starts again on the same port with the same secret."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.srv = Server(config)

    async def start(self) -> None:
        await self.srv.start()
        # Later incarnations listen on the port the first one got.
        self.config = replace(self.config, port=self.srv.port)

    async def restart(self) -> None:
        await self.srv.stop()
        self.srv = Server(self.config)
        await self.srv.start()

    async def stop(self) -> None:
        await self.srv.stop()

    @property
    def url(self) -> str:
        return self.srv.url


@contextlib.asynccontextmanager
async def restartable(**overrides: Any) -> AsyncIterator[Restartable]:
    cfg = Config(host="127.0.0.1", port=0, secret=SECRET, **overrides)
    r = Restartable(cfg)
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@contextlib.asynccontextmanager
async def control_endpoint(r: Restartable) -> AsyncIterator[str]:
    """Serve ``GET /publish?guild=G&from=A&to=B`` (publishes events ``N`` with
    data A..B), ``GET /disconnect?code=C`` and ``GET /restart`` on loopback;
    yields the base URL. One request per connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode()
            url = urllib.parse.urlsplit(target)
            q = dict(urllib.parse.parse_qsl(url.query))
            status, body = 200, b""
            if url.path == "/publish":
                ss = [
                    await r.srv.publish(q["guild"], "N", n)
                    for n in range(int(q["from"]), int(q["to"]) + 1)
                ]
                body = orjson.dumps({"s": ss})
            elif url.path == "/disconnect":
                body = orjson.dumps({"closed": r.srv.disconnect_all(int(q["code"]), "test")})
            elif url.path == "/restart":
                await r.restart()
                body = orjson.dumps({"port": r.srv.port})
            else:
                status, body = 404, b'{"error": "unknown path"}'
            writer.write(
                b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (status, len(body), body)
            )
            await writer.drain()
        finally:
            writer.close()

    ctl = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = ctl.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        ctl.close()
        await ctl.wait_closed()
