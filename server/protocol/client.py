"""The gateway client session (PROTOCOL.md, "A session, step by step"), Sans-I/O.

The client's half of the protocol, beside the server's
:class:`guildcast.protocol.session.Session`: text messages and commands in,
outputs out, no I/O and no clock (``now`` is passed in). The asyncio client
(:mod:`guildcast.client`) is a thin adapter around it; the harness and the
tests can drive it byte for byte.

It owns, across connections: the guilds the application follows with the
:class:`Position` of the last event handed out (the source of every
IDENTIFY), the PUBLISH nonce counter and the duplicate and gap counters; and,
per connection: the state (``IDLE`` -> ``AWAIT_HELLO`` -> ``IDENTIFYING`` ->
``READY`` -> ``IDLE``), the guilds requested and SUBSCRIBED, the PUBLISHes
awaiting their ACK, the UNSUBSCRIBEs awaiting UNSUBSCRIBED and the heartbeat
and liveness deadlines.

Consistency model. Each guild's events are handed out in increasing ``s``
with no duplicate: ``s <= last seen`` is dropped (and counted) as a safety
net; ``s > last + 1`` is reported as a :class:`Gap` (the server promises
none within an epoch; with an ``events`` filter gaps are expected and not
reported). A SUBSCRIBED with ``recovered: false`` after a Position was sent
yields a :class:`Resync` before that guild's next event. A :class:`Rewind`
(protocol 1.1) asked for a guild becomes a Position at its SUBSCRIBED
(``{epoch, head - rewound}``): the replay follows it, and a reconnect
recovers from the last event handed out, never rewinding twice.

Presence (with ``presence=True``, PROTOCOL.md "Presence"): per guild, a
:class:`Roster` of this connection: PRESENCE_SNAPSHOT replaces it, each
PRESENCE_JOIN/LEAVE after it applies to it (the server sends no change
twice and misses none between snapshot and changes); it is forgotten when
the connection ends or the guild is left, and rebuilt by the next snapshot.

Passive guilds (PROTOCOL.md "Passive subscriptions") keep their Position
while passive: it is where :meth:`ClientSession.activate` resumes, so the
events missed meanwhile are replayed. Their GUILD_ACTIVITY notices come out
as :class:`Activity` and set the head :meth:`ClientSession.unread` counts to.
A passive guild has no roster (the server sends it no presence changes); its
activation's PRESENCE_SNAPSHOT starts a new one. A passive request carries no
rewind: a guild deactivated before its rewind was answered keeps the place
that many events before its passive SUBSCRIBED's head.

A SUBSCRIBE (or an IDENTIFY's guild) refused with ERROR 1013 ("try again
later": the node cannot start the guild now, PROTOCOL.md "Refusals") is not
dropped: the guild stays followed and is asked for again after a full-jitter
backoff delay (the attempt's window, at least the "back off" floor's, as a
reconnect after close 1013), or the retry hint in the ERROR's message when
that is longer (:func:`subscribe_retry_delay`); :class:`SubscribeDeferred`
says so. A reconnect's IDENTIFY asks for it anyway. Every other refusal
(4403, 4430) stops following the guild (:class:`SubscribeRefused`).

A connect that is refused (nothing listens: the node is restarting) is not
a sign of overload: :meth:`ClientSession.connect_refused` paces the next
attempt soon and without growing the backoff, or, after a RECONNECT that
named a delay range, the range's width later, so the crowd keeps the spread
the range gave it from the moment the node listens again (PROTOCOL.md
"Pacing"; :func:`refused_delay`).

Bounds: the guilds followed are the application's; PUBLISHes awaiting an ACK
are bounded by the adapter (``max_inflight_publishes``); one connection's
tables are cleared when it ends (:meth:`ClientSession.connection_lost`);
SUBSCRIBE retries hold one entry per followed guild.
"""

from __future__ import annotations

import itertools
import random as _rnd
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeAlias

import orjson

from guildcast.protocol.codes import (
    ABNORMAL_CLOSURE,
    ACTIVITY_EVENT,
    PRESENCE_EVENTS,
    RESERVED_EVENTS,
    Close,
    CloseAction,
    Err,
    Op,
)
from guildcast.protocol.codes import classify_close as _classify
from guildcast.protocol.hints import parse_reconnect, parse_retry
from guildcast.protocol.wire import (
    EVENT_RULE,
    GUILD_RULE,
    IDEMPOTENCY_KEY_RULE,
    valid_event,
    valid_guild,
    valid_idempotency_key,
)

#: The HEARTBEAT message (PROTOCOL.md "Messages", op 1).
HEARTBEAT = b'{"op":1,"d":null}'
#: The server's default ``max_frame`` (PROTOCOL.md "Connecting"): a larger
#: message would be closed with the fatal 1009, so the client refuses it.
DEFAULT_MAX_MESSAGE = 64 * 1024
#: A connection that has delivered nothing for this many heartbeat intervals
#: (and at least ZOMBIE_MIN_S seconds) while the application was reading is
#: dead (half-open TCP) and is replaced.
ZOMBIE_INTERVALS = 3
ZOMBIE_MIN_S = 5.0
#: Seconds from the WebSocket being open to HELLO before the client gives up.
DEFAULT_HELLO_TIMEOUT = 10.0
#: Close code and reason a client uses for a server that breaks the protocol.
BAD_SERVER = 4000


# --- data --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Position:
    """The last event of a guild the application has seen (PROTOCOL.md "Messages")."""

    epoch: str
    s: int


@dataclass(frozen=True, slots=True)
class Rewind:
    """Protocol 1.1 (PROTOCOL.md "Rewind"): start a guild with no Position from
    its last ``n`` events (the server bounds them by its history and
    ``max_rewind``) instead of from now."""

    n: int

    def __post_init__(self) -> None:
        if type(self.n) is not int or self.n < 1:
            raise ValueError(f"rewind must be a positive integer, not {self.n!r}")


