"""Redis-only presence behaviour: node heartbeats and reaping of dead nodes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from guildcast.broker.base import Presence
from guildcast.broker.redis import RedisBroker, channel
from tests.support.redis import RedisProc
from tests.support.wait import until


async def test_dead_node_members_are_dropped_after_the_timeout(tmp_path: Path) -> None:
    proc = RedisProc(tmp_path)
    proc.start()
    try:
        # Node "a" joins a member, then dies without cleaning up (its tasks
        # are cancelled and its connection dropped, as in kill -9).
        a = RedisBroker(proc.url, 10, 60, node_id="a", presence_timeout=1.0, health_interval=0.2)
        b = RedisBroker(proc.url, 10, 60, node_id="b", presence_timeout=1.0, health_interval=0.2)
        await a.start()
        await b.start()
        leaves: list[Presence] = []
        left = asyncio.Event()

        def presence(gid: str, kind: str, m: Presence, v: int | None) -> None:
            if kind == "leave":
                leaves.append(m)
                left.set()

        b.set_feed(lambda gid, recs: None, presence)
        await b.listen("g")
        a.presence_join("g", Presence("ann", "s-a", "a"))
        b.presence_join("g", Presence("bea", "s-b", "b"))

        async def two() -> bool:
            return len(await b.presence("g")) == 2

        await until(two)
        for t in a._tasks:  # simulate the crash: no graceful close
            t.cancel()
        await a.redis.aclose()
        # After presence_timeout, "a"'s member is gone from the list and a
        # leave is published by whichever node reaps it.
        async with asyncio.timeout(30):
            await left.wait()
        assert [m.user for m in leaves] == ["ann"]
        assert [m.user for m in await b.presence("g")] == ["bea"]
        await b.close()
    finally:
        proc.stop()


async def test_graceful_close_removes_own_members(tmp_path: Path) -> None:
    proc = RedisProc(tmp_path)
    proc.start()
    try:
        a = RedisBroker(proc.url, 10, 60, node_id="a")
        b = RedisBroker(proc.url, 10, 60, node_id="b")
        await a.start()
        await b.start()
        a.presence_join("g", Presence("ann", "s-a", "a"))

        async def one() -> bool:
            return len(await b.presence("g")) == 1

        await until(one)
        await a.close()
        assert await b.presence("g") == []
        await b.close()
    finally:
        proc.stop()


async def test_reaped_leaves_take_versions_and_unversioned_announcements_parse(
    tmp_path: Path,
) -> None:
    """A dead node's members leave with the guild's next versions (the reaper's
    script counts them like any change), and an announcement without a
    version (a node of an earlier version) is passed on with None."""
    proc = RedisProc(tmp_path)
    proc.start()
    try:
        a = RedisBroker(proc.url, 10, 60, node_id="a", presence_timeout=1.0, health_interval=0.2)
        b = RedisBroker(proc.url, 10, 60, node_id="b", presence_timeout=1.0, health_interval=0.2)
        await a.start()
        await b.start()
        seen: list[tuple[str, str, int | None]] = []

        def presence(gid: str, kind: str, m: Presence, v: int | None) -> None:
            seen.append((kind, m.session, v))

        b.set_feed(lambda gid, recs: None, presence)
        await b.listen("g")
        a.presence_join("g", Presence("ann", "s-a1", "a"))
        a.presence_join("g", Presence("ann", "s-a2", "a"))
        await until(lambda: len(seen) == 2, "two joins")
        for t in a._tasks:  # a dies without cleaning up
            t.cancel()
        await a.redis.aclose()
        await until(lambda: len(seen) == 4, "the reaper's two leaves", timeout=30)
        assert [k for k, _, _ in seen] == ["join", "join", "leave", "leave"]
        assert [v for _, _, v in seen] == [1, 2, 3, 4]
        snap = await b.presence_snapshot("g", 10)
        assert (snap.version, snap.total, snap.members) == (4, 0, [])
        legacy = b'P|join|{"user":"old","session":"s-old","node":"z"}'
        await b.redis.publish(channel("g"), legacy)
        await until(lambda: len(seen) == 5, "the unversioned join")
        assert seen[4] == ("join", "s-old", None)
        await b.close()
    finally:
        proc.stop()
