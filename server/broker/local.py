"""The in-process brokers' listeners, live feed and presence (one node).

The memory and the disk broker hold one each: which guilds this node's
actors listen to (counted: an old guild actor still stopping and its
successor may overlap), the feed callback records of a plain ``append`` go
to, and each guild's presence with its change feed. Nothing crosses a node.

Presence versions (``PresenceSnapshot``): every change of a guild's
presence takes the guild's next version, fed with the change. A guild's
version is kept while it has members or a listener and forgotten after; a
version never repeats: a guild's versions start again above every version
forgotten (the floor), so a change still queued from before is always older
than a snapshot taken after.

Consistency model: one event loop; presence is kept in join order, one
entry per session key; a change is fed only for a listened guild.
Bounds: one counter per listened guild, one entry per subscribed session,
one version per guild with members or a listener.
"""

from __future__ import annotations

from itertools import islice

from guildcast.broker.base import Feed, Presence, PresenceFeed, PresenceSnapshot, Record


class LocalFeed:
    """Listeners, feed and presence of the guilds of one node."""

    __slots__ = ("_feed", "_listening", "_pfloor", "_presence", "_presence_feed", "_pversion")

    def __init__(self) -> None:
        self._listening: dict[str, int] = {}
        self._feed: Feed | None = None
        self._presence_feed: PresenceFeed | None = None
        #: Presence of each guild: member key -> member, in join order.
        self._presence: dict[str, dict[str, Presence]] = {}
        #: The version of each guild's presence, and the floor new versions
        #: start above (the module docstring).
        self._pversion: dict[str, int] = {}
        self._pfloor = 0

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
            self._forget_version(gid)

    def clear(self) -> None:
        """Nobody listens any more (the broker closes)."""
        self._listening.clear()

    def records(self, gid: str, recs: list[Record]) -> None:
        """Feed ``recs`` of ``gid`` to its listener, if any."""
        if gid in self._listening and self._feed is not None:
            self._feed(gid, recs)

    def join(self, gid: str, member: Presence) -> None:
        members = self._presence.setdefault(gid, {})
        if members.get(member.key) == member:
            return  # already present: no change, nothing to tell
        members[member.key] = member
        v = self._pversion[gid] = self._pversion.get(gid, self._pfloor) + 1
        if self._presence_feed is not None and gid in self._listening:
            self._presence_feed(gid, "join", member, v)

    def leave(self, gid: str, member: Presence) -> None:
        members = self._presence.get(gid)
        if members is None or members.pop(member.key, None) is None:
            return
        v = self._pversion[gid] = self._pversion.get(gid, self._pfloor) + 1
        if not members:
            del self._presence[gid]
        if self._presence_feed is not None and gid in self._listening:
            self._presence_feed(gid, "leave", member, v)
        self._forget_version(gid)

    def _forget_version(self, gid: str) -> None:
        """Forget the presence version of a guild nobody holds one of."""
        if gid not in self._presence and gid not in self._listening:
            self._pfloor = max(self._pfloor, self._pversion.pop(gid, 0))

    def members(self, gid: str) -> list[Presence]:
        return list(self._presence.get(gid, {}).values())

    def snapshot(self, gid: str, limit: int) -> PresenceSnapshot:
        """``gid``'s presence at its current version, at most ``limit`` members listed."""
        members = self._presence.get(gid, {})
        listed = list(islice(members.values(), max(0, limit)))
        return PresenceSnapshot(self._pversion.get(gid, self._pfloor), len(members), listed)
