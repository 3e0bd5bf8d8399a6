"""The gateway session state machine (PROTOCOL.md, "Session flow"), Sans-I/O.

It owns one connection's protocol state: identified or not, the granted
token, the subscribed guild set, the command window, the publish bucket,
the deadlines and the ordered queue of pending PUBLISH answers. It performs
no I/O: :meth:`Session.receive` takes one text message and returns
:data:`Effect` values for the caller to carry out (write bytes, close, ask a
guild to subscribe/unsubscribe/publish). Time is passed in, never read.

States: ``AWAIT_IDENTIFY`` -> ``READY`` -> ``CLOSED``; any state may go to
``CLOSED`` and ``CLOSED`` absorbs every input. Once a :class:`Close` effect
has been returned the session ignores everything after it.
"""

from __future__ import annotations

import fnmatch
import functools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from guildcast.protocol import wire
from guildcast.protocol.bucket import TokenBucket
from guildcast.protocol.codes import CLIENT_OPS, RESERVED_EVENTS, Close, Err, Op


class AuthError(Exception):
    """Raised by an :class:`Authenticator` when a token is not acceptable."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token allows (PROTOCOL.md, "Tokens")."""

    sub: str
    guilds: tuple[str, ...] = ()
    pub: tuple[str, ...] = ()
    #: events per second; ``None`` means "use the server's default", 0 unlimited.
    pub_rate: float | None = None

    def may_subscribe(self, gid: str) -> bool:
        return _matches(self.guilds, gid)

    def may_publish(self, gid: str) -> bool:
        return _matches(self.pub, gid)


#: Answers of :func:`_matches` remembered, least recently used dropped first:
#: every PUBLISH checks its guild against the token's patterns, and
#: ``fnmatchcase`` was 3-4.5% of the server's samples in manyguilds;
#: about 200 bytes an entry, so ~1.6 MiB at most.
_MATCH_CACHE_SIZE = 8192


@functools.lru_cache(maxsize=_MATCH_CACHE_SIZE)
def _matches(patterns: tuple[str, ...], gid: str) -> bool:
    # Shell-style patterns; ``fnmatchcase`` so matching never depends on the OS.
    # A pure function of its arguments, so caching it changes no answer.
    return any(p == gid or fnmatch.fnmatchcase(gid, p) for p in patterns)


class Authenticator(Protocol):
    """Turns a token string into a :class:`Grant` or raises :class:`AuthError`."""

    def __call__(self, token: str) -> Grant: ...


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-session limits; the defaults are PROTOCOL.md's."""

    heartbeat_interval_ms: int = 30_000
    identify_timeout: float = 10.0
    #: PROTOCOL.md "Rate limits": 120 commands per 60 s (a fixed window that
    #: opens at the first command of the window).
    command_limit: int = 120
    command_window: float = 60.0
    #: Default PUBLISH rate (events/s) for tokens without ``pub_rate``; 0 = unlimited.
    publish_rate: float = 50.0
    #: A PUBLISH message larger than this (bytes of JSON) gets ERROR 4413.
    max_payload: int = 32 * 1024
    #: Guilds one session may be subscribed to at once; past it ERROR 4430.
    max_subscriptions: int = 1000
    #: Longest accepted ``nonce``; longer is a decode error.
    max_nonce: int = 128
    #: PUBLISHes awaiting their answer (ACK or ERROR, sent in order), with
    #: the SUBSCRIBE refusals queued behind them; one more closes with 4008.
    #: Refusals queue behind an unanswered PUBLISH, so without this a client
    #: could grow the queue without end.
    max_pending_publishes: int = 4096


# --- effects -----------------------------------------------------------------


@dataclass(slots=True)
class Send:
    """Write these (already framed) bytes to the connection."""

    data: bytes


@dataclass(slots=True)
class CloseConn:
    """Close the connection with this code; the session is now CLOSED."""

    code: int
    reason: str


@dataclass(slots=True)
class Subscribe:
    """Join guild ``gid``; ``position`` is ``(epoch, s)`` to recover from, or
    None; ``rewind`` (1.1) asks for the guild's last N events first (never
    with a ``position`` or ``passive``; ``wire.GuildRequest``); ``passive``
    (1.1): notices only (PROTOCOL.md "Passive subscriptions"), also the way
    to switch a subscribed guild between the two modes."""

    gid: str
    position: tuple[str, int] | None
    rewind: int | None = None
    passive: bool = False


