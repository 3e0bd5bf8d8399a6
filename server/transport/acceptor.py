"""Accepting connections greedily (docs/OPERATIONS.md "Deploying without a
reconnect storm").

Owns one listening socket's accepting. libuv, so uvloop, accepts one
connection per listening socket per event-loop turn (libuv 1.45, "unix:
don't accept() connections in a loop", libuv#3696) and leaves the rest to
the next turn. On an idle node turns are short and that is enough; on a
node whose turns are long because it is busy with live traffic, which is
exactly a node taking its clients back after a restart, the accept rate
falls to (listening sockets x turns per second): 72-1,044 accepts a second
were measured in a 19,000-client storm (four sockets, 18-261 turns a
second) while 12,000 connections waited in the kernel's queues, unanswered,
until their clients gave up after 30 s and came back to wait again.

An :class:`Acceptor` reads its socket itself (``loop.add_reader``) and
accepts up to :data:`ACCEPT_BATCH` connections each time it is readable,
handing each to the loop (``connect_accepted_socket``: the transport and
protocol the loop's own server would make, TCP_NODELAY included). So new
connections reach the gateway as fast as they come and what paces them is
admission control (admission.py), which answers them (a wait, or 1013 with a
retry hint), not the kernel's queue, which does not. The batch bounds one
readiness's work so live traffic still gets its turn.

Out of descriptors (EMFILE, ENFILE) a pending connection cannot be
accepted, and a level-triggered socket would wake the loop for it at once,
forever. As libuv does, the acceptor keeps one descriptor in reserve: it
frees it, accepts the connection, closes it (the client sees the
connection end, not a silence) and takes the reserve again, and reports
the moment (``on_exhausted``: ``guildcast.core.fdwatch``). If even the
reserve cannot be taken back, or accept fails otherwise (ENOBUFS,
ENOMEM), the socket is not read for :data:`EXHAUSTED_PAUSE` seconds.
Connections accepted but not yet handed to the loop when the acceptor is
closed (a drain) are ended, not opened: they would miss the drain.

Consistency model: used only from its event loop; the gateway owns (closes)
it. State: the socket, the reserve descriptor, and the tasks handing
accepted connections to the loop (each done within a loop turn or two).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable

from guildcast.core.ratelog import RateLimitedLog

__all__ = ["ACCEPT_BATCH", "EXHAUSTED_PAUSE", "Acceptor"]

log = logging.getLogger("guildcast.gateway")
_flood = RateLimitedLog(log)

#: Connections accepted per readiness of one socket: a storm's arrivals get
#: in within a few turns (four sockets take 512 a turn), and one turn's
#: accepting stays around ten milliseconds.
ACCEPT_BATCH = 128
#: Seconds the socket is not read when no descriptor can be freed for
#: shedding (the reserve itself could not be taken back), or after another
#: accept error that leaves it readable (ENOBUFS, ENOMEM).
EXHAUSTED_PAUSE = 0.1
#: accept() errors that concern only the connection being accepted (it was
#: reset or timed out while queued): skip it and take the next.
_GONE = frozenset(
    e
    for e in (
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
        errno.EPERM,
    )
)
_EXHAUSTED = frozenset((errno.EMFILE, errno.ENFILE))


def _reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class Acceptor:
    """Accepts from one listening socket, up to ``ACCEPT_BATCH`` per readiness."""

    __slots__ = (
        "_adopting",
        "_closed",
        "_factory",
        "_loop",
        "_on_exhausted",
        "_reserve",
        "accepted",
        "sock",
    )

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        on_exhausted: Callable[[int], None] | None = None,
    ) -> None:
        #: The listening socket (non-blocking, listening), owned from here on.
        self.sock = sock
        #: Connections accepted (handed to the loop) so far.
        self.accepted = 0
        self._factory = factory
        self._on_exhausted = on_exhausted
        self._loop = asyncio.get_running_loop()
        self._reserve = _reserve()
        self._adopting: set[asyncio.Task[None]] = set()
        self._closed = False
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        sock = self.sock
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _GONE:
                    continue
                if e.errno in _EXHAUSTED:
                    self._shed(e.errno)
                    return
                # ENOBUFS, ENOMEM or worse: the socket stays readable, so
                # do not spin on it; try again shortly (as asyncio does).
                _flood.log(
                    logging.ERROR,
                    "accept_failed",
                    "accepting a connection failed: %s",
                    e,
                    extra={"errno": e.errno},
                )
                self._pause()
                return
            self._adopt(conn)

    def _adopt(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(False)
        except OSError:
            conn.close()
            return
        self.accepted += 1
        task = self._loop.create_task(self._connect(conn))
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    async def _connect(self, conn: socket.socket) -> None:
        if self._closed:
            # Accepted just before the gateway stopped accepting (a drain):
            # a connection made now would miss the drain's RECONNECT and be
            # waited for until its timeout. Ended instead: the client retries.
            conn.close()
            return
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except Exception as e:  # the loop could not take it: it is closed
            conn.close()
            log.debug("an accepted connection could not be opened: %s", e)

    def _shed(self, code: int) -> None:
        """Out of descriptors: turn queued connections away through the
        reserve descriptor (as libuv does), or stop reading for a moment."""
        if self._on_exhausted is not None:
            self._on_exhausted(code)
        for _ in range(ACCEPT_BATCH):
            if self._reserve is None:
                break
            os.close(self._reserve)
            self._reserve = None
            try:
                conn, _addr = self.sock.accept()
            except OSError:
                self._reserve = _reserve()
                return  # nothing queued any more (or gone): done
            conn.close()
            self._reserve = _reserve()
        if self._reserve is None:
            # No descriptor to shed with: do not spin on a socket we cannot serve.
            self._pause()

    def _pause(self) -> None:
        """Stop reading the socket for ``EXHAUSTED_PAUSE`` seconds."""
        if not self._closed:
            self._loop.remove_reader(self.sock.fileno())
            self._loop.call_later(EXHAUSTED_PAUSE, self._resume)

    def _resume(self) -> None:
        if self._closed:
            return
        if self._reserve is None:
            self._reserve = _reserve()
        self._loop.add_reader(self.sock.fileno(), self._ready)

    def close(self) -> None:
        """Stop accepting and close the socket (queued connections are reset
        by the kernel); connections the loop already has are not touched,
        those accepted but not yet handed to it are ended."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    async def wait_closed(self) -> None:
        """Wait until every connection accepted so far has been handed to the
        loop (its protocol then belongs to the gateway) or, after
        :meth:`close`, ended."""
        while self._adopting:
            await asyncio.gather(*self._adopting, return_exceptions=True)