@dataclass(frozen=True, slots=True)
class Event:
    """One guild event, handed out in ``s`` order, exactly once."""

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
class Member:
    """A session in a guild's presence (PROTOCOL.md "Presence")."""

    user: str
    session: str
    node: str


@dataclass(frozen=True, slots=True)
class Roster:
    """A guild's presence as this connection knows it: ``members`` (at most
    the server's limit of them, in the order learnt) out of ``count``;
    ``truncated`` when the snapshot could not list them all."""

    guild: str
    members: tuple[Member, ...]
    count: int
    truncated: bool


@dataclass(frozen=True, slots=True)
class PresenceSnapshot:
    """PRESENCE_SNAPSHOT: ``guild``'s presence now replaces what was known."""

    guild: str
    members: tuple[Member, ...]
    count: int
    truncated: bool


@dataclass(frozen=True, slots=True)
class PresenceJoin:
    """PRESENCE_JOIN: ``member`` subscribed to ``guild``."""

    guild: str
    member: Member


@dataclass(frozen=True, slots=True)
class PresenceLeave:
    """PRESENCE_LEAVE: ``member`` left ``guild``."""

    guild: str
    member: Member


# --- outputs -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Write this text message."""

    data: bytes


@dataclass(frozen=True, slots=True)
class CloseConn:
    """Close the connection with ``code``; ``problem`` says what the server did
    wrong (for the log) when the close is the client's verdict on it."""

    code: int
    reason: str
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class Ready:
    """READY: the connection is identified."""

    session_id: str
    user: str


@dataclass(frozen=True, slots=True)
class Subscribed:
    """SUBSCRIBED ``guild``; ``position`` is where its stream resumes
    (``passive``: where an activation will resume; no event follows)."""

    guild: str
    position: Position
    recovered: bool
    passive: bool = False


@dataclass(frozen=True, slots=True)
class Activity:
    """GUILD_ACTIVITY: passive guild ``guild``'s head was at least ``s``."""

    guild: str
    epoch: str
    s: int


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """``guild`` is left: no event of it follows (UNSUBSCRIBED, or the connection ended)."""

    guild: str


@dataclass(frozen=True, slots=True)
class SubscribeRefused:
    """The server refused to subscribe ``guild`` (ERROR ``code``); it is no longer followed."""

    guild: str
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class SubscribeDeferred:
    """The server answered ``guild``'s SUBSCRIBE with ERROR 1013 (try again
    later): it stays followed and is asked for again in ``delay`` seconds
    (or by the next IDENTIFY)."""

    guild: str
    code: int
    message: str
    delay: float


@dataclass(frozen=True, slots=True)
class Acked:
    """The PUBLISH with ``nonce`` was sequenced as ``s`` of ``guild`` in ``epoch``."""

    nonce: str
    guild: str
    s: int
    epoch: str


@dataclass(frozen=True, slots=True)
class PublishRefused:
    """The PUBLISH with ``nonce`` was refused with ERROR ``code``."""

    nonce: str
    code: int
    message: str
    guild: str | None


@dataclass(frozen=True, slots=True)
class PublishInterrupted:
    """The connection ended before the PUBLISH with ``nonce`` was answered."""

    nonce: str


@dataclass(frozen=True, slots=True)
class ServerError:
    """An ERROR that answers no pending command."""

    code: int
    message: str
    guild: str | None


@dataclass(frozen=True, slots=True)
class Gap:
    """``guild`` jumped from ``after`` to ``s`` (events ``after+1 .. s-1`` never came)."""

    guild: str
    after: int
    s: int


@dataclass(frozen=True, slots=True)
class ReconnectRequested:
    """RECONNECT: the server is draining; its close (1001) follows.
    ``delay_ms``: the reconnect delay range it suggests (protocol 1.1), if any."""

    delay_ms: tuple[int, int] | None = None


