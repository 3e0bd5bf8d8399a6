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

Each socket is read by an :class:`~guildcast.transport.acceptor.Acceptor`
(acceptor.py), which accepts greedily: the loop's own server takes one
connection per socket per loop turn, too few on a node busy with live
traffic.

Consistency model: called once per gateway start from its event loop; the
acceptors returned are owned (closed) by the gateway.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Callable
from typing import Any

from guildcast.transport.acceptor import Acceptor

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
        _bind_one(probe, addr)
        return int(probe.getsockname()[1])


def _bind_one(sock: socket.socket, addr: tuple[Any, ...]) -> None:
    """``sock.bind(addr)``, a failure worded as asyncio's own bind failure."""
    try:
        sock.bind(addr)
    except OSError as e:
        why = (e.strerror or str(e)).lower()
        raise OSError(
            e.errno, f"error while attempting to bind on address {addr!r}: {why}"
        ) from None


def _bind(host: str, port: int, reuse_port: bool) -> list[socket.socket]:
    """Listening sockets on every address of ``host`` (as the loop's own
    ``create_server`` binds them), all on one port: the first one's if
    ``port`` is 0."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    missing: OSError | None = None
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr[0]) in seen:
                continue
            seen.add((family, addr[0]))
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as e:
                # A family this kernel lacks (IPv6 disabled): skip it, as
                # asyncio's create_server does, if another address binds.
                missing = missing or e
                continue
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # One socket per family, as asyncio does: no dual-stack surprise.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            _bind_one(sock, (addr[0], port, *addr[2:]))
            port = int(sock.getsockname()[1])
            sock.listen(LISTEN_BACKLOG)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if not socks and missing is not None:
        raise missing
    return socks


def listen(
    factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    shared: bool,
    sockets: int = LISTEN_SOCKETS,
    on_exhausted: Callable[[int], None] | None = None,
) -> list[Acceptor]:
    """Listen on ``host:port`` (0: a free port) with ``sockets`` listening
    sockets (``Config.listen_sockets``; one where the system does not
    spread a port's connections); ``shared``: other processes listen on it
    too (``--workers``), so it is not claimed first. Each socket is read by
    an :class:`~guildcast.transport.acceptor.Acceptor` (``on_exhausted``:
    called when a connection could not be accepted for want of a
    descriptor). Returns the acceptors, the first one's socket bound to the
    port. Called from the running event loop."""
    if sockets < 1:
        raise ValueError("listen_sockets must be 1 or more")
    if not _shares_ports():
        sockets = 1
    socks: list[socket.socket] = []
    try:
        if sockets == 1 and not shared:
            socks = _bind(host, port, False)
        else:
            if not shared:
                port = _claim(host, port)
            for _ in range(sockets):
                more = _bind(host, port, True)
                socks += more
                port = int(more[0].getsockname()[1])
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    acceptors: list[Acceptor] = []
    try:
        for sock in socks:
            acceptors.append(Acceptor(sock, factory, on_exhausted))
    except BaseException:
        for acc in acceptors:
            acc.close()
        for sock in socks[len(acceptors) :]:
            sock.close()
        raise
    return acceptors
