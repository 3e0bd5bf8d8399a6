"""Presence snapshot and diffs across two cluster nodes over a real redis-server
(docs/PROTOCOL.md "Presence"; the consistency argument: docs/RELIABILITY.md
"Presence snapshot and diffs").

Joins and leaves of either node reach a watcher through Redis pub/sub while
its snapshot is read from the presence hash: the presence version (one INCR
in the script that makes and announces each change) is what keeps the two
in step, and a feed reconnect resynchronises with a fresh snapshot.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager

import orjson
import redis.asyncio as aioredis

from guildcast.broker.base import Presence
from guildcast.broker.redis import (
    _PRESENCE_JOIN,
    channel,
    node_members,
    presence_key,
    presence_version_key,
)
from guildcast.core.tokens import make_token
from tests.support import gateway as gw
from tests.support.node import SECRET, ServeProcess, cluster_nodes
from tests.support.presence import CHURNERS, PresenceView, churn_while_watching, watch
from tests.support.redis import RedisProc
from tests.support.wait import until


def token(user: str) -> str:
    return make_token(SECRET, user, ["*"], ["*"], pub_rate=0)


def nodes(redis: RedisProc, *extra: str) -> AbstractAsyncContextManager[list[ServeProcess]]:
    return cluster_nodes(redis.url, redis.dir, 2, *extra)


async def http_sessions(n: ServeProcess, gid: str) -> set[str]:
    status, body = await n.get(f"/v1/guilds/{gid}/presence")
    assert status == 200, body
    return {m["session"] for m in body["members"]}


async def test_snapshot_and_diffs_consistent_under_50_churning_sessions_on_two_nodes(
    redis: RedisProc,
) -> None:
    async with nodes(redis) as (a, b):
        views = await churn_while_watching(
            [a.url, b.url],
            [a.url, b.url, a.url, b.url],
            "churn",
            token,
            lambda: http_sessions(a, "churn"),
        )
        # Both nodes list the same presence once quiet (the watchers' own
        # sessions may still be leaving when the churn returns).

        async def same() -> bool:
            return await http_sessions(b, "churn") == await http_sessions(a, "churn")

        await until(same, "both nodes to list the same presence")
    assert sum(v.joins + v.leaves for v in views) > CHURNERS
    # Members of both nodes are in each watcher's set.
    for v in views:
        assert {m["node"] for m in v.members.values()} == {"node0", "node1"}


async def test_a_snapshot_past_the_limit_on_a_cluster_node(redis: RedisProc) -> None:
    async with nodes(redis, "--presence-limit", "3") as (a, b):
        members = [
            (await gw.session([a.url, b.url][i % 2], token(f"u{i}"), {"big": None}))[0]
            for i in range(8)
        ]
        view = PresenceView("big")
        subscribed = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(watch(b.url, token("w"), view, subscribed))
            async with asyncio.timeout(gw.TIMEOUT):
                await subscribed.wait()
            snap = view.snapshot
            assert snap["count"] == 8 and snap["truncated"] is True
            assert len(snap["members"]) == 3
            assert {m["session"] for m in snap["members"]} <= await http_sessions(a, "big")
            await members.pop().close()  # a leave from node1

            async def counted() -> bool:
                return view.count == 8  # 8 - 1 + the watcher's own join

            await until(counted, "the watcher to count the leave and its own join")
            task.cancel()
        assert view.problems == []
        for ws in members:
            await ws.close()


async def member(url: str, user: str, gid: str) -> tuple[gw.ClientConnection, str]:
    """A session of ``user`` subscribed to ``gid``; returns it and its session id."""
    ws = await gw.open_ws(url)
    ready = await gw.identify(ws, token(user), {gid: None})
    subscribed = await gw.recv(ws)
    assert subscribed["t"] == "SUBSCRIBED" and subscribed["g"] == gid, subscribed
    return ws, ready["d"]["session_id"]


async def test_presence_stays_true_across_feed_reconnects(redis: RedisProc) -> None:
    """Redis drops the nodes' pub/sub connections three times while sessions
    of node1 join and leave: whatever is published while node0 resubscribes
    is lost for it; a version gap or the reconnect itself makes it resend a
    snapshot, so the watcher's set still ends equal to the true one."""
    async with nodes(redis) as (a, b):
        view = PresenceView("room")
        subscribed = asyncio.Event()
        r = aioredis.Redis.from_url(redis.url)
        kept: list[tuple[gw.ClientConnection, str]] = []
        try:
            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(watch(a.url, token("w"), view, subscribed))
                async with asyncio.timeout(gw.TIMEOUT):
                    await subscribed.wait()

                listening = len(await r.client_list(_type="pubsub"))
                assert listening >= 1

                async def feeds_back() -> bool:
                    return len(await r.client_list(_type="pubsub")) >= listening

                for round_ in range(3):
                    # The feeds killed last round are back, or this kill finds none.
                    await until(feeds_back, "the nodes' feeds to resubscribe")
                    killed = await r.client_kill_filter(_type="pubsub")
                    assert killed >= 1
                    for i in range(5):
                        kept.append(await member(b.url, f"r{round_}-{i}", "room"))
                    await kept.pop(0)[0].close()
                # The sessions still there (the leave of the last one closed
                # reaches Redis after its close: the listings are waited for).
                expected = {sid for _, sid in kept} | {view.session_id}

                async def settled() -> bool:
                    return (
                        view.sessions()
                        == expected
                        == await http_sessions(a, "room")
                        == await http_sessions(b, "room")
                    )

                try:
                    await until(settled, "the watcher to hold the true member set", timeout=60)
                except AssertionError:
                    raise AssertionError(
                        f"expected {sorted(expected)}; watcher {sorted(view.sessions())}; "
                        f"node0 {sorted(await http_sessions(a, 'room'))}; "
                        f"node1 {sorted(await http_sessions(b, 'room'))}; "
                        f"snapshots {view.snapshots}; problems {view.problems}"
                    ) from None
                task.cancel()
        finally:
            for ws, _ in kept:
                await ws.close()
            await r.aclose()
        assert view.problems == []
        assert len(expected) == 3 * 5 - 3 + 1


