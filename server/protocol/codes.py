"""Opcodes, close codes, ERROR codes and the WebSocket subprotocol of the
gateway protocol (PROTOCOL.md, "Connecting", "Messages" and "Close codes").
Plain ints so the hot path compares ints."""

from __future__ import annotations

from enum import Enum, IntEnum

#: The version of PROTOCOL.md this package implements. 1.1 only adds to 1.0:
#: a 1.0 client (no subprotocol, 1.0 frames) is served unchanged.
PROTOCOL_VERSION = "1.1"
#: The WebSocket subprotocol (``Sec-WebSocket-Protocol``, RFC 6455 1.9) a
#: client may offer, and the server echoes (PROTOCOL.md "Connecting"). It
#: names the frame format, which 1.x only extends, so it stays ``v1``.
SUBPROTOCOL = "guildcast.v1"
#: Every subprotocol the server accepts, preferred first.
SUBPROTOCOLS = (SUBPROTOCOL,)


class Op(IntEnum):
    """PROTOCOL.md, "Opcodes"."""

    DISPATCH = 0
    HEARTBEAT = 1
    IDENTIFY = 2
    SUBSCRIBE = 3
    UNSUBSCRIBE = 4
    PUBLISH = 5
    RECONNECT = 7
    HELLO = 10
    HEARTBEAT_ACK = 11
    ACK = 12
    ERROR = 13


#: Opcodes a client may send; anything else closes with 4001.
CLIENT_OPS = frozenset({Op.HEARTBEAT, Op.IDENTIFY, Op.SUBSCRIBE, Op.UNSUBSCRIBE, Op.PUBLISH})


class Close(IntEnum):
    """PROTOCOL.md, "Close codes". The client's reaction is in ``RECONNECTABLE``."""

    GOING_AWAY = 1001
    TOO_LARGE = 1009
    TRY_AGAIN_LATER = 1013
    UNKNOWN_ERROR = 4000
    UNKNOWN_OPCODE = 4001
    DECODE_ERROR = 4002
    NOT_IDENTIFIED = 4003
    AUTH_FAILED = 4004
    ALREADY_IDENTIFIED = 4005
    RATE_LIMITED = 4008
    SESSION_TIMEOUT = 4009
    SLOW_CONSUMER = 4010


#: Close codes after which a client should reconnect and recover (PROTOCOL.md
#: marks them "reconnect, recover" or "back off, reconnect").
RECONNECTABLE = frozenset(
    {
        Close.GOING_AWAY,
        Close.TRY_AGAIN_LATER,
        Close.UNKNOWN_ERROR,
        Close.RATE_LIMITED,
        Close.SESSION_TIMEOUT,
        Close.SLOW_CONSUMER,
    }
)


class Err(IntEnum):
    """Codes carried in an ERROR payload (PROTOCOL.md, end of "Close codes")."""

    TRY_AGAIN_LATER = 1013
    DECODE_ERROR = 4002
    FORBIDDEN = 4403
    PAYLOAD_TOO_LARGE = 4413
    PUBLISH_RATE_LIMITED = 4429
    #: A PUBLISH whose ``t`` is a string outside the event-name grammar
    #: (protocol 1.1; 1.0 closed with 4002).
    INVALID_EVENT_NAME = 4422
    #: The same code for a PUBLISH whose ``idempotency_key`` is present but
    #: not a key (protocol 1.1): a malformed field of one PUBLISH, refused
    #: with the connection kept (an alias: ``Err(4422)`` is named as above).
    INVALID_IDEMPOTENCY_KEY = 4422
    #: A PUBLISH whose idempotency key the guild's window holds for an event
    #: of other content (protocol 1.1): refused, not sequenced.
    IDEMPOTENCY_CONFLICT = 4409
    TOO_MANY_SUBSCRIPTIONS = 4430
    #: The PUBLISH reached the sequencer but its answer did not come back: it
    #: may or may not have been sequenced (not "refused, retry").
    OUTCOME_UNKNOWN = 4504


#: The dispatch names of presence (PROTOCOL.md, "Presence"): sent by the
#: server only, so a publisher cannot forge a join, a leave or a snapshot.
PRESENCE_EVENTS = frozenset({"PRESENCE_JOIN", "PRESENCE_LEAVE", "PRESENCE_SNAPSHOT"})

#: The dispatch a passive subscription gets instead of events (PROTOCOL.md,
#: "Passive subscriptions"): the guild's head moved.
ACTIVITY_EVENT = "GUILD_ACTIVITY"

#: Event names a publisher may not use (PROTOCOL.md, "Publishing"): every
#: dispatch name the server sends itself.
RESERVED_EVENTS = (
    frozenset({"READY", "SUBSCRIBED", "UNSUBSCRIBED", ACTIVITY_EVENT}) | PRESENCE_EVENTS
)


class CloseAction(Enum):
    """What a client does after a close code (PROTOCOL.md "Close codes", last column)."""

    #: "fix the client": reconnecting would be refused the same way.
    FATAL = "fatal"
    #: "get a new token": fatal unless a fresh token can be had.
    AUTH = "auth"
    #: "back off, reconnect": the server is full or the client was rate limited.
    BACKOFF = "backoff"
    #: "reconnect, recover" (and every code not listed, 1006 included).
    RETRY = "retry"


#: "fix the client" codes, plus the RFC 6455 codes that mean the same
#: (1002 protocol error, 1003 unsupported data, 1007 invalid payload, 1008
#: policy violation, 1010 missing extension).
FATAL_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 1010, 4001, 4002, 4003, 4005})
#: Close codes after which a client backs off before reconnecting.
BACKOFF_CLOSE_CODES = frozenset({Close.TRY_AGAIN_LATER, Close.RATE_LIMITED})
#: The local close code of a connection that never opened or was cut (RFC 6455 7.1.5).
ABNORMAL_CLOSURE = 1006


def classify_close(code: int) -> CloseAction:
    """The client's reaction to close ``code``."""
    if code == Close.AUTH_FAILED:
        return CloseAction.AUTH
    if code in FATAL_CLOSE_CODES:
        return CloseAction.FATAL
    if code in BACKOFF_CLOSE_CODES:
        return CloseAction.BACKOFF
    return CloseAction.RETRY
