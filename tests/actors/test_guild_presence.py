"""The guild's presence snapshot and its versioned changes, on the memory
broker, with in-memory sinks (tests/actors/test_guild.py's FakeSink), in
orderings a socket test cannot force (docs/RELIABILITY.md, "Presence
snapshot and diffs")."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from guildcast.actors.groups import Groups
from guildcast.actors.guild import (
    Feed,
    Guild,
    GuildSettings,
    InfoMsg,
    PresenceMsg,
    Subscribe,
    Unsubscribe,
)
from guildcast.broker.base import Presence
from guildcast.broker.memory import MemoryBroker
from tests.actors.support import scope
from tests.actors.test_guild import FakeSink


@dataclass
class Env:
    guild: Guild
    broker: MemoryBroker
    groups: Groups

    def subscribe(self, sink: FakeSink, session: str, presence: bool = True) -> None:
        self.groups.join(self.guild.gid, sink)
        member = Presence(session, session, "local")
        self.guild.cast_system(Subscribe(sink, None, member, presence))

    def unsubscribe(self, sink: FakeSink) -> None:
        self.guild.cast_system(Unsubscribe(sink))
        self.groups.leave(self.guild.gid, sink)

    async def settle(self) -> None:
        """Every message queued so far (and what they queued) is handled."""
        for _ in range(3):
            await self.guild.call(InfoMsg(), timeout=10)


@asynccontextmanager
async def presence_env(partition_size: int = 512) -> AsyncIterator[Env]:
    async with scope() as tg:
        broker = MemoryBroker(100, 300)
        groups = Groups("guilds")
        guild = Guild("room", GuildSettings(partition_size=partition_size), groups, tg, broker)
        broker.set_feed(
            lambda gid, recs: guild.cast_system(Feed(recs)),
            lambda gid, kind, m, v: guild.cast_system(PresenceMsg(kind, m, v)),
        )
        guild.start(tg)
        yield Env(guild, broker, groups)


def presence(sink: FakeSink) -> list[tuple[str, Any]]:
    """The sink's presence dispatches: ("snapshot", [sessions]) or (kind, session)."""
    out: list[tuple[str, Any]] = []
    for m in sink.messages():
        if m.get("t") == "PRESENCE_SNAPSHOT":
            out.append(("snapshot", [x["session"] for x in m["d"]["members"]]))
        elif m.get("t") in ("PRESENCE_JOIN", "PRESENCE_LEAVE"):
            out.append((m["t"], m["d"]["session"]))
    return out


async def test_snapshot_taken_before_queued_changes_are_handled_skips_them() -> None:
    """Joins already in the broker (so in the snapshot) whose announcements
    are still queued behind the subscribe are not sent to it again; the
    sessions subscribed before get them."""
    async with presence_env() as env:
        first, watcher = FakeSink("first"), FakeSink("watcher")
        env.subscribe(first, "first")
        await env.settle()
        # One batch: two sessions without presence join (their joins are
        # announced into the mailbox, behind this batch), then the watcher:
        # the snapshot cached for "first" is older than first's own join, so
        # the watcher's is read afresh and already holds a and b.
        a, b = FakeSink("a"), FakeSink("b")
        env.subscribe(a, "a", presence=False)
        env.subscribe(b, "b", presence=False)
        env.subscribe(watcher, "watcher")
        await env.settle()
        assert presence(watcher) == [
            ("snapshot", ["first", "a", "b"]),
            ("PRESENCE_JOIN", "watcher"),
        ]
        assert presence(first) == [
            ("snapshot", []),
            ("PRESENCE_JOIN", "first"),
            ("PRESENCE_JOIN", "a"),
            ("PRESENCE_JOIN", "b"),
            ("PRESENCE_JOIN", "watcher"),
        ]


async def test_a_change_queued_before_the_feed_stopped_is_not_counted_after() -> None:
    """The last session leaves (the guild stops listening) and its leave is
    handled after that; a later presence subscriber must still get its own
    join and the ones after it (no version of the earlier listening may
    make them look old)."""
    async with presence_env() as env:
        a = FakeSink("a")
        env.subscribe(a, "a")
        await env.settle()
        env.unsubscribe(a)
        await env.settle()  # a's leave handled while not listening
        b, c = FakeSink("b"), FakeSink("c")
        env.subscribe(b, "b")
        await env.settle()
        env.subscribe(c, "c")
        await env.settle()
        assert presence(b) == [("snapshot", []), ("PRESENCE_JOIN", "b"), ("PRESENCE_JOIN", "c")]
        assert presence(c) == [("snapshot", ["b"]), ("PRESENCE_JOIN", "c")]


async def test_leaving_and_a_new_subscriber_in_one_batch_need_no_resync() -> None:
    """The last session's leave and a new presence subscribe in one batch:
    the feed stops and starts again, the stale leave is older than the new
    snapshot, and the newcomer gets one snapshot and its own join."""
    async with presence_env() as env:
        a, b = FakeSink("a"), FakeSink("b")
        env.subscribe(a, "a")
        await env.settle()
        env.unsubscribe(a)
        env.subscribe(b, "b")
        await env.settle()
        assert presence(b) == [("snapshot", []), ("PRESENCE_JOIN", "b")]


async def test_a_version_gap_resynchronises_every_presence_session() -> None:
    """A change whose version skips one (an announcement lost on the way)
    makes the guild read presence afresh and send every presence session a
    new snapshot, in partitions too; the changes at or before it are dropped."""
    async with presence_env(partition_size=1) as env:
        a, b = FakeSink("a"), FakeSink("b")
        env.subscribe(a, "a")
        env.subscribe(b, "b")
        await env.settle()
        # A member appears in the broker without its announcement reaching
        # the guild (as a Redis pub/sub message can be lost), then another
        # change is announced: its version is one too far.
        env.broker.set_feed(lambda gid, recs: None, lambda gid, kind, m, v: None)
        env.broker.presence_join("room", Presence("ghost", "ghost", "n2"))
        env.broker.set_feed(
            lambda gid, recs: env.guild.cast_system(Feed(recs)),
            lambda gid, kind, m, v: env.guild.cast_system(PresenceMsg(kind, m, v)),
        )
        env.broker.presence_join("room", Presence("late", "late", "n2"))
        await env.settle()
        for sink in (a, b):
            got = presence(sink)
            assert got[-1] == ("snapshot", ["a", "b", "ghost", "late"]), (sink, got)
            assert ("PRESENCE_JOIN", "late") not in got
        assert presence(b)[:3] == [
            ("snapshot", []),
            ("PRESENCE_JOIN", "a"),
            ("PRESENCE_JOIN", "b"),
        ]


async def test_a_change_without_a_version_from_an_older_node_goes_to_everyone() -> None:
    """A node of an earlier version announces changes without a version:
    they are forwarded to every presence session as before, and do not
    disturb the versioned ones."""
    async with presence_env() as env:
        a = FakeSink("a")
        env.subscribe(a, "a")
        await env.settle()
        env.guild.cast_system(PresenceMsg("join", Presence("old", "old", "n0"), None))
        b = FakeSink("b")
        env.subscribe(b, "b")
        await env.settle()
        assert presence(a) == [
            ("snapshot", []),
            ("PRESENCE_JOIN", "a"),
            ("PRESENCE_JOIN", "old"),
            ("PRESENCE_JOIN", "b"),
        ]
        assert presence(b) == [("snapshot", ["a"]), ("PRESENCE_JOIN", "b")]
