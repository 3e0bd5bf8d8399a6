"""What the transports ask of the layer that owns guilds.

The transport (``server/transport``) may not import the actors; the node
wires an implementation of :class:`GatewayHost` (``guildcast.actors.hub.Hub``)
into the gateway, whose methods return without awaiting (docs/DESIGN.md rule 3),
and one of :class:`ApiHost` (``guildcast.node.NodeApi``) into the HTTP API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from guildcast.core.failures import Failure as Failure
from guildcast.core.failures import KeyConflict as KeyConflict
from guildcast.core.failures import OutcomeUnknown as OutcomeUnknown
from guildcast.core.failures import Overloaded as Overloaded
from guildcast.core.metrics import MetricsSnapshot
from guildcast.core.sink import Member, Sink

#: How a publish is answered without a future: ``(s, epoch)`` or the
#: failure, exactly one of them None (``GatewayHost.publish_to``).
PublishReply = Callable[[tuple[int, str] | None, BaseException | None], None]


class Subscriber(Sink, Member, Protocol):
    """A connection that can receive events and join groups."""

    @property
    def user(self) -> str:
        """The token's ``sub`` (presence)."""

    @property
    def session_id(self) -> str:
        """The session id sent in READY (presence)."""

    @property
    def wants_presence(self) -> bool:
        """IDENTIFY ``presence``: wants PRESENCE_JOIN/PRESENCE_LEAVE dispatches."""


class GatewayHost(Protocol):
    def subscribe(
        self,
        sub: Subscriber,
        gid: str,
        position: tuple[str, int] | None,
        rewind: int | None = None,
        passive: bool = False,
    ) -> None:
        """Join ``gid``; the guild answers SUBSCRIBED (and any replay) through
        ``sub``: after ``position``, or (1.1) the last ``rewind`` events.
        ``passive``: notices only (PROTOCOL.md "Passive subscriptions");
        subscribing again switches the mode."""

    def unsubscribe(self, sub: Subscriber, gid: str) -> None:
        """Leave ``gid``; the guild answers UNSUBSCRIBED through ``sub`` after its last event."""

    def publish(
        self, gid: str, t: str, d_json: bytes, key: str | None = None
    ) -> asyncio.Future[tuple[int, str]]:
        """Sequence an event; the future gives ``(s, epoch)``.

        The edge has validated it: ``gid`` and ``t`` are valid and not
        reserved, ``d_json`` is ``d`` encoded once (``wire.encode``); its
        bytes reach the broker as they are; ``key`` is a valid idempotency
        key or None. Raises a runtime :class:`Failure` (``core/failures.py``)
        at once when the guild cannot take it; the future fails with one. A
        key already in the guild's window gives the original ``(s, epoch)``,
        or fails with :class:`KeyConflict`.
        """

    def publish_to(
        self,
        gid: str,
        t: str,
        d_json: bytes,
        key: str | None,
        reply: PublishReply,
    ) -> None:
        """:meth:`publish` with its answer given to ``reply(result, error)``
        (exactly one of them None) instead of a future, called once in the
        guild's own step. ``reply`` must not block; what it raises is
        logged, never passed to the guild. Raises as :meth:`publish` does."""


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Stored events of one guild after a given ``s`` (``GET .../history``)."""

    guild: str
    epoch: str
    #: The guild's last ``s`` when the page was read.
    head: int
    #: The oldest ``s`` still in history, or None when it is empty.
    first: int | None
    #: DISPATCH envelopes as JSON (exactly what subscribers got), oldest first.
    events: list[bytes]


class ApiHost(Protocol):
    """What the HTTP API asks of the node.

    Errors: ValueError for bad input, a runtime :class:`Failure`
    (``core/failures.py``: a full mailbox, too many guilds, storage or
    broker trouble, a draining node, an unknown outcome) answered as its
    row of the failure table says. Anything else is a bug.
    """

    def publish(
        self, gid: str, t: str, d_json: bytes, key: str | None = None
    ) -> asyncio.Future[tuple[int, str]]:
        """Queue an event for sequencing; the future gives ``(s, epoch)`` once it
        is sequenced (and stored, with a durable broker), or the original's
        for an idempotency ``key`` already in the guild's window.

        Validated by the HTTP API (ids, names, keys, ``d`` encoded once: ``d_json``).
        Raises a :class:`Failure` at once; the future fails with one
        (:class:`KeyConflict` for a key used for another event).
        Calls made one after another are sequenced in that order per guild.
        """

    async def info(self, gid: str) -> dict[str, Any]:
        """Head ``s``, epoch, local subscribers and history bounds of ``gid``."""

    async def history(self, gid: str, after: int, limit: int) -> HistoryPage:
        """At most ``limit`` stored events of ``gid`` with ``s > after``."""

    def ready(self) -> bool:
        """False while the node is starting, draining or without its broker."""

    def not_ready_reason(self) -> str:
        """Why :meth:`ready` is false ("draining", "broker unavailable", …)."""

    async def presence(self, gid: str) -> list[dict[str, str]]:
        """The sessions subscribed to ``gid`` on every node: user, session, node."""

    def metrics(self) -> MetricsSnapshot:
        """The node's counters and gauges now (``/metrics``)."""
