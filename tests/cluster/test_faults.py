"""Cluster faults through a TCP fault proxy (guildcast.loadtest.faultproxy).

Node A reaches Redis through the proxy, node B directly. Publishers on B
publish with ACK; subscribers on A (and B) keep every event with the epoch
it was labelled with; the ledger (guildcast.loadtest.faultcheck) checks that
no acknowledged event is lost, doubled or mislabelled across the fault.
Short Redis timeouts (``FAST``) keep each test within a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed

from guildcast.broker.redis import node_members
from guildcast.core.tokens import make_token
from guildcast.loadtest.faultcheck import Ledger, Publisher, Subscriber, wait_clean
from guildcast.loadtest.faultproxy import ThreadedFaultProxy
from tests.support import gateway as gw
from tests.support.api import KEY as API_KEY
from tests.support.node import SECRET, ServeProcess, cluster_node
from tests.support.redis import RedisProc
from tests.support.wait import until

GUILDS = ["alpha", "beta"]
#: Redis command timeout and feed deadline of 1 s: a fault is seen within ~1-2 s.
FAST = ("--redis-timeout", "1", "--feed-deadline", "1")


def token(user: str) -> str:
    return make_token(SECRET, user, ["*"], ["*"], pub_rate=0)


@pytest.fixture
def proxy(redis: RedisProc) -> Iterator[ThreadedFaultProxy]:
    p = ThreadedFaultProxy("127.0.0.1", redis.port)
    p.start()
    yield p
    p.stop()


@dataclass
class Cluster:
    a: ServeProcess
    b: ServeProcess
    subs: list[Subscriber]
    pubs: list[Publisher]
    stop: asyncio.Event

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.pubs, self.subs)

    def acked(self) -> int:
        return sum(len(p.acked) for p in self.pubs)

    async def more_acked(self, n: int, timeout: float = 30) -> None:
        target = self.acked() + n

        async def grown() -> bool:
            return self.acked() >= target

        await until(grown, "more acknowledgements", timeout=timeout)

    async def ready(self, node: ServeProcess) -> bool:
        return (await node.get("/readyz"))[0] == 200


@contextlib.asynccontextmanager
async def cluster(a_url: str, b_url: str, logs: Path, n_subs: int = 4) -> AsyncIterator[Cluster]:
    a = cluster_node(a_url, "a", logs / "a.log", *FAST)
    b = cluster_node(b_url, "b", logs / "b.log", *FAST)
    try:
        await a.start()
        await b.start()
        # A's subscribers fall back to B when A closes them; B's stay on B.
        subs = [Subscriber([a.url, b.url], token(f"a{i}"), GUILDS) for i in range(n_subs)]
        subs += [Subscriber([b.url], token(f"b{i}"), GUILDS) for i in range(2)]
        tasks = [asyncio.create_task(s.run()) for s in subs]
        pubs = [Publisher([b.url], token("p0"), "p0"), Publisher([a.url, b.url], token("p1"), "p1")]
        stop = asyncio.Event()
        try:
            async with asyncio.timeout(30):
                for s in subs:
                    await s.subscribed.wait()
            ptasks = [asyncio.create_task(p.stream(GUILDS, stop)) for p in pubs]
            c = Cluster(a, b, subs, pubs, stop)
            await c.more_acked(20)
            yield c
        finally:
            stop.set()
            await asyncio.gather(*ptasks, return_exceptions=True)
            for p in pubs:
                await p.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for n in (a, b):
            await n.close()


async def settle(c: Cluster) -> None:
    """Publishing goes on after the fault; then stop and check the ledger."""
    await c.more_acked(40)
    c.stop.set()
    tally, _ = await wait_clean(c.ledger, 20)
    assert tally.acknowledged > 60
    assert tally.clean, (tally, tally.details)


async def test_black_holed_link_then_healed_loses_nothing(
    redis: RedisProc, proxy: ThreadedFaultProxy
) -> None:
    async with cluster(proxy.url, redis.url, redis.dir) as c:
        proxy.set_mode("blackhole")

        async def not_ready() -> bool:
            return not await c.ready(c.a)

        await until(not_ready, timeout=15)
        await c.more_acked(40)  # B goes on publishing while A is cut off
        await asyncio.sleep(8)  # the fault itself: a long black hole
        proxy.heal()

        async def ready() -> bool:
            return await c.ready(c.a)

        await until(ready, timeout=20)
        await settle(c)


async def test_zombie_feed_is_detected_and_subscribers_recover(
    redis: RedisProc, proxy: ThreadedFaultProxy
) -> None:
    async with cluster(proxy.url, redis.url, redis.dir) as c:
        # Only A's pub/sub connection: open, forwarding commands, delivering nothing.
        proxy.set_mode("zombie", only=b"SUBSCRIBE")

        async def not_ready() -> bool:
            return not await c.ready(c.a)

        await until(not_ready, timeout=15)
        await c.more_acked(60)
        # A cannot serve its subscribers: they were closed with 4000 and
        # recovered on B, missing nothing.
        await settle(c)
        assert any(4000 in s.close_codes for s in c.subs[:4])
        proxy.heal()

        async def ready() -> bool:
            return await c.ready(c.a)

        await until(ready, timeout=20)


async def test_redis_restart_empty_every_node_sees_the_new_epoch(
    redis: RedisProc, proxy: ThreadedFaultProxy
) -> None:
    async with cluster(proxy.url, redis.url, redis.dir) as c:
        await c.more_acked(40)
        c.stop.set()
        await wait_clean(c.ledger, 20)
        redis.stop()  # without persistence: every guild's history is gone

        async def both_down() -> bool:
            return not await c.ready(c.a) and not await c.ready(c.b)

        await until(both_down, timeout=20)
        redis.start()
        # Now A publishes (it sees the new epoch in its ACKs); B's and A's
        # subscribers must never see new events under the old epoch.
        c.stop.clear()
        pub = Publisher([c.a.url], token("pa"), "pa")
        c.pubs.append(pub)
        task = asyncio.create_task(pub.stream(GUILDS, c.stop))
        try:
            await c.more_acked(80, 40)
            epochs = {e for g, e, _ in pub.acked.values()}
            assert epochs, "A never published after the restart"
            c.stop.set()
            await task
            tally, _ = await wait_clean(c.ledger, 20)
            assert tally.mislabelled == 0, tally.details
            assert tally.clean, (tally, tally.details)
            for s in c.subs:  # every subscriber moved to the new epochs
                assert {s.epoch[g] for g in GUILDS} <= epochs
        finally:
            c.stop.set()
            await pub.close()


async def test_an_evicting_maxmemory_policy_fails_readiness_and_refuses(redis: RedisProc) -> None:
    node = cluster_node(redis.url, "b", redis.dir / "b.log", *FAST)
    await node.start()
    raw = aioredis.Redis(port=redis.port)
    pub = Publisher([node.url], token("p"), "p")
    try:
        assert await pub.publish("g")
        for policy in ("allkeys-lru", "volatile-ttl"):  # any key / keys with a TTL
            await raw.config_set("maxmemory-policy", policy)

            async def refused(policy: str = policy) -> bool:
                status, body = await node.get("/readyz")
                return status == 503 and f"maxmemory-policy is {policy}" in body["detail"]

            await until(refused, timeout=15)
            assert not await pub.publish("g")  # not sequenced: s is never reused
            assert set(pub.refused) == {1013} and not pub.unknown
        await raw.config_set("maxmemory-policy", "noeviction")

        async def ready() -> bool:
            return (await node.get("/readyz"))[0] == 200

        await until(ready, timeout=15)
        assert await pub.publish("g")
        assert [s for _, _, s in pub.acked.values()] == [1, 2]
    finally:
        await pub.close()
        await raw.aclose()
        await node.close()


async def test_a_node_paused_past_presence_timeout_reannounces_its_sessions(
    redis: RedisProc, proxy: ThreadedFaultProxy
) -> None:
    async with cluster(proxy.url, redis.url, redis.dir) as c:

        async def on(node: str) -> set[str]:
            status, body = await c.b.get("/v1/guilds/alpha/presence")
            assert status == 200, body
            return {m["user"] for m in body["members"] if m["node"] == node}

        users = {f"a{i}" for i in range(4)}

        async def whole() -> bool:
            return await on("a") == users

        await until(whole, timeout=15)
        assert c.a.proc is not None
        r = aioredis.Redis(port=redis.port)
        os.kill(c.a.proc.pid, signal.SIGSTOP)
        try:

            async def reaped() -> bool:
                # Gone for good: another node's reaper removed A's members.
                return not await on("a") and not await r.exists(node_members("a"))

            await until(reaped, timeout=20)  # presence timeout is 2 s
        finally:
            os.kill(c.a.proc.pid, signal.SIGCONT)
            await r.aclose()
        await until(whole, timeout=20)


async def test_a_late_redis_answer_is_outcome_unknown_not_refused(
    redis: RedisProc, proxy: ThreadedFaultProxy
) -> None:
    a = cluster_node(proxy.url, "a", redis.dir / "a.log", *FAST)
    await a.start()
    pub = Publisher([a.url], token("p"), "p")
    try:
        assert await pub.publish("late")  # connected, script loaded
        headers = {"Authorization": f"Bearer {API_KEY}"}

        async def ready() -> bool:
            return (await a.get("/readyz"))[0] == 200

        proxy.set_mode("delay", 1.6)  # every answer comes after the 1 s timeout
        assert not await pub.publish("late")
        assert pub.unknown == {"p-1"} and not pub.refused  # ERROR 4504, not 1013
        proxy.heal()
        await until(ready, timeout=20)
        async with aiohttp.ClientSession() as http:
            proxy.set_mode("delay", 1.6)
            body = {"guild": "late", "t": "EV", "d": {"k": "http-1"}}
            async with http.post(a.api_url + "/v1/publish", json=body, headers=headers) as r:
                status, answer = r.status, await r.json()
        assert status == 504 and answer["outcome"] == "unknown", answer
        proxy.heal()

        async def both_sequenced() -> bool:
            status, page = await a.get("/v1/guilds/late/history?after=0")
            keys = {e["d"]["k"] for e in page.get("events", [])} if status == 200 else set()
            return {"p-1", "http-1"} <= keys

        await until(both_sequenced, timeout=20)  # "unknown" was the honest answer
    finally:
        await pub.close()
        await a.close()


async def test_a_resume_whose_history_cannot_be_read_is_told_to_retry_not_that_it_lost(
    redis: RedisProc, proxy: ThreadedFaultProxy
) -> None:
    """A Position whose events history holds, read while Redis answers too
    late, is closed 1013 "broker unavailable" (come back with it), never
    answered ``recovered: false`` (the events are gone: reload), which in a
    storm cost clients events they could have had; back with the same
    Position once Redis answers, it recovers them all. The feed deadline is
    long, so the guild keeps listening and only the read fails."""
    a = cluster_node(
        proxy.url, "a", redis.dir / "a.log", "--redis-timeout", "1", "--feed-deadline", "60"
    )
    await a.start()
    pub = Publisher([a.url], token("p"), "p")
    holder = ws = None
    try:
        # A session holds the guild on A: listening, its head known there.
        holder, sub = await gw.subscribe(a.url, token("holder"), "resume")
        epoch = sub["epoch"]
        for _ in range(5):
            assert await pub.publish("resume")
        seen = [await gw.recv(holder) for _ in range(5)]
        assert [m["s"] for m in seen] == [1, 2, 3, 4, 5]

        proxy.set_mode("delay", 1.6)  # every answer comes after the 1 s timeout
        ws = await gw.open_ws(a.url)
        await gw.identify(ws, token("back"), {"resume": {"epoch": epoch, "s": 2}})
        try:
            first = await gw.recv(ws)
        except ConnectionClosed:
            pass
        else:
            raise AssertionError(f"answered instead of closed 1013: {first}")
        assert (ws.close_code, ws.close_reason) == (1013, "broker unavailable")
        proxy.heal()

        async def recovered() -> bool:
            back, d = await gw.subscribe(a.url, token("back"), "resume", {"epoch": epoch, "s": 2})
            try:
                if not d["recovered"]:
                    raise AssertionError(f"told to reload: {d}")
                replay = [await gw.recv(back) for _ in range(3)]
                assert [m["s"] for m in replay] == [3, 4, 5] and d["s"] == 5, replay
                return True
            finally:
                await back.close()

        async def attempt() -> bool:
            try:
                return await recovered()
            except (ConnectionClosed, OSError, TimeoutError):
                return False  # Redis still slow for this one: come back

        await until(attempt, "a recovered resume once Redis answers", timeout=30)
    finally:
        proxy.heal()
        for w in (holder, ws):
            if w is not None:
                await w.close()
        await pub.close()
        await a.close()