@dataclass(slots=True)
class Unsubscribe:
    """Leave guild ``gid``; the host answers UNSUBSCRIBED in order with the stream."""

    gid: str


@dataclass(slots=True)
class Forbidden:
    """A SUBSCRIBE or PUBLISH was refused with ERROR 4403 (outside the token's
    patterns, or a reserved event name): a security event the host logs. The
    ERROR itself is a :class:`Send` of its own (a PUBLISH's may come later,
    in answer order)."""

    gid: str
    message: str


@dataclass(slots=True, eq=False)
class Publish:
    """Sequence this event; answer with :meth:`Session.publish_done` or ``publish_failed``."""

    gid: str
    t: str
    d: Any
    nonce: str | None
    #: The idempotency key (protocol 1.1), validated, or None.
    key: str | None = None
    #: Set when answered: the framed ACK or ERROR for this PUBLISH.
    answer: bytes | None = field(default=None)


Effect = Send | CloseConn | Subscribe | Unsubscribe | Publish | Forbidden


class _Refusal:
    """The ERROR answering a refused SUBSCRIBE, waiting in the answer queue
    behind PUBLISHes sent before it (PROTOCOL.md "Publishing": answers in
    the order of the commands)."""

    __slots__ = ("answer",)

    def __init__(self, answer: bytes) -> None:
        self.answer = answer


class State(Enum):
    AWAIT_IDENTIFY = "await_identify"
    READY = "ready"
    CLOSED = "closed"


