"""The WebSocket gateway: an ``asyncio.Protocol`` per connection around
websockets' Sans-I/O ``ServerProtocol`` (docs/DESIGN.md rule 5).

websockets does the opening handshake (with our choice of subprotocol,
:func:`_select_subprotocol`; a plain upgrade request that arrives in one
read is checked and answered the same way by :mod:`upgrade`, and
websockets' protocol is made, in OPEN state, only when the connection first
needs it: most never do), frame parsing (on a connection :mod:`upgrade`
answered, the plain text frames are read by :mod:`inbound` and every other
frame is handed to websockets whole), ping/pong, UTF-8 and size
checks, and the close handshake; a ping or pong also tells the session the
client is alive (protocol 1.1). We assemble fragmented messages,
drive the gateway :class:`~guildcast.protocol.session.Session` straight from
``data_received`` and carry out its effects. There is no task per
connection: one sweeper task per gateway enforces every deadline
(handshake, IDENTIFY, heartbeat, close handshake) every ``sweep_interval``.
It does not visit every connection: each is filed in a coarse timer wheel
(one slot per ``sweep_interval``) under its earliest deadline, is visited
when that slot comes due and re-filed there and then if its deadline has
moved later (a heartbeat); a deadline that moves earlier (IDENTIFY with a
short heartbeat interval, a close) is filed at once. So a deadline is
enforced at most one ``sweep_interval`` (plus loop delay) late, and an idle
connection heartbeating every 30 s costs one visit per 45 s instead of two
per second.

Compression: permessage-deflate is negotiated by websockets' extension
machinery with the parameters in ``compression.py`` (``--compression``); a
connection that negotiated it carries the node's
:class:`~guildcast.protocol.deflate.Deflater` as ``deflate``, and is written
the frames compressed once for every such connection; its own frames (HELLO,
answers, errors) follow the same threshold rule. websockets itself never
compresses what we write (we write frames to the transport ourselves); it
decodes the client's compressed frames.

A :class:`Connection` is the :class:`~guildcast.core.sink.Sink` the fanout path
writes to: ``send`` is one ``transport.write`` plus the unsent-bytes bound
(past ``max_buffer`` the connection is closed with 4010 and its backlog is
discarded after ``close_timeout``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, cast

from websockets.exceptions import NegotiationError
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State as WsState
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from guildcast.core import failures, fdwatch
from guildcast.core.failures import Failure
from guildcast.core.fdwatch import DescriptorWatch
from guildcast.core.host import GatewayHost
from guildcast.core.ids import HexIds
from guildcast.core.metrics import MetricsSnapshot
from guildcast.core.ratelog import RateLimitedLog
from guildcast.core.userrate import UserBuckets
from guildcast.protocol import hints, wire
from guildcast.protocol.codes import SUBPROTOCOL, SUBPROTOCOLS, Close, Err
from guildcast.protocol.deflate import Deflater, SharedFrame
from guildcast.protocol.session import (
    Authenticator,
    CloseConn,
    Effect,
    Forbidden,
    Limits,
    Publish,
    Send,
    Session,
    Subscribe,
    Unsubscribe,
)
from guildcast.protocol.session import State as SessionState
from guildcast.transport import drain as staggered
from guildcast.transport import inbound, listen, static, upgrade
from guildcast.transport.acceptor import Acceptor
from guildcast.transport.admission import QUEUED, Admission
from guildcast.transport.compression import SharedDeflateFactory, negotiated

log = logging.getLogger("guildcast.gateway")
#: websockets logs every open and close at INFO; that is our job, at our level.
_ws_log = logging.getLogger("guildcast.websockets")
_ws_log.setLevel(logging.WARNING)
#: Refusals, slow consumers and auth failures come in floods: a few lines each.
_flood = RateLimitedLog(log)
#: Close codes worth a log line: (kind, level).
_LOGGED_CLOSES: dict[int, tuple[str, int]] = {
    Close.TRY_AGAIN_LATER: ("connection_refused", logging.WARNING),
    Close.SLOW_CONSUMER: ("slow_consumer", logging.INFO),
    Close.AUTH_FAILED: ("auth_failed", logging.INFO),
}

GATEWAY_PATH = "/gateway"
#: Request paths that open the gateway (PROTOCOL.md "Connecting"): a proxy
#: or library that appends a slash reaches it too. The query string is
#: ignored (``?v=1`` means nothing: the subprotocol names the version).
GATEWAY_PATHS = frozenset({GATEWAY_PATH, GATEWAY_PATH + "/"})
#: Characters of a refused ``Sec-WebSocket-Protocol`` offer quoted back in the 400.
_MAX_OFFER_ECHO = 100
_SUBPROTOCOLS = [Subprotocol(sp) for sp in SUBPROTOCOLS]


def _select_subprotocol(
    proto: ServerProtocol, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    """PROTOCOL.md "Connecting" (protocol 1.1): no offer is served as a 1.0
    client was (no subprotocol); an offer including ``guildcast.v1`` is
    answered with it; an offer of only others is refused with HTTP 400
    (websockets turns :class:`NegotiationError` into that answer, its text
    in the body) naming the one we speak."""
    return _choose_subprotocol(offered)


def _choose_subprotocol(offered: Sequence[str]) -> Subprotocol | None:
    """:func:`_select_subprotocol` without websockets' protocol (upgrade.py's path)."""
    if not offered:
        return None
    for sp in _SUBPROTOCOLS:
        if sp in offered:
            return sp
    quoted = ", ".join(offered)[:_MAX_OFFER_ECHO]
    raise NegotiationError(
        f"unsupported subprotocol ({quoted}); this server speaks {SUBPROTOCOL} (or none)"
    )


#: Session ids: 8 random bytes in hex, as ``secrets.token_hex(8)``, one
#: ``getrandom`` per 512 (core/ids.py).
_session_ids = HexIds(8)

#: Frames one message may arrive in (the first and its continuations); one
#: more closes with 1009 (PROTOCOL.md "Transport"). Browsers send one frame
#: per message and libraries that fragment use frames of kilobytes, so 1,024
#: is far above any real client, and bounds an attacker's empty fragments to
#: 1,024 list entries (about 100 KiB) per connection.
MAX_FRAGMENTS = 1024


@dataclass(frozen=True, slots=True)
class GatewayLimits:
    """Transport limits; see the README's configuration table."""

    #: Largest incoming message (PROTOCOL.md "Transport": 1009 past it).
    max_frame: int = 64 * 1024
    #: Unsent bytes allowed per connection before 4010 (slow consumer).
    max_buffer: int = 4 * 1024 * 1024
    #: Accepted WebSocket connections; past it the handshake completes and
    #: the connection is closed with 1013.
    max_connections: int = 19_000
    #: Seconds to complete the HTTP upgrade after TCP connect.
    handshake_timeout: float = 10.0
    #: Seconds the client has to answer our close frame before we drop it.
    close_timeout: float = 10.0
    #: How often deadlines are checked (seconds).
    sweep_interval: float = 0.5
    #: PUBLISH bytes/s per user over all their connections (0: unlimited;
    #: ERROR 4429 past it; core/userrate.py).
    user_publish_bytes: float = 0.0
    #: IDENTIFYs admitted per second (handshakes: twice that); past it close
    #: 1013 with a retry hint, resumes first (transport/admission.py). 0: no bound.
    admit_rate: float = 0.0


