"""The Guildcast Python client: one resilient gateway session for an application.

It owns one WebSocket connection at a time to a Guildcast gateway
(PROTOCOL.md), and everything the protocol asks of a client: IDENTIFY,
heartbeats on the announced interval, SUBSCRIBE/UNSUBSCRIBE, PUBLISH with
nonce-matched ACKs, and reconnecting with backoff and full jitter
(:mod:`clients.backoff`) whenever a close code says "reconnect".

Consistency model. For each subscribed guild the client keeps the
:class:`Position` of the last event it handed to the application. Every
reconnect's IDENTIFY carries those positions, so the server replays what was
missed (PROTOCOL.md, "Subscribing and recovery"). The application sees each
guild's events in increasing ``s``, with no duplicates: anything with
``s <= last seen`` is dropped as a safety net. When the server cannot
recover a guild (``recovered: false`` after a Position was sent: the epoch
changed or the history window was passed), the application gets a
:class:`Resync` item in :meth:`Client.events` (and ``on_unrecovered(gid)``)
before that guild's next event, and must reload that guild's state.

Bounds and overflow policies:

- The event queue holds at most ``max_pending_events`` items. When it is
  full the reader stops reading the socket (backpressure): the server's
  buffer for this client grows, and past its limit the server closes with
  4010; the client then reconnects and recovers from its positions, so
  nothing is lost while history lasts. An application that subscribes must
  therefore consume :meth:`Client.events`.
- At most ``max_inflight_publishes`` PUBLISH wait for their ACK; further
  :meth:`Client.publish` calls wait for a slot.

Tasks: the reconnect loop is one task owned by the client (started by
:meth:`Client.connect`, awaited by :meth:`Client.close`); each connection's
heartbeat task is owned by a task group inside that loop.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

import orjson
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.uri import parse_uri

from guildcast.client.backoff import Backoff

log = logging.getLogger("guildcast.client")

# --- protocol constants (PROTOCOL.md; duplicated so clients/ stands alone) ----

_OP_DISPATCH = 0
_OP_HEARTBEAT = 1
_OP_IDENTIFY = 2
_OP_SUBSCRIBE = 3
_OP_UNSUBSCRIBE = 4
_OP_PUBLISH = 5
_OP_RECONNECT = 7
_OP_HELLO = 10
_OP_HEARTBEAT_ACK = 11
_OP_ACK = 12
_OP_ERROR = 13

#: PROTOCOL.md "Close codes": "fix the client" (plus the RFC 6455 codes that
#: mean the same) and "get a new token". Every other code, including an
#: abnormal closure (1006) or a refused connection, means "reconnect".
FATAL_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 1010, 4001, 4002, 4003, 4005})
#: "get a new token": fatal unless a token provider can supply a fresh one.
AUTH_FAILED = 4004
#: "back off, reconnect": the server is full (1013) or we were rate limited
#: (4008). The next delay starts at least from this attempt's window, so a
#: crowd refused at once does not retry in the first, shortest window.
_BACKOFF_CODES = frozenset({1013, 4008})
_BACKOFF_FLOOR = 2
#: Close code used locally when the connection never opened or was cut.
ABNORMAL_CLOSURE = 1006

_GUILD_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_EVENT_RE = re.compile(r"[A-Z0-9_]{1,64}")
_RESERVED_EVENTS = frozenset({"READY", "SUBSCRIBED", "UNSUBSCRIBED"})
_HEARTBEAT = '{"op":1,"d":null}'

#: Items the event queue holds before the reader applies backpressure.
DEFAULT_MAX_PENDING_EVENTS = 10_000
#: PUBLISH awaiting an ACK at once; more callers wait for a slot.
DEFAULT_MAX_INFLIGHT_PUBLISHES = 1_000
#: The server's default ``max_frame`` (PROTOCOL.md "Transport"): a larger
#: message would close the connection with 1009, which is fatal, so the
#: client refuses to send it.
DEFAULT_MAX_MESSAGE = 64 * 1024
#: A connection that has delivered nothing for this many heartbeat intervals
#: (and at least _ZOMBIE_MIN_S seconds) while we were reading is considered
#: dead (half-open TCP) and is replaced.
_ZOMBIE_INTERVALS = 3
_ZOMBIE_MIN_S = 5.0


# --- public data types ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Position:
    """The last event of a guild the application has seen (PROTOCOL.md "Opcodes")."""

    epoch: str
    s: int


@dataclass(frozen=True, slots=True)
class Event:
    """One guild event, delivered in ``s`` order, exactly once."""

    guild: str
    name: str
    s: int
    data: Any


@dataclass(frozen=True, slots=True)
class Resync:
    """Guild ``guild`` could not be recovered: reload its state.

    Events the application missed are gone; the next events of this guild
    start at ``s + 1`` in ``epoch``.
    """

    guild: str
    epoch: str
    s: int


@dataclass(frozen=True, slots=True)
class SubscriptionLost:
    """The server refused to re-subscribe ``guild`` after a reconnect
    (ERROR ``code``, for example 4403 when a fresh token no longer allows it).
    The client no longer follows this guild."""

    guild: str
    code: int
    message: str


Item: TypeAlias = Event | Resync | SubscriptionLost
TokenProvider: TypeAlias = Callable[[], str | Awaitable[str]]


# --- exceptions -----------------------------------------------------------------


class GuildcastError(Exception):
    """Base class of the client's exceptions."""


