"""A TCP fault proxy on loopback: what a bad network does to a node's Redis link.

``FaultProxy`` listens on 127.0.0.1 and forwards every connection to one
upstream (a ``redis-server``). A test or the fault harness
(``guildcast.loadtest.faults``) switches its mode while traffic flows:

- ``pass``: forward both ways (the default; also what :meth:`heal` restores);
- ``delay``: forward each chunk ``delay`` seconds late, in order, both ways;
- ``stall``: stop reading both ways (TCP back-pressure; nothing is lost, it
  flows again on heal, like a link that pauses);
- ``blackhole``: keep every connection open, read and discard everything in
  both directions, and forward no close (packets stop, nothing closes);
- ``zombie``: forward client -> server, discard server -> client (a
  connection that stays open and delivers nothing);
- :meth:`drop`: abort every open connection (RST) once (or, with ``only``,
  those whose client sent those bytes); new ones pass.

``set_mode(mode, only=b"SUBSCRIBE")`` applies the mode only to connections
whose client has sent those bytes (say, the pub/sub connection of a Redis
client); the others pass. ``only`` is matched against the first
``HEAD_BYTES`` a client sent and against every chunk for the ``markers``
given to the proxy (``SUBSCRIBE`` by default: a Redis client may turn a
pooled command connection into its pub/sub connection at any time).

Consistency model: one asyncio loop owns every connection; a mode change
applies to the next chunk read on every connection. Bounds: each direction
of a connection holds at most ``MAX_DELAYED_CHUNKS`` delayed chunks (then it
stops reading: back-pressure), and reads at most ``CHUNK`` bytes at a time.
Only loopback addresses are accepted as the listen address.

``ThreadedFaultProxy`` runs one in its own thread and event loop, so a test
whose loop blocks (starting node processes) does not stall the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

#: Bytes read per chunk.
CHUNK = 65536
#: Client bytes kept per connection to match ``only`` against.
HEAD_BYTES = 4096
#: Delayed chunks queued per direction before the proxy stops reading.
MAX_DELAYED_CHUNKS = 1024

MODES = ("pass", "delay", "stall", "blackhole", "zombie")


class _Conn:
    """One proxied connection's state."""

    __slots__ = ("head", "marks")

    def __init__(self) -> None:
        #: The first ``HEAD_BYTES`` the client sent (where a Redis client's
        #: SUBSCRIBE is), to match ``only`` against.
        self.head = bytearray()
        #: Markers (and ``only`` values) the client sent after its head.
        self.marks: set[bytes] = set()


class FaultProxy:
    """Forwards ``127.0.0.1:port`` to ``upstream``; see the module docstring."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        host: str = "127.0.0.1",
        markers: tuple[bytes, ...] = (b"SUBSCRIBE",),
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError("the fault proxy listens on loopback only")
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = 0
        self.mode = "pass"
        self.delay = 0.0
        self.only: bytes | None = None
        self.markers = markers
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._conns: dict[_Conn, tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Connections accepted so far (for tests that want to see a reconnect).
        self.accepted = 0

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._accept, self.host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def set_mode(self, mode: str, delay: float = 0.0, only: bytes | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        self.mode = mode
        self.delay = delay
        self.only = only
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    def heal(self) -> None:
        self.set_mode("pass")

    def drop(self, only: bytes | None = None) -> None:
        """Abort (RST) every open connection (or those whose client sent ``only``)."""
        for conn, (a, b) in list(self._conns.items()):
            if only is not None and only not in conn.head and only not in conn.marks:
                continue
            for w in (a, b):
                w.transport.abort()
            del self._conns[conn]

    # --- forwarding --------------------------------------------------------------

    def _mode(self, conn: _Conn) -> str:
        if self.only is not None and self.only not in conn.marks and self.only not in conn.head:
            return "pass"
        return self.mode

    def _discards(self, conn: _Conn, upstream_to_client: bool) -> bool:
        mode = self._mode(conn)
        return mode == "blackhole" or (mode == "zombie" and upstream_to_client)

    async def _until(self, ok: Callable[[], bool]) -> None:
        while not ok():
            await self._changed.wait()

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            ur, uw = await asyncio.open_connection(*self.upstream)
        except OSError:
            cw.transport.abort()
            return
        conn = _Conn()
        self._conns[conn] = (cw, uw)
        tasks = [
            asyncio.create_task(self._pipe(conn, cr, uw, False)),
            asyncio.create_task(self._pipe(conn, ur, cw, True)),
        ]
        self._tasks.update(tasks)
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._tasks.difference_update(tasks)
            self._conns.pop(conn, None)
            for w in (cw, uw):
                w.transport.abort()

    async def _pipe(
        self, conn: _Conn, r: asyncio.StreamReader, w: asyncio.StreamWriter, down: bool
    ) -> None:
        """One direction of ``conn``: ``down`` is upstream -> client."""
        q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(MAX_DELAYED_CHUNKS)

        async def writer() -> None:
            while True:
                due, data = await q.get()
                if not data:
                    await self._until(lambda: not self._discards(conn, down))
                    with contextlib.suppress(OSError):
                        w.write_eof()
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._until(lambda: self._mode(conn) != "stall")
                if self._discards(conn, down):
                    continue
                w.write(data)
                await w.drain()

        wt = asyncio.create_task(writer())
        try:
            while True:
                await self._until(lambda: self._mode(conn) != "stall")
                try:
                    data = await r.read(CHUNK)
                except OSError:
                    data = b""  # reset: what was already read still goes on
                if not down:
                    if len(conn.head) < HEAD_BYTES:
                        conn.head += data[: HEAD_BYTES - len(conn.head)]
                    for m in self.markers:
                        if m in data:
                            conn.marks.add(m)
                    if self.only is not None and self.only in data:
                        conn.marks.add(self.only)
                if data and self._discards(conn, down):
                    continue
                lag = self.delay if self._mode(conn) == "delay" else 0.0
                due = time.monotonic() + lag
                await q.put((due, data))
                if not data:
                    break
            await wt
        finally:
            wt.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await wt


class ThreadedFaultProxy:
    """A :class:`FaultProxy` in its own thread; every method is thread-safe."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._proxy: FaultProxy | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._upstream = (upstream_host, upstream_port)
        self.port = 0

    def _call(self, fn: Callable[[], object]) -> None:
        done: Future[None] = Future()

        def run() -> None:
            try:
                fn()
                done.set_result(None)
            except BaseException as e:  # handed to the caller's thread
                done.set_exception(e)

        self._loop.call_soon_threadsafe(run)
        done.result(10)

    def start(self, port: int = 0) -> int:
        self._thread.start()

        async def make() -> int:
            self._proxy = FaultProxy(*self._upstream)
            return await self._proxy.start(port)

        self.port = asyncio.run_coroutine_threadsafe(make(), self._loop).result(10)
        return self.port

    @property
    def proxy(self) -> FaultProxy:
        assert self._proxy is not None
        return self._proxy

    @property
    def accepted(self) -> int:
        return self.proxy.accepted

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def set_mode(self, mode: str, delay: float = 0.0, only: bytes | None = None) -> None:
        self._call(lambda: self.proxy.set_mode(mode, delay, only))

    def heal(self) -> None:
        self._call(self.proxy.heal)

    def drop(self, only: bytes | None = None) -> None:
        self._call(lambda: self.proxy.drop(only))

    def stop(self) -> None:
        if self._proxy is not None:
            asyncio.run_coroutine_threadsafe(self._proxy.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
