"""Guildcast clients: the asyncio Python client (``from guildcast.client import Client``)
and, in ``clients/js/``, the browser/Node ES module ``guildcast.js`` (a symlink to
the one real file, the server's package data ``server/transport/static/guildcast.js``)."""

from guildcast.client.backoff import Backoff, full_jitter, window
from guildcast.client.client import (
    AuthenticationFailed,
    Client,
    ClientClosed,
    CommandError,
    Event,
    GuildcastClosed,
    GuildcastError,
    Item,
    Member,
    Position,
    PresenceJoin,
    PresenceLeave,
    PresenceSnapshot,
    PublishError,
    PublishInterrupted,
    ReconnectFailed,
    Resync,
    Roster,
    SubscribeError,
    SubscriptionLost,
)

__all__ = [
    "AuthenticationFailed",
    "Backoff",
    "Client",
    "ClientClosed",
    "CommandError",
    "Event",
    "GuildcastClosed",
    "GuildcastError",
    "Item",
    "Member",
    "Position",
    "PresenceJoin",
    "PresenceLeave",
    "PresenceSnapshot",
    "PublishError",
    "PublishInterrupted",
    "ReconnectFailed",
    "Resync",
    "Roster",
    "SubscribeError",
    "SubscriptionLost",
    "full_jitter",
    "window",
]