class Connection(asyncio.Protocol):
    """One client connection: transport, websockets protocol and gateway session."""

    __slots__ = (
        "_admitted",
        "_answers",
        "_cork",
        "_due",
        "_exit_hooks",
        "_fast",
        "_frags",
        "_gw",
        "_held",
        "_inbound",
        "_max_buffer",
        "_msg_len",
        "_subprotocol",
        "_transport",
        "_waiting",
        "closing",
        "deadline",
        "deflate",
        "events",
        "exited",
        "proto",
        "session",
    )

    def __init__(self, gw: Gateway) -> None:
        self._gw = gw
        #: ``limits.max_buffer``, read on every send (one attribute, not three).
        self._max_buffer = gw.limits.max_buffer
        self._transport: asyncio.Transport | None = None
        #: PUBLISH answers due in this loop iteration (``_answer``); bounded
        #: by the session's ``max_pending_publishes``.
        self._answers: list[list[Effect]] | None = None
        #: While answers are written: their frames, sent as one write.
        self._cork: list[bytes] | None = None
        #: Frames held to the end of the loop turn after a message that
        #: subscribes (:meth:`_on_message`), so READY and the guild's
        #: SUBSCRIBED leave in one write; None: not holding. Bound: what one
        #: loop turn sends this connection, checked against ``max_buffer``
        #: when released.
        self._held: list[bytes] | None = None
        #: websockets' protocol (:meth:`_ws`): made on the first read in
        #: CONNECTING state for a handshake websockets does; after one
        #: :mod:`upgrade` answered, only when first needed (a frame
        #: :mod:`inbound` does not read itself, a close, EOF), in OPEN state:
        #: most connections never need one (about 9 us and 1.5 KiB each).
        self.proto: ServerProtocol | None = None
        #: The handshake was :mod:`upgrade`'s (the connection is OPEN even
        #: while ``proto`` is None), and the subprotocol it chose.
        self._fast = False
        self._subprotocol: Subprotocol | None = None
        self.session: Session | None = None
        self.events: frozenset[str] | None = None
        #: The node's deflater once permessage-deflate is negotiated (Sink.deflate).
        self.deflate: Deflater | None = None
        self.closing = False
        self.exited = False
        #: Handshake or close-handshake deadline (monotonic); the session has its own.
        self.deadline = time.monotonic() + gw.limits.handshake_timeout
        self._frags: list[bytes | bytearray | memoryview] | None = None
        #: Client frames this connection reads itself (inbound.py): the
        #: bytes of a frame not complete yet (at most a header and
        #: ``max_frame``; appended to, so a frame read a byte at a time costs
        #: linear time); None: websockets parses everything (the handshake
        #: was websockets', or a frame it must fail the connection for came).
        self._inbound: bytes | bytearray | None = None
        self._msg_len = 0
        self._exit_hooks: list[Callable[[object], None]] | None = None
        #: The deadline-wheel slot this connection is filed in (None: not filed).
        self._due: int | None = None
        #: Admission (admission.py): the IDENTIFY waiting for its turn and
        #: any message that came after it in the same read (the connection
        #: is not read meanwhile, so this is at most one read's frames), and
        #: whether it has had its turn.
        self._waiting: list[bytes] | None = None
        self._admitted = False

    def __repr__(self) -> str:
        sid = self.session.session_id if self.session else "-"
        return f"<Connection {sid}>"

    # --- Subscriber identity (presence) ---------------------------------------

    @property
    def user(self) -> str:
        s = self.session
        return s.grant.sub if s is not None and s.grant is not None else ""

    @property
    def session_id(self) -> str:
        return self.session.session_id if self.session is not None else ""

    @property
    def wants_presence(self) -> bool:
        return self.session is not None and self.session.presence

    # --- Sink ----------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self.closing

    @property
    def activity_batch(self) -> bool:
        session = self.session
        return session is not None and session.activity_batch

    def send(self, data: bytes) -> None:
        if self.closing:
            return
        if self._cork is not None:
            self._cork.append(data)
            return
        held = self._held
        if held is not None:
            held.append(data)
            return
        t = self._transport
        assert t is not None
        t.write(data)
        if t.get_write_buffer_size() > self._max_buffer:
            self._gw.slow_consumers += 1
            self.close(Close.SLOW_CONSUMER, "slow consumer")

    def close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        if self._held is not None:
            self._release()  # what is held goes before the close frame
            if self.closing:  # writing it closed it (slow consumer)
                return
        if self._answers is not None and self._cork is None:
            self._write_answers()  # answers already due go before the close frame
            if self.closing:  # writing them closed it (slow consumer)
                return
        cork = self._cork
        if cork:  # answers written before the close frame, in order
            data = b"".join(cork)
            cork.clear()
            self._cork = None
            self.send(data)
            self._cork = cork
            if self.closing:  # the send itself closed (slow consumer)
                return
        self.closing = True
        self._gw.close_codes[code] = self._gw.close_codes.get(code, 0) + 1
        if code in _LOGGED_CLOSES:
            self._log_close(code, reason)
        if self.session is not None:
            self.session.closed()
        self.deadline = time.monotonic() + self._gw.limits.close_timeout
        self._gw._file(self, self.deadline)
        proto = self._ws() if self._fast else self.proto
        if proto is not None and proto.state is WsState.OPEN:
            proto.send_close(code, reason[:120])
            self._flush()
        elif self._transport is not None:
            self._transport.close()

    def _log_close(self, code: int, reason: str) -> None:
        kind, level = _LOGGED_CLOSES[code]
        t = self._transport
        peer = t.get_extra_info("peername") if t is not None else None
        _flood.log(
            level,
            kind,
            "gateway: closing %s with %d: %s",
            peer,
            code,
            reason,
            extra={"code": code, "reason": reason, "peer": str(peer)},
        )

    def _log_forbidden(self, gid: str, message: str) -> None:
        """ERROR 4403 (a guild or publish outside the token's patterns): a
        security event, logged like auth failures (a few lines per flood)."""
        t = self._transport
        peer = t.get_extra_info("peername") if t is not None else None
        _flood.log(
            logging.INFO,
            "forbidden",
            "gateway: user %r from %s: %s (guild %s, ERROR 4403)",
            self.user,
            peer,
            message,
            gid,
            extra={"code": Err.FORBIDDEN, "user": self.user, "guild": gid, "peer": str(peer)},
        )

    def add_exit_hook(self, hook: Callable[[object], None]) -> None:
        if self.exited:
            hook(self)
            return
        if self._exit_hooks is None:
            self._exit_hooks = [hook]
        else:
            self._exit_hooks.append(hook)

    # --- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance.
        # TCP_NODELAY: both uvloop and asyncio set it on every TCP transport
        # (tests/transport/test_nodelay.py checks), so small frames leave at once.
        self._transport = cast(asyncio.Transport, transport)
        self._gw.pending.add(self)
        self._gw._file(self, self.deadline)

    def data_received(self, data: bytes) -> None:
        if self._inbound is not None:
            self._read_frames(data)
            self._flush()
            return
        proto = self.proto
        if proto is None:
            proto = self._upgrade(data)
            if proto is None:
                return  # answered here (upgrade.py), frames sent with it handled
        self._parse(proto, data)
        self._flush()

    def _parse(self, proto: ServerProtocol, data: bytes | bytearray) -> None:
        """websockets parses ``data`` and we handle what it found."""
        proto.receive_data(data)
        for ev in proto.events_received():
            if type(ev) is Frame:
                self._on_frame(ev)
            elif type(ev) is Request:
                self._on_request(ev)

    def _read_frames(self, data: bytes | bytearray) -> None:
        """Client frames on an OPEN connection (inbound.py): a plain text
        frame goes straight to :meth:`_on_message`; any other whole frame to
        websockets (made then if it was not yet: :meth:`_ws`), in order; an
        incomplete one waits for the rest."""
        held = self._inbound
        if held:
            assert type(held) is bytearray
            held += data
            data = held
        self._inbound = b""
        max_size = self._gw.limits.max_frame
        pos = 0
        n = len(data)
        while pos < n:
            # No protocol yet: OPEN, and websockets is inside no message.
            proto = self.proto
            if proto is not None and proto.state is not WsState.OPEN:
                break  # closing: websockets finishes the close handshake
            kind, end, key_at = inbound.next_frame(data, pos, max_size)
            if (
                kind == inbound.TEXT
                and self._frags is None
                and (proto is None or proto.current_size is None)
            ):
                self._on_message(inbound.unmask(data, key_at, end))
            elif kind <= inbound.WHOLE:  # TEXT inside a fragmented message, or WHOLE
                self._parse(self._ws(), data[pos:end])
            elif kind == inbound.PARTIAL:
                if type(data) is bytearray:
                    del data[:pos]
                    self._inbound = data
                else:
                    self._inbound = bytearray(data[pos:])
                return
            else:  # HANDOVER
                break
            pos = end
        else:
            return
        proto = self._ws()
        self._inbound = None  # websockets reads the rest, and what follows
        self._parse(proto, data[pos:])

    def eof_received(self) -> bool | None:
        proto = self._ws()
        if self._inbound:  # an incomplete frame: websockets judges it with the EOF
            held, self._inbound = self._inbound, None
            self._parse(proto, held)
        proto.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        gw = self._gw
        gw.pending.discard(self)
        gw.connections.discard(self)
        if not gw.connections and not gw.pending:
            gw._all_gone.set()
        self.closing = True
        if self.session is not None:
            self.session.closed()
        self.exited = True
        hooks, self._exit_hooks = self._exit_hooks, None
        if hooks:
            for hook in hooks:
                try:
                    hook(self)
                except Exception:
                    log.exception("exit hook failed for %r", self)

    # --- internals -----------------------------------------------------------

    def _flush(self, tail: bytes = b"") -> None:
        """Write what websockets has queued (and then ``tail``, one of our
        frames) in one write; if websockets is done with the connection, the
        FIN follows what it queued and nothing else is written."""
        t = self._transport
        if t is None:
            return
        chunks = self.proto.data_to_send() if self.proto is not None else []
        if tail:
            chunks.append(tail)
        out: list[bytes] = []
        held = self._held
        if held is not None and chunks:  # held frames go first, in this write
            self._held = None
            out.extend(held)
        for chunk in chunks:
            if chunk:
                out.append(chunk)
                continue
            # SEND_EOF: websockets is done with this connection (after a
            # close handshake either side began, or a refused upgrade).
            if out:
                t.write(b"".join(out))
            self.closing = True
            self._linger(t)
            return  # nothing follows the FIN (``tail`` included)
        if out:
            t.write(b"".join(out))

    def _linger(self, t: asyncio.Transport) -> None:
        """Half-close: FIN after what is already written, then keep reading
        (websockets discards it) until the client closes or ``close_timeout``
        (the sweeper aborts). Closing a socket with unread input makes the
        kernel reset it and drop what was not yet sent, so a client still
        sending (a frame over ``max_frame``, say) would lose the close frame
        that says why."""
        if not t.can_write_eof():
            t.close()
            return
        self.deadline = min(self.deadline, time.monotonic() + self._gw.limits.close_timeout)
        self._gw._file(self, self.deadline)
        t.write_eof()

    def _ws(self) -> ServerProtocol:
        """websockets' protocol, made now if there is none yet: OPEN with
        the chosen subprotocol after :mod:`upgrade`'s handshake (its parser
        is at a frame boundary: it is only ever given whole frames, or
        everything from one frame's start), else CONNECTING."""
        proto = self.proto
        if proto is None:
            if self._fast:
                proto = self._new_proto(WsState.OPEN)
                proto.subprotocol = self._subprotocol
            else:
                proto = self._new_proto(WsState.CONNECTING)
            self.proto = proto
        return proto

    @property
    def subprotocol(self) -> Subprotocol | None:
        """The subprotocol the handshake chose (None: a protocol 1.0 client)."""
        proto = self.proto
        return proto.subprotocol if proto is not None else self._subprotocol

    def _new_proto(self, state: WsState) -> ServerProtocol:
        return ServerProtocol(
            extensions=self._gw.extensions,
            subprotocols=_SUBPROTOCOLS,
            select_subprotocol=_select_subprotocol,
            max_size=self._gw.limits.max_frame,
            state=state,
            logger=_ws_log,
        )

    def _upgrade(self, data: bytes) -> ServerProtocol | None:
        """The first read: a plain upgrade request is answered here
        (:mod:`upgrade`; returns None); anything else goes to websockets in
        CONNECTING state (returned, to be fed ``data``)."""
        hs = upgrade.parse(data, GATEWAY_PATHS)
        if hs is None:
            return self._ws()
        try:
            sp = _choose_subprotocol(hs.offered)
        except NegotiationError:
            return self._ws()  # websockets writes the 400
        self._fast = True
        self._subprotocol = sp
        self._inbound = b""  # frames from here on: inbound.py, websockets when needed
        self._opened(upgrade.response(hs.accept, sp))
        if hs.rest and not self.closing:
            self.data_received(hs.rest)
        return None

    def _on_request(self, req: Request) -> None:
        gw = self._gw
        proto = self.proto
        assert proto is not None
        path = req.path.split("?", 1)[0]
        if (
            "Upgrade" not in req.headers
            and (page := static.response_for(path, gw.demo_page, gw.readiness)) is not None
        ):
            proto.send_response(page)  # demo page, health checks (static.py); then closed
            return
        if path not in GATEWAY_PATHS:
            proto.send_response(proto.reject(404, "Not Found: the gateway is at /gateway\n"))
            return
        resp = proto.accept(req)
        proto.send_response(resp)
        # websockets' parser keeps the Request alive for the connection's life
        # (a local of its parse generator): drop its headers, ~2 KB of strings.
        req.headers.clear()
        if resp.status_code != 101:
            return
        self._opened(b"")

    def _opened(self, head: bytes) -> None:
        """The upgrade is accepted; ``head`` is the 101 if this module wrote
        it (else websockets has it queued). Both paths pass admission here."""
        gw = self._gw
        now = time.monotonic()
        refusal = (
            "server full"
            if len(gw.connections) >= gw.limits.max_connections
            else gw.admission.handshake(now)
        )
        if refusal is not None:
            # Stays in ``pending`` so the sweeper drops it if it never answers.
            gw.refused += 1
            self._flush(head)
            self.close(Close.TRY_AGAIN_LATER, refusal)
            return
        gw.pending.discard(self)
        gw.connections.add(self)
        gw.accepted += 1
        proto = self.proto
        if gw.deflater is not None and proto is not None and negotiated(proto.extensions):
            self.deflate = gw.deflater
        self.session = Session(gw.authenticate, gw.session_limits, _session_ids.next(), now)
        self.deadline = float("inf")
        gw._file(self, self.session.deadline)
        # The 101 response and HELLO leave in one write.
        self._flush(head + self._own(self.session.hello()))

    def _on_frame(self, frame: Frame) -> None:
        op = frame.opcode
        if op is Opcode.TEXT:
            if frame.fin:
                self._on_message(frame.data)
            else:
                self._frags = [frame.data]
        elif op is Opcode.CONT:
            frags = self._frags
            if frags is None or self.closing:
                return  # websockets rejects a stray continuation before us
            if len(frags) >= MAX_FRAGMENTS:
                # websockets bounds the bytes of a message, not its pieces:
                # empty fragments would each cost a list entry, unbounded.
                self._frags = None
                self.close(Close.TOO_LARGE, "message in too many fragments")
                if self._transport is not None:
                    # Nothing it sends now is worth parsing: the close frame
                    # is out, and the sweeper ends the connection after
                    # close_timeout if it does not answer.
                    self._transport.pause_reading()
                return
            frags.append(frame.data)
            if frame.fin:
                self._frags = None
                self._on_message(b"".join(frags))
        elif op is Opcode.BINARY:
            session = self.session
            if session is not None:
                self._run(session.receive_binary())
        elif op is Opcode.PING or op is Opcode.PONG:
            # websockets answers a ping itself; both prove the client alive
            # (PROTOCOL.md "A session, step by step" 4, protocol 1.1), so a
            # library that pings on its own needs no HEARTBEAT.
            session = self.session
            if session is not None:
                session.alive(time.monotonic())
        # CLOSE is answered by websockets itself.

    def _on_message(self, data: bytes | bytearray | memoryview) -> None:
        session = self.session
        if session is None or self.closing:
            return
        if self._waiting is not None:  # behind an IDENTIFY waiting its turn
            self._waiting.append(bytes(data))
            return
        if (
            not self._admitted
            and session.state is SessionState.AWAIT_IDENTIFY
            and self._gw.admission.rate > 0
            and self._wait_turn(data)
        ):
            return
        self._msg_len = len(data)  # what a PUBLISH in it costs its user
        effects = session.receive(data, time.monotonic())
        self.events = session.events
        # IDENTIFY may move the deadline earlier (a heartbeat interval shorter
        # than the IDENTIFY timeout); later moves are found when the slot is due.
        self._gw._file(self, session.deadline)
        if self._held is None and self._answers is None and Subscribe in map(type, effects):
            # Hold READY (or what else this message answers) for the guild's
            # SUBSCRIBED: the guild's step was scheduled by the subscribe,
            # so it runs before the release scheduled after it, this turn.
            self._held = []
            self._run(effects)
            asyncio.get_running_loop().call_soon(self._release)
            return
        self._run(effects)

    def _wait_turn(self, data: bytes | bytearray | memoryview) -> bool:
        """Admission control of an IDENTIFY (admission.py): False to serve
        it now; True when it waits its turn or was refused (close 1013)."""
        resume = _identify_resume(data)
        if resume is None:
            return False  # not an IDENTIFY (or not one): the session judges it
        gw = self._gw
        verdict = gw.admission.arrive(self, resume, time.monotonic())
        if verdict is None:
            self._admitted = True
            return False
        if verdict is QUEUED:
            self._waiting = [bytes(data)]
            if self._transport is not None:
                self._transport.pause_reading()
            gw._admit_wake.set()
            return True
        self.close(Close.TRY_AGAIN_LATER, verdict)
        return True

    def admitted(self) -> None:
        """The waiting IDENTIFY's turn (the gateway's admitter)."""
        held, self._waiting = self._waiting, None
        if self.closing or held is None:
            return
        self._admitted = True
        for data in held:
            self._on_message(data)
        t = self._transport
        if t is not None and not t.is_closing():
            t.resume_reading()  # also for a close handshake to finish
        self._flush()

    def _release(self) -> None:
        """Write what :meth:`_on_message` held, as one write."""
        held = self._held
        self._held = None
        if held and not self.closing:
            self.send(held[0] if len(held) == 1 else b"".join(held))

    def _run(self, effects: list[Effect]) -> None:
        gw = self._gw
        for e in effects:
            tp = type(e)
            if tp is Send:
                if self._answers is not None and self._cork is None:
                    # PUBLISH answers of this iteration are queued: what the
                    # session says now goes after them, in the session's order
                    # (PROTOCOL.md: answers in the order the PUBLISHes came).
                    self._answers.append([e])
                else:
                    self.send(self._own(e.data))  # type: ignore[union-attr]
            elif tp is Forbidden:
                assert isinstance(e, Forbidden)
                self._log_forbidden(e.gid, e.message)
            elif tp is Subscribe:
                assert isinstance(e, Subscribe)
                try:
                    gw.host.subscribe(self, e.gid, e.position, e.rewind, e.passive)
                except Failure as exc:
                    if self.session is not None:
                        # In command order, like every answer (after earlier
                        # PUBLISHes' ACKs, queued or not yet due).
                        code = failures.answer(exc).error_code
                        self._run(self.session.subscribe_failed(e.gid, code, str(exc)))
            elif tp is Unsubscribe:
                assert isinstance(e, Unsubscribe)
                gw.host.unsubscribe(self, e.gid)
            elif tp is Publish:
                assert isinstance(e, Publish)
                self._publish(e)
            elif tp is CloseConn:
                assert isinstance(e, CloseConn)
                self.close(e.code, e.reason)

    def _own(self, data: bytes) -> bytes:
        """This session's own frames (not shared events) as it is sent them:
        compressed past the threshold if it negotiated permessage-deflate."""
        z = self.deflate
        return data if z is None else z.frames(data)

    def _publish(self, p: Publish) -> None:
        session = self.session
        assert session is not None
        grant = session.grant
        # A token with its own pub_rate is its issuer's choice (as it
        # overrides --publish-rate); the node's default applies to the rest.
        if (
            grant is not None
            and grant.pub_rate is None
            and not self._gw.user_rates.take(grant.sub, self._msg_len, time.monotonic())
        ):
            self._run(
                session.publish_failed(
                    p, Err.PUBLISH_RATE_LIMITED, "over the publish volume of your user"
                )
            )
            return
        try:
            # Encoded once, here; its bytes go to the broker as they are.
            d_json = wire.encode(p.d)
        except TypeError as exc:  # decodable but not encodable (nested too deep)
            self._run(session.publish_failed(p, Close.DECODE_ERROR, f"d is not JSON: {exc}"))
            return
        try:
            # The guild answers in its own step (``publish_to``): no Future
            # and no extra loop turn per PUBLISH; the ACK is still queued
            # and written with the iteration's other answers (``_answer``).
            self._gw.host.publish_to(p.gid, p.t, d_json, p.key, partial(self._published, p))
        except (Failure, ValueError) as exc:
            code = failures.answer(exc).error_code
            self._run(session.publish_failed(p, code, str(exc)))
            return

    def _published(
        self, p: Publish, result: tuple[int, str] | None, exc: BaseException | None
    ) -> None:
        session = self.session
        if session is None or self.closing:
            return  # the answer of a gone session is dropped silently
        if exc is not None:
            # One table for both transports (core/failures.py): 4504 for an
            # outcome unknown, never "refused, retry"; 4409 for a key conflict.
            effects = session.publish_failed(p, failures.answer(exc).error_code, str(exc))
        else:
            assert result is not None
            s, epoch = result
            effects = session.publish_done(p, p.gid, s, epoch)
        self._answer(effects)

    def _answer(self, effects: list[Effect]) -> None:
        """Queue a PUBLISH answer: the answers one loop iteration brings (a
        busy publisher's events, sequenced by many guilds) go out in one
        write, after the callbacks already queued (``call_soon``)."""
        answers = self._answers
        if answers is None:
            answers = self._answers = []
            asyncio.get_running_loop().call_soon(self._write_answers)
        answers.append(effects)

    def _write_answers(self) -> None:
        answers = self._answers
        self._answers = None
        if answers is None or self.closing:
            return
        cork: list[bytes] = []
        self._cork = cork
        try:
            for effects in answers:
                self._run(effects)
        finally:
            self._cork = None
        if cork:
            self.send(cork[0] if len(cork) == 1 else b"".join(cork))

    def next_deadline(self) -> float:
        """The earliest deadline :meth:`tick` enforces (monotonic; may be inf)."""
        s = self.session
        if self.closing or s is None:
            return self.deadline
        return s.deadline

    def tick(self, now: float) -> None:
        """Enforce deadlines; called by the gateway's sweeper."""
        if self.closing or self.session is None:
            if now >= self.deadline and self._transport is not None:
                self._transport.abort()
            return
        effects = self.session.check_timeout(now)
        if effects:
            self._run(effects)


