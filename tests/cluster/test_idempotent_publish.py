"""Idempotent publish across a cluster (PROTOCOL.md "Idempotent publish"): two
``guildcast serve`` nodes over a real redis-server; the same key published
on both nodes at once is sequenced once (the window lives in Redis, checked
inside the append script), and a plain subscriber sees each event once."""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from guildcast.core.tokens import make_token
from guildcast.loadtest.faultproxy import ThreadedFaultProxy
from tests.support.api import Api
from tests.support.gateway import ACK, DISPATCH, PUBLISH, recv, send, session, subscribe
from tests.support.node import SECRET, ServeProcess, cluster_node, cluster_nodes
from tests.support.redis import RedisProc
from tests.support.wait import until

WATCHER = make_token(SECRET, "watcher", ["*"], [], None, 3600)
PUBLISHER = make_token(SECRET, "pub", ["*"], ["*"], pub_rate=0)
N = 1000
CONCURRENCY = 32
#: Redis command timeout and feed deadline of 1 s (as tests/cluster/test_faults.py).
FAST = ("--redis-timeout", "1", "--feed-deadline", "1")


def two_nodes(redis: RedisProc) -> AbstractAsyncContextManager[list[ServeProcess]]:
    return cluster_nodes(redis.url, redis.dir, 2, "--api-publish-rate", "0")


def event(gid: str, i: int) -> dict[str, Any]:
    return {"guild": gid, "t": "ORDER", "d": {"i": i}, "idempotency_key": f"order-{i}"}


async def test_one_key_on_two_nodes_at_once_sequences_once(redis: RedisProc) -> None:
    """1,000 keys, each published on both nodes concurrently (a retry racing
    its original on another node): 1,000 events, both answers the same."""
    async with two_nodes(redis) as ns:
        ws, sub = await subscribe(ns[1].url, WATCHER, "shop")
        apis = [Api(n.api_url) for n in ns]
        try:
            sem = asyncio.Semaphore(CONCURRENCY)
            answers: dict[int, int] = {}

            async def one(i: int) -> None:
                async with sem:
                    (st0, b0, _), (st1, b1, _) = await asyncio.gather(
                        apis[i % 2].publish(event("shop", i)),
                        apis[(i + 1) % 2].publish(event("shop", i)),
                    )
                assert (st0, st1) == (200, 200), (b0, b1)
                assert (b0["s"], b0["epoch"]) == (b1["s"], b1["epoch"]), (i, b0, b1)
                assert b0["epoch"] == sub["epoch"]
                answers[i] = b0["s"]

            await asyncio.gather(*(one(i) for i in range(N)))
            assert sorted(answers.values()) == list(range(1, N + 1))
            status, info, _ = await apis[0].get("/v1/guilds/shop")
            assert status == 200 and info["s"] == N
            # The plain subscriber on node1 sees each event once, then END.
            status, end, _ = await apis[0].publish({"guild": "shop", "t": "END", "d": None})
            assert status == 200 and end["s"] == N + 1
            got: list[dict[str, Any]] = []
            while len(got) < N + 1:
                m = await recv(ws)
                if m["op"] == DISPATCH and "s" in m:
                    got.append(m)
            assert [m["s"] for m in got] == list(range(1, N + 2))
            assert {m["d"]["i"]: m["s"] for m in got[:N]} == answers
        finally:
            for a in apis:
                await a.session.close()
            await ws.close()


async def test_gateway_retry_on_the_other_node(redis: RedisProc) -> None:
    """A plain websockets publisher whose answer was lost reconnects to the
    other node and retries: the ACK carries the original s and epoch."""
    async with two_nodes(redis) as ns:
        body = {"guild": "room", "t": "MSG", "d": {"n": 1}, "idempotency_key": "msg-1"}
        acks = []
        for n in ns:
            pub, _ = await session(n.url, PUBLISHER)
            try:
                await send(pub, PUBLISH, {**body, "nonce": "1"})
                ack = await recv(pub)
                assert ack["op"] == ACK, ack
                acks.append((ack["d"]["s"], ack["d"]["epoch"]))
            finally:
                await pub.close()
        assert acks[0] == acks[1] and acks[0][0] == 1
        async with Api(ns[0].api_url) as api:
            status, info, _ = await api.get("/v1/guilds/room")
            assert status == 200 and info["s"] == 1


async def test_outcome_unknown_then_a_retry_with_the_same_key(tmp_path: Path) -> None:
    """Issue "Hardening 3" item 2's retry: every Redis answer comes after the
    node's 1 s timeout, so an HTTP publish is answered 504 and a gateway
    PUBLISH ERROR 4504 although both were sequenced. Retried with the same
    key once Redis answers in time: the original s and epoch, one event each."""
    redis = RedisProc(tmp_path)
    redis.start()
    proxy = ThreadedFaultProxy("127.0.0.1", redis.port)
    proxy.start()
    a = cluster_node(proxy.url, "a", tmp_path / "a.log", *FAST)
    try:
        await a.start()
        pub, _ = await session(a.url, PUBLISHER)
        gw_body = {"guild": "late", "t": "EV", "d": {"k": "gw"}, "idempotency_key": "gw-1"}
        http_body = {"guild": "late", "t": "EV", "d": {"k": "http"}, "idempotency_key": "http-1"}
        async with Api(a.api_url) as api:
            status, warm, _ = await api.publish({"guild": "late", "t": "EV", "d": {"k": "warm"}})
            assert status == 200 and warm["s"] == 1  # connected, script loaded

            async def ready() -> bool:
                return (await a.get("/readyz"))[0] == 200

            proxy.set_mode("delay", 1.6)  # every answer after the 1 s timeout
            await send(pub, PUBLISH, {**gw_body, "nonce": "1"})
            err = await recv(pub)
            assert err["op"] == 13 and err["d"]["code"] == 4504, err
            proxy.heal()
            await until(ready, "node a ready after the heal", timeout=20)
            proxy.set_mode("delay", 1.6)
            status, answer, _ = await api.publish(http_body)
            assert status == 504 and answer["outcome"] == "unknown", answer
            proxy.heal()
            await until(ready, "node a ready after the heal", timeout=20)

            async def sequenced() -> dict[str, int]:
                status, page, _ = await api.get("/v1/guilds/late/history?after=0")
                return {e["d"]["k"]: e["s"] for e in page["events"]} if status == 200 else {}

            async def both() -> bool:
                return {"gw", "http"} <= set(await sequenced())

            await until(both, "both unknown outcomes sequenced", timeout=20)
            original = await sequenced()
            # The retries, as PROTOCOL.md says: the same key.
            await send(pub, PUBLISH, {**gw_body, "nonce": "2"})
            ack = await recv(pub)
            assert ack["op"] == ACK and ack["d"]["s"] == original["gw"], (ack, original)
            status, again, _ = await api.publish(http_body)
            assert status == 200 and again["s"] == original["http"], (again, original)
            assert ack["d"]["epoch"] == again["epoch"] == warm["epoch"]
            assert await sequenced() == original  # nothing published twice
            status, info, _ = await api.get("/v1/guilds/late")
            assert info["s"] == 3
        await pub.close()
    finally:
        await a.close()
        proxy.stop()
        redis.stop()
