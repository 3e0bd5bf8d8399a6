"""The in-process brokers' listeners, live feed and presence (one node).

The memory and the disk broker hold one each: which guilds this node's
actors listen to (counted: an old guild actor still stopping and its
successor may overlap), the feed callback records of a plain ``append`` go
to, and each guild's presence with its change feed. Nothing crosses a node.

Consistency model: one event loop; presence is kept in join order, one
entry per session key; a change is fed only for a listened guild.
Bounds: one counter per listened guild, one entry per subscribed session.
"""

from __future__ import annotations

from guildcast.broker.base import Feed, Presence, PresenceFeed, Record


class LocalFeed:
    """Listeners, feed and presence of the guilds of one node."""

    __slots__ = ("_feed", "_listening", "_presence", "_presence_feed")

    def __init__(self) -> None:
        self._listening: dict[str, int] = {}
        self._feed: Feed | None = None
        self._presence_feed: PresenceFeed | None = None
        #: Presence of each guild: member key -> member, in join order.
        self._presence: dict[str, dict[str, Presence]] = {}

    def set_feed(self, feed: Feed, presence: PresenceFeed | None = None) -> None:
        self._feed = feed
        self._presence_feed = presence

    def listening(self, gid: str) -> bool:
        """True while an actor of this node listens to ``gid``."""
        return gid in self._listening

    def listen(self, gid: str) -> None:
        self._listening[gid] = self._listening.get(gid, 0) + 1

    def unlisten(self, gid: str) -> None:
        n = self._listening.get(gid, 0) - 1
        if n > 0:
            self._listening[gid] = n
        else:
            self._listening.pop(gid, None)

    def clear(self) -> None:
        """Nobody listens any more (the broker closes)."""
        self._listening.clear()

    def records(self, gid: str, recs: list[Record]) -> None:
        """Feed ``recs`` of ``gid`` to its listener, if any."""
        if gid in self._listening and self._feed is not None:
            self._feed(gid, recs)

    def join(self, gid: str, member: Presence) -> None:
        self._presence.setdefault(gid, {})[member.key] = member
        if self._presence_feed is not None and gid in self._listening:
            self._presence_feed(gid, "join", member)

    def leave(self, gid: str, member: Presence) -> None:
        members = self._presence.get(gid)
        if members is None or members.pop(member.key, None) is None:
            return
        if not members:
            del self._presence[gid]
        if self._presence_feed is not None and gid in self._listening:
            self._presence_feed(gid, "leave", member)

    def members(self, gid: str) -> list[Presence]:
        return list(self._presence.get(gid, {}).values())
