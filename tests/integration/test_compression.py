"""permessage-deflate with real clients (docs/PROTOCOL.md "Compression").

Each client negotiates the extension with a real node, subscribes, and
decodes a realistic mix of events (heartbeat-sized ones, chat messages of a
few hundred bytes, a 4 KiB dashboard snapshot, a replay, its own ACKs): what
it reads must be exactly what an uncompressed client of the same guild reads,
byte for byte, and the node must have sent it compressed frames. Clients:
websockets (ours, and a plain one), aiohttp, Node's ``ws``, a raw client
offering bare ``permessage-deflate`` (context takeover both ways) that decodes
with one inflater kept across messages, and clients we cannot share frames
with (a smaller server window), which get a working uncompressed connection.
Frames many sessions share besides events (a passive guild's notice, a
presence snapshot, a drain's RECONNECT) are compressed once per node.
Chromium is in tests/browser/test_compression.py.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from guildcast import Server
from guildcast.client import Client
from guildcast.protocol.client import Event
from guildcast.protocol.deflate import RSV1
from guildcast.protocol.frames import OP_TEXT, client_frame, scan_frames
from tests.integration.test_metrics import scrape, value
from tests.support.api import Api
from tests.support.gateway import DISPATCH, identify, open_ws, recv, send, session
from tests.support.node import api_server, node
from tests.support.wait import TIMEOUT, output

ROOT = Path(__file__).resolve().parents[2]
JS_DIR = ROOT / "clients" / "js"
NODE = shutil.which("node")
NODE_WS = JS_DIR / "node_modules" / "ws" / "package.json"
GID = "zlib"


def chat(i: int) -> dict[str, Any]:
    """A chat message of a few hundred bytes of JSON."""
    rnd = random.Random(i)
    words = "ok so the deploy went fine but the cache is cold again, see the graph".split()
    return {
        "id": f"{rnd.getrandbits(60)}",
        "channel": "general",
        "author": {"id": "u-1029", "name": "alice", "avatar": "a1b2c3d4e5f6"},
        "text": " ".join(rnd.choice(words) for _ in range(rnd.randint(5, 40))),
        "ts": "2026-12-02T01:02:03.456Z",
        "mentions": [],
    }


def dashboard(i: int) -> dict[str, Any]:
    """A dashboard snapshot of about 4 KiB of JSON."""
    rnd = random.Random(i)
    return {
        "ts": 1764636000 + i,
        "services": [
            {
                "name": f"svc-{k}",
                "status": rnd.choice(["ok", "ok", "degraded"]),
                "p50_ms": round(rnd.uniform(1, 30), 2),
                "p99_ms": round(rnd.uniform(30, 400), 2),
                "rps": rnd.randint(10, 5000),
                "region": rnd.choice(["eu-west-1", "us-east-1"]),
            }
            for k in range(34)
        ],
    }


MIX: list[tuple[str, Any]] = [
    ("TICK", 1),
    *[("MESSAGE_CREATE", chat(i)) for i in range(6)],
    ("DASHBOARD", dashboard(0)),
    ("TICK", 2),
    ("DASHBOARD", dashboard(1)),
]


async def publish_mix(server: Server) -> None:
    for t, d in MIX:
        await server.publish(GID, t, d)


async def dispatches(ws: ClientConnection, n: int) -> list[str]:
    """The next ``n`` DISPATCH texts (exact strings, as the client decoded them)."""
    out: list[str] = []
    async with asyncio.timeout(TIMEOUT):
        while len(out) < n:
            raw = await ws.recv()
            assert isinstance(raw, str)
            if orjson.loads(raw)["op"] == DISPATCH:
                out.append(raw)
    return out


@asynccontextmanager
async def reference(server: Server) -> AsyncIterator[ClientConnection]:
    """An uncompressed subscriber of the guild: what every client must read."""
    ws, _ = await session(server.url, server.token("ref"), {GID: None})
    try:
        yield ws
    finally:
        await ws.close()


def deflate_connections(server: Server) -> int:
    return sum(1 for c in server.gateway.connections if c.deflate is not None)


async def check(
    server: Server, client: Callable[[asyncio.Event], Awaitable[list[str]]]
) -> list[str]:
    """Run ``client`` (it sets the event once subscribed, then returns the
    DISPATCH texts it decoded) beside a reference subscriber; the events are
    published once both are in. Returns what the client read."""
    async with reference(server) as ref:
        ready = asyncio.Event()
        task = asyncio.create_task(client(ready))
        async with asyncio.timeout(TIMEOUT):
            await ready.wait()
        before = server.stats_counters.deliveries_compressed
        await publish_mix(server)
        expected = await dispatches(ref, len(MIX))
        got = await asyncio.wait_for(task, TIMEOUT)
    assert got == expected
    return got if server.stats_counters.deliveries_compressed > before else []


async def test_websockets_client_negotiates_and_decodes(server: Server) -> None:
    async def client(ready: asyncio.Event) -> list[str]:
        ws, _ = await session(server.url, server.token("ws"), {GID: None}, compression="deflate")
        try:
            ext = ws.response.headers["Sec-WebSocket-Extensions"]
            assert "server_no_context_takeover" in ext and "client_no_context_takeover" in ext
            assert "client_max_window_bits=12" in ext
            assert deflate_connections(server) == 1
            ready.set()
            return await dispatches(ws, len(MIX))
        finally:
            await ws.close()

    assert await check(server, client)


async def test_compressed_replay_and_answers(server: Server) -> None:
    """A recovering session's replay and its own ACKs follow the same rule:
    it reads what an uncompressed one reads."""
    tok = server.token("p", pub=["*"])
    await publish_mix(server)
    seen: dict[str, list[str]] = {}
    for mode in (None, "deflate"):
        ws = await open_ws(server.url, compression=mode)
        await identify(ws, tok, {GID: {"epoch": (await server.head(GID))[0], "s": 0}})
        sub = await recv(ws)
        assert sub["t"] == "SUBSCRIBED" and sub["d"]["recovered"], sub
        texts = await dispatches(ws, len(MIX))
        await send(ws, 5, {"guild": "elsewhere", "t": "BIG", "d": chat(99), "nonce": "n1"})
        ack = await recv(ws)
        assert ack["op"] == 12
        texts.append(ack["d"]["g"])
        seen[str(mode)] = texts
        await ws.close()
    assert seen["deflate"] == seen["None"]


async def test_aiohttp_client_negotiates_and_decodes(server: Server) -> None:
    async def client(ready: asyncio.Event) -> list[str]:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(server.url, compress=15) as ws,
        ):
            assert ws.compress == 12  # our client_max_window_bits, so it compresses
            assert ws.client_notakeover
            assert (await ws.receive_json())["op"] == 10
            await ws.send_json(
                {"op": 2, "d": {"token": server.token("aio"), "guilds": {GID: None}}}
            )
            assert (await ws.receive_json())["t"] == "READY"
            assert (await ws.receive_json())["t"] == "SUBSCRIBED"
            ready.set()
            out: list[str] = []
            while len(out) < len(MIX):
                out.append(await ws.receive_str())
            return out

    assert await check(server, client)


async def test_our_python_client_accepts_compression(server: Server) -> None:
    async with Client(server.url, server.token("py", guilds=["*"])) as c:
        await c.subscribe(GID)
        assert deflate_connections(server) == 1
        await publish_mix(server)
        got = []
        async with asyncio.timeout(TIMEOUT):
            async for ev in c.events():
                assert isinstance(ev, Event), ev
                got.append((ev.name, ev.data))
                if len(got) == len(MIX):
                    break
    assert got == MIX


#: Connects with Node's ws (perMessageDeflate is on by default), subscribes,
#: prints "ready", then the negotiated extensions and the DISPATCH texts.
NODE_SCRIPT = r"""
const { createRequire } = require("node:module");
const WebSocket = createRequire(process.argv[2])("ws");
const [url, token, gid, n] = [process.argv[3], process.argv[4], process.argv[5], +process.argv[6]];
const ws = new WebSocket(url);
const out = [];
ws.on("message", (data) => {
  const text = String(data);
  const m = JSON.parse(text);
  if (m.op === 10) ws.send(JSON.stringify({ op: 2, d: { token, guilds: { [gid]: null } } }));
  else if (m.t === "SUBSCRIBED") console.log("ready");
  else if (m.op === 0 && m.t !== "READY") {
    out.push(text);
    if (out.length === n) {
      console.log(JSON.stringify({ extensions: Object.keys(ws._extensions), out }));
      ws.close();
    }
  }
});
ws.on("error", (err) => { console.log(JSON.stringify({ error: String(err) })); process.exit(1); });
"""


@pytest.mark.skipif(NODE is None, reason="node is not installed")
@pytest.mark.skipif(
    not NODE_WS.exists(), reason="Node's ws is not installed: npm ci --prefix clients/js"
)
async def test_node_ws_negotiates_and_decodes(server: Server, tmp_path: Path) -> None:
    assert NODE is not None
    script = tmp_path / "ws_deflate.cjs"
    script.write_text(NODE_SCRIPT)

    async def client(ready: asyncio.Event) -> list[str]:
        assert NODE is not None
        proc = await asyncio.create_subprocess_exec(
            NODE,
            str(script),
            str(JS_DIR / "package.json"),
            server.url,
            server.token("node"),
            GID,
            str(len(MIX)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert proc.stdout is not None
        async with asyncio.timeout(TIMEOUT):
            line = await proc.stdout.readline()
        assert line.strip() == b"ready", line
        assert deflate_connections(server) == 1
        ready.set()
        text = await output(proc, 60)
        assert proc.returncode == 0, text
        result = json.loads(text.strip().splitlines()[-1])
        assert result["extensions"] == ["permessage-deflate"], result
        out: list[str] = result["out"]
        return out

    assert await check(server, client)


async def raw_client(server: Server, offer: str, ready: asyncio.Event) -> tuple[str, list[str]]:
    """A hand-written client offering ``offer``; it decodes compressed
    messages with ONE inflater kept across messages (context takeover, as
    it offered). Returns the extensions answer and the DISPATCH texts."""
    host, port = "127.0.0.1", server.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        (
            f"GET /gateway HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: {offer}\r\n\r\n"
        ).encode()
    )
    async with asyncio.timeout(TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    answer = ""
    for line in head.decode().split("\r\n"):
        if line.lower().startswith("sec-websocket-extensions:"):
            answer = line.split(":", 1)[1].strip()
    inflater = zlib.decompressobj(-15)
    buf = b""

    async def frames() -> AsyncIterator[str]:
        nonlocal buf
        while True:
            spans, used, err = scan_frames(buf)
            assert err is None
            for b0, p, q in spans:
                assert b0 & 0x0F == OP_TEXT and b0 & 0x80
                body = buf[p:q]
                if b0 & RSV1:
                    body = inflater.decompress(body + b"\x00\x00\xff\xff")
                yield body.decode()
            buf = buf[used:]
            async with asyncio.timeout(TIMEOUT):
                data = await reader.read(65536)
            assert data, "server closed"
            buf += data

    it = frames()
    assert json.loads(await anext(it))["op"] == 10
    ident = {"op": 2, "d": {"token": server.token("raw"), "guilds": {GID: None}}}
    writer.write(client_frame(OP_TEXT, orjson.dumps(ident)))
    assert json.loads(await anext(it))["t"] == "READY"
    assert json.loads(await anext(it))["t"] == "SUBSCRIBED"
    ready.set()
    out = [await anext(it) for _ in MIX]
    writer.close()
    return answer, out


async def test_client_offering_context_takeover_gets_shared_frames(server: Server) -> None:
    """Bare ``permessage-deflate`` asks for context takeover both ways; RFC
    7692 lets the server answer ``server_no_context_takeover`` to any offer,
    so this client is served the shared compressed frames, and decoding them
    with a context kept across messages reads them exactly."""
    answer = ""

    async def client(ready: asyncio.Event) -> list[str]:
        nonlocal answer
        answer, out = await raw_client(server, "permessage-deflate", ready)
        return out

    assert await check(server, client)
    assert answer == "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


async def test_client_insisting_on_a_small_window_gets_uncompressed(server: Server) -> None:
    """A smaller server window than the shared frames' is something we cannot
    share: the offer is declined and the connection works uncompressed."""
    for offer in ("permessage-deflate; server_max_window_bits=10", "permessage-deflate; x=1"):
        answer = "?"

        async def client(ready: asyncio.Event, offer: str = offer) -> list[str]:
            nonlocal answer
            answer, out = await raw_client(server, offer, ready)
            return out

        assert await check(server, client) == []  # nothing compressed
        assert answer == ""
    # websockets' client with such a factory connects, uncompressed.
    small = ClientPerMessageDeflateFactory(server_max_window_bits=10)
    ws, _ = await session(server.url, server.token("w10"), {GID: None}, extensions=[small])
    assert "Sec-WebSocket-Extensions" not in ws.response.headers
    assert deflate_connections(server) == 0
    await ws.close()


async def test_compression_off_declines_every_offer() -> None:
    async with node(compression="off") as srv:
        ws, _ = await session(srv.url, srv.token("off"), {GID: None}, compression="deflate")
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        await srv.publish(GID, "DASHBOARD", dashboard(3))
        assert orjson.loads((await dispatches(ws, 1))[0])["d"] == dashboard(3)
        assert srv.gateway.deflater is None
        assert srv.stats_counters.deliveries_compressed == 0
        await ws.close()


async def test_metrics_count_compression_once_per_event() -> None:
    """Two deflate sessions and one plain: each big event is compressed once
    (not once per recipient), and /metrics reports the bytes before and after
    and the compressed share of deliveries."""
    async with api_server() as srv, Api(srv.api_url) as api:
        socks = []
        for mode in ("deflate", "deflate", None):
            ws, _ = await session(srv.url, srv.token("m"), {GID: None}, compression=mode)
            socks.append(ws)
        m0, _ = await scrape(api)
        assert value(m0, "guildcast_connections_deflate") == 2
        await publish_mix(srv)
        for ws in socks:
            await dispatches(ws, len(MIX))
        m1, _ = await scrape(api)
        big = sum(1 for t, _ in MIX if t != "TICK")

        def moved(name: str) -> float:
            return value(m1, name) - value(m0, name)

        assert moved("guildcast_compressed_messages_total") == big
        assert moved("guildcast_deliveries_compressed_total") == 2 * big
        assert moved("guildcast_deliveries_total") == 3 * len(MIX)
        zin, zout = (
            moved("guildcast_compress_input_bytes_total"),
            moved("guildcast_compress_output_bytes_total"),
        )
        assert 0 < zout < zin
        wrote, plain = (
            moved("guildcast_bytes_written_total"),
            moved("guildcast_bytes_written_uncompressed_total"),
        )
        # Two of three sessions saved what the compressor saved, less frame headers.
        assert plain - wrote >= 2 * (zin - zout) - 2 * 8 * big
        assert wrote < plain
        for ws in socks:
            await ws.close()


async def test_notices_snapshots_and_drain_reconnects_compressed_once_per_node() -> None:
    """Frames many sessions get besides events follow the rule too: a tick's
    GUILD_ACTIVITY notice of a guild, a presence snapshot served to every
    subscriber between two changes, a drain's RECONNECT are each compressed
    once for all the deflate sessions, which decode what a plain one reads."""
    async with node(compression_threshold=16, passive_interval=0.05) as srv:
        z = srv.gateway.deflater
        assert z is not None
        tok = srv.token("n")
        epoch = (await srv.head("quiet-" * 8))[0]
        gid = "quiet-" * 8  # a compressible notice (the gid is in it twice over)
        passive: list[ClientConnection] = []
        for mode in ("deflate", "deflate", "deflate", None):
            ws, subs = await session(srv.url, tok, {gid: {"passive": True}}, compression=mode)
            assert subs[gid]["passive"] is True
            passive.append(ws)
        before = z.compressed
        await srv.publish(gid, "E", {"text": "hello"})
        raws = [(await dispatches(w, 1))[0] for w in passive]
        notes = [orjson.loads(m) for m in raws]
        assert len(set(raws)) == 1, "every session decodes the same notice text"
        assert notes[0]["t"] == "GUILD_ACTIVITY", notes
        assert notes[0]["d"] == {"s": 1, "epoch": epoch}
        assert z.compressed - before == 1  # one notice, one compression
        # Presence: three deflate sessions and a plain one, all members, then
        # each subscribes again with presence: one snapshot, compressed once.
        pres: list[ClientConnection] = []
        for mode in ("deflate", "deflate", "deflate", None):
            ws = await open_ws(srv.url, compression=mode)
            assert (await recv(ws))["op"] == 10
            await send(ws, 2, {"token": tok, "guilds": {}, "presence": True})
            assert (await recv(ws))["t"] == "READY"
            pres.append(ws)

        async def snapshot(ws: ClientConnection) -> str:
            await send(ws, 3, {"guilds": {"room": None}})
            async with asyncio.timeout(TIMEOUT):
                while True:
                    raw = await ws.recv()
                    assert isinstance(raw, str)
                    if orjson.loads(raw).get("t") == "PRESENCE_SNAPSHOT":
                        return raw

        for ws in pres:
            await snapshot(ws)  # each is a member now, its join fanned out
        # Settle: one more change, seen by every presence session, so none
        # is pending when the snapshots below are served.
        probe, _ = await session(srv.url, tok, {"room": None})
        for ws in pres:
            async with asyncio.timeout(TIMEOUT):
                while orjson.loads(await ws.recv()).get("t") != "PRESENCE_JOIN":
                    pass
        before = z.compressed
        snaps = [await snapshot(ws) for ws in pres]
        assert len(set(snaps)) == 1, "every session decodes the same snapshot text"
        assert len(orjson.loads(snaps[0])["d"]["members"]) == len(pres) + 1  # and the probe
        # One snapshot plus each deflate session's own SUBSCRIBED.
        assert z.compressed - before == 1 + 3
        # A drain's RECONNECT (17 bytes of payload, past this threshold): the
        # same frame for every session (these offer no subprotocol: 1.0),
        # compressed once, and read as the plain session reads it.
        before = z.compressed
        await srv.gateway.drain(TIMEOUT)
        assert z.compressed - before == 1
        for ws in [pres[0], pres[-1]]:
            async with asyncio.timeout(TIMEOUT):
                while (raw := await ws.recv()) and orjson.loads(raw)["op"] != 7:
                    pass
            assert raw == '{"op":7,"d":null}'
        for ws in [*passive, *pres, probe]:
            await ws.close()
