"""Opcodes, close codes and ERROR codes of the gateway protocol (PROTOCOL.md,
"Opcodes" and "Close codes"). Plain ints so the hot path compares ints."""

from __future__ import annotations

from enum import IntEnum


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
    TOO_MANY_SUBSCRIPTIONS = 4430
    #: The PUBLISH reached the sequencer but its answer did not come back: it
    #: may or may not have been sequenced (not "refused, retry").
    OUTCOME_UNKNOWN = 4504


#: Event names a publisher may not use (PROTOCOL.md, "Publishing").
RESERVED_EVENTS = frozenset({"READY", "SUBSCRIBED", "UNSUBSCRIBED"})