async def test_changes_lost_with_the_feed_are_recovered_by_a_fresh_snapshot(
    redis: RedisProc,
) -> None:
    """The last presence change before a feed reconnect is lost for good
    (Redis drops the pub/sub connections in the very transaction that
    announces it, so no later change reveals a version gap): node0 must
    notice on resubscribing and send its watcher a fresh PRESENCE_SNAPSHOT."""
    async with nodes(redis) as (a, b):
        view = PresenceView("lost")
        subscribed = asyncio.Event()
        r = aioredis.Redis.from_url(redis.url)
        try:
            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(watch(a.url, token("w"), view, subscribed))
                async with asyncio.timeout(gw.TIMEOUT):
                    await subscribed.wait()
                await until(lambda: view.joins == 1, "the watcher's own join")
                # A member of node1 joins, announced by the broker's own
                # script, in one transaction with the kill of every pub/sub
                # connection: its announcement reaches no node.
                ghost = Presence("ghost", "ghost-session", b.node_id)
                keys = [
                    presence_key("lost"),
                    node_members(b.node_id),
                    channel("lost"),
                    presence_version_key("lost"),
                ]
                async with r.pipeline(transaction=True) as pipe:
                    pipe.client_kill_filter(_type="pubsub")
                    pipe.eval(
                        _PRESENCE_JOIN,
                        len(keys),
                        *keys,
                        ghost.key,
                        orjson.dumps(ghost.as_dict()),
                        "lost",
                    )
                    killed, joined = await pipe.execute()
                assert killed >= 1 and joined == 1

                async def recovered() -> bool:
                    return "ghost-session" in view.sessions()

                await until(recovered, "a fresh snapshot with the lost join", timeout=60)
                assert view.snapshots >= 2
                assert view.sessions() == await http_sessions(a, "lost")
                task.cancel()
        finally:
            await r.aclose()
        assert view.problems == []
