"""Feed router: a broker's live feed -> the listening guild actor's mailbox.

Only a remote feed (the Redis broker's subscription) arrives this way: an
in-process log (``guildcast.broker.base.LocalLog``) hands the records it
appended back to the appending guild, which emits them in the same step
(docs/ARCHITECTURE.md, "The publish path").

Each record list, gap notice (None) or ``FEED_LOST`` goes to the guild
registered under that id (``Guild.feed``): a list for a parked guild is a
step of the guild run at once on this callback's stack (``Actor.step_now``),
anything else one ``Feed`` system message (never dropped; its bound is the
feed's own: the broker delivers what it read from Redis). A guild that is
not alive on this node does not listen: its feed is ignored.
"""

from __future__ import annotations

from guildcast.actors.guild import Guild, PresenceMsg
from guildcast.actors.registry import Registry
from guildcast.broker.base import Broker, Presence, Record


class FeedRouter:
    """Routes ``broker``'s feed and presence changes to the guilds of ``registry``."""

    def __init__(self, registry: Registry[Guild]) -> None:
        self.registry = registry

    def attach(self, broker: Broker) -> None:
        """Make this router the broker's feed and presence listener."""
        broker.set_feed(self.records, self.presence)

    def records(self, gid: str, records: list[Record] | str | None) -> None:
        """Feed records (or None: "you may have missed some", or FEED_LOST)."""
        guild = self.registry.lookup(gid)
        if guild is not None:
            guild.feed(records)

    def presence(self, gid: str, kind: str, member: Presence, v: int | None) -> None:
        """A presence change ("join" or "leave") of ``gid``, of version ``v``."""
        guild = self.registry.lookup(gid)
        if guild is not None:
            guild.cast_system(PresenceMsg(kind, member, v))
