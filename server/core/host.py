"""What the gateway transport asks of the layer that owns guilds.

The transport (``server/transport``) may not import the actors; the node
wires an implementation of :class:`GatewayHost` (``server.actors.hub.Hub``)
into it. Every method returns without awaiting (DESIGN.md rule 3).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from server.core.sink import Member, Sink


class Subscriber(Sink, Member, Protocol):
    """A connection that can receive events and join groups."""


class GatewayHost(Protocol):
    def subscribe(self, sub: Subscriber, gid: str, position: tuple[str, int] | None) -> None:
        """Join ``gid``; the guild answers SUBSCRIBED (and any replay) through ``sub``."""

    def unsubscribe(self, sub: Subscriber, gid: str) -> None:
        """Leave ``gid``; the guild answers UNSUBSCRIBED through ``sub`` after its last event."""

    def publish(self, gid: str, t: str, d: Any) -> asyncio.Future[tuple[int, str]]:
        """Sequence an event; the future gives ``(s, epoch)``.

        Raises :class:`Overloaded` at once when the guild cannot take more.
        """


class Overloaded(Exception):
    """The target cannot accept more work now; try again later (1013)."""