def _identify_resume(data: bytes | bytearray | memoryview) -> bool | None:
    """For an IDENTIFY: True if it names a Position for some guild (a
    resume), False if none (fresh: no ``guilds``, or only null, rewind or
    passive-without-Position requests); None for anything else (the
    session decodes and judges every message itself)."""
    try:
        msg = wire.decode(data)
    except wire.JSONDecodeError:
        return None
    if type(msg) is not dict or msg.get("op") != 2:
        return None
    d = msg.get("d")
    if type(d) is not dict:
        return None
    guilds = d.get("guilds", {})
    if type(guilds) is not dict:
        return None
    return any(_names_position(value) for value in guilds.values())


def _names_position(value: object) -> bool:
    """A guild's IDENTIFY value recovers from a Position (a request the
    session will refuse counts as none: it never gets that far)."""
    try:
        return wire.guild_request(value).position is not None
    except ValueError:
        return False


def _reconnecting(delay_ms: tuple[int, int]) -> Callable[[Connection], None]:
    """RECONNECT (with ``delay_ms`` for a 1.1 session), then close 1001."""
    # The same two frames for every session of the drain: compressed (when
    # past the threshold) once per parameter set, like every shared frame.
    v11 = SharedFrame(hints.reconnect_frame(*delay_ms))
    v10 = SharedFrame(wire.RECONNECT_FRAME)

    def reconnect(conn: Connection) -> None:
        frame = v11 if conn.subprotocol is not None else v10
        conn.send(frame.for_sink(conn.deflate))
        conn.close(Close.GOING_AWAY, "server shutting down")

    return reconnect


