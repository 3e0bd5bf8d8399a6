"""The demo page and guildcast.js are served from the gateway's own port
(server/transport/static.py), and ``guildcast serve`` prints the demo URL.

There is one guildcast.js: the package data file
``server/transport/static/guildcast.js``; ``clients/js/guildcast.js`` is a
relative symlink to it."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

from guildcast import Server
from guildcast.client import Client
from tests.support.node import serve_process
from tests.support.wait import until

ROOT = Path(__file__).resolve().parents[2]
#: The one browser client: package data, served at /guildcast.js.
SERVED_JS = ROOT / "server" / "transport" / "static" / "guildcast.js"
#: Where the JS tests and the docs find it: a symlink to SERVED_JS.
CLIENT_JS = ROOT / "clients" / "js" / "guildcast.js"


async def http_get(port: int, path: str, headers: str = "") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode())
        async with asyncio.timeout(20):
            raw = await reader.read()  # the server closes after one response
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, hdrs, body


async def test_page_and_script_are_served(server: Server) -> None:
    source = SERVED_JS.read_bytes()
    status, hdrs, body = await http_get(server.port, "/guildcast.js")
    assert status == 200 and hdrs["content-type"].startswith("text/javascript")
    assert body == source  # the package data file, byte for byte
    assert body == CLIENT_JS.read_bytes()  # which is what clients/js/ imports
    assert int(hdrs["content-length"]) == len(source)
    for path in ("/", "/demo", "/?x=1"):
        status, hdrs, body = await http_get(server.port, path)
        assert status == 200 and hdrs["content-type"].startswith("text/html")
        assert b'import { GuildcastClient } from "/guildcast.js"' in body
    status, _, _ = await http_get(server.port, "/nope")
    assert status == 404
    # An upgrade request for a page path is not a page request.
    status, _, _ = await http_get(server.port, "/", "Upgrade: websocket\r\nConnection: Upgrade\r\n")
    assert status == 404
    # The gateway still works for WebSocket clients; nothing leaked.
    async with Client(server.url, server.token("x")) as c:
        assert c.connected
    assert len(server.gateway.pending) == 0


def test_client_js_is_a_link_to_the_served_file() -> None:
    # One file, not two copies that can drift: clients/js/guildcast.js is a
    # relative symlink (so it survives a clone anywhere) to the package data.
    assert SERVED_JS.is_file() and not SERVED_JS.is_symlink()
    assert CLIENT_JS.is_symlink(), "clients/js/guildcast.js must be a symlink, not a copy"
    target = os.readlink(CLIENT_JS)
    assert not os.path.isabs(target), target
    assert CLIENT_JS.resolve() == SERVED_JS.resolve()


async def test_serve_prints_a_working_demo_url(tmp_path: Path) -> None:
    demo = re.compile(r"live demo board: http://127\.0\.0\.1:(\d+)/#token=([^&\s]+)&guild=demo")
    # No secret given: serve generates one and prints the demo token and URL.
    async with serve_process(["--no-uvloop"], tmp_path / "serve.log", api=False, secret=None) as p:

        def printed() -> re.Match[str] | None:
            return next((m for line in p.stdout if (m := demo.search(line))), None)

        await until(lambda: printed() is not None, "the demo URL")
        m = printed()
        assert m is not None
        port, token = int(m.group(1)), m.group(2)
        status, _, body = await http_get(port, "/")
        assert status == 200 and b"Guildcast board" in body
        async with Client(f"ws://127.0.0.1:{port}/gateway", token) as c:
            assert c.user == "demo"
            assert await c.publish("demo", "CARD_ADDED", {"text": "hi"}) == 1
        assert await p.terminate() == 0