class GuildcastClosed(GuildcastError):
    """The client has stopped for good; ``code`` says why (a close code)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"guildcast connection closed for good: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class AuthenticationFailed(GuildcastClosed):
    """Close 4004: the token was refused (and no provider gave an accepted one)."""


class ReconnectFailed(GuildcastClosed):
    """The backoff limits were reached; ``code`` is the last failure's close code."""


class ClientClosed(GuildcastClosed):
    """The application closed the client."""

    def __init__(self) -> None:
        super().__init__(1000, "client closed")


class CommandError(GuildcastError):
    """The server answered a command with ERROR ``code`` (PROTOCOL.md op 13)."""

    def __init__(self, code: int, message: str, guild: str | None = None) -> None:
        super().__init__(f"{code} {message}" + (f" (guild {guild})" if guild else ""))
        self.code = code
        self.message = message
        self.guild = guild


class PublishError(CommandError):
    """A PUBLISH was refused (4403 forbidden, 4413 too large, 4429 rate limited, ...)."""


class SubscribeError(CommandError):
    """A SUBSCRIBE was refused (4403 forbidden guild, 4430 too many guilds, ...)."""


class PublishInterrupted(GuildcastError):
    """The connection closed before the PUBLISH was acknowledged: the event may
    or may not have been sequenced. The client does not retry it by itself."""


# --- the bounded event queue ---------------------------------------------------------


class _Mailbox:
    """Single-consumer FIFO of :data:`Item`, bounded: ``put`` waits while full."""

    def __init__(self, bound: int) -> None:
        if bound < 1:
            raise ValueError("max_pending_events must be >= 1")
        self._items: deque[Item] = deque()
        self._bound = bound
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._ended = False
        self._error: BaseException | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        return len(self._items) >= self._bound

    async def put(self, item: Item) -> None:
        while len(self._items) >= self._bound and not self._ended:
            self._writable.clear()
            await self._writable.wait()
        if self._ended:
            return
        self._items.append(item)
        self._readable.set()

    def end(self, error: BaseException | None) -> None:
        """No more items: ``get`` drains what is queued, then raises ``error``
        (or StopAsyncIteration when None)."""
        if not self._ended:
            self._ended = True
            self._error = error
        self._readable.set()
        self._writable.set()

    async def get(self) -> Item:
        while not self._items:
            if self._ended:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._readable.clear()
            await self._readable.wait()
        item = self._items.popleft()
        self._writable.set()
        return item


