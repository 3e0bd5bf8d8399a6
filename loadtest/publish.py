"""Publishers: load-test events into the server, over the gateway or HTTP.

Owns the publishing connections of the controller and what they learned:
events sent, acknowledged (with the ``s`` each got), refused, and the
publish-to-acknowledgement latency.

Two pacing modes, both with a bounded in-flight window (the memory bound of
a publisher: at most ``window`` unanswered events, never a growing queue):
- ``rate == 0``: as fast as acknowledgements allow, ``window`` in flight;
- ``rate > 0``: events are due at ``rate`` per second from the start; when
  the window is full, due events wait (they are sent late, never dropped)
  and the lateness shows as an achieved rate below the target. The events
  that fell due while a gateway publisher had no connection (a server
  restart) are not made up afterwards: the schedule starts again at the
  reconnect, so a storm is met by the same 2,000 events/s, not by a burst
  of everything the outage held back. With ``tick`` (``--publish-tick``)
  a publisher writes at most once per ``tick`` seconds, the events that
  fell due meanwhile pipelined in one write, as an application's publisher
  under load sends what it has queued; with 0 each event is written on its
  own as it falls due (the server then wakes once per event).

Over the gateway a publisher is one WebSocket connection sending op 5 and
reading the ACKs, which come back in PUBLISH order (PROTOCOL.md
"Publishing"). Over HTTP it is ``window`` keep-alive connections, each with
one ``POST /v1/publish`` outstanding (HTTP/1.1 without pipelining).

Flow control (``gate``, rate 0 only by default): the server acknowledges an
event once it is sequenced, not once it is delivered, so a publisher at
full speed can outrun subscribers that read slower than the server writes
(the harness itself, on a small machine); their backlog would then grow to
the server's unsent-bytes bound and end in 4010 closes. The gate tells a
publisher how many more events it may send before it is ``--max-lag``
events ahead of what subscribers have received; a closed gate is polled
every 2 ms. The run then measures the highest rate both sides sustain.
By default the gate allows as many events as leave each subscriber 16 KiB
behind, or the ACK window, whichever is more (``scenarios.default_max_lag``):
while the fleet
keeps within that, the ACK window alone paces the publisher, as the
referee's does.

Consistency: ``heads`` holds, per guild, the highest ``s`` acknowledged;
the controller uses it at the end to check that every subscriber got
everything. An event whose ACK was lost with its connection (server restart)
may still have been sequenced: subscribers then see it, which is fine, since
``heads`` is a lower bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson

from guildcast.loadtest import wire
from guildcast.loadtest.fleet import new_hist
from guildcast.protocol.codes import Op
from guildcast.protocol.frames import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    client_frame,
    close_code,
    parse_frames,
)

#: Seconds a publisher waits for its connection to open (handshake to READY).
OPEN_TIMEOUT = 30.0
#: Seconds a stopping publisher waits for its last acknowledgements.
FINISH_TIMEOUT = 15.0
#: Seconds between looks at a closed flow-control gate.
GATE_POLL = 0.002


class PubStats:
    """Counters shared by every publisher of a run (single event loop)."""

    def __init__(self) -> None:
        self.sent = 0
        self.acked = 0
        self.errors: dict[str, int] = {}
        self.lost_in_flight = 0
        self.reconnects = 0
        self.heads: dict[str, int] = {}
        self.ack_lat: dict[int, int] = {}
        self.error_samples: list[str] = []

    def ack(self, gid: str, s: int, sent_ns: int, now_ns: int) -> None:
        self.acked += 1
        if s > self.heads.get(gid, 0):
            self.heads[gid] = s
        k = (now_ns - sent_ns) // 1000
        self.ack_lat[k] = self.ack_lat.get(k, 0) + 1

    def error(self, code: str, sample: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1
        if len(self.error_samples) < 10:
            self.error_samples.append(sample[:200])

    def snapshot(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "acked": self.acked,
            "errors": dict(self.errors),
            "lost_in_flight": self.lost_in_flight,
            "reconnects": self.reconnects,
            "error_samples": list(self.error_samples),
        }


class Pacer:
    """Decides how many events are due now (see the module docstring)."""

    def __init__(self, rate: float, tick: float = 0.0) -> None:
        self.rate = rate
        #: Seconds between two writes at a fixed rate (0: each event on its own).
        self.tick = tick
        self.t0 = time.monotonic()
        self.sent = 0

    def due(self, room: int) -> int:
        if self.rate <= 0:
            return room
        want = int((time.monotonic() - self.t0) * self.rate) + 1 - self.sent
        return max(0, min(room, want))

    def restart(self) -> None:
        """Start the schedule again now: what fell due meanwhile is skipped."""
        self.t0 = time.monotonic()
        self.sent = 0

    def wait_time(self) -> float:
        if self.rate <= 0:
            return 1.0
        return max(0.0005, self.tick, self.t0 + (self.sent + 1) / self.rate - time.monotonic())


@dataclass(frozen=True)
class Load:
    """What one publisher sends, whichever way: events to ``gids`` (a random
    one each, drawn with ``seed``) at ``rate``/s (0: as fast as the window
    allows), at most ``window`` unanswered, ``size`` bytes of ``d`` each,
    counted in ``stats``."""

    gids: Sequence[str]
    rate: float
    window: int
    size: int
    stats: PubStats
    seed: int
    #: ``--pad``: "x" or "text" (``wire.pad_for``).
    pad: str = "x"
    #: ``--publish-tick``: at a fixed rate, seconds between two writes; the
    #: events that fell due meanwhile go in one write, pipelined (0: each
    #: event is written on its own as it falls due).
    tick: float = 0.0


class Sender:
    """The load state both publishers share (what to send, how fast, the
    window, flow control), set from a :class:`Load`."""

    def __init__(self, load: Load) -> None:
        self.gids = list(load.gids)
        self.window = max(1, load.window)
        self.pad = wire.pad_for(load.size, load.pad)
        self.stats = load.stats
        self.rng = random.Random(load.seed)
        self.pacer = Pacer(load.rate, load.tick)
        #: Flow control: how many more events may be sent now (None: no limit).
        self.gate: Callable[[], int] | None = None


class GatewayPublisher(Sender, asyncio.Protocol):
    """One gateway connection publishing with op 5 and reading ACKs."""

    def __init__(self, host: str, port: int, path: str, token: str, load: Load) -> None:
        super().__init__(load)
        self.host, self.port, self.path, self.token = host, port, path, token
        self.gids_b = [g.encode() for g in self.gids]
        self.transport: asyncio.Transport | None = None
        #: (gid, publish time in ns) of every unanswered PUBLISH, in send order.
        self.inflight: deque[tuple[str, int]] = deque()
        self.room = asyncio.Event()
        self.ready: asyncio.Future[bool] | None = None
        self.rest = b""
        self.upgrade: wire.Upgrade | None = None
        self.hb_interval = 30.0
        self.hb_due = float("inf")

    # --- connection --------------------------------------------------------------

    async def open(self) -> bool:
        loop = asyncio.get_running_loop()
        self.ready = loop.create_future()
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                await loop.create_connection(lambda: self, self.host, self.port)
                return await self.ready
        except (OSError, TimeoutError) as e:
            self.stats.error("connect:" + type(e).__name__, str(e))
            if self.transport is not None:
                self.transport.abort()
            return False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rest = b""
        self.upgrade = wire.Upgrade(self.host, self.port, self.path)
        transport.write(self.upgrade.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.stats.lost_in_flight += len(self.inflight)
        self.inflight.clear()
        self.room.set()
        if self.ready is not None and not self.ready.done():
            self.ready.set_result(False)

    def data_received(self, data: bytes) -> None:
        if self.upgrade is not None:
            done, err, data = self.upgrade.receive(data)
            if not done:
                return
            self.upgrade = None
            if err is not None:
                self.stats.error("handshake", err)
                assert self.transport is not None
                self.transport.abort()
                return
        buf = self.rest + data if self.rest else data
        frames, used, err = parse_frames(buf)
        self.rest = buf[used:]
        now = time.time_ns()
        for op, _fin, payload in frames:
            if op == OP_TEXT:
                s = wire.fast_ack_s(payload)
                if s is not None and self.inflight:
                    gid, sent_ns = self.inflight.popleft()
                    self.stats.ack(gid, s, sent_ns, now)
                else:
                    self._message(payload)
            elif op == OP_CLOSE:
                code, reason = close_code(payload)
                self.stats.error(f"close:{code}", reason)
                if self.transport is not None:
                    self.transport.write(wire.close_frame(1000))
                    self.transport.close()
            elif op == OP_PING and self.transport is not None:
                self.transport.write(client_frame(OP_PONG, payload))
        if err is not None and self.transport is not None:
            self.stats.error("protocol", err)
            self.transport.abort()
        if len(self.inflight) < self.window:
            self.room.set()

    def _message(self, payload: bytes) -> None:
        msg = orjson.loads(payload)
        op = msg.get("op")
        d = msg.get("d")
        if op == Op.HELLO:
            self.hb_interval = d["heartbeat_interval"] / 1000.0
            self.hb_due = time.monotonic() + self.hb_interval * 0.7
            assert self.transport is not None
            self.transport.write(wire.identify(self.token, {}))
        elif op == Op.DISPATCH and msg.get("t") == "READY":
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(True)
        elif op == Op.ACK and self.inflight:
            gid, sent_ns = self.inflight.popleft()
            self.stats.ack(gid, int(d["s"]), sent_ns, time.time_ns())
        elif op == Op.ERROR:
            if d.get("nonce") is not None or d.get("g") is not None:
                # A refused PUBLISH: answered in order, like an ACK.
                if self.inflight:
                    self.inflight.popleft()
            self.stats.error(str(d.get("code")), str(d.get("message")))

    # --- publishing --------------------------------------------------------------

    def _send(self, k: int) -> None:
        t = self.transport
        assert t is not None
        out = []
        rng = self.rng
        gids, gids_b = self.gids, self.gids_b
        single = len(gids) == 1
        for _ in range(k):
            j = 0 if single else rng.randrange(len(gids))
            ts = time.time_ns()
            out.append(wire.text(wire.publish_payload(gids_b[j], ts // 1000, self.pad)))
            self.inflight.append((gids[j], ts))
        t.write(b"".join(out))
        self.pacer.sent += k
        self.stats.sent += k

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set, reconnecting if the server goes away;
        then wait (bounded) for the acknowledgements still due."""
        backoff = 0.05
        while not stop.is_set():
            if self.transport is None:
                if not await self.open():
                    await _sleep_or_stop(stop, backoff)
                    backoff = min(1.0, backoff * 2)
                    self.stats.reconnects += 1
                    continue
                backoff = 0.05
                self.pacer.restart()
            now = time.monotonic()
            if now >= self.hb_due and self.transport is not None:
                self.transport.write(wire.text(wire.HEARTBEAT))
                self.hb_due = now + self.hb_interval
            room = self.window - len(self.inflight)
            gated = False
            if room > 0 and self.gate is not None:
                allowed = self.gate()
                if allowed < room:
                    room = max(0, allowed)
                    gated = room == 0
            k = self.pacer.due(room) if room > 0 else 0
            if k and self.transport is not None:
                self._send(k)
            self.room.clear()
            if gated:
                await asyncio.sleep(GATE_POLL)
            elif len(self.inflight) >= self.window or self.pacer.rate <= 0:
                # Woken by an ACK, or by the controller after it sets ``stop``.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self.room.wait()
            else:
                await asyncio.sleep(min(0.1, self.pacer.wait_time()))
        await self.finish()

    def wake(self) -> None:
        self.room.set()

    async def finish(self) -> None:
        deadline = time.monotonic() + FINISH_TIMEOUT
        while self.inflight and self.transport is not None and time.monotonic() < deadline:
            self.room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.room.wait(), 0.2)
        if self.transport is not None:
            self.transport.write(wire.close_frame(1000))
            self.transport.close()


