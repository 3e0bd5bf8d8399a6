"""The gateway's listening sockets (docs/OPERATIONS.md "Deploying without a
reconnect storm").

Owns how the gateway listens: on Linux, ``listen_sockets`` (default
``LISTEN_SOCKETS``) sockets bound to
the one port with ``SO_REUSEPORT``, each asking for a backlog of
``LISTEN_BACKLOG``. The kernel keeps an accept queue per listening socket,
capped at ``net.core.somaxconn`` (4,096 by default), and spreads incoming
connections over the sockets of the port by a hash of their addresses; so
the node has ``LISTEN_SOCKETS`` times the queue room a single socket gets,
without a sysctl. That room is what a reconnect storm needs: while the node
is busy with the first arrivals (handshakes, IDENTIFYs, replays) between two
polls of its sockets, the next ones wait in those queues; once a queue is
full the kernel drops connection attempts, and each drop costs its client
seconds of TCP retransmission (SYN 1, 3, 7, 15 s after the first), not one
round trip.

A lone node must still refuse a port another process holds (or a second
node started on it by mistake: with ``SO_REUSEPORT`` both would share it
silently), so unless the caller shares the port on purpose (``--workers``)
the port is first claimed with a plain bind, which fails with EADDRINUSE as
before if anything is bound there, then released and bound by the node's
own sockets at once.

Consistency model: called once per gateway start from its event loop; the
servers returned are owned (closed) by the gateway.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Callable

__all__ = ["LISTEN_BACKLOG", "LISTEN_SOCKETS", "listen"]

#: The backlog asked for: the kernel caps it at ``net.core.somaxconn``, so
#: this asks for the most any setting allows and an operator who raises the
#: sysctl gets it without a flag.
LISTEN_BACKLOG = 65_535
#: Listening sockets per node on Linux. Four accept queues of 4,096
#: (16,384) held the 15,193 connections found queued at once when a
#: rolling restart moved 19,000 sessions onto one worker, where one queue
#: dropped 201,433 attempts (docs/OPERATIONS.md has the storm figures);
#: each costs one descriptor and one poll registration, nothing per
#: connection.
LISTEN_SOCKETS = 4


def _shares_ports() -> bool:
    """Linux spreads connections over a port's SO_REUSEPORT sockets (other
    systems hand them all to one, which gains nothing)."""
    return sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def _claim(host: str, port: int) -> int:
    """Bind ``host:port`` plainly and let go: raises OSError (EADDRINUSE) if
    anything holds it; returns the port (the one picked for port 0)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As asyncio binds its own: a port left in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(addr)
        except OSError as e:  # worded as asyncio's own bind failure
            why = (e.strerror or str(e)).lower()
            raise OSError(
                e.errno, f"error while attempting to bind on address {addr!r}: {why}"
            ) from None
        return int(probe.getsockname()[1])


async def listen(
    factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    shared: bool,
    sockets: int = LISTEN_SOCKETS,
) -> list[asyncio.Server]:
    """Listen on ``host:port`` (0: a free port) with ``sockets`` listening
    sockets (``Config.listen_sockets``; one where the system does not
    spread a port's connections); ``shared``: other processes listen on it
    too (``--workers``), so it is not claimed first. Returns the servers,
    the first one's first socket bound to the port."""
    if sockets < 1:
        raise ValueError("listen_sockets must be 1 or more")
    loop = asyncio.get_running_loop()
    if not _shares_ports() or (sockets == 1 and not shared):
        srv = await loop.create_server(
            factory, host, port, reuse_port=shared or None, backlog=LISTEN_BACKLOG
        )
        return [srv]
    if not shared:
        port = _claim(host, port)
    servers: list[asyncio.Server] = []
    try:
        for _ in range(sockets):
            srv = await loop.create_server(
                factory, host, port, reuse_port=True, backlog=LISTEN_BACKLOG
            )
            servers.append(srv)
            port = int(srv.sockets[0].getsockname()[1])
    except BaseException:
        for srv in servers:
            srv.close()
        raise
    return servers