def _check_guild(gid: str) -> None:
    if type(gid) is not str or _GUILD_RE.fullmatch(gid) is None:
        raise ValueError(f"invalid guild id {gid!r}: 1-128 characters of [A-Za-z0-9_.:-]")


def _position_json(pos: Position | None) -> dict[str, Any] | None:
    return None if pos is None else {"epoch": pos.epoch, "s": pos.s}


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


class Client:
    """A Guildcast gateway client that reconnects and recovers by itself.

    Use it as ``async with Client(url, token) as c:``; entering connects and
    waits for READY (retrying per ``backoff``), leaving closes cleanly.

    Arguments:
        url: the gateway URL, ``ws://host:port/gateway``.
        token: a token (PROTOCOL.md "Tokens"); or give ``token_provider``.
        token_provider: called (sync or async) before every connection
            attempt for a fresh token. With a provider, one 4004 (token
            refused) is retried with a new token; a second in a row is fatal.
        guilds: guilds to subscribe to from the first IDENTIFY.
        events: event names this session wants (IDENTIFY ``events``);
            None for all.
        backoff: the reconnect schedule (default: 0.5 s base, 30 s cap,
            unbounded attempts).
        on_unrecovered: called with a guild id when that guild could not be
            recovered (also reported as :class:`Resync` in :meth:`events`).
        on_ready: called with the session id each time a connection is READY.
        on_disconnect: called with ``(code, reason)`` each time a connection
            ends, before any reconnect.
        max_pending_events: bound of the event queue (see module docstring).
        max_inflight_publishes: PUBLISH awaiting ACK at once.
        max_message: largest message the client will send (bytes).
        open_timeout: seconds for the TCP + WebSocket handshake and HELLO.
        close_timeout: seconds to wait for the close handshake.

    Callbacks may be plain functions or coroutine functions; they run on the
    reader, so keep them short. Exceptions they raise are logged.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        token_provider: TokenProvider | None = None,
        guilds: Iterable[str] = (),
        events: Iterable[str] | None = None,
        backoff: Backoff | None = None,
        on_unrecovered: Callable[[str], Any] | None = None,
        on_ready: Callable[[str], Any] | None = None,
        on_disconnect: Callable[[int, str], Any] | None = None,
        max_pending_events: int = DEFAULT_MAX_PENDING_EVENTS,
        max_inflight_publishes: int = DEFAULT_MAX_INFLIGHT_PUBLISHES,
        max_message: int = DEFAULT_MAX_MESSAGE,
        open_timeout: float = 10.0,
        close_timeout: float = 5.0,
    ) -> None:
        try:
            parse_uri(url)
        except InvalidURI as exc:
            raise ValueError(f"invalid gateway URL {url!r}: {exc}") from None
        if token is None and token_provider is None:
            raise ValueError("give a token or a token_provider")
        self.url = url
        self._token = token
        self._token_provider = token_provider
        self._event_filter = None if events is None else list(events)
        for name in self._event_filter or ():
            if _EVENT_RE.fullmatch(name) is None:
                raise ValueError(f"invalid event name {name!r}")
        self._backoff = backoff if backoff is not None else Backoff()
        self._on_unrecovered = on_unrecovered
        self._on_ready = on_ready
        self._on_disconnect = on_disconnect
        self._max_pending = max_pending_events
        self._max_message = max_message
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self._publish_slots_n = max_inflight_publishes

        #: Guilds the application follows, each with the last Position it saw
        #: (None until the first SUBSCRIBED). The source of every IDENTIFY.
        self._desired: dict[str, Position | None] = {}
        for gid in guilds:
            _check_guild(gid)
            self._desired[gid] = None
        #: Guilds SUBSCRIBED on the current connection.
        self._subscribed: set[str] = set()
        #: Guilds requested on the current connection, with the Position sent.
        self._sent: dict[str, Position | None] = {}
        self._sub_waiters: dict[str, asyncio.Future[Position]] = {}
        self._unsub_waiters: dict[str, asyncio.Future[None]] = {}
        self._publishes: dict[str, asyncio.Future[int]] = {}
        self._nonces = itertools.count(1)

        self._ws: ClientConnection | None = None
        self._identified = False
        self._wake: asyncio.Event | None = None
        self._mailbox: _Mailbox | None = None
        self._publish_slots: asyncio.Semaphore | None = None
        self._runner: asyncio.Task[None] | None = None
        self._first_ready: asyncio.Future[None] | None = None
        self._failure: GuildcastClosed | None = None
        self._closing = False
        self._auth_failures = 0
        self._heartbeat_paused_until = 0.0
        self._last_recv = 0.0
        self._reader_blocked = False

        #: Session id and user of the current connection (READY).
        self.session_id: str | None = None
        self.user: str | None = None
        #: Connections that reached READY, the first included.
        self.sessions = 0
        #: Events dropped because their ``s`` was already seen (safety net).
        self.duplicates_dropped = 0

    # --- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Start the connection loop and wait until the first READY.

        Raises :class:`GuildcastClosed` (or a subclass) if the client stops
        before that: a fatal close code, a refused token, or the backoff
        limits reached. Calling it again after success does nothing.
        """
        if self._runner is None:
            if self._closing:
                raise ClientClosed()
            loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._mailbox = _Mailbox(self._max_pending)
            self._publish_slots = asyncio.Semaphore(self._publish_slots_n)
            self._first_ready = loop.create_future()
            self._runner = asyncio.create_task(self._run(), name=f"guildcast-client {self.url}")
        assert self._first_ready is not None
        try:
            await asyncio.shield(self._first_ready)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the connection (1000) and stop; :meth:`events` ends after the
        queued items. Pending commands raise :class:`ClientClosed`. Idempotent."""
        if self._closing:
            if self._runner is not None:
                await asyncio.gather(self._runner, return_exceptions=True)
            return
        self._closing = True
        if self._mailbox is not None:
            # Unblock a reader waiting for queue space so the close handshake
            # can be read; queued items stay for events().
            self._mailbox.end(self._failure)
        ws = self._ws
        if ws is not None:
            try:
                await asyncio.wait_for(ws.close(1000, "client closing"), self._close_timeout)
            except (TimeoutError, OSError, ConnectionClosed):
                pass
        runner = self._runner
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        self._stop(None)

    @property
    def connected(self) -> bool:
        """True while the current connection is READY."""
        return self._identified

    @property
    def positions(self) -> dict[str, Position | None]:
        """A copy of each followed guild's last seen Position (for persisting)."""
        return dict(self._desired)

    def pause_heartbeats(self, seconds: float) -> None:
        """Send no HEARTBEAT for ``seconds``: the server will close the session
        with 4009 and the client will reconnect and recover. For testing that
        path; applications never need it."""
        self._heartbeat_paused_until = asyncio.get_running_loop().time() + seconds

    # --- application API ---------------------------------------------------------

    async def events(self) -> AsyncIterator[Item]:
        """Yield :class:`Event`, :class:`Resync` and :class:`SubscriptionLost`
        items in order, until the client is closed.

        Raises the client's :class:`GuildcastClosed` error when it stopped for
        good (after the items queued before it). One consumer at a time.
        """
        mailbox = self._require_started()
        while True:
            try:
                item = await mailbox.get()
            except StopAsyncIteration:
                return
            yield item

    async def subscribe(self, gid: str, position: Position | None = None) -> Position:
        """Follow guild ``gid``; returns its Position once SUBSCRIBED.

        With ``position`` (for example one saved from :attr:`positions`), the
        server replays the events after it, or a :class:`Resync` comes first
        if it cannot. Raises :class:`SubscribeError` on ERROR (4403: the token
        does not allow this guild) and :class:`GuildcastClosed` if the client
        stops. While disconnected it waits for the next connection.
        """
        _check_guild(gid)
        self._require_usable()
        if gid in self._subscribed:
            pos = self._desired.get(gid)
            assert pos is not None
            return pos
        fut = self._sub_waiters.get(gid)
        if fut is None:
            fut = self._sub_waiters[gid] = asyncio.get_running_loop().create_future()
        if gid not in self._desired:
            self._desired[gid] = position
        ws = self._ws
        if ws is not None and self._identified and gid not in self._sent:
            self._sent[gid] = self._desired[gid]
            msg = {"op": _OP_SUBSCRIBE, "d": {"guilds": {gid: _position_json(self._desired[gid])}}}
            await self._send(ws, msg)
        return await asyncio.shield(fut)

    async def unsubscribe(self, gid: str) -> None:
        """Stop following guild ``gid``; no event of it is delivered after this
        returns. A no-op for a guild not followed."""
        _check_guild(gid)
        self._require_usable()
        if gid not in self._desired:
            return
        del self._desired[gid]
        self._subscribed.discard(gid)
        waiter = self._sub_waiters.pop(gid, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(SubscribeError(0, "unsubscribed before SUBSCRIBED", gid))
            waiter.exception()  # retrieved: nobody may be awaiting it any more
        ws = self._ws
        if ws is None or not self._identified or gid not in self._sent:
            return
        del self._sent[gid]
        fut = self._unsub_waiters.get(gid)
        if fut is None:
            fut = self._unsub_waiters[gid] = asyncio.get_running_loop().create_future()
        await self._send(ws, {"op": _OP_UNSUBSCRIBE, "d": {"guilds": [gid]}})
        await asyncio.shield(fut)

    async def publish(self, gid: str, t: str, d: Any = None) -> int:
        """Publish event ``t`` with data ``d`` to guild ``gid``; returns its ``s``.

        Waits for a connection if there is none. Raises ValueError for an
        invalid guild id, event name, non-JSON data or an oversized message,
        :class:`PublishError` when the server refuses it (4403, 4413, 4429,
        1013), :class:`PublishInterrupted` when the connection closes before
        the ACK, and :class:`GuildcastClosed` if the client stops.
        """
        _check_guild(gid)
        if type(t) is not str or _EVENT_RE.fullmatch(t) is None:
            raise ValueError(f"invalid event name {t!r}: 1-64 characters of [A-Z0-9_]")
        if t in _RESERVED_EVENTS:
            raise ValueError(f"{t} is a reserved event name")
        slots = self._publish_slots
        if slots is None:
            raise GuildcastError("client not connected: use 'async with Client(...)'")
        async with slots:
            ws = await self._wait_ready()
            nonce = str(next(self._nonces))
            try:
                body = orjson.dumps(
                    {"op": _OP_PUBLISH, "d": {"guild": gid, "t": t, "d": d, "nonce": nonce}}
                )
            except TypeError as exc:
                raise ValueError(f"data is not JSON serialisable: {exc}") from None
            if len(body) > self._max_message:
                raise ValueError(f"message of {len(body)} bytes exceeds {self._max_message}")
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._publishes[nonce] = fut
            try:
                try:
                    await ws.send(body.decode())
                except ConnectionClosed:
                    if not fut.done():
                        raise PublishInterrupted("connection closed while sending") from None
                return await fut
            finally:
                self._publishes.pop(nonce, None)

    # --- internals: state ----------------------------------------------------------

    def _require_started(self) -> _Mailbox:
        if self._mailbox is None:
            raise GuildcastError("client not connected: use 'async with Client(...)'")
        return self._mailbox

    def _require_usable(self) -> None:
        self._require_started()
        if self._failure is not None:
            raise self._failure
        if self._closing:
            raise ClientClosed()

    async def _wait_ready(self) -> ClientConnection:
        wake = self._wake
        assert wake is not None
        while True:
            self._require_usable()
            ws = self._ws
            if ws is not None and self._identified:
                return ws
            wake.clear()
            await wake.wait()

    def _stop(self, failure: GuildcastClosed | None) -> None:
        """Stop for good: end the event stream and fail every waiter."""
        if failure is not None and self._failure is None:
            self._failure = failure
        err: GuildcastClosed = self._failure or ClientClosed()
        if self._mailbox is not None:
            self._mailbox.end(self._failure)
        if self._first_ready is not None and not self._first_ready.done():
            self._first_ready.set_exception(err)
        self._fail_waiters(err, err)
        if self._wake is not None:
            self._wake.set()

    def _fail_waiters(self, sub_err: BaseException, pub_err: BaseException) -> None:
        for fut in self._publishes.values():
            if not fut.done():
                fut.set_exception(pub_err)
        for sfut in self._sub_waiters.values():
            if not sfut.done():
                sfut.set_exception(sub_err)
        self._sub_waiters.clear()
        for ufut in self._unsub_waiters.values():
            if not ufut.done():
                ufut.set_result(None)
        self._unsub_waiters.clear()

    async def _call(self, cb: Callable[..., Any] | None, *args: Any) -> None:
        if cb is None:
            return
        try:
            await _maybe_await(cb(*args))
        except Exception:
            log.exception("guildcast client callback %r failed", cb)

    async def _send(self, ws: ClientConnection, msg: dict[str, Any]) -> None:
        """Send a command; a closed connection is not an error (the next
        IDENTIFY carries the desired state)."""
        try:
            await ws.send(orjson.dumps(msg).decode())
        except ConnectionClosed:
            pass

    # --- internals: the connection loop --------------------------------------------

    async def _token_for_attempt(self) -> str:
        if self._token_provider is not None:
            token = await _maybe_await(self._token_provider())
            if not isinstance(token, str):
                raise TypeError("token_provider must return a str")
            self._token = token
        assert self._token is not None
        return self._token

    async def _run(self) -> None:
        try:
            while True:
                code, reason = await self._attempt()
                if self._closing:
                    return
                failure = self._classify(code, reason)
                if failure is not None:
                    self._stop(failure)
                    return
                floor = _BACKOFF_FLOOR if code in _BACKOFF_CODES else 0
                delay = self._backoff.next_delay(floor)
                if delay is None:
                    self._stop(ReconnectFailed(code, f"gave up reconnecting ({reason})"))
                    return
                log.info("guildcast: closed %s %s; reconnecting in %.3f s", code, reason, delay)
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug; stop loudly rather than spin
            log.exception("guildcast client loop failed")
            self._stop(GuildcastClosed(4000, f"client error: {exc!r}"))

    def _classify(self, code: int, reason: str) -> GuildcastClosed | None:
        """The failure that stops the client after close ``code``, or None to reconnect."""
        if code == AUTH_FAILED:
            self._auth_failures += 1
            if self._token_provider is None or self._auth_failures > 1:
                return AuthenticationFailed(code, reason)
            return None
        if code in FATAL_CLOSE_CODES:
            return GuildcastClosed(code, reason)
        return None

    async def _attempt(self) -> tuple[int, str]:
        """One connection, from TCP connect to close; returns ``(code, reason)``."""
        try:
            token = await self._token_for_attempt()
        except Exception as exc:
            log.warning("guildcast: token provider failed: %r", exc)
            return ABNORMAL_CLOSURE, f"token provider failed: {exc!r}"
        try:
            ws = await websockets.connect(
                self.url,
                open_timeout=self._open_timeout,
                close_timeout=self._close_timeout,
                ping_interval=None,  # the protocol's HEARTBEAT does this job
                compression=None,  # PROTOCOL.md "Transport": off
                max_size=None,  # the server bounds what it sends
                user_agent_header="guildcast-python-client",
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if 400 <= status < 500 and status not in (408, 429):
                return 4002, f"HTTP {status} from {self.url}: wrong gateway URL?"
            return ABNORMAL_CLOSURE, f"HTTP {status}"
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            return ABNORMAL_CLOSURE, f"connect failed: {exc!r}"
        self._ws = ws
        try:
            await self._session(ws, token)
        except ConnectionClosed:
            pass
        except (TimeoutError, OSError) as exc:
            log.info("guildcast: connection failed: %r", exc)
            await ws.close(4000, "client timeout")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # A message that breaks PROTOCOL.md: drop this connection, keep going.
            log.error("guildcast: bad message from server: %r", exc)
            await ws.close(4000, "bad message from server")
        finally:
            self._ws = None
            self._identified = False
            self._subscribed.clear()
            self._sent.clear()
            self._reader_blocked = False
            interrupted = PublishInterrupted("connection closed before the ACK")
            for fut in self._publishes.values():
                if not fut.done():
                    fut.set_exception(interrupted)
            for ufut in self._unsub_waiters.values():
                if not ufut.done():
                    ufut.set_result(None)
            self._unsub_waiters.clear()
        await ws.wait_closed()
        rcvd = ws.protocol.close_rcvd
        if rcvd is None:
            code, reason = ABNORMAL_CLOSURE, "connection lost"
        else:
            code, reason = rcvd.code, rcvd.reason
        await self._call(self._on_disconnect, code, reason)
        return code, reason

    async def _session(self, ws: ClientConnection, token: str) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._open_timeout):
            hello = orjson.loads(await ws.recv())
        if hello.get("op") != _OP_HELLO:
            await ws.close(4000, "expected HELLO")
            return
        interval = float(hello["d"]["heartbeat_interval"]) / 1000.0
        self._last_recv = loop.time()
        self._sent = dict(self._desired)
        identify: dict[str, Any] = {
            "token": token,
            "guilds": {gid: _position_json(pos) for gid, pos in self._sent.items()},
        }
        if self._event_filter is not None:
            identify["events"] = self._event_filter
        await ws.send(orjson.dumps({"op": _OP_IDENTIFY, "d": identify}).decode())
        # The heartbeat task is owned by this coroutine: cancelled and awaited
        # whichever way the connection ends.
        beat = asyncio.create_task(self._heartbeat(ws, interval), name="guildcast-heartbeat")
        try:
            async for raw in ws:
                self._last_recv = loop.time()
                await self._handle(ws, orjson.loads(raw))
        finally:
            beat.cancel()
            (result,) = await asyncio.gather(beat, return_exceptions=True)
            if isinstance(result, Exception):
                log.error("guildcast: heartbeat task failed: %r", result)

    async def _heartbeat(self, ws: ClientConnection, interval: float) -> None:
        """PROTOCOL.md "Session flow" 4: HEARTBEAT every interval; replace a
        connection that has gone silent (half-open TCP)."""
        loop = asyncio.get_running_loop()
        silent_limit = max(_ZOMBIE_INTERVALS * interval, _ZOMBIE_MIN_S)
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            if not self._reader_blocked and now - self._last_recv > silent_limit:
                log.warning("guildcast: no data for %.1f s; reconnecting", now - self._last_recv)
                await ws.close(4000, "server silent")
                return
            if now < self._heartbeat_paused_until:
                continue
            try:
                await ws.send(_HEARTBEAT)
            except ConnectionClosed:
                return

    async def _deliver(self, item: Item) -> None:
        mailbox = self._mailbox
        assert mailbox is not None
        if mailbox.full:
            self._reader_blocked = True
        try:
            await mailbox.put(item)
        finally:
            self._reader_blocked = False
            self._last_recv = asyncio.get_running_loop().time()

    async def _handle(self, ws: ClientConnection, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        d: Any = msg.get("d")
        if op == _OP_DISPATCH:
            t, g = msg.get("t"), msg.get("g")
            if t == "READY":
                await self._ready(ws, d)
            elif t == "SUBSCRIBED" and g is not None:
                await self._subscribed_guild(g, d)
            elif t == "UNSUBSCRIBED" and g is not None:
                fut = self._unsub_waiters.pop(g, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            elif g is not None and isinstance(msg.get("s"), int):
                await self._event(g, t, msg["s"], d)
        elif op == _OP_ACK:
            pfut = self._publishes.get(d.get("nonce"))
            if pfut is not None and not pfut.done():
                pfut.set_result(int(d["s"]))
        elif op == _OP_ERROR:
            await self._error(d)
        elif op == _OP_RECONNECT:
            log.info("guildcast: server asked to reconnect (draining)")
        # HEARTBEAT_ACK: _last_recv was updated by the reader.

    async def _ready(self, ws: ClientConnection, d: dict[str, Any]) -> None:
        self._identified = True
        self.session_id = d.get("session_id")
        self.user = d.get("user")
        self.sessions += 1
        self._auth_failures = 0
        self._backoff.reset()
        # Guilds the application asked for while IDENTIFY was in flight.
        missing = {gid: pos for gid, pos in self._desired.items() if gid not in self._sent}
        if missing:
            self._sent.update(missing)
            guilds = {gid: _position_json(pos) for gid, pos in missing.items()}
            await self._send(ws, {"op": _OP_SUBSCRIBE, "d": {"guilds": guilds}})
        if self._first_ready is not None and not self._first_ready.done():
            self._first_ready.set_result(None)
        assert self._wake is not None
        self._wake.set()
        await self._call(self._on_ready, self.session_id or "")

    async def _subscribed_guild(self, gid: str, d: dict[str, Any]) -> None:
        if gid not in self._desired:
            return  # unsubscribed meanwhile; UNSUBSCRIBED follows
        epoch, head, recovered = str(d["epoch"]), int(d["s"]), bool(d["recovered"])
        sent = self._sent.get(gid)
        current = self._desired[gid]
        self._subscribed.add(gid)
        if recovered and current is not None and current.epoch == epoch:
            pos = current  # the replay s+1..head follows
        else:
            pos = self._desired[gid] = Position(epoch, head)
            if sent is not None:
                await self._deliver(Resync(gid, epoch, head))
                await self._call(self._on_unrecovered, gid)
        fut = self._sub_waiters.pop(gid, None)
        if fut is not None and not fut.done():
            fut.set_result(pos)

    async def _event(self, gid: str, t: Any, s: int, d: Any) -> None:
        if gid not in self._desired:
            return  # unsubscribed: the server stops at UNSUBSCRIBED
        pos = self._desired[gid]
        if pos is not None and s <= pos.s:
            self.duplicates_dropped += 1
            return
        self._desired[gid] = Position(pos.epoch if pos is not None else "", s)
        await self._deliver(Event(gid, str(t), s, d))

    async def _error(self, d: dict[str, Any]) -> None:
        code, message = int(d.get("code", 0)), str(d.get("message", ""))
        nonce, gid = d.get("nonce"), d.get("g")
        if nonce is not None:
            pfut = self._publishes.get(nonce)
            if pfut is not None and not pfut.done():
                pfut.set_exception(PublishError(code, message, gid))
            return
        if gid is not None and gid in self._sent and gid not in self._subscribed:
            # A SUBSCRIBE (or IDENTIFY guild) was refused: stop following it.
            self._desired.pop(gid, None)
            self._sent.pop(gid, None)
            fut = self._sub_waiters.pop(gid, None)
            if fut is not None and not fut.done():
                fut.set_exception(SubscribeError(code, message, gid))
            else:
                await self._deliver(SubscriptionLost(gid, code, message))
            return
        log.warning("guildcast: server error %s %s (guild %s)", code, message, gid)