class _Reject(Exception):
    """Internal: close the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def error_frame(code: int, message: str, nonce: str | None = None, g: str | None = None) -> bytes:
    """A framed ERROR (op 13) message."""
    d: dict[str, Any] = {"code": code, "message": message}
    if nonce is not None:
        d["nonce"] = nonce
    if g is not None:
        d["g"] = g
    return wire.message(Op.ERROR, d)


class Session:
    """One connection's gateway state. Feed it messages; carry out what it returns.

    The caller must: send :meth:`hello` first; call :meth:`receive` for each
    text message, :meth:`receive_binary` for each binary message and
    :meth:`check_timeout` now and then; carry out returned effects in order;
    answer every :class:`Publish` effect exactly once.
    """

    __slots__ = (
        "_auth",
        "_bucket",
        "_cmd_count",
        "_cmd_window_start",
        "_pending",
        "activity_batch",
        "deadline",
        "events",
        "grant",
        "limits",
        "presence",
        "session_id",
        "state",
        "subscriptions",
    )

    def __init__(self, authenticate: Authenticator, limits: Limits, session_id: str, now: float):
        self._auth = authenticate
        self.limits = limits
        self.session_id = session_id
        self.state = State.AWAIT_IDENTIFY
        self.grant: Grant | None = None
        #: Event names this session wants, or None for all (IDENTIFY ``events``).
        self.events: frozenset[str] | None = None
        #: IDENTIFY ``presence``: send PRESENCE_JOIN/LEAVE of subscribed guilds.
        self.presence = False
        #: (1.1) IDENTIFY ``activity_batch``: a passive tick's notices in one
        #: GUILD_ACTIVITY of several guilds (PROTOCOL.md "Passive subscriptions").
        self.activity_batch = False
        self.subscriptions: set[str] = set()
        #: Monotonic time after which :meth:`check_timeout` closes the session.
        self.deadline = now + limits.identify_timeout
        self._cmd_window_start = 0.0
        self._cmd_count = 0
        #: The PUBLISH bucket, or None when publishing is not rate limited.
        self._bucket: TokenBucket | None = None
        #: PUBLISHes awaiting their answer, in arrival order, and the
        #: SUBSCRIBE refusals that came after them; created on the first
        #: PUBLISH (an empty deque is ~600 bytes and most sessions never
        #: publish). Bound: ``max_pending_publishes`` entries.
        self._pending: deque[Publish | _Refusal] | None = None

    # --- inputs --------------------------------------------------------------

    def hello(self) -> bytes:
        """The HELLO frame the server sends first (PROTOCOL.md "Session flow" 1)."""
        return wire.message(Op.HELLO, {"heartbeat_interval": self.limits.heartbeat_interval_ms})

    def receive(self, data: bytes | bytearray | memoryview, now: float) -> list[Effect]:
        """Handle one text message. Never raises for bad input: it closes instead."""
        if self.state is State.CLOSED:
            return []
        try:
            return self._receive(data, now)
        except _Reject as r:
            return self._close(r.code, r.reason)

    def receive_binary(self) -> list[Effect]:
        """Binary frames are not part of the protocol (PROTOCOL.md "Transport")."""
        if self.state is State.CLOSED:
            return []
        return self._close(Close.DECODE_ERROR, "binary frames are not accepted")

    def check_timeout(self, now: float) -> list[Effect]:
        """Close the session if its identify or heartbeat deadline has passed."""
        if self.state is State.CLOSED or now < self.deadline:
            return []
        if self.state is State.AWAIT_IDENTIFY:
            return self._close(Close.NOT_IDENTIFIED, "no IDENTIFY in time")
        return self._close(Close.SESSION_TIMEOUT, "no heartbeat in time")

    def alive(self, now: float) -> None:
        """A WebSocket ping or pong arrived (PROTOCOL.md "A session, step by
        step" 4, protocol 1.1): like any message it proves the connection
        alive once identified; before IDENTIFY it extends nothing."""
        if self.state is State.READY:
            self.deadline = now + self.limits.heartbeat_interval_ms * 1.5 / 1000.0

    def closed(self) -> None:
        """The connection is gone; the session absorbs everything from now on."""
        self.state = State.CLOSED

    def publish_done(self, p: Publish, gid: str, s: int, epoch: str) -> list[Effect]:
        """A PUBLISH was sequenced; returns the ACKs now due, in PUBLISH order."""
        d: dict[str, Any] = {"g": gid, "s": s, "epoch": epoch}
        if p.nonce is not None:
            d["nonce"] = p.nonce
        p.answer = wire.message(Op.ACK, d)
        return self._flush_answers()

    def publish_failed(self, p: Publish, code: int, message: str) -> list[Effect]:
        """A PUBLISH could not be sequenced; answer it with ERROR ``code``."""
        p.answer = error_frame(code, message, p.nonce, p.gid)
        # It may wait behind earlier PUBLISHes for its turn: keep only the answer.
        p.d = None
        return self._flush_answers()

    def subscribe_failed(self, gid: str, code: int, message: str) -> list[Effect]:
        """The host could not subscribe ``gid`` (ERROR ``code``, e.g. 1013):
        the session no longer counts it, and its ERROR is answered in command
        order, after the PUBLISHes sent before it (the effects now due)."""
        self.subscriptions.discard(gid)
        return self._refuse(error_frame(code, message, g=gid))

    # --- internals -----------------------------------------------------------

    def _refuse(self, frame: bytes) -> list[Effect]:
        """A SUBSCRIBE's ERROR: sent now if no PUBLISH awaits its answer,
        else queued behind them (a full queue closes with 4008)."""
        if self.state is State.CLOSED:
            return []
        pending = self._pending
        if not pending:
            return [Send(frame)]
        if len(pending) >= self.limits.max_pending_publishes:
            return self._close(Close.RATE_LIMITED, "too many answers awaiting their turn")
        pending.append(_Refusal(frame))
        return []

    def _forbid(self, p: Publish, message: str) -> list[Effect]:
        return [Forbidden(p.gid, message), *self.publish_failed(p, Err.FORBIDDEN, message)]

    def _close(self, code: int, reason: str) -> list[Effect]:
        self.state = State.CLOSED
        if self._pending is not None:
            self._pending.clear()
        return [CloseConn(code, reason)]

    def _flush_answers(self) -> list[Effect]:
        out: list[Effect] = []
        if self.state is State.CLOSED:
            return out
        pending = self._pending
        if pending is None:
            return out
        while pending and (answer := pending[0].answer) is not None:
            pending.popleft()
            out.append(Send(answer))
        return out

    def _receive(self, data: bytes | bytearray | memoryview, now: float) -> list[Effect]:
        try:
            msg = wire.decode(data)
        except wire.JSONDecodeError:
            raise _Reject(Close.DECODE_ERROR, "not valid JSON") from None
        if type(msg) is not dict:
            raise _Reject(Close.DECODE_ERROR, "a message must be a JSON object")
        op = msg.get("op")
        if type(op) is not int or op.bit_length() > 64:
            # Numbers are decoded exactly (wire.decode): a 2**64 is no opcode.
            raise _Reject(Close.DECODE_ERROR, "op must be an integer")
        if op not in CLIENT_OPS:
            raise _Reject(Close.UNKNOWN_OPCODE, f"unknown opcode {op}")
        d = msg.get("d")
        # Any message proves the connection alive (PROTOCOL.md "Session flow" 4:
        # "a connection silent for 1.5 x interval is closed").
        if self.state is State.READY:
            self.deadline = now + self.limits.heartbeat_interval_ms * 1.5 / 1000.0
        if op == Op.HEARTBEAT:
            return [Send(wire.HEARTBEAT_ACK_FRAME)]
        if op == Op.PUBLISH:
            if self.state is not State.READY:
                raise _Reject(Close.NOT_IDENTIFIED, "PUBLISH before IDENTIFY")
            return self._publish(d, len(data), now)
        # IDENTIFY, SUBSCRIBE, UNSUBSCRIBE: the command rate limit applies.
        if op == Op.IDENTIFY:
            if self.state is State.READY:
                raise _Reject(Close.ALREADY_IDENTIFIED, "already identified")
        elif self.state is not State.READY:
            raise _Reject(Close.NOT_IDENTIFIED, "command before IDENTIFY")
        self._count_command(now)
        if op == Op.IDENTIFY:
            return self._identify(d, now)
        if op == Op.SUBSCRIBE:
            if type(d) is not dict:
                raise _Reject(Close.DECODE_ERROR, "SUBSCRIBE needs d.guilds")
            return self._subscribe(_guild_requests(d.get("guilds")))
        return self._unsubscribe(d)

    def _count_command(self, now: float) -> None:
        lim = self.limits
        if now - self._cmd_window_start >= lim.command_window:
            self._cmd_window_start = now
            self._cmd_count = 0
        self._cmd_count += 1
        if self._cmd_count > lim.command_limit:
            raise _Reject(Close.RATE_LIMITED, "too many commands")

    def _identify(self, d: Any, now: float) -> list[Effect]:
        if type(d) is not dict:
            raise _Reject(Close.DECODE_ERROR, "IDENTIFY needs an object")
        token = d.get("token")
        if type(token) is not str:
            raise _Reject(Close.DECODE_ERROR, "IDENTIFY needs a token string")
        guilds = _guild_requests(d.get("guilds", {}))
        presence = d.get("presence", False)
        if type(presence) is not bool:
            raise _Reject(Close.DECODE_ERROR, "presence must be true or false")
        self.presence = presence
        batch = d.get("activity_batch", False)
        if type(batch) is not bool:
            raise _Reject(Close.DECODE_ERROR, "activity_batch must be true or false")
        self.activity_batch = batch
        events = d.get("events")
        if events is not None:
            if type(events) is not list or not all(wire.valid_event(e) for e in events):
                raise _Reject(Close.DECODE_ERROR, "events must be a list of event names")
            self.events = frozenset(events)
        try:
            grant = self._auth(token)
        except AuthError as e:
            raise _Reject(Close.AUTH_FAILED, f"authentication failed: {e}") from None
        self.grant = grant
        self.state = State.READY
        self.deadline = now + self.limits.heartbeat_interval_ms * 1.5 / 1000.0
        rate = grant.pub_rate if grant.pub_rate is not None else self.limits.publish_rate
        # A burst of one second's worth, but at least one event: a rate below
        # 1/s (say 0.5) still allows one event per 1/rate seconds.
        self._bucket = TokenBucket(rate, now) if rate > 0 else None
        ready = wire.message(
            Op.DISPATCH, {"session_id": self.session_id, "user": grant.sub}, t="READY"
        )
        out: list[Effect] = [Send(ready)]
        out.extend(self._subscribe(guilds))
        return out

    def _subscribe(self, guilds: dict[str, wire.GuildRequest]) -> list[Effect]:
        grant = self.grant
        assert grant is not None
        out: list[Effect] = []
        subs = self.subscriptions
        for gid, req in guilds.items():
            if not grant.may_subscribe(gid):
                refusal = self._refuse(error_frame(Err.FORBIDDEN, "guild not allowed", g=gid))
                if self.state is State.CLOSED:
                    return refusal  # the answer queue was full: 4008, alone
                out.append(Forbidden(gid, "guild not allowed"))
                out.extend(refusal)
                continue
            if gid not in subs and len(subs) >= self.limits.max_subscriptions:
                frame = error_frame(Err.TOO_MANY_SUBSCRIPTIONS, "too many guilds", g=gid)
                refusal = self._refuse(frame)
                if self.state is State.CLOSED:
                    return refusal
                out.extend(refusal)
                continue
            subs.add(gid)
            out.append(Subscribe(gid, req.position, req.rewind, req.passive))
        return out

    def _unsubscribe(self, d: Any) -> list[Effect]:
        gids = d.get("guilds") if type(d) is dict else None
        if type(gids) is not list or not all(wire.valid_guild(g) for g in gids):
            raise _Reject(Close.DECODE_ERROR, "UNSUBSCRIBE needs d.guilds, a list of guild ids")
        out: list[Effect] = []
        for gid in dict.fromkeys(gids):
            if gid in self.subscriptions:
                self.subscriptions.discard(gid)
                out.append(Unsubscribe(gid))
            else:
                out.append(Send(wire.unsubscribed_frame(gid)))
        return out

    def _publish(self, d: Any, size: int, now: float) -> list[Effect]:
        if type(d) is not dict:
            raise _Reject(Close.DECODE_ERROR, "PUBLISH needs an object")
        gid, t, nonce = d.get("guild"), d.get("t"), d.get("nonce")
        if not wire.valid_guild(gid):
            raise _Reject(Close.DECODE_ERROR, "PUBLISH needs a valid guild id")
        if type(t) is not str:
            raise _Reject(Close.DECODE_ERROR, "PUBLISH needs an event name t (a string)")
        if nonce is not None and (type(nonce) is not str or len(nonce) > self.limits.max_nonce):
            raise _Reject(Close.DECODE_ERROR, "nonce must be a short string")
        pending = self._pending
        if pending is None:
            pending = self._pending = deque()
        elif len(pending) >= self.limits.max_pending_publishes:
            raise _Reject(Close.RATE_LIMITED, "too many PUBLISH awaiting an answer")
        key = d.get("idempotency_key")
        p = Publish(gid, t, d.get("d"), nonce, key)
        pending.append(p)
        grant = self.grant
        assert grant is not None
        if not wire.valid_event(t):
            # Protocol 1.1: a string outside the grammar is a failed command
            # (ERROR 4422, no token taken), not a broken client (1.0: 4002).
            return self.publish_failed(
                p, Err.INVALID_EVENT_NAME, f"invalid event name: t must be {wire.EVENT_RULE}"
            )
        if key is not None and not wire.valid_idempotency_key(key):
            # Protocol 1.1, like a bad t: this PUBLISH fails, the session stays.
            p.key = None
            return self.publish_failed(
                p,
                Err.INVALID_IDEMPOTENCY_KEY,
                f"invalid idempotency_key: it must be {wire.IDEMPOTENCY_KEY_RULE}",
            )
        if t in RESERVED_EVENTS:
            return self._forbid(p, f"{t} is a reserved event name")
        if not grant.may_publish(gid):
            return self._forbid(p, "publishing to this guild not allowed")
        if size > self.limits.max_payload:
            return self.publish_failed(p, Err.PAYLOAD_TOO_LARGE, "payload too large")
        bucket = self._bucket
        if bucket is not None and bucket.take(1, now):
            return self.publish_failed(p, Err.PUBLISH_RATE_LIMITED, "publish rate exceeded")
        return [p]

    @property
    def pending_publishes(self) -> int:
        """PUBLISH commands not yet answered (and refusals queued behind them)."""
        return 0 if self._pending is None else len(self._pending)


def _guild_requests(guilds: Any) -> dict[str, wire.GuildRequest]:
    """Validate ``{gid: null, a Position or (1.1) an object of options}``
    (PROTOCOL.md "Messages"; each value parsed by ``wire.guild_request``);
    raises _Reject."""
    if type(guilds) is not dict:
        raise _Reject(Close.DECODE_ERROR, "guilds must be an object of guild id to Position")
    out: dict[str, wire.GuildRequest] = {}
    for gid, value in guilds.items():
        if not wire.valid_guild(gid):
            raise _Reject(Close.DECODE_ERROR, "invalid guild id")
        try:
            out[gid] = wire.guild_request(value)
        except ValueError as e:
            raise _Reject(Close.DECODE_ERROR, str(e)) from None
    return out
