"""Cluster mode end to end: real node processes over a real redis-server.

Every test here starts its own redis-server on a free loopback port and
``guildcast serve --redis`` processes, and checks the protocol's guarantee
across nodes: each client gets every event of its guilds in ``s`` order,
with no gap and no duplicate, across node deaths and Redis restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets

from guildcast.core.tokens import make_token
from tests.support.gateway import Follower, Publisher, send
from tests.support.node import SECRET, ServeProcess, cluster_nodes
from tests.support.redis import RedisProc
from tests.support.wait import until

GUILDS = ["alpha", "beta"]


def token(user: str) -> str:
    return make_token(SECRET, user, ["*"], ["*"], pub_rate=0)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProc]:
    r = RedisProc(tmp_path, persist=True)
    r.start()
    yield r
    r.stop()


def nodes(redis: RedisProc, n: int) -> AbstractAsyncContextManager[list[ServeProcess]]:
    return cluster_nodes(redis.url, redis.dir, n)


@contextlib.asynccontextmanager
async def following(followers: list[Follower]) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(f.run()) for f in followers]
    try:
        async with asyncio.timeout(60):
            for f in followers:
                await f.subscribed.wait()
        yield
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def check_complete(followers: list[Follower], acked: dict[str, set[int]]) -> None:
    """Every follower has 1..head of each guild, in order, identical across followers."""
    reference: dict[str, list[tuple[int, object]]] = {}
    for f in followers:
        assert f.violations == [], f.violations
        for g in GUILDS:
            got = f.events.get(g, [])
            assert [s for s, _ in got] == list(range(1, len(got) + 1))
            assert acked[g] <= {s for s, _ in got}, "an acknowledged event is missing"
            ref = reference.setdefault(g, got)
            assert got == ref, "two clients saw different events for one s"


async def test_three_nodes_every_client_gets_every_event_in_one_order(redis: RedisProc) -> None:
    async with nodes(redis, 3) as ns:
        followers = [Follower([ns[i % 3].url], token(f"u{i}"), GUILDS) for i in range(24)]
        async with following(followers):
            pubs = [Publisher(n.url, token(f"p{i}")) for i, n in enumerate(ns)]
            async with contextlib.AsyncExitStack() as stack:
                for p in pubs:
                    await stack.enter_async_context(p)

                async def stream(p: Publisher, k: int) -> None:
                    for i in range(60):
                        for g in GUILDS:
                            assert await p.publish(g, {"from": k, "i": i}) is not None

                await asyncio.gather(*(stream(p, k) for k, p in enumerate(pubs)))
            total = 3 * 60

            async def all_in() -> bool:
                return all(f.count(g) >= total for f in followers for g in GUILDS)

            await until(all_in, "every follower to have every event", timeout=60)
            acked = {g: {s for p in pubs for gg, s, _ in p.acked if gg == g} for g in GUILDS}
            assert all(len(acked[g]) == total for g in GUILDS)
            check_complete(followers, acked)


async def test_kill9_node_clients_recover_elsewhere_and_presence_drops_it(
    redis: RedisProc,
) -> None:
    async with nodes(redis, 3) as ns:
        victim = ns[2]
        followers = [
            Follower([ns[i % 3].url, ns[(i + 1) % 3].url], token(f"u{i}"), GUILDS)
            for i in range(12)
        ]
        on_victim = [f for i, f in enumerate(followers) if i % 3 == 2]

        async def presence_nodes() -> set[str]:
            status, body = await ns[0].get("/v1/guilds/alpha/presence")
            assert status == 200, body
            return {m["node"] for m in body["members"]}

        async with following(followers):

            async def victim_present() -> bool:
                return victim.node_id in await presence_nodes()

            await until(victim_present, "the victim node in presence")
            async with Publisher(ns[0].url, token("pub")) as pub:
                for i in range(200):
                    if i == 80:
                        await victim.kill()
                    for g in GUILDS:
                        assert await pub.publish(g, i) is not None

            async def all_in() -> bool:
                return all(f.count(g) >= 200 for f in followers for g in GUILDS)

            await until(all_in, "every follower to have every event", timeout=60)
            acked = {g: {s for gg, s, _ in pub.acked if gg == g} for g in GUILDS}
            check_complete(followers, acked)
            assert all(f.reconnects >= 1 for f in on_victim)
            assert all(f.unrecovered == 0 for f in followers)

            async def victim_gone() -> bool:
                nodes = await presence_nodes()
                return bool(nodes) and victim.node_id not in nodes

            # presence_timeout is 2 s; allow generous slack on a shared CI box.
            await until(victim_gone, "the killed node to leave presence", timeout=30)


async def test_redis_restart_publishes_fail_loudly_and_nothing_acked_is_lost(
    redis: RedisProc,
) -> None:
    async with nodes(redis, 2) as ns:
        followers = [Follower([ns[i % 2].url], token(f"u{i}"), GUILDS) for i in range(6)]
        async with following(followers), Publisher(ns[0].url, token("pub")) as pub:
            for i in range(50):
                for g in GUILDS:
                    assert await pub.publish(g, i) is not None
            redis.stop()
            # While Redis is down a publish is refused with an ERROR, never
            # acknowledged and silently dropped; readiness and metrics say so.
            for i in range(5):
                assert await pub.publish("alpha", ("down", i)) is None
            assert {f["code"] for f in pub.failed} == {1013}

            async def not_ready() -> bool:
                status, body = await ns[0].get("/readyz")
                return status == 503 and body["detail"] == "broker unavailable"

            await until(not_ready, "/readyz to fail")
            _, metrics = await ns[0].get("/metrics")
            assert "guildcast_broker_up 0.0" in metrics
            redis.start()

            # Publishes succeed again by themselves once Redis is back.
            async def publishes_again() -> bool:
                return await pub.publish("beta", "probe") is not None

            await until(publishes_again, "publishes to succeed again", timeout=60)

            async def ready_again() -> bool:
                return (await ns[0].get("/readyz"))[0] == 200

            await until(ready_again, "/readyz to pass again")
            for i in range(50, 100):
                for g in GUILDS:
                    assert await pub.publish(g, i) is not None
            acked = {g: {s for gg, s, _ in pub.acked if gg == g} for g in GUILDS}

            async def all_in() -> bool:
                return all(
                    acked[g] <= {s for s, _ in f.events.get(g, [])}
                    for f in followers
                    for g in GUILDS
                )

            await until(all_in, "every follower to have every event", timeout=60)
            check_complete(followers, acked)
            # Redis kept its data (AOF): the epochs did not change.
            assert len({f.epochs["alpha"] for f in followers}) == 1


async def test_presence_dispatches_cross_nodes(redis: RedisProc) -> None:
    async with nodes(redis, 2) as ns:
        async with contextlib.AsyncExitStack() as stack:
            watcher = await stack.enter_async_context(websockets.connect(ns[0].url))
            await watcher.recv()
            await send(
                watcher, 2, {"token": token("w"), "guilds": {"room": None}, "presence": True}
            )

            async def next_presence() -> dict[str, Any]:
                async with asyncio.timeout(30):
                    while True:
                        m = orjson.loads(await watcher.recv())
                        if m.get("t") in ("PRESENCE_JOIN", "PRESENCE_LEAVE"):
                            return dict(m)

            assert (await next_presence())["d"]["user"] == "w"  # its own join
            other = await websockets.connect(ns[1].url)
            await other.recv()
            await send(other, 2, {"token": token("far"), "guilds": {"room": None}})
            joined = await next_presence()
            assert joined["t"] == "PRESENCE_JOIN"
            assert joined["d"] == {
                "user": "far",
                "session": joined["d"]["session"],
                "node": ns[1].node_id,
            }
            await other.close()
            left = await next_presence()
            assert left["t"] == "PRESENCE_LEAVE" and left["d"]["user"] == "far"
