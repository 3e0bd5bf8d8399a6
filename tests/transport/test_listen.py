"""The gateway's listening sockets (server/transport/listen.py): on Linux a
node listens with LISTEN_SOCKETS sockets on its one port, each with its own
accept queue, and serves connections arriving through every one of them; a
lone node still refuses a port that is taken, by another process or by a
node already listening there."""

from __future__ import annotations

import asyncio
import errno
import sys

import psutil
import pytest

from guildcast import Config, Server
from guildcast.transport.listen import LISTEN_SOCKETS
from tests.support import gateway as gw
from tests.support.node import SECRET, node

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT spreads on Linux")

#: Connections opened at once: enough that the kernel's hash sends some
#: through each listening socket (a socket the loop did not serve would
#: leave about a quarter of them without their HELLO).
CONNECTIONS = 200


def _listening(port: int) -> int:
    return sum(
        1
        for c in psutil.Process().net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
    )


@linux_only
async def test_a_node_listens_with_several_sockets_and_serves_them_all() -> None:
    async with node() as srv:
        assert srv.port is not None
        assert _listening(srv.port) == LISTEN_SOCKETS
        socks = await asyncio.gather(*(gw.open_ws(srv.url) for _ in range(CONNECTIONS)))
        try:
            hellos = await asyncio.gather(*(gw.recv(ws) for ws in socks))
            assert all(h["op"] == 10 for h in hellos)
        finally:
            await asyncio.gather(*(ws.close() for ws in socks))


async def test_a_second_lone_node_on_the_same_port_is_refused() -> None:
    async with node() as first:
        second = Server(Config(host="127.0.0.1", port=first.port, secret=SECRET))
        with pytest.raises(OSError) as exc:
            await second.start()
        assert exc.value.errno == errno.EADDRINUSE
        assert str(first.port) in str(exc.value)
        # The first one still serves.
        ws, _ = await gw.session(first.url, first.token("u", guilds=["*"]))
        await ws.close()


async def test_a_stopped_node_frees_every_socket_of_its_port() -> None:
    async with node() as srv:
        port = srv.port
        assert port is not None
    assert _listening(port) == 0
    again = Server(Config(host="127.0.0.1", port=port, secret=SECRET))
    await again.start()
    try:
        ws, _ = await gw.session(again.url, again.token("u", guilds=["*"]))
        await ws.close()
    finally:
        await again.stop()


@linux_only
async def test_listen_sockets_sets_how_many_and_one_still_claims_its_port() -> None:
    """``listen_sockets`` (``--listen-sockets``): the node listens with that
    many sockets and serves through them; with one, a second lone node on the
    port is still refused; less than one is refused at construction."""
    for n in (1, 2):
        async with node(listen_sockets=n) as srv:
            assert srv.port is not None
            assert _listening(srv.port) == n
            socks = await asyncio.gather(*(gw.open_ws(srv.url) for _ in range(CONNECTIONS // 4)))
            try:
                hellos = await asyncio.gather(*(gw.recv(ws) for ws in socks))
                assert all(h["op"] == 10 for h in hellos)
            finally:
                await asyncio.gather(*(ws.close() for ws in socks))
            if n == 1:
                second = Server(Config(host="127.0.0.1", port=srv.port, secret=SECRET))
                with pytest.raises(OSError) as exc:
                    await second.start()
                assert exc.value.errno == errno.EADDRINUSE
    with pytest.raises(ValueError, match="listen_sockets"):
        Server(Config(listen_sockets=0))
