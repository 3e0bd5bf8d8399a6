"""Redis-only presence behaviour: node heartbeats and reaping of dead nodes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from guildcast.broker.base import Presence
from guildcast.broker.redis import RedisBroker
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
