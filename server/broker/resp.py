"""A lean RESP2 connection for the Redis broker's two hot paths.

Owns one connection to Redis (TCP, TLS or a unix socket, as the broker's
``redis://`` / ``rediss://`` / ``unix://`` URL says) spoken without
redis-py's per-command machinery: commands are packed by :func:`pack` and a
whole batch leaves in one ``write``; replies are parsed by hiredis in the
transport's read callback, as many per read as arrived. The Redis broker
(``redis.py``) uses one for its append pipeline (a batch of scripts, one
future for all their replies) and one for its pub/sub feed (every reply
handed to a callback in arrival order); everything else stays on redis-py.

Consistency model: Redis answers a connection's commands in order, so the
n-th reply belongs to the n-th command still owed one. A connection whose
caller stops waiting for an answer (a timeout) has lost that pairing and is
closed, never reused; a lost connection fails every batch still owed
replies with :class:`ConnectionError` (sent: the outcome is unknown).

Bounds: at most :data:`MAX_OWED` batches owed replies per connection (the
broker keeps one in flight); what one read delivers is parsed and handed on
in that read's callback, so nothing queues here beyond hiredis's buffer of
one incomplete reply.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis

#: Batches a connection may owe replies at once: the broker's pipeliner keeps
#: one in flight; more is a caller bug, refused rather than queued unbounded.
MAX_OWED = 64


class ReplyError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-NOSCRIPT ...``): the
    command was refused, the connection is fine."""


Arg = bytes | str | int


def pack(*args: Arg) -> bytes:
    """One command as a RESP array of bulk strings (str as UTF-8, int as
    its decimal digits), the encoding redis-py's ``Encoder`` uses."""
    return pack_after(b"", 0, args)


def bulks(args: Iterable[Arg]) -> bytes:
    """``args`` as bulk strings back to back: a command's fixed first
    arguments, packed once and given to :func:`pack_after` many times."""
    out: list[bytes] = []
    _add_bulks(out, args)
    return b"".join(out)


def pack_after(head: bytes, n: int, args: Sequence[Arg]) -> bytes:
    """One command whose first ``n`` arguments are ``head`` (from
    :func:`bulks`) and the rest ``args``."""
    out = [b"*%d\r\n" % (n + len(args)), head]
    _add_bulks(out, args)
    return b"".join(out)


def _add_bulks(out: list[bytes], args: Iterable[Arg]) -> None:
    for a in args:
        if type(a) is bytes:
            b = a
        elif type(a) is int:
            b = b"%d" % a
        elif isinstance(a, str):
            b = a.encode()
        else:
            raise TypeError(f"cannot send {type(a).__name__} to Redis")
        out.append(b"$%d\r\n" % len(b))
        out.append(b)
        out.append(b"\r\n")


