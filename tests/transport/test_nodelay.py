"""Every accepted connection has Nagle's algorithm off (TCP_NODELAY), on
uvloop and on the stock asyncio loop: the gateway relies on the event loop
setting it rather than a ``setsockopt`` per connection, so a small frame
(a heartbeat ACK, one event) leaves at once instead of waiting for an ACK."""

from __future__ import annotations

import socket

from tests.support import gateway as gw
from tests.support.node import node


async def test_accepted_sockets_have_nodelay() -> None:
    async with node() as srv:
        ws, _ = await gw.session(srv.url, srv.token("user", guilds=["*"]))
        try:
            # The handshake and IDENTIFY are done: the server holds the connection.
            (conn,) = srv.gateway.connections
            sock = conn._transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            await ws.close()
