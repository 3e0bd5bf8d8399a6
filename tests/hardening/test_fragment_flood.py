"""A million empty continuation frames before IDENTIFY, with no token (issue
"Hardening 2", item 4): websockets bounds a message's bytes, not its
fragments, so each empty one used to cost a list entry, unbounded. The
gateway now closes a message of more than ``MAX_FRAGMENTS`` frames with 1009
(PROTOCOL.md "Transport"); the node's RSS stays flat and other clients are
served throughout. Against a real ``guildcast serve`` process, so its RSS
is the server's alone."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from urllib.parse import urlparse

import psutil

from guildcast.core.tokens import make_token
from guildcast.transport.gateway import MAX_FRAGMENTS
from tests.integration.raw import RawWs
from tests.support.api import Api
from tests.support.gateway import recv as recv_json
from tests.support.gateway import subscribe
from tests.support.node import SECRET, serve_process

TOKEN = make_token(SECRET, "watcher", ["*"], [], None, 3600)
#: Empty fragments each attacking connection sends (6 bytes each on the wire).
FRAGMENTS = 1_000_000
#: Fragments per write.
CHUNK = 10_000
#: RSS the server may grow by over three attacks: far below the ~8 MiB of list
#: entries one attack used to cost, above allocator noise.
RSS_BOUND = 4 * 2**20


def empty_fragment() -> bytes:
    """A masked, empty, non-final continuation frame (mask key 0: allowed)."""
    return bytes((0x00, 0x80, 0, 0, 0, 0))


async def attack(port: int) -> tuple[int | None, int]:
    """One connection: handshake, a non-final text frame, then empty
    continuations until the server closes. Returns (close code, fragments sent)."""
    sock = await RawWs.open(port)
    assert await sock.handshake() == 101
    await sock.sendall(bytes((0x01, 0x81, 0, 0, 0, 0)) + b"{")  # TEXT, fin=0, "{"
    reader = asyncio.create_task(sock.read_until_close())
    chunk = empty_fragment() * CHUNK
    sent = 0

    async def flood() -> None:
        nonlocal sent
        while sent < FRAGMENTS:
            try:
                await sock.sendall(chunk)
            except (ConnectionError, TimeoutError):
                return  # the server closed the connection under us
            sent += CHUNK

    sender = asyncio.create_task(flood())
    try:
        async with asyncio.timeout(30):
            code, _ = await reader
    finally:
        for t in (reader, sender):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        sock.close()
    return code, sent


async def test_a_million_empty_fragments_close_1009_and_cost_no_memory(tmp_path: Path) -> None:
    async with serve_process([], tmp_path / "serve.log") as node:
        assert node.proc is not None
        port = urlparse(node.url).port
        assert port is not None
        server = psutil.Process(node.proc.pid)
        good, _ = await subscribe(node.url, TOKEN, "calm")
        try:
            # A first attack warms the allocator and the code paths up.
            code, sent = await attack(port)
            assert code == 1009, code
            rss0 = server.memory_info().rss
            for _ in range(3):
                code, sent = await attack(port)
                assert code == 1009, code
                # closed at the bound, not after the whole flood was read
                assert sent < FRAGMENTS, sent
            grown = server.memory_info().rss - rss0
            print(f"sent {sent} fragments, rss grew by {grown / 2**20:.2f} MiB")
            assert grown < RSS_BOUND, f"RSS grew by {grown / 2**20:.1f} MiB"
            # the other client is served all along
            async with Api(node.api_url) as api:
                status, body, _ = await api.publish({"guild": "calm", "t": "N", "d": 1})
            assert status == 200
            msg = await recv_json(good)
            assert (msg["g"], msg["s"], msg["d"]) == ("calm", body["s"], 1)
        finally:
            await good.close()
    assert MAX_FRAGMENTS * 6 < FRAGMENTS * 6 // 100  # the bound is far below the flood