class RespConnection(asyncio.Protocol):
    """One Redis connection. Replies go to :attr:`sink` when it is set (the
    pub/sub feed: pushes, not answers), else to the batches owed them
    (:meth:`request`)."""

    def __init__(self) -> None:
        self._parser = hiredis.Reader(replyError=ReplyError)
        self._transport: asyncio.Transport | None = None
        #: Batches owed replies: how many, those come so far, the future.
        self._owed: deque[tuple[int, list[Any], asyncio.Future[list[Any]]]] = deque()
        #: Every reply as it arrives, in order, for a subscriber connection.
        self.sink: Callable[[list[Any]], None] | None = None
        #: ``time.monotonic()`` of the last read (the feed's liveness).
        self.last_read = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        #: Why the connection ended (set once :attr:`closed` is done).
        self.error: BaseException | None = None

    # --- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        parser = self._parser
        parser.feed(data)
        replies: list[Any] = []
        try:
            while (r := parser.gets()) is not False:
                replies.append(r)
            sink = self.sink
            if sink is not None:
                sink(replies)
                return
            owed = self._owed
            for r in replies:
                if not owed:
                    raise ConnectionError("redis sent a reply nothing asked for")
                n, got, fut = owed[0]
                got.append(r)
                if len(got) == n:
                    owed.popleft()
                    if not fut.done():
                        fut.set_result(got)
        except Exception as e:  # a protocol error, or the sink's own: drop the link
            self._fail(e)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("redis closed the connection"))

    # --- use -----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return not self.closed.done()

    def write(self, data: bytes) -> None:
        """Send commands whose replies go to :attr:`sink` (or none are owed)."""
        if self._transport is None or not self.is_open:
            raise ConnectionError("redis connection is closed")
        self._transport.write(data)

    def request(self, data: bytes, n: int) -> asyncio.Future[list[Any]]:
        """Send ``n`` packed commands; the future's result is their ``n``
        replies in order (an error reply is a :class:`ReplyError` among
        them); it fails with ``ConnectionError`` if the connection is lost
        first. A caller that stops waiting must :meth:`close` the connection."""
        if len(self._owed) >= MAX_OWED:
            raise ConnectionError("too many batches owed replies on one connection")
        self.write(data)
        fut: asyncio.Future[list[Any]] = self._loop.create_future()
        self._owed.append((n, [], fut))
        return fut

    def close(self) -> None:
        self._fail(ConnectionError("redis connection closed"))

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if self._transport is not None:
            self._transport.close()
        # Waiters always get an OSError (a ConnectionError): the broker's
        # callers answer those as a lost link ("not published" or "outcome
        # unknown"). A reply hiredis cannot parse (``hiredis.ProtocolError``,
        # not an OSError: a URL aimed at something that is not Redis, a
        # corrupted stream) must not escape them as anything else.
        err = exc if isinstance(exc, OSError) else ConnectionError(f"redis: {exc!r}")
        while self._owed:
            fut = self._owed.popleft()[2]
            if not fut.done():
                fut.set_exception(err)
        if not self.closed.done():
            self.closed.set_result(None)


async def connect(pool: aioredis.ConnectionPool, *, select_db: bool = True) -> RespConnection:
    """A connection to the Redis that ``pool`` (redis-py's, built from the
    broker's URL) connects to: the same address, TLS settings, credentials
    and database (``select_db``; a subscriber needs none: channels span
    databases). Raises ``OSError`` / ``ConnectionError`` / :class:`ReplyError`
    (refused credentials); the caller bounds the time."""
    loop = asyncio.get_running_loop()
    kw = pool.connection_kwargs
    cls = pool.connection_class
    conn: RespConnection
    if issubclass(cls, aioredis.UnixDomainSocketConnection):
        _, conn = await loop.create_unix_connection(RespConnection, kw["path"])
    else:
        ctx: ssl.SSLContext | None = None
        if issubclass(cls, aioredis.SSLConnection):
            # redis-py's own TLS context for these URL settings (certificates,
            # verification), so both kinds of connection trust the same peer.
            ctx = cls(**kw).ssl_context.get()
        host = kw.get("host", "localhost")
        _, conn = await loop.create_connection(
            RespConnection,
            host,
            kw.get("port", 6379),
            ssl=ctx,
            server_hostname=host if ctx else None,
        )
    try:
        cmds: list[bytes] = []
        password = kw.get("password")
        if password:
            user = kw.get("username")
            cmds.append(pack("AUTH", user, password) if user else pack("AUTH", password))
        db = int(kw.get("db") or 0)
        if select_db and db:
            cmds.append(pack("SELECT", db))
        if cmds:
            for r in await conn.request(b"".join(cmds), len(cmds)):
                if isinstance(r, ReplyError):
                    raise r
    except BaseException:
        conn.close()
        raise
    return conn


def pack_all(commands: Iterable[tuple[Arg, ...]]) -> bytes:
    """Several commands packed back to back (one write)."""
    return b"".join(pack(*c) for c in commands)
