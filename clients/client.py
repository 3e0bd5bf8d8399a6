"""The Guildcast Python client: one resilient gateway session for an application.

A thin asyncio adapter: the protocol (IDENTIFY, heartbeats, SUBSCRIBE and
UNSUBSCRIBE, PUBLISH with nonce-matched ACKs, Position tracking, close-code
classification) is the Sans-I/O :class:`guildcast.protocol.client.ClientSession`;
this module owns the WebSocket (websockets' asyncio client), the clock, the
tasks, the futures the application awaits, the bounded event queue and the
reconnect loop with full-jitter backoff (:mod:`guildcast.client.backoff`).

Consistency model. For each subscribed guild the session keeps the
:class:`Position` of the last event handed to the application. Every
reconnect's IDENTIFY carries those positions, so the server replays what was
missed (PROTOCOL.md, "Subscribing and recovering"). The application sees each
guild's events in increasing ``s``, with no duplicates: anything with
``s <= last seen`` is dropped as a safety net. When the server cannot
recover a guild (``recovered: false`` after a Position was sent: the epoch
changed or the history window was passed), the application gets a
:class:`Resync` item in :meth:`Client.events` (and ``on_unrecovered(gid)``)
before that guild's next event, and must reload that guild's state.

Presence (``presence=True``, PROTOCOL.md "Presence"): each subscribed
guild's members are kept as a :class:`Roster` (:meth:`Client.roster`): the
PRESENCE_SNAPSHOT that follows SUBSCRIBED, then every join and leave after
it, which the server sends with no change missed or doubled. The same
changes come through :meth:`Client.events` in order with the guild's events
(:class:`PresenceSnapshot`, :class:`PresenceJoin`, :class:`PresenceLeave`).
A roster belongs to one connection: after a reconnect it is None until the
new snapshot arrives.

Passive guilds (``subscribe(gid, passive=True)``, PROTOCOL.md "Passive
subscriptions") deliver no events, only :class:`Activity` items (the
guild's head, at most once per the server's ``passive_interval``);
:meth:`Client.unread` counts the events since the guild's Position, and
:meth:`Client.activate` switches it to active on the live connection: the
events missed while passive are replayed first, then live ones. A passive
guild has no roster (no presence changes come while passive); its
activation's snapshot starts a new one.

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
timer task (HELLO timeout, heartbeats, liveness) is owned by the coroutine
that reads that connection, which cancels and awaits it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from guildcast.client.backoff import Backoff
from guildcast.protocol import client as proto
from guildcast.protocol.client import DEFAULT_MAX_MESSAGE as DEFAULT_MAX_MESSAGE
from guildcast.protocol.client import Activity as Activity
from guildcast.protocol.client import Event as Event
from guildcast.protocol.client import Member as Member
from guildcast.protocol.client import Position as Position
from guildcast.protocol.client import PresenceJoin as PresenceJoin
from guildcast.protocol.client import PresenceLeave as PresenceLeave
from guildcast.protocol.client import PresenceSnapshot as PresenceSnapshot
from guildcast.protocol.client import Resync as Resync
from guildcast.protocol.client import Roster as Roster
from guildcast.protocol.codes import ABNORMAL_CLOSURE, SUBPROTOCOL, Close, CloseAction
from guildcast.protocol.codes import FATAL_CLOSE_CODES as FATAL_CLOSE_CODES

log = logging.getLogger("guildcast.client")

#: "get a new token": fatal unless a token provider can supply a fresh one.
AUTH_FAILED = int(Close.AUTH_FAILED)
#: Items the event queue holds before the reader applies backpressure.
DEFAULT_MAX_PENDING_EVENTS = 10_000
#: PUBLISH awaiting an ACK at once; more callers wait for a slot.
DEFAULT_MAX_INFLIGHT_PUBLISHES = 1_000


@dataclass(frozen=True, slots=True)
class SubscriptionLost:
    """The server refused to re-subscribe ``guild`` after a reconnect
    (ERROR ``code``, for example 4403 when a fresh token no longer allows it).
    The client no longer follows this guild."""

    guild: str
    code: int
    message: str


Item: TypeAlias = (
    Event | Resync | SubscriptionLost | Activity | PresenceSnapshot | PresenceJoin | PresenceLeave
)
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
        rewind: protocol 1.1 (PROTOCOL.md "Rewind"): those guilds start with
            their last ``rewind`` events (as many as the server's history and
            ``max_rewind`` allow) instead of from now; once SUBSCRIBED a
            reconnect recovers from the last event, never rewinding again.
        events: event names this session wants (IDENTIFY ``events``);
            None for all.
        presence: ask for presence (IDENTIFY ``presence``): each guild's
            :meth:`roster`, and its changes as items of :meth:`events`.
        activity_batch: protocol 1.1 (PROTOCOL.md "Passive subscriptions"):
            the server sends a notice interval's heads of all passive guilds
            in one message (IDENTIFY ``activity_batch``; about 4x fewer bytes
            for a session in many passive guilds); still one
            :class:`Activity` item per guild. A server that does not know
            it sends one notice per guild, read the same way.
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
        presence: bool = False,
        backoff: Backoff | None = None,
        on_unrecovered: Callable[[str], Any] | None = None,
        on_ready: Callable[[str], Any] | None = None,
        on_disconnect: Callable[[int, str], Any] | None = None,
        max_pending_events: int = DEFAULT_MAX_PENDING_EVENTS,
        max_inflight_publishes: int = DEFAULT_MAX_INFLIGHT_PUBLISHES,
        max_message: int = DEFAULT_MAX_MESSAGE,
        open_timeout: float = 10.0,
        close_timeout: float = 5.0,
        rewind: int | None = None,
        activity_batch: bool = False,
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
        self._backoff = backoff if backoff is not None else Backoff()
        #: The protocol state across connections (guilds and their Positions);
        #: a SUBSCRIBE refused with 1013 is retried on the backoff's schedule.
        self._session = proto.ClientSession(
            guilds,
            events,
            renewable_token=token_provider is not None,
            max_message=max_message,
            hello_timeout=open_timeout,
            rewind=rewind,
            presence=presence,
            activity_batch=activity_batch,
            retry_base=self._backoff.base,
            retry_cap=self._backoff.cap,
            random=self._backoff.rng.random,
        )
        self._on_unrecovered = on_unrecovered
        self._on_ready = on_ready
        self._on_disconnect = on_disconnect
        self._max_pending = max_pending_events
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self._publish_slots_n = max_inflight_publishes

        self._sub_waiters: dict[str, asyncio.Future[Position]] = {}
        self._unsub_waiters: dict[str, asyncio.Future[None]] = {}
        self._publishes: dict[str, asyncio.Future[int]] = {}

        self._ws: ClientConnection | None = None
        self._wake: asyncio.Event | None = None
        self._mailbox: _Mailbox | None = None
        self._publish_slots: asyncio.Semaphore | None = None
        self._runner: asyncio.Task[None] | None = None
        self._first_ready: asyncio.Future[None] | None = None
        self._failure: GuildcastClosed | None = None
        self._closing = False

        #: Session id and user of the current connection (READY).
        self.session_id: str | None = None
        self.user: str | None = None
        #: Connections that reached READY, the first included.
        self.sessions = 0
        #: What the reconnect loop did (PROTOCOL.md "Pacing"): RECONNECTs
        #: received, closes 1013, waits that followed a server hint,
        #: reconnects scheduled, 1 once it gave up (backoff limits),
        #: SUBSCRIBEs refused with ERROR 1013 and scheduled again, and
        #: connects refused (nothing listening) paced without backoff.
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "reconnect_requests",
                "try_again_later",
                "hinted_waits",
                "reconnects",
                "gave_up",
                "subscribe_retries",
                "refused_connects",
            ),
            0,
        )

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
        return self._session.ready

    @property
    def subprotocol(self) -> str | None:
        """The subprotocol the current connection agreed (``guildcast.v1``
        with a 1.1 server), or None (not connected, or a 1.0 server)."""
        ws = self._ws
        return None if ws is None else ws.subprotocol

    @property
    def positions(self) -> dict[str, Position | None]:
        """A copy of each followed guild's last seen Position (for persisting)."""
        return self._session.positions

    def roster(self, gid: str) -> Roster | None:
        """``gid``'s members as this connection knows them (with
        ``presence=True``): its PRESENCE_SNAPSHOT and every join and leave
        since, already received (:meth:`events` may still hold them); None
        before the snapshot (not subscribed, or reconnecting)."""
        return self._session.roster(gid)

    @property
    def duplicates_dropped(self) -> int:
        """Events dropped because their ``s`` was already seen (safety net)."""
        return self._session.duplicates_dropped

    @property
    def gaps(self) -> int:
        """Jumps in a guild's ``s`` seen (the server promises none; logged)."""
        return self._session.gaps

    def pause_heartbeats(self, seconds: float) -> None:
        """Send no HEARTBEAT for ``seconds``: the server will close the session
        with 4009 and the client will reconnect and recover. For testing that
        path; applications never need it."""
        self._session.pause_heartbeats(asyncio.get_running_loop().time() + seconds)

    # --- application API ---------------------------------------------------------

    async def events(self) -> AsyncIterator[Item]:
        """Yield :class:`Event`, :class:`Resync` and :class:`SubscriptionLost`
        items (and, with ``presence=True``, :class:`PresenceSnapshot`,
        :class:`PresenceJoin` and :class:`PresenceLeave`) in order, until the
        client is closed.

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

    async def subscribe(
        self,
        gid: str,
        position: Position | None = None,
        *,
        rewind: int | None = None,
        passive: bool = False,
    ) -> Position:
        """Follow guild ``gid``; returns its Position once SUBSCRIBED.

        With ``position`` (for example one saved from :attr:`positions`), the
        server replays the events after it, or a :class:`Resync` comes first
        if it cannot. With ``rewind`` instead (protocol 1.1, PROTOCOL.md
        "Rewind"), the guild's last ``rewind`` events come first (at most what
        the server's history and ``max_rewind`` hold), then live ones; the
        returned Position is the one before them. Raises ValueError for both,
        or a rewind that is not a positive integer;
        :class:`SubscribeError` on ERROR (4403: the token does not allow this
        guild) and :class:`GuildcastClosed` if the client stops. While
        disconnected it waits for the next connection. An ERROR 1013 (the
        node cannot take the guild now) is not raised: the guild is asked
        for again after a full-jitter delay on the ``backoff`` schedule (at
        least any retry hint in the message), as often as it takes, and
        this waits for it (``counters["subscribe_retries"]``; leave the
        guild with :meth:`unsubscribe` to stop).

        ``passive=True``: no events, only :class:`Activity` items (PROTOCOL.md
        "Passive subscriptions"; never with a ``rewind``: ValueError). For a
        guild already followed in the other mode this switches it, as
        :meth:`activate` / :meth:`deactivate` do.
        """
        proto.check_guild(gid)
        if position is not None and rewind is not None:
            raise ValueError("give a position or a rewind, not both")
        if rewind is not None:
            proto.Rewind(rewind)  # ValueError now, not at the SUBSCRIBE
            if passive:
                raise ValueError("a passive guild takes no rewind (it receives no events)")
        self._require_usable()
        if self._session.follows(gid) and self._session.is_passive(gid) != passive:
            return await self._switch(gid, passive)
        pos = self._session.subscribed(gid)
        if pos is not None:
            return pos
        fut = self._sub_waiters.get(gid)
        if fut is None:
            fut = self._sub_waiters[gid] = asyncio.get_running_loop().create_future()
        await self._carry_out(self._session.subscribe(gid, position, rewind, passive))
        return await asyncio.shield(fut)

    async def activate(self, gid: str) -> Position:
        """Switch followed guild ``gid`` from passive to active; returns the
        Position its stream resumes from once SUBSCRIBED. The events missed
        while passive follow (within the server's history; else a
        :class:`Resync` comes first), then live ones, with no gap or duplicate."""
        return await self._switch(gid, False)

    async def deactivate(self, gid: str) -> Position:
        """Switch followed guild ``gid`` to passive; returns its Position (what
        :meth:`activate` resumes from) once the server confirms."""
        return await self._switch(gid, True)

    def unread(self, gid: str) -> int | None:
        """Events of passive guild ``gid`` after its Position by the last
        :class:`Activity` (0 when active; None when unknown)."""
        return self._session.unread(gid)

    def is_passive(self, gid: str) -> bool:
        """True if ``gid`` is followed passively."""
        return self._session.is_passive(gid)

    async def _switch(self, gid: str, passive: bool) -> Position:
        proto.check_guild(gid)
        self._require_usable()
        if not self._session.follows(gid):
            raise ValueError(f"guild {gid!r} is not followed: subscribe first")
        if self._session.is_passive(gid) == passive:
            pos = self._session.subscribed(gid)
            if pos is not None and gid not in self._sub_waiters:
                return pos
        fut = self._sub_waiters.get(gid)
        if fut is None or fut.done():
            fut = self._sub_waiters[gid] = asyncio.get_running_loop().create_future()
        await self._carry_out(self._session.set_passive(gid, passive))
        return await asyncio.shield(fut)

    async def unsubscribe(self, gid: str) -> None:
        """Stop following guild ``gid``; no event of it is delivered after this
        returns. A no-op for a guild not followed."""
        proto.check_guild(gid)
        self._require_usable()
        if not self._session.follows(gid):
            return
        waiter = self._sub_waiters.pop(gid, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(SubscribeError(0, "unsubscribed before SUBSCRIBED", gid))
            waiter.exception()  # retrieved: nobody may be awaiting it any more
        out = self._session.unsubscribe(gid)
        if not self._session.leaving(gid):
            return
        fut = self._unsub_waiters.get(gid)
        if fut is None:
            fut = self._unsub_waiters[gid] = asyncio.get_running_loop().create_future()
        await self._carry_out(out)
        await asyncio.shield(fut)

    async def publish(
        self, gid: str, t: str, d: Any = None, *, idempotency_key: str | None = None
    ) -> int:
        """Publish event ``t`` with data ``d`` to guild ``gid``; returns its ``s``.

        Waits for a connection if there is none. Raises ValueError for an
        invalid guild id, event name, idempotency key, non-JSON data or an
        oversized message, :class:`PublishError` when the server refuses it
        (4403, 4409, 4413, 4429, 1013, or 4504: outcome unknown),
        :class:`PublishInterrupted` when the connection closes before the
        ACK, and :class:`GuildcastClosed` if the client stops.

        With ``idempotency_key`` (protocol 1.1), a publish whose outcome is
        unknown (4504, :class:`PublishInterrupted`) is safe to retry with the
        same key: within the server's window the retry returns the original
        ``s`` and subscribers see the event once (PROTOCOL.md "Idempotent
        publish"). The same key with other ``t``/``d`` is refused with 4409.
        """
        proto.check_publish(gid, t)
        proto.check_idempotency_key(idempotency_key)
        slots = self._publish_slots
        if slots is None:
            raise GuildcastError("client not connected: use 'async with Client(...)'")
        async with slots:
            ws = await self._wait_ready()
            nonce, send = self._session.publish(gid, t, d, idempotency_key)
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._publishes[nonce] = fut
            try:
                try:
                    await ws.send(send.data, text=True)
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
            if ws is not None and self._session.ready:
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
        for fut in self._publishes.values():
            if not fut.done():
                fut.set_exception(err)
        for sfut in self._sub_waiters.values():
            if not sfut.done():
                sfut.set_exception(err)
        self._sub_waiters.clear()
        for ufut in self._unsub_waiters.values():
            if not ufut.done():
                ufut.set_result(None)
        self._unsub_waiters.clear()
        if self._wake is not None:
            self._wake.set()

    async def _call(self, cb: Callable[..., Any] | None, *args: Any) -> None:
        if cb is None:
            return
        try:
            await _maybe_await(cb(*args))
        except Exception:
            log.exception("guildcast client callback %r failed", cb)

    # --- internals: carrying out the session's outputs -------------------------------

    async def _carry_out(self, outputs: list[proto.Output]) -> None:
        """Do what the session asked, in order. A closed connection is not an
        error when sending (the next IDENTIFY carries the desired state)."""
        for o in outputs:
            if isinstance(o, proto.Send):
                ws = self._ws
                if ws is not None:
                    try:
                        await ws.send(o.data, text=True)
                    except ConnectionClosed:
                        pass
            elif isinstance(o, Event | PresenceSnapshot | PresenceJoin | PresenceLeave):
                await self._deliver(o)
            elif isinstance(o, proto.Subscribed):
                # A SUBSCRIBED of the mode asked for (a switch may still be
                # answered by one of the mode it left).
                if o.passive == self._session.is_passive(o.guild):
                    fut = self._sub_waiters.pop(o.guild, None)
                    if fut is not None and not fut.done():
                        fut.set_result(o.position)
            elif isinstance(o, Activity):
                await self._deliver(o)
            elif isinstance(o, Resync):
                await self._deliver(o)
                await self._call(self._on_unrecovered, o.guild)
            elif isinstance(o, proto.Acked):
                pfut = self._publishes.get(o.nonce)
                if pfut is not None and not pfut.done():
                    pfut.set_result(o.s)
            elif isinstance(o, proto.PublishRefused):
                pfut = self._publishes.get(o.nonce)
                if pfut is not None and not pfut.done():
                    pfut.set_exception(PublishError(o.code, o.message, o.guild))
            elif isinstance(o, proto.PublishInterrupted):
                pfut = self._publishes.get(o.nonce)
                if pfut is not None and not pfut.done():
                    pfut.set_exception(PublishInterrupted("connection closed before the ACK"))
            elif isinstance(o, proto.Unsubscribed):
                ufut = self._unsub_waiters.pop(o.guild, None)
                if ufut is not None and not ufut.done():
                    ufut.set_result(None)
            elif isinstance(o, proto.SubscribeRefused):
                sfut = self._sub_waiters.pop(o.guild, None)
                if sfut is not None and not sfut.done():
                    sfut.set_exception(SubscribeError(o.code, o.message, o.guild))
                else:
                    await self._deliver(SubscriptionLost(o.guild, o.code, o.message))
            elif isinstance(o, proto.SubscribeDeferred):
                self.counters["subscribe_retries"] += 1
                log.info(
                    "guildcast: guild %s refused (%s %s); asking again in %.3f s",
                    o.guild,
                    o.code,
                    o.message,
                    o.delay,
                )
            elif isinstance(o, proto.Ready):
                await self._ready(o)
            elif isinstance(o, proto.CloseConn):
                if o.problem is not None:
                    log.warning("guildcast: %s (%s); reconnecting", o.reason, o.problem)
                if self._ws is not None:
                    await self._ws.close(o.code, o.reason)
            elif isinstance(o, proto.Gap):
                log.warning("guildcast: guild %s jumped from s=%d to s=%d", o.guild, o.after, o.s)
            elif isinstance(o, proto.ServerError):
                log.warning("guildcast: server error %s %s (guild %s)", o.code, o.message, o.guild)
            elif isinstance(o, proto.ReconnectRequested):
                self.counters["reconnect_requests"] += 1
                log.info("guildcast: server asked to reconnect (draining)")

    async def _ready(self, r: proto.Ready) -> None:
        self.session_id = r.session_id
        self.user = r.user
        self.sessions += 1
        self._backoff.reset()
        if self._first_ready is not None and not self._first_ready.done():
            self._first_ready.set_result(None)
        assert self._wake is not None
        self._wake.set()
        await self._call(self._on_ready, self.session_id or "")

    async def _deliver(self, item: Item) -> None:
        mailbox = self._mailbox
        assert mailbox is not None
        session = self._session
        if mailbox.full:
            session.stalled = True
        try:
            await mailbox.put(item)
        finally:
            session.stalled = False
            session.alive(asyncio.get_running_loop().time())

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
                code, reason, refused = await self._attempt()
                if self._closing:
                    return
                verdict = self._session.verdict(code, reason)
                if verdict.give_up:
                    cls = (
                        AuthenticationFailed
                        if verdict.action is CloseAction.AUTH
                        else GuildcastClosed
                    )
                    self._stop(cls(code, reason))
                    return
                if code == Close.TRY_AGAIN_LATER:
                    self.counters["try_again_later"] += 1
                fixed = None
                if refused:
                    # Nothing listening (PROTOCOL.md "Pacing"): soon, not
                    # growing, or the width of the restart's RECONNECT range.
                    b = self._backoff
                    fixed = self._session.connect_refused(b.clock(), b.rng.random(), b.cap)
                delay = (
                    self._backoff.next_delay(verdict.floor)
                    if fixed is None  # (a Backoff of the older signature still works)
                    else self._backoff.next_delay(verdict.floor, fixed)
                )
                if delay is None:
                    self.counters["gave_up"] += 1
                    self._stop(ReconnectFailed(code, f"gave up reconnecting ({reason})"))
                    return
                if fixed is not None:
                    self.counters["refused_connects"] += 1
                if verdict.wait_ms is not None:
                    # The server's pacing hint (PROTOCOL.md "Pacing"): never sooner.
                    self.counters["hinted_waits"] += 1
                    delay = proto.paced_delay(delay, verdict.wait_ms, self._backoff.rng.random())
                self.counters["reconnects"] += 1
                log.info("guildcast: closed %s %s; reconnecting in %.3f s", code, reason, delay)
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug; stop loudly rather than spin
            log.exception("guildcast client loop failed")
            self._stop(GuildcastClosed(4000, f"client error: {exc!r}"))

    async def _attempt(self) -> tuple[int, str, bool]:
        """One connection, from TCP connect to close; returns ``(code,
        reason, refused)``, ``refused`` True when the TCP connect itself was
        refused (nothing listening on the port)."""
        try:
            token = await self._token_for_attempt()
        except Exception as exc:
            log.warning("guildcast: token provider failed: %r", exc)
            return ABNORMAL_CLOSURE, f"token provider failed: {exc!r}", False
        try:
            ws = await websockets.connect(
                self.url,
                open_timeout=self._open_timeout,
                close_timeout=self._close_timeout,
                ping_interval=None,  # the protocol's HEARTBEAT does this job
                # PROTOCOL.md "Compression": permessage-deflate is offered
                # (websockets decodes; the server sends each message
                # compressed with no context takeover, so no inflater is
                # kept between messages).
                compression="deflate",
                max_size=None,  # the server bounds what it sends
                user_agent_header="guildcast-python-client",
                # PROTOCOL.md "Connecting" (1.1); a 1.0 server ignores the offer.
                subprotocols=[Subprotocol(SUBPROTOCOL)],
            )
        except InvalidStatus as exc:
            code, reason = self._session.connect_failed(exc.response.status_code)
            return code, f"{reason} ({self.url})", False
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            refused = isinstance(exc, ConnectionRefusedError)
            return ABNORMAL_CLOSURE, f"connect failed: {exc!r}", refused
        self._ws = ws
        try:
            await self._connection(ws, token)
        except ConnectionClosed:
            pass
        except OSError as exc:
            log.info("guildcast: connection failed: %r", exc)
            await ws.close(4000, "client error")
        finally:
            self._ws = None
            await self._carry_out(self._session.connection_lost())
        await ws.wait_closed()
        rcvd = ws.protocol.close_rcvd
        if rcvd is None:
            code, reason = ABNORMAL_CLOSURE, "connection lost"
        else:
            code, reason = rcvd.code, rcvd.reason
        await self._call(self._on_disconnect, code, reason)
        return code, reason, False

    async def _connection(self, ws: ClientConnection, token: str) -> None:
        """Read ``ws`` into the session until it closes; the timer task (HELLO
        timeout, heartbeats, liveness) is owned here: cancelled and awaited
        whichever way the connection ends."""
        loop = asyncio.get_running_loop()
        session = self._session
        session.connection_made(token, loop.time())
        retick = asyncio.Event()
        timers = asyncio.create_task(self._timers(retick), name="guildcast-timers")
        try:
            async for raw in ws:
                due = session.next_tick
                await self._carry_out(session.receive(raw, loop.time()))
                if session.next_tick < due:
                    retick.set()  # a deadline moved earlier (HELLO's interval)
        finally:
            timers.cancel()
            (result,) = await asyncio.gather(timers, return_exceptions=True)
            if isinstance(result, Exception):
                log.error("guildcast: timer task failed: %r", result)

    async def _timers(self, retick: asyncio.Event) -> None:
        """Call the session's :meth:`tick` at its ``next_tick``; ``retick`` wakes
        this task early when that moved earlier."""
        loop = asyncio.get_running_loop()
        session = self._session
        while True:
            retick.clear()
            wait = session.next_tick - loop.time()
            try:
                async with asyncio.timeout(None if wait == float("inf") else max(0.0, wait)):
                    await retick.wait()
                continue
            except TimeoutError:
                pass
            await self._carry_out(session.tick(loop.time()))
