"""Runtime failures and the protocol's answer to each: one table for both
transports.

A failure of the runtime (a full mailbox, an exited actor, a full registry,
a call that timed out, an unreachable broker, an append whose answer never
came) is an exception whose class derives from :class:`Failure` and names
its row with ``kind``. The layers that raise them (actors, brokers) import
this module; the transports (gateway ERROR codes, HTTP status, body and
``Retry-After``) read the answer from :data:`ANSWERS` through
:func:`answer` and nowhere else, so a failure is answered the same way on
the gateway, over HTTP and to an embedding application (docs/PROTOCOL.md,
"Publishing": every code but 4504 / HTTP 504 means "not published").

Consistency model: a constant table, read-only; no state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from guildcast.protocol.codes import Close, Err

#: Seconds an HTTP client is told to wait (``Retry-After``) after a refusal
#: that is this node's momentary state (a busy guild, an unreachable broker):
#: the shortest ``Retry-After`` can say, and about how long a burst takes to
#: drain from a guild mailbox or a Redis reconnect to be noticed.
RETRY_AFTER_S = 1


class Kind(Enum):
    """The rows of :data:`ANSWERS`."""

    #: A limit of this node: a user's share of guilds, a node not ready or draining.
    OVERLOADED = "overloaded"
    #: An actor's mailbox is at its bound (``actors.actor.MailboxFull``).
    MAILBOX_FULL = "mailbox_full"
    #: The actor exited before it took or answered the message (``ActorExited``).
    ACTOR_EXITED = "actor_exited"
    #: ``max_guilds`` actors are alive and none can be evicted (``RegistryFull``).
    REGISTRY_FULL = "registry_full"
    #: A call got no reply within its timeout (``CallTimeout``). Only reads are
    #: calls with a timeout; a publish waiting too long is ``OUTCOME_UNKNOWN``.
    CALL_TIMEOUT = "call_timeout"
    #: The broker cannot be reached; nothing was appended (``BrokerUnavailable``).
    BROKER_UNAVAILABLE = "broker_unavailable"
    #: A publish reached the sequencer but its answer did not come back: it may
    #: or may not have been sequenced (``OutcomeUnknown``; HTTP's publish timeout).
    OUTCOME_UNKNOWN = "outcome_unknown"
    #: The publish's idempotency key is in the guild's window for an event of
    #: other content (``KeyConflict``): refused, not sequenced.
    KEY_CONFLICT = "key_conflict"
    #: The publish's future was cancelled before it was sequenced.
    CANCELLED = "cancelled"
    #: The request itself is wrong (a ``ValueError`` from the edge's checks).
    INVALID = "invalid"
    #: Anything else: a bug. HTTP answers 500 and logs the traceback.
    UNEXPECTED = "unexpected"


class Failure(Exception):
    """A runtime failure the protocol has an answer for; ``kind`` names its row."""

    kind: ClassVar[Kind] = Kind.OVERLOADED

    def fields(self) -> dict[str, Any]:
        """Fields the HTTP answer's body carries besides ``error`` and ``detail``."""
        return {}


class Overloaded(Failure):
    """The target cannot accept more work now; try again later (1013)."""

    kind = Kind.OVERLOADED


class OutcomeUnknown(Failure):
    """A publish was handed to the sequencer but its answer never came (a
    timeout, a connection lost while waiting): it may or may not have been
    sequenced. ERROR 4504 on the gateway, HTTP 504 ``"outcome": "unknown"``
    (PROTOCOL.md "Publishing")."""

    kind = Kind.OUTCOME_UNKNOWN


class KeyConflict(Failure):
    """A publish's idempotency key is in the guild's window for an event of
    other content (``t`` or ``d``): refused, not sequenced. ERROR 4409 on
    the gateway, HTTP 409 ``idempotency_conflict`` with the original's ``s``
    and ``epoch`` (PROTOCOL.md "Idempotent publish")."""

    kind = Kind.KEY_CONFLICT

    def __init__(self, s: int, epoch: str) -> None:
        super().__init__(f"idempotency key already used for another event (s={s}, epoch {epoch})")
        self.s = s
        self.epoch = epoch

    def fields(self) -> dict[str, Any]:
        return {"s": self.s, "epoch": self.epoch}


#: ``outcome`` of an HTTP batch entry: the event was not sequenced.
NOT_PUBLISHED = "not_published"
#: ``outcome`` of an HTTP batch entry: the event may or may not have been sequenced.
UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Answer:
    """What both transports say for one kind of failure."""

    kind: Kind
    #: The gateway's ERROR code in the answer to the PUBLISH or SUBSCRIBE
    #: (the connection stays open).
    error_code: int
    #: The HTTP status.
    status: int
    #: The HTTP body's ``"error"``.
    error: str
    #: :data:`NOT_PUBLISHED` or :data:`UNKNOWN`: a publish's fate (HTTP body
    #: ``"outcome"`` where it is unknown, every batch entry).
    outcome: str
    #: ``Retry-After`` seconds of the HTTP answer, or None for no header.
    retry_after: int | None

    @property
    def headers(self) -> dict[str, str] | None:
        """The HTTP headers of the answer."""
        if self.retry_after is None:
            return None
        return {"Retry-After": str(self.retry_after)}


def _retry_later(kind: Kind) -> Answer:
    return Answer(kind, Err.TRY_AGAIN_LATER, 503, "unavailable", NOT_PUBLISHED, RETRY_AFTER_S)


#: The one table: every :class:`Kind` and its answer on both transports.
ANSWERS: Mapping[Kind, Answer] = {
    Kind.OVERLOADED: _retry_later(Kind.OVERLOADED),
    Kind.MAILBOX_FULL: _retry_later(Kind.MAILBOX_FULL),
    Kind.ACTOR_EXITED: _retry_later(Kind.ACTOR_EXITED),
    Kind.REGISTRY_FULL: _retry_later(Kind.REGISTRY_FULL),
    Kind.CALL_TIMEOUT: _retry_later(Kind.CALL_TIMEOUT),
    Kind.BROKER_UNAVAILABLE: _retry_later(Kind.BROKER_UNAVAILABLE),
    Kind.OUTCOME_UNKNOWN: Answer(
        Kind.OUTCOME_UNKNOWN, Err.OUTCOME_UNKNOWN, 504, "outcome_unknown", UNKNOWN, None
    ),
    Kind.KEY_CONFLICT: Answer(
        Kind.KEY_CONFLICT,
        Err.IDEMPOTENCY_CONFLICT,
        409,
        "idempotency_conflict",
        NOT_PUBLISHED,
        None,
    ),
    Kind.CANCELLED: _retry_later(Kind.CANCELLED),
    Kind.INVALID: Answer(Kind.INVALID, Close.DECODE_ERROR, 400, "bad_shape", NOT_PUBLISHED, None),
    Kind.UNEXPECTED: Answer(
        Kind.UNEXPECTED, Err.TRY_AGAIN_LATER, 500, "internal_error", NOT_PUBLISHED, None
    ),
}


def kind_of(exc: BaseException) -> Kind:
    """The row of ``exc``."""
    if isinstance(exc, Failure):
        return exc.kind
    if isinstance(exc, asyncio.CancelledError):
        return Kind.CANCELLED
    if isinstance(exc, ValueError):
        return Kind.INVALID
    return Kind.UNEXPECTED


def answer(exc: BaseException) -> Answer:
    """The protocol's answer to ``exc`` (:data:`ANSWERS`)."""
    return ANSWERS[kind_of(exc)]