class HttpPublisher(Sender):
    """``window`` keep-alive HTTP/1.1 connections posting to ``/v1/publish``."""

    def __init__(self, host: str, port: int, api_key: str | None, load: Load) -> None:
        super().__init__(load)
        self.host, self.port, self.api_key = host, port, api_key

    def _request(self, gid: str, ts: int) -> bytes:
        body = (
            b'{"guild":"'
            + gid.encode()
            + b'","t":"'
            + wire.EVENT.encode()
            + b'","d":'
            + wire.event_data(ts, self.pad)
            + b"}"
        )
        auth = f"Authorization: Bearer {self.api_key}\r\n" if self.api_key else ""
        head = (
            f"POST /v1/publish HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    def wake(self) -> None:
        pass  # every connection checks ``stop`` at least every 0.1 s

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            for k in range(self.window):
                tg.create_task(self._conn(stop), name=f"http-publisher-{k}")

    async def _conn(self, stop: asyncio.Event) -> None:
        backoff = 0.05
        while not stop.is_set():
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), OPEN_TIMEOUT
                )
            except (OSError, TimeoutError) as e:
                self.stats.error("connect:" + type(e).__name__, str(e))
                self.stats.reconnects += 1
                await _sleep_or_stop(stop, backoff)
                backoff = min(1.0, backoff * 2)
                continue
            backoff = 0.05
            try:
                await self._serve(reader, writer, stop)
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                self.stats.error("http:" + type(e).__name__, str(e))
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop: asyncio.Event
    ) -> None:
        while not stop.is_set():
            if self.pacer.due(1) == 0:
                await asyncio.sleep(min(0.1, self.pacer.wait_time()))
                continue
            if self.gate is not None and self.gate() <= 0:
                await asyncio.sleep(GATE_POLL)
                continue
            gid = self.gids[0] if len(self.gids) == 1 else self.rng.choice(self.gids)
            ts = time.time_ns()
            self.pacer.sent += 1
            self.stats.sent += 1
            writer.write(self._request(gid, ts // 1000))
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), FINISH_TIMEOUT)
            except BaseException:
                self.stats.lost_in_flight += 1
                raise
            status, length, close = _parse_head(head)
            body = await reader.readexactly(length)
            if status == 200:
                ans = orjson.loads(body)
                self.stats.ack(str(ans["g"]), int(ans["s"]), ts, time.time_ns())
            else:
                self.stats.error(f"http:{status}", body.decode("utf-8", "replace"))
            if close:
                return


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"bad status line {lines[0][:80]!r}")
    status = int(parts[1])
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
        elif name == b"transfer-encoding":
            raise ValueError("chunked responses are not supported by the load tester")
    return status, length, close


async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)


def ack_hist(stats: PubStats) -> Any:
    """The publish-to-ACK latency histogram (microseconds)."""
    from guildcast.loadtest.fleet import fold_latencies

    h = new_hist()
    fold_latencies(dict(stats.ack_lat), h)
    return h