class Gateway:
    """Listens for WebSocket connections and owns them until they close."""

    def __init__(
        self,
        host: GatewayHost,
        authenticate: Authenticator,
        session_limits: Limits,
        limits: GatewayLimits,
        deflater: Deflater | None = None,
    ) -> None:
        self.host = host
        self.authenticate = authenticate
        self.session_limits = session_limits
        self.limits = limits
        #: The node's compressor: permessage-deflate is offered to clients
        #: (``--compression on``) when set, declined when None.
        self.deflater = deflater
        self.extensions = [SharedDeflateFactory()] if deflater is not None else None
        #: Connections past the handshake (counted against max_connections).
        self.connections: set[Connection] = set()
        #: Connections still in the HTTP upgrade (or being refused).
        self.pending: set[Connection] = set()
        self.accepted = 0
        self.refused = 0
        self.slow_consumers = 0
        self.close_codes: dict[int, int] = {}
        #: Serve the demo board on plain GETs of ``/`` (static.py).
        self.demo_page = True
        #: "" when the node is ready, else why not: ``GET /readyz`` here.
        self.readiness: Callable[[], str] | None = None
        #: Notices EMFILE on accept, which no loop reports (core/fdwatch.py).
        self.descriptors = DescriptorWatch()
        #: Publish volume per user, across connections (core/userrate.py).
        self.user_rates = UserBuckets(limits.user_publish_bytes)
        #: Handshakes and IDENTIFYs per second, resumes first (admission.py);
        #: the admitter task serves its queue when woken.
        self.admission = Admission(limits.admit_rate, time.monotonic())
        self._admit_wake = asyncio.Event()
        self._admitter: asyncio.Task[None] | None = None
        #: Set whenever the last connection has gone (for drain).
        self._all_gone = asyncio.Event()
        #: The listening sockets' acceptors (listen.py, acceptor.py).
        self._acceptors: list[Acceptor] = []
        self._sweeper: asyncio.Task[None] | None = None
        #: The deadline wheel: slot -> connections filed there (slot ``k``
        #: holds deadlines in ``((k-1)*sweep_interval, k*sweep_interval]``).
        #: Bound: a connection is filed at most once per deadline move that
        #: brings its deadline earlier (connect, IDENTIFY, close) plus once
        #: per visit; entries of a connection re-filed earlier, or gone, are
        #: stale and skipped (``Connection._due`` names the live slot).
        self._wheel: dict[int, list[Connection]] = {}
        #: The first slot the sweeper has not yet emptied.
        self._wheel_next = math.floor(time.monotonic() / limits.sweep_interval)

    def _file(self, conn: Connection, deadline: float) -> None:
        """File ``conn`` under ``deadline`` unless it is filed at or before it."""
        if deadline == math.inf:
            return
        slot = max(math.ceil(deadline / self.limits.sweep_interval), self._wheel_next)
        due = conn._due
        if due is not None and due <= slot:
            return
        conn._due = slot
        bucket = self._wheel.get(slot)
        if bucket is None:
            self._wheel[slot] = [conn]
        else:
            bucket.append(conn)

    async def start(
        self,
        host: str,
        port: int,
        tg: asyncio.TaskGroup,
        reuse_port: bool = False,
        sockets: int = listen.LISTEN_SOCKETS,
    ) -> int:
        """Listen on ``host:port`` (0 for a free port); returns the bound port."""
        # Several sockets on the port, each its own accept queue (listen.py).
        self._acceptors = listen.listen(
            lambda: Connection(self), host, port, reuse_port, sockets, self.descriptors.note
        )
        self._sweeper = tg.create_task(self._sweep(), name="gateway-sweeper")
        if self.admission.rate > 0:
            self._admitter = tg.create_task(self._admit(), name="gateway-admitter")
        DescriptorWatch.warn_if_short(self.limits.max_connections)
        sock = self._acceptors[0].sock
        return int(sock.getsockname()[1])

    async def _sweep(self) -> None:
        interval = self.limits.sweep_interval
        wheel = self._wheel
        due = time.monotonic() + interval
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            # How late the loop was: admissions follow it (admission.py).
            self.admission.loop_lag(now - due)
            due = now + interval
            self.descriptors.check(now)
            self.user_rates.prune(now)
            last = math.floor(now / interval)
            while self._wheel_next <= last:
                slot = self._wheel_next
                # Re-filing during this pass lands in a later slot (this pass
                # or the next), never in the one being emptied.
                self._wheel_next = slot + 1
                for conn in wheel.pop(slot, ()):
                    if conn._due != slot or conn.exited:
                        continue  # stale: re-filed earlier, or gone
                    conn._due = None
                    try:
                        conn.tick(now)
                    except Exception:
                        log.exception("sweeping %r failed", conn)
                    if not conn.exited:
                        self._file(conn, conn.next_deadline())

    async def _admit(self) -> None:
        """Serve the admission queue: waiting IDENTIFYs as tokens come
        (resumes first), and refuse those that waited too long."""
        adm = self.admission
        while True:
            if not adm.waiting:
                self._admit_wake.clear()
                await self._admit_wake.wait()
                continue
            await asyncio.sleep(adm.next_due(time.monotonic()))
            admitted, refused = adm.due(time.monotonic())
            for conn in admitted:
                try:
                    cast(Connection, conn).admitted()
                except Exception:
                    log.exception("admitting %r failed", conn)
            for conn, reason in refused:
                cast(Connection, conn).close(Close.TRY_AGAIN_LATER, reason)

    def stop_accepting(self) -> None:
        for acc in self._acceptors:
            acc.close()

    async def drain(self, timeout: float, spread: float = 0.0) -> None:
        """Graceful shutdown (PROTOCOL.md op 7 and close 1001): stop accepting,
        send RECONNECT then close 1001 to every session, in waves over at
        most ``spread`` s (transport/drain.py; a 1.1 session's RECONNECT
        names a reconnect delay range), and wait up to ``timeout`` s in all
        for the close handshakes before dropping the rest."""
        self.stop_accepting()
        started = time.monotonic()
        for conn in list(self.pending):
            conn.close(Close.GOING_AWAY, "server shutting down")
        conns = list(self.connections)
        ready = SessionState.READY
        identified = {c for c in conns if c.session is not None and c.session.state is ready}
        window = staggered.drain_window(
            len(conns), min(spread, timeout / 2), self.limits.admit_rate
        )
        delay = staggered.reconnect_delay_ms(len(conns), window, self.limits.admit_rate)
        await staggered.reconnect_in_waves(conns, window, _reconnecting(delay))
        log.info(
            "drain: RECONNECT sent to %d sessions in %.2f s", len(conns), time.monotonic() - started
        )
        deadline = started + timeout
        while self.connections or self.pending:
            # A session's RECONNECT and close, acknowledged by its peer:
            # closed without waiting for the client's close frame (a
            # connection that never identified is waited for, as before;
            # transport/drain.py).
            for conn in identified & self.connections:
                t = conn._transport
                if conn.closing and t is not None and staggered.delivered(t):
                    t.abort()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._all_gone.clear()
            if not self.connections and not self.pending:
                break
            try:
                await asyncio.wait_for(self._all_gone.wait(), min(left, staggered.ACK_POLL))
            except TimeoutError:
                pass
        for conn in [*self.connections, *self.pending]:
            if conn._transport is not None:
                conn._transport.abort()
        await asyncio.sleep(0)

    async def close(self) -> None:
        self.stop_accepting()
        for task in (self._sweeper, self._admitter):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        for acc in self._acceptors:
            await acc.wait_closed()

    def report_metrics(self, m: MetricsSnapshot) -> None:
        """``ReportsMetrics``: connections, sessions, refusals and descriptors
        (O(connections): scrape time only)."""
        m.connections = len(self.connections)
        m.connections_pending = len(self.pending)
        m.connections_accepted = self.accepted
        m.connections_refused = self.refused
        m.slow_consumers = self.slow_consumers
        m.close_codes = dict(self.close_codes)
        ready = SessionState.READY
        for c in self.connections:
            if c.session is not None and c.session.state is ready:
                m.sessions_identified += 1
            if c.deflate is not None:
                m.connections_deflate += 1
        z = self.deflater
        if z is not None:
            m.compressed_messages = z.compressed
            m.compress_bytes_in = z.bytes_in
            m.compress_bytes_out = z.bytes_out
        m.user_publish_refused = self.user_rates.refused
        self.admission.report_metrics(m)
        m.descriptors_exhausted = self.descriptors.exhausted
        m.open_descriptors = fdwatch.open_descriptors()
        m.descriptor_limit = fdwatch.soft_limit()

    def stats(self) -> dict[str, Any]:
        return {
            "connections": len(self.connections),
            "pending": len(self.pending),
            "accepted": self.accepted,
            "refused": self.refused,
            "slow_consumers": self.slow_consumers,
            "close_codes": dict(self.close_codes),
            "admission": asdict(self.admission.stats),
        }
