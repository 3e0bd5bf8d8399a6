"""A drain closes an identified session once its client's kernel has
acknowledged RECONNECT and the close frame, without waiting for the client's
close frame (server/transport/drain.py); ``delivered`` says when that is."""

from __future__ import annotations

import asyncio
import socket

from guildcast.transport.drain import delivered
from tests.support.gateway import RECONNECT, expect_close, recv, subscribe
from tests.support.node import node
from tests.support.wait import TIMEOUT, until

#: Far longer than any test waits: a drain that waited for the client's
#: close frame would still be waiting when the test gives up.
LONG_DRAIN = 600.0


async def test_drain_does_not_wait_for_an_identified_clients_close_frame() -> None:
    async with node(drain_timeout=LONG_DRAIN, close_timeout=LONG_DRAIN) as srv:
        ws, _ = await subscribe(srv.url, srv.token("u"), "g")
        ws.transport.pause_reading()  # it never answers the close frame now
        async with asyncio.timeout(TIMEOUT):
            await srv.stop()
        assert not srv.gateway.connections
        ws.transport.resume_reading()
        # Everything the drain wrote was there: RECONNECT, then close 1001.
        msg = await recv(ws)
        assert msg["op"] == RECONNECT, msg
        await expect_close(ws, 1001)


async def test_delivered_waits_for_the_peers_acknowledgement() -> None:
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue(maxsize=1)

    async def take(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put(w)

    server = await asyncio.start_server(take, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        peer = socket.socket()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.setblocking(False)
        await asyncio.get_running_loop().sock_connect(peer, ("127.0.0.1", port))
        try:
            async with asyncio.timeout(TIMEOUT):
                writer = await accepted.get()
            t = writer.transport
            assert delivered(t)  # nothing written yet
            # More than the peer's window and our buffers hold: the peer does
            # not read, so some is unsent or unacknowledged.
            writer.write(b"x" * (16 << 20))
            assert not delivered(t)
            got = 0
            loop = asyncio.get_running_loop()
            while got < 16 << 20:
                async with asyncio.timeout(TIMEOUT):
                    got += len(await loop.sock_recv(peer, 1 << 20))
            await until(lambda: delivered(t), "the peer to acknowledge every byte")
            writer.close()
        finally:
            peer.close()