Output: TypeAlias = (
    Send
    | CloseConn
    | Ready
    | Subscribed
    | Unsubscribed
    | SubscribeRefused
    | SubscribeDeferred
    | Acked
    | PublishRefused
    | PublishInterrupted
    | ServerError
    | Gap
    | ReconnectRequested
    | Event
    | Resync
    | Activity
    | PresenceSnapshot
    | PresenceJoin
    | PresenceLeave
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do after a connection closed with ``code``."""

    code: int
    reason: str
    action: CloseAction
    #: True: stop for good; False: back off and reconnect.
    give_up: bool
    #: The backoff attempt floor (PROTOCOL.md "back off, reconnect").
    floor: int
    #: The server's pacing hint (PROTOCOL.md "Pacing"), ms: a 1013's retry
    #: hint, or the delay range of the RECONNECT before a 1001; None: none.
    wait_ms: tuple[int, int] | None = None


def paced_delay(backoff: float, wait_ms: tuple[int, int] | None, u: float) -> float:
    """The wait (seconds) before reconnecting: the backoff's full-jitter
    delay, or a uniform draw (``u`` in [0, 1)) from the server's hint when
    that is longer; a client never comes back before the hint allows."""
    if wait_ms is None:
        return backoff
    lo, hi = wait_ms
    return max(backoff, (lo + u * (hi - lo)) / 1000.0)


#: A connect refused (nothing listens on the port: the node is stopping or
#: starting again) costs the server nothing, so it is retried soon and
#: without growing (PROTOCOL.md "Pacing"): uniformly in ``[0,
#: REFUSED_WINDOW]`` s, about how long a cold start's crowd takes to
#: arrive, so a crowd refused together comes back as a cold start does...
REFUSED_WINDOW = 1.0
#: ... or, after a RECONNECT that named a delay range (a restart the node
#: announced), exactly the range's width later, at least this (s): each
#: client keeps the place its first draw gave it in the range, so the
#: crowd arrives spread over the range once the node listens again, as the
#: node asked, however long its restart took.
REFUSED_MIN_PERIOD = 0.25
#: Seconds of refused connects in a row paced this way; after that the
#: node is not restarting but gone, and the usual backoff takes over.
REFUSED_FOR = 30.0


def refused_delay(
    restart_ms: tuple[int, int] | None, refused_for: float, u: float, cap: float = REFUSED_WINDOW
) -> float | None:
    """The wait (seconds) before trying again after a refused connect, or
    None when the usual backoff applies (refused for longer than
    ``REFUSED_FOR`` s already). ``restart_ms``: the delay range of the
    RECONNECT that ended the last connection, if any (a server's hint, as
    every hint not cut by the backoff's cap); ``refused_for``: seconds since
    the first refusal in a row; ``u`` in [0, 1); ``cap``: the backoff's cap,
    which bounds the window too."""
    if refused_for > REFUSED_FOR:
        return None
    if restart_ms is not None:
        lo, hi = restart_ms
        return max(REFUSED_MIN_PERIOD, (hi - lo) / 1000.0)
    return u * min(REFUSED_WINDOW, cap)


#: "back off, reconnect": the next delay starts at least from this attempt's
#: window, so a crowd refused at once does not retry in the shortest window.
BACKOFF_FLOOR = 2
#: The SUBSCRIBE retry schedule's defaults (s): those of the clients'
#: reconnect backoff (``guildcast.client.backoff``), which the adapters pass.
RETRY_BASE = 0.5
RETRY_CAP = 30.0
#: Exponent ceiling of the retry window (as the backoff's): finite floats.
_MAX_EXPONENT = 32


def subscribe_retry_delay(
    attempt: int,
    wait_ms: tuple[int, int] | None,
    base: float,
    cap: float,
    u: Callable[[], float],
) -> float:
    """Seconds before asking again for a guild refused with ERROR 1013 for
    the ``attempt``-th time in a row (0-based): full jitter over the
    window ``min(cap, base * 2**max(attempt, BACKOFF_FLOOR))``, or a draw
    from the message's retry hint ``wait_ms`` when longer (:func:`paced_delay`);
    ``u`` draws uniformly from [0, 1), first for the jitter, then for the hint."""
    n = min(max(attempt, BACKOFF_FLOOR), _MAX_EXPONENT)
    window = min(cap, base * (1 << n))
    return paced_delay(u() * window, wait_ms, u())


class State(Enum):
    IDLE = "idle"
    AWAIT_HELLO = "await_hello"
    IDENTIFYING = "identifying"
    READY = "ready"


# --- message builders (client -> server) --------------------------------------


def position_json(pos: Position | None) -> dict[str, Any] | None:
    """A Position as the protocol writes it, ``{"epoch", "s"}`` or null."""
    return None if pos is None else {"epoch": pos.epoch, "s": pos.s}


def start_json(start: Position | Rewind | None, passive: bool = False) -> dict[str, Any] | None:
    """A guild's value in IDENTIFY/SUBSCRIBE: a Position, ``{"rewind": n}`` or
    null; (1.1) ``passive``: ``{"passive": true}`` with the Position if there
    is one. A passive request carries no rewind (the server refuses the pair:
    a passive subscriber receives no events); a guild's pending Rewind is sent
    when it is active."""
    if passive:
        d: dict[str, Any] = {"epoch": start.epoch, "s": start.s} if type(start) is Position else {}
        d["passive"] = True
        return d
    if isinstance(start, Rewind):
        return {"rewind": start.n}
    return position_json(start)


def identify_message(
    token: str,
    guilds: Mapping[str, Position | Rewind | None],
    events: list[str] | None = None,
    presence: bool = False,
    passive: Collection[str] = (),
    activity_batch: bool = False,
) -> bytes:
    """IDENTIFY (op 2); ``presence`` asks for PRESENCE_SNAPSHOT/JOIN/LEAVE; the
    guilds in ``passive`` are subscribed passively; (1.1) ``activity_batch``
    asks for a passive tick's notices in one GUILD_ACTIVITY of several guilds."""
    d: dict[str, Any] = {
        "token": token,
        "guilds": {gid: start_json(pos, gid in passive) for gid, pos in guilds.items()},
    }
    if events is not None:
        d["events"] = events
    if presence:
        d["presence"] = True
    if activity_batch:
        d["activity_batch"] = True
    return orjson.dumps({"op": Op.IDENTIFY, "d": d})


def subscribe_message(
    guilds: Mapping[str, Position | Rewind | None], passive: Collection[str] = ()
) -> bytes:
    """SUBSCRIBE (op 3); the guilds in ``passive`` are subscribed passively."""
    d = {"guilds": {gid: start_json(pos, gid in passive) for gid, pos in guilds.items()}}
    return orjson.dumps({"op": Op.SUBSCRIBE, "d": d})


def unsubscribe_message(guilds: list[str]) -> bytes:
    """UNSUBSCRIBE (op 4)."""
    return orjson.dumps({"op": Op.UNSUBSCRIBE, "d": {"guilds": guilds}})


def publish_message(
    gid: str, t: str, d: Any, nonce: str | None = None, idempotency_key: str | None = None
) -> bytes:
    """PUBLISH (op 5); raises ValueError when ``d`` is not JSON serialisable.
    ``idempotency_key`` (protocol 1.1) is left out when None."""
    body: dict[str, Any] = {"guild": gid, "t": t, "d": d}
    if nonce is not None:
        body["nonce"] = nonce
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    try:
        return orjson.dumps({"op": Op.PUBLISH, "d": body})
    except TypeError as exc:
        raise ValueError(f"data is not JSON serialisable: {exc}") from None


def check_guild(gid: object) -> str:
    """``gid`` if it is a valid guild id, else ValueError."""
    if not valid_guild(gid):
        raise ValueError(f"invalid guild id {gid!r}: {GUILD_RULE}")
    return gid


def check_publish(gid: object, t: object) -> None:
    """ValueError for what the server would refuse: a guild id it closes 4002
    for, an event name it answers ERROR 4422 for (protocol 1.1; 4002 in 1.0)
    or a reserved name (ERROR 4403). Checked here so the mistake shows at
    the call, not as an answer later."""
    check_guild(gid)
    if not valid_event(t):
        raise ValueError(f"invalid event name {t!r}: {EVENT_RULE}")
    if t in RESERVED_EVENTS:
        raise ValueError(f"{t} is a reserved event name")


def check_idempotency_key(key: object) -> None:
    """ValueError for an idempotency key the server would refuse (ERROR 4422,
    protocol 1.1); None (no key) passes."""
    if key is not None and not valid_idempotency_key(key):
        raise ValueError(f"invalid idempotency key {key!r}: {IDEMPOTENCY_KEY_RULE}")


def classify_close(code: int) -> CloseAction:
    """The client's reaction to close ``code`` (PROTOCOL.md "Close codes")."""
    return _classify(code)


class _Bad(Exception):
    """Internal: the server broke the protocol; close the connection."""


def _obj(d: Any, what: str) -> dict[str, Any]:
    if type(d) is not dict:
        raise _Bad(f"{what} needs an object d")
    return d


def _member(d: Any, what: str) -> Member:
    m = _obj(d, what)
    user, session, node = m.get("user"), m.get("session"), m.get("node")
    if type(user) is not str or type(session) is not str or type(node) is not str:
        raise _Bad(f"{what} needs {{user, session, node}} strings")
    return Member(user, session, node)


class _Roster:
    """One guild's presence on this connection: session id -> member, and the count."""

    __slots__ = ("count", "members", "truncated")

    def __init__(self, members: dict[str, Member], count: int, truncated: bool) -> None:
        self.members = members
        self.count = count
        self.truncated = truncated


# --- the session ---------------------------------------------------------------


class ClientSession:
    """One client's protocol state across its connections. Feed it; carry out its outputs.

    The adapter must: call :meth:`connection_made` when a WebSocket is open,
    :meth:`receive` for each text message, :meth:`tick` at :attr:`next_tick`,
    :meth:`connection_lost` when the connection is gone and :meth:`verdict`
    with its close code; carry out the outputs in order.
    """

    def __init__(
        self,
        guilds: Iterable[str] = (),
        events: Iterable[str] | None = None,
        *,
        renewable_token: bool = False,
        max_message: int = DEFAULT_MAX_MESSAGE,
        hello_timeout: float = DEFAULT_HELLO_TIMEOUT,
        rewind: int | None = None,
        presence: bool = False,
        activity_batch: bool = False,
        retry_base: float = RETRY_BASE,
        retry_cap: float = RETRY_CAP,
        random: Callable[[], float] = _rnd.random,
    ) -> None:
        self.events = None if events is None else list(events)
        #: IDENTIFY ``presence``: keep a :class:`Roster` per guild.
        self.presence = presence
        #: (1.1) IDENTIFY ``activity_batch``: a passive tick's notices come as
        #: one GUILD_ACTIVITY of several guilds (still one Activity each).
        self.activity_batch = activity_batch
        for name in self.events or ():
            if not valid_event(name):
                raise ValueError(f"invalid event name {name!r}")
        #: With a token provider one 4004 is retried with a fresh token.
        self.renewable_token = renewable_token
        self.max_message = max_message
        self.hello_timeout = hello_timeout
        #: Guilds followed, each with the last Position handed out (None, or
        #: the Rewind asked for, until the first SUBSCRIBED): the source of
        #: every IDENTIFY.
        self._desired: dict[str, Position | Rewind | None] = {}
        start = None if rewind is None else Rewind(rewind)
        for gid in guilds:
            self._desired[check_guild(gid)] = start
        #: Followed guilds subscribed passively, and the last head each was
        #: seen at (passive SUBSCRIBED or GUILD_ACTIVITY): what ``unread`` counts to.
        self._passive: set[str] = set()
        self._heads: dict[str, Position] = {}
        self._nonces = itertools.count(1)
        self._auth_failures = 0
        #: The delay range of the last RECONNECT (its 1001 follows).
        self._reconnect_hint: tuple[int, int] | None = None
        #: The range of the RECONNECT that ended the last connection, kept
        #: for the refused connects that follow (:meth:`connect_refused`),
        #: and when the refusals in a row began; both forgotten once a
        #: connection opens.
        self._restart_hint: tuple[int, int] | None = None
        self._refused_since: float | None = None
        #: SUBSCRIBE retries after ERROR 1013 (:func:`subscribe_retry_delay`):
        #: the schedule's window and jitter source, and each followed guild's
        #: refusals in a row (forgotten at its SUBSCRIBED or when left).
        self._retry_base = retry_base
        self._retry_cap = retry_cap
        self._random = random
        self._refusals: dict[str, int] = {}
        #: Events dropped because their ``s`` was already handed out.
        self.duplicates_dropped = 0
        #: Gaps seen (the server promises none within an epoch).
        self.gaps = 0
        self.state = State.IDLE
        self._token = ""
        self._reset_connection()

    def _reset_connection(self) -> None:
        #: Guilds requested on this connection, with the Position (or Rewind) sent.
        self._sent: dict[str, Position | Rewind | None] = {}
        #: Guilds SUBSCRIBED on this connection.
        self._subscribed: set[str] = set()
        #: PUBLISH nonces awaiting their answer on this connection.
        self._inflight: set[str] = set()
        #: Guilds whose UNSUBSCRIBED is awaited on this connection.
        self._leaving: set[str] = set()
        #: Presence of each guild on this connection (after its snapshot).
        self._rosters: dict[str, _Roster] = {}
        #: Guilds refused with 1013 on this connection, and when to ask again.
        self._retry_at: dict[str, float] = {}
        #: When the next HEARTBEAT (and liveness check) is due.
        self._beat_at = float("inf")
        self.interval = 0.0
        self._last_recv = 0.0
        self._paused_until = 0.0
        #: When :meth:`tick` has something to do (the caller's clock).
        self.next_tick = float("inf")
        #: The adapter is waiting for the application to take events: the
        #: silence that follows is not the server's fault.
        self.stalled = False

    # --- state ---------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True while the current connection is READY."""
        return self.state is State.READY

    @property
    def positions(self) -> dict[str, Position | None]:
        """A copy of each followed guild's last Position (None before its
        first SUBSCRIBED, a pending rewind included)."""
        return {g: p if type(p) is Position else None for g, p in self._desired.items()}

    def follows(self, gid: str) -> bool:
        return gid in self._desired

    def subscribed(self, gid: str) -> Position | None:
        """The guild's Position if it is SUBSCRIBED on this connection, else None."""
        pos = self._desired.get(gid) if gid in self._subscribed else None
        return pos if type(pos) is Position else None

    def rosters(self) -> dict[str, Roster]:
        """Every guild's :meth:`roster` known on this connection."""
        return {gid: r for gid in self._rosters if (r := self.roster(gid)) is not None}

    def roster(self, gid: str) -> Roster | None:
        """``gid``'s presence as this connection knows it (its snapshot and
        the changes since), or None before its PRESENCE_SNAPSHOT."""
        r = self._rosters.get(gid)
        if r is None:
            return None
        return Roster(gid, tuple(r.members.values()), r.count, r.truncated)

    def is_passive(self, gid: str) -> bool:
        """True if ``gid`` is followed passively (notices only)."""
        return gid in self._passive

    def unread(self, gid: str) -> int | None:
        """Events of passive guild ``gid`` after its Position, by the last
        head heard of (0 for an active guild); None when unknown (no head
        yet, or the head is of another epoch: then they are lost)."""
        if gid not in self._desired:
            return None
        if gid not in self._passive:
            return 0
        head, pos = self._heads.get(gid), self._desired[gid]
        if head is None or type(pos) is not Position or head.epoch != pos.epoch:
            return None
        return max(0, head.s - pos.s)

    # --- connection lifecycle ------------------------------------------------------

    def connection_made(self, token: str, now: float) -> None:
        """A WebSocket is open: wait for HELLO (within ``hello_timeout``)."""
        self._reset_connection()
        self._reconnect_hint = None
        self._restart_hint = None
        self._refused_since = None
        self._token = token
        self.state = State.AWAIT_HELLO
        self._last_recv = now
        self.next_tick = now + self.hello_timeout

    def connection_lost(self) -> list[Output]:
        """The connection is gone: what it left unanswered."""
        out: list[Output] = [PublishInterrupted(n) for n in sorted(self._inflight, key=_nonce_key)]
        out.extend(Unsubscribed(g) for g in sorted(self._leaving))
        self.state = State.IDLE
        self._reset_connection()
        return out

    def verdict(self, code: int, reason: str) -> Verdict:
        """After a close with ``code``: stop for good, or back off and reconnect."""
        action = classify_close(code)
        give_up = action is CloseAction.FATAL
        if action is CloseAction.AUTH:
            self._auth_failures += 1
            give_up = not self.renewable_token or self._auth_failures > 1
        floor = BACKOFF_FLOOR if action is CloseAction.BACKOFF else 0
        wait = None
        if code == Close.TRY_AGAIN_LATER:
            wait = parse_retry(reason)
        elif code == Close.GOING_AWAY:
            wait = self._reconnect_hint
            self._restart_hint = wait
        self._reconnect_hint = None
        return Verdict(code, reason, action, give_up, floor, wait)

    def connect_refused(self, now: float, u: float, cap: float = REFUSED_WINDOW) -> float | None:
        """A connect was refused (nothing listening: ECONNREFUSED): the wait
        (seconds) before the next attempt (:func:`refused_delay`: soon and
        not growing, or the width of the last RECONNECT's range), or None
        for the usual backoff (refused for more than ``REFUSED_FOR`` s in a
        row). ``now``: the caller's clock; ``u`` in [0, 1); ``cap``: the
        backoff's."""
        if self._refused_since is None:
            self._refused_since = now
        return refused_delay(self._restart_hint, now - self._refused_since, u, cap)

    def connect_failed(self, status: int | None) -> tuple[int, str]:
        """The close code and reason of a connection that never opened: an
        HTTP ``status`` (None: no answer) other than 101."""
        if status is not None and 400 <= status < 500 and status not in (408, 429):
            return 4002, f"HTTP {status}: wrong gateway URL?"
        if status is None:
            return ABNORMAL_CLOSURE, "connect failed"
        return ABNORMAL_CLOSURE, f"HTTP {status}"

    # --- timers ----------------------------------------------------------------

    def tick(self, now: float) -> list[Output]:
        """Deadlines due at ``now``: the HELLO timeout, liveness, the next HEARTBEAT."""
        if now < self.next_tick:
            return []
        if self.state is State.AWAIT_HELLO:
            self.next_tick = float("inf")
            return [CloseConn(BAD_SERVER, "no HELLO in time")]
        if self.state is State.IDLE:
            self.next_tick = float("inf")
            return []
        out = self._retry_subscribes(now) if self._retry_at else []
        if now >= self._beat_at:
            silent_limit = max(ZOMBIE_INTERVALS * self.interval, ZOMBIE_MIN_S)
            if not self.stalled and now - self._last_recv > silent_limit:
                self.next_tick = float("inf")
                problem = f"no data for {now - self._last_recv:.1f} s"
                return [CloseConn(BAD_SERVER, "server silent", problem)]
            self._beat_at = now + self.interval
            if now >= self._paused_until:
                out.append(Send(HEARTBEAT))
        self.next_tick = min([self._beat_at, *self._retry_at.values()])
        return out

    def _retry_subscribes(self, now: float) -> list[Output]:
        """SUBSCRIBE again the guilds refused with 1013 whose delay is over."""
        if self.state is not State.READY:
            return []
        due = [gid for gid, at in self._retry_at.items() if at <= now]
        guilds: dict[str, Position | Rewind | None] = {}
        for gid in due:
            del self._retry_at[gid]
            if gid in self._desired and gid not in self._sent:
                guilds[gid] = self._sent[gid] = self._desired[gid]
        return [Send(subscribe_message(guilds, self._passive))] if guilds else []

    def pause_heartbeats(self, until: float) -> None:
        """Send no HEARTBEAT before ``until`` (the server then closes with 4009)."""
        self._paused_until = until

    def alive(self, now: float) -> None:
        """The connection is known alive at ``now`` (the adapter finished a wait)."""
        self._last_recv = now

    # --- commands ----------------------------------------------------------------

    def subscribe(
        self,
        gid: str,
        position: Position | None = None,
        rewind: int | None = None,
        passive: bool = False,
    ) -> list[Output]:
        """Follow ``gid`` (if it is new: from ``position``, or from its last
        ``rewind`` events, protocol 1.1; not both; ``passive``: notices only,
        never with a rewind); SUBSCRIBE now if READY. For a guild already
        followed in the other mode this switches it (:meth:`set_passive`)."""
        check_guild(gid)
        if position is not None and rewind is not None:
            raise ValueError("give a position or a rewind, not both")
        if passive and rewind is not None:
            raise ValueError("a passive guild takes no rewind (it receives no events)")
        if gid not in self._desired:
            self._desired[gid] = position if rewind is None else Rewind(rewind)
            if passive:
                self._passive.add(gid)
        elif passive != (gid in self._passive):
            return self.set_passive(gid, passive)
        if self.state is not State.READY or gid in self._sent or gid in self._retry_at:
            return []  # asked for already, or again once its retry delay is over
        pos = self._sent[gid] = self._desired[gid]
        return [Send(subscribe_message({gid: pos}, self._passive))]

    def set_passive(self, gid: str, passive: bool) -> list[Output]:
        """Switch followed guild ``gid`` to passive, or back to active: the
        SUBSCRIBE carries its Position, so an activation replays the events
        missed while passive (``recovered: false`` past the history window)."""
        check_guild(gid)
        if gid not in self._desired:
            raise ValueError(f"guild {gid!r} is not followed: subscribe first")
        if passive == (gid in self._passive):
            return []
        if passive:
            self._passive.add(gid)
        else:
            self._passive.discard(gid)
            self._heads.pop(gid, None)
        if self.state is not State.READY or gid not in self._sent:
            return []  # the next IDENTIFY or SUBSCRIBE carries the mode
        pos = self._sent[gid] = self._desired[gid]
        return [Send(subscribe_message({gid: pos}, self._passive))]

    def activate(self, gid: str) -> list[Output]:
        """:meth:`set_passive` ``(gid, False)``."""
        return self.set_passive(gid, False)

    def unsubscribe(self, gid: str) -> list[Output]:
        """Stop following ``gid``. An UNSUBSCRIBE is sent (and :class:`Unsubscribed`
        will follow) only when the guild was requested on this READY connection."""
        check_guild(gid)
        if self._desired.pop(gid, _MISSING) is _MISSING:
            return []
        self._passive.discard(gid)
        self._heads.pop(gid, None)
        self._subscribed.discard(gid)
        self._rosters.pop(gid, None)
        self._refusals.pop(gid, None)
        self._retry_at.pop(gid, None)
        if self.state is not State.READY or self._sent.pop(gid, _MISSING) is _MISSING:
            return []
        self._leaving.add(gid)
        return [Send(unsubscribe_message([gid]))]

    def leaving(self, gid: str) -> bool:
        """True while an UNSUBSCRIBED of ``gid`` is awaited."""
        return gid in self._leaving

    def publish(
        self, gid: str, t: str, d: Any = None, idempotency_key: str | None = None
    ) -> tuple[str, Send]:
        """A PUBLISH with a fresh nonce, on a READY connection; ValueError for
        an invalid guild or event name, idempotency key, non-JSON data or an
        oversized message. Publishing again with the same ``idempotency_key``
        (after a lost answer: 4504, an interrupted connection) is answered
        with the original's ``s`` within the server's window (PROTOCOL.md
        "Idempotent publish")."""
        check_publish(gid, t)
        check_idempotency_key(idempotency_key)
        if self.state is not State.READY:
            raise RuntimeError("publish needs a READY connection")
        nonce = str(next(self._nonces))
        body = publish_message(gid, t, d, nonce, idempotency_key)
        if len(body) > self.max_message:
            raise ValueError(f"message of {len(body)} bytes exceeds {self.max_message}")
        self._inflight.add(nonce)
        return nonce, Send(body)

    # --- server messages -------------------------------------------------------------

    def receive(self, data: bytes | bytearray | memoryview | str, now: float) -> list[Output]:
        """Handle one text message from the server."""
        if self.state is State.IDLE:
            return []
        self._last_recv = now
        try:
            msg = orjson.loads(data)
            if type(msg) is not dict:
                raise _Bad("a message must be a JSON object")
            if self.state is State.AWAIT_HELLO:
                return self._hello(msg, now)
            return self._message(msg, now)
        except (_Bad, orjson.JSONDecodeError) as exc:
            reason = (
                "expected HELLO" if self.state is State.AWAIT_HELLO else "bad message from server"
            )
            self.state = State.IDLE
            self.next_tick = float("inf")
            return [CloseConn(BAD_SERVER, reason, str(exc))]

    def _hello(self, msg: dict[str, Any], now: float) -> list[Output]:
        if msg.get("op") != Op.HELLO:
            raise _Bad("expected HELLO")
        interval = _obj(msg.get("d"), "HELLO").get("heartbeat_interval")
        if not isinstance(interval, int | float) or isinstance(interval, bool) or interval <= 0:
            raise _Bad("HELLO needs a positive heartbeat_interval")
        self.interval = float(interval) / 1000.0
        self.next_tick = self._beat_at = now + self.interval
        self.state = State.IDENTIFYING
        self._sent = dict(self._desired)
        return [
            Send(
                identify_message(
                    self._token,
                    self._sent,
                    self.events,
                    self.presence,
                    self._passive,
                    self.activity_batch,
                )
            )
        ]

    def _message(self, msg: dict[str, Any], now: float) -> list[Output]:
        op = msg.get("op")
        d = msg.get("d")
        if op == Op.DISPATCH:
            t, g = msg.get("t"), msg.get("g")
            if t == "READY":
                return self._ready(_obj(d, "READY"))
            if g is None:
                if t == ACTIVITY_EVENT:
                    return self._activity_batch(_obj(d, ACTIVITY_EVENT))
                return []
            if type(g) is not str:
                raise _Bad("g must be a guild id")
            if t == "SUBSCRIBED":
                return self._subscribed_guild(g, _obj(d, "SUBSCRIBED"))
            if t == ACTIVITY_EVENT:
                return self._activity(g, _obj(d, ACTIVITY_EVENT))
            if t == "UNSUBSCRIBED":
                if g in self._leaving:
                    self._leaving.discard(g)
                    return [Unsubscribed(g)]
                return []
            s = msg.get("s")
            if type(s) is int:
                if type(t) is not str:
                    raise _Bad("an event needs its name t")
                return self._event(g, t, s, d)
            if self.presence and t in PRESENCE_EVENTS and g in self._desired:
                return self._presence(g, t, d)
            return []  # no s: presence (not asked for), not a guild event
        if op == Op.ACK:
            return self._ack(_obj(d, "ACK"))
        if op == Op.ERROR:
            return self._error(_obj(d, "ERROR"), now)
        if op == Op.RECONNECT:
            self._reconnect_hint = parse_reconnect(d)
            return [ReconnectRequested(self._reconnect_hint)]
        return []  # HEARTBEAT_ACK; unknown ops are ignored

    def _ready(self, d: dict[str, Any]) -> list[Output]:
        if self.state is State.READY:
            raise _Bad("a second READY")
        self.state = State.READY
        self._auth_failures = 0
        out: list[Output] = []
        # Guilds the application asked for while IDENTIFY was in flight.
        missing = {gid: pos for gid, pos in self._desired.items() if gid not in self._sent}
        if missing:
            self._sent.update(missing)
            out.append(Send(subscribe_message(missing, self._passive)))
        # Guilds IDENTIFY asked for that the application left meanwhile: the
        # server is subscribing them, so unsubscribe now (UNSUBSCRIBED follows).
        stale = [gid for gid in self._sent if gid not in self._desired]
        if stale:
            for gid in stale:
                del self._sent[gid]
                self._leaving.add(gid)
            out.append(Send(unsubscribe_message(stale)))
        out.append(Ready(str(d.get("session_id") or ""), str(d.get("user") or "")))
        return out

    def _subscribed_guild(self, gid: str, d: dict[str, Any]) -> list[Output]:
        if gid not in self._desired:
            return []  # unsubscribed meanwhile; UNSUBSCRIBED follows
        epoch, head, recovered = d.get("epoch"), d.get("s"), d.get("recovered")
        if type(epoch) is not str or type(head) is not int or type(recovered) is not bool:
            raise _Bad("SUBSCRIBED needs {epoch: str, s: int, recovered: bool}")
        passive = d.get("passive", False)
        if type(passive) is not bool:
            raise _Bad("SUBSCRIBED passive must be true or false")
        sent = self._sent.get(gid)
        current = self._desired[gid]
        self._subscribed.add(gid)
        self._refusals.pop(gid, None)
        out: list[Output] = []
        if passive:
            # No replay: the Position stays where an activation resumes; a
            # fresh one (or one of a lost epoch) starts at the head, and a
            # Rewind not yet answered becomes the Position that many events
            # back (they count as unread; the activation replays them). No
            # presence changes come while passive: the roster is forgotten
            # until the activation's PRESENCE_SNAPSHOT.
            self._heads[gid] = Position(epoch, head)
            self._rosters.pop(gid, None)
            if type(current) is Rewind:
                pos = self._desired[gid] = Position(epoch, max(0, head - current.n))
            elif type(current) is Position and current.epoch == epoch:
                pos = current
            else:
                pos = self._desired[gid] = Position(epoch, head)
                if isinstance(sent, Position):
                    out.append(Resync(gid, epoch, head))
            out.append(Subscribed(gid, pos, False, True))
            return out
        if type(sent) is Rewind and type(current) is Rewind:
            # The rewind becomes a Position: the replay head-k+1..head follows.
            k = d.get("rewound")
            if type(k) is not int or not 0 <= k <= head:
                raise _Bad("SUBSCRIBED to a rewind needs rewound: int in 0..s")
            pos = self._desired[gid] = Position(epoch, head - k)
        elif recovered and type(current) is Position and current.epoch == epoch:
            pos = current  # the replay s+1..head follows
        else:
            pos = self._desired[gid] = Position(epoch, head)
            if isinstance(sent, Position):
                out.append(Resync(gid, epoch, head))
        out.append(Subscribed(gid, pos, recovered))
        return out

    def _activity(self, gid: str, d: dict[str, Any]) -> list[Output]:
        epoch, s = d.get("epoch"), d.get("s")
        if type(epoch) is not str or type(s) is not int:
            raise _Bad("GUILD_ACTIVITY needs {epoch: str, s: int}")
        if gid not in self._desired:
            return []
        known = self._heads.get(gid)
        if known is None or known.epoch != epoch or s > known.s:
            self._heads[gid] = Position(epoch, s)
        return [Activity(gid, epoch, s)]

    def _activity_batch(self, d: dict[str, Any]) -> list[Output]:
        """(1.1) A GUILD_ACTIVITY of several guilds, ``{gid: s}``, read as that
        many single notices. Each guild's epoch is the one its passive
        SUBSCRIBED named (the last head heard of, else the Position: the
        server closes a guild's passive sessions with 4000 when its epoch
        changes, so a notice is never of another epoch)."""
        out: list[Output] = []
        for gid, s in d.items():
            if type(s) is not int:
                raise _Bad("a GUILD_ACTIVITY of several guilds needs {guild: s: int}")
            if gid not in self._desired:
                continue  # unsubscribed meanwhile: the server stops at UNSUBSCRIBED
            known = self._heads.get(gid) or self._desired[gid]
            if type(known) is not Position:
                continue  # no epoch known yet: the passive SUBSCRIBED tells the head
            if gid not in self._heads or s > known.s:
                self._heads[gid] = Position(known.epoch, s)
            out.append(Activity(gid, known.epoch, s))
        return out

    def _event(self, gid: str, t: str, s: int, d: Any) -> list[Output]:
        if gid not in self._desired:
            return []  # unsubscribed: the server stops at UNSUBSCRIBED
        start = self._desired[gid]
        # A Rewind: no SUBSCRIBED yet, nothing to compare with.
        pos = start if isinstance(start, Position) else None
        out: list[Output] = []
        if pos is not None:
            if s <= pos.s:
                self.duplicates_dropped += 1
                return out
            if s > pos.s + 1 and self.events is None and gid in self._subscribed:
                self.gaps += 1
                out.append(Gap(gid, pos.s, s))
        self._desired[gid] = Position(pos.epoch if pos is not None else "", s)
        out.append(Event(gid, t, s, d))
        return out

    def _presence(self, gid: str, t: Any, d: Any) -> list[Output]:
        """PRESENCE_SNAPSHOT replaces the roster; JOIN/LEAVE apply to it."""
        if t == "PRESENCE_SNAPSHOT":
            snap = _obj(d, t)
            raw, count, truncated = snap.get("members"), snap.get("count"), snap.get("truncated")
            if type(raw) is not list or type(count) is not int or type(truncated) is not bool:
                raise _Bad("PRESENCE_SNAPSHOT needs {members: list, count: int, truncated: bool}")
            members = [_member(m, "a PRESENCE_SNAPSHOT member") for m in raw]
            self._rosters[gid] = _Roster({m.session: m for m in members}, count, truncated)
            return [PresenceSnapshot(gid, tuple(members), count, truncated)]
        member = _member(d, str(t))
        r = self._rosters.get(gid)
        if t == "PRESENCE_JOIN":
            if r is not None and member.session not in r.members:
                r.members[member.session] = member
                r.count += 1
            return [PresenceJoin(gid, member)]
        if r is not None:
            if r.members.pop(member.session, None) is not None or r.truncated:
                r.count = max(0, r.count - 1)
        return [PresenceLeave(gid, member)]

    def _ack(self, d: dict[str, Any]) -> list[Output]:
        nonce, g, s, epoch = d.get("nonce"), d.get("g"), d.get("s"), d.get("epoch")
        if nonce not in self._inflight:
            return []
        if type(s) is not int or type(g) is not str:
            raise _Bad("ACK needs {g: str, s: int}")
        assert isinstance(nonce, str)
        self._inflight.discard(nonce)
        return [Acked(nonce, g, s, str(epoch))]

    def _error(self, d: dict[str, Any], now: float) -> list[Output]:
        code, message = d.get("code", 0), d.get("message", "")
        if type(code) is not int:
            raise _Bad("ERROR needs an integer code")
        message = str(message)
        nonce, gid = d.get("nonce"), d.get("g")
        gid = gid if type(gid) is str else None
        if nonce is not None:
            if nonce in self._inflight:
                assert isinstance(nonce, str)
                self._inflight.discard(nonce)
                return [PublishRefused(nonce, code, message, gid)]
            return []
        if gid is not None and gid in self._sent and gid not in self._subscribed:
            if code == Err.TRY_AGAIN_LATER:
                # "Try again later": ask again after a backoff delay, or the
                # hint in the message when it is longer (PROTOCOL.md "Pacing").
                del self._sent[gid]
                if self.state is not State.READY:  # (before READY: READY asks again)
                    return [SubscribeDeferred(gid, code, message, 0.0)]
                attempt = self._refusals.get(gid, 0)
                self._refusals[gid] = attempt + 1
                delay = subscribe_retry_delay(
                    attempt, parse_retry(message), self._retry_base, self._retry_cap, self._random
                )
                at = self._retry_at[gid] = now + delay
                self.next_tick = min(self.next_tick, at)
                return [SubscribeDeferred(gid, code, message, delay)]
            # A SUBSCRIBE (or IDENTIFY guild) was refused: stop following it.
            self._desired.pop(gid, None)
            self._sent.pop(gid, None)
            self._rosters.pop(gid, None)
            return [SubscribeRefused(gid, code, message)]
        return [ServerError(code, message, gid)]


_MISSING: Any = object()


def _nonce_key(nonce: str) -> tuple[int, str]:
    return (len(nonce), nonce)
