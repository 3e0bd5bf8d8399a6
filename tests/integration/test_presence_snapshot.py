"""Presence snapshot on one node, with plain ``websockets`` clients
(docs/PROTOCOL.md "Presence"; the consistency argument: docs/RELIABILITY.md
"Presence snapshot and diffs")."""

from __future__ import annotations

import asyncio

from guildcast import Server
from tests.support import gateway as gw
from tests.support.api import Api
from tests.support.node import api_server
from tests.support.presence import CHURNERS, PresenceView, churn_while_watching, watch
from tests.support.wait import until


async def http_sessions(api: Api, gid: str) -> set[str]:
    status, body, _ = await api.get(f"/v1/guilds/{gid}/presence")
    assert status == 200, body
    return {m["session"] for m in body["members"]}


async def test_snapshot_comes_right_after_subscribed_then_own_join() -> None:
    async with api_server() as srv:
        a, _ = await gw.session(srv.url, srv.token("ann"), {"room": None})
        ws = await gw.open_ws(srv.url)
        hello = await gw.recv(ws)
        assert hello["op"] == gw.HELLO
        await gw.send(
            ws,
            gw.IDENTIFY,
            {"token": srv.token("bob"), "guilds": {"room": None}, "presence": True},
        )
        ready = await gw.recv(ws)
        sub = await gw.recv(ws)
        assert sub["t"] == "SUBSCRIBED"
        snap = await gw.recv(ws)
        assert snap["t"] == "PRESENCE_SNAPSHOT" and snap["g"] == "room" and "s" not in snap
        assert snap["d"]["count"] == 1 and snap["d"]["truncated"] is False
        (ann,) = snap["d"]["members"]
        assert ann["user"] == "ann" and set(ann) == {"user", "session", "node"}
        # The snapshot is of the others; this session's own join follows it.
        own = await gw.recv(ws)
        assert own["t"] == "PRESENCE_JOIN"
        assert own["d"]["session"] == ready["d"]["session_id"]
        # A session that did not ask for presence gets no snapshot.
        await gw.send(a, gw.SUBSCRIBE, {"guilds": {"room": None}})
        again = await gw.recv(a)
        assert again["t"] == "SUBSCRIBED"
        await gw.still_open(a)  # and nothing else came before the HEARTBEAT_ACK
        # Subscribing again answers SUBSCRIBED and a fresh snapshot, now
        # with this session in it, and no second join of it.
        await gw.send(ws, gw.SUBSCRIBE, {"guilds": {"room": None}})
        assert (await gw.recv(ws))["t"] == "SUBSCRIBED"
        snap2 = await gw.recv(ws)
        assert snap2["t"] == "PRESENCE_SNAPSHOT" and snap2["d"]["count"] == 2
        await gw.still_open(ws)
        await a.close()
        left = await gw.recv(ws)
        assert left["t"] == "PRESENCE_LEAVE" and left["d"]["user"] == "ann"
        await ws.close()


async def test_snapshot_and_diffs_consistent_under_50_churning_sessions() -> None:
    # Small partitions: the watchers and the churners spread over partition
    # actors, whose mailboxes must keep the snapshot-then-diffs order too.
    async with api_server(partition_size=8, max_connections=500) as srv, Api(srv.api_url) as api:
        views = await churn_while_watching(
            [srv.url],
            [srv.url] * 5,
            "churn",
            lambda user: srv.token(user, guilds=["churn"]),
            lambda: http_sessions(api, "churn"),
        )
    # The watchers saw churn after their snapshot, not only a quiet guild.
    assert sum(v.joins + v.leaves for v in views) > CHURNERS


async def test_a_snapshot_past_the_limit_gives_the_count_and_says_truncated() -> None:
    async with api_server(presence_limit=5) as srv, Api(srv.api_url) as api:
        members = [
            (await gw.session(srv.url, srv.token(f"u{i}"), {"big": None}))[0] for i in range(12)
        ]
        view = PresenceView("big")
        subscribed = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(watch(srv.url, srv.token("w"), view, subscribed))
            async with asyncio.timeout(gw.TIMEOUT):
                await subscribed.wait()
            snap = view.snapshot
            assert snap["count"] == 12 and snap["truncated"] is True
            assert len(snap["members"]) == 5
            listed = {m["session"] for m in snap["members"]}
            assert listed <= await http_sessions(api, "big")
            # Diffs still apply: the count follows joins and leaves.
            await members.pop().close()
            extra, _ = await gw.session(srv.url, srv.token("late"), {"big": None})
            members.append(extra)

            async def followed() -> bool:
                # 12 - 1 + the watcher + "late"
                return view.count == 13 and any(m["user"] == "late" for m in view.members.values())

            await until(followed, "the watcher to count the leave and the joins")
            task.cancel()
        assert view.problems == []
        for ws in members:
            await ws.close()


async def test_presence_limit_zero_lists_nobody_but_counts() -> None:
    async with api_server(presence_limit=0) as srv:
        a, _ = await gw.session(srv.url, srv.token("ann"), {"room": None})
        ws = await gw.open_ws(srv.url)
        await gw.recv(ws)
        await gw.send(
            ws, gw.IDENTIFY, {"token": srv.token("b"), "guilds": {"room": None}, "presence": True}
        )
        await gw.recv(ws)  # READY
        assert (await gw.recv(ws))["t"] == "SUBSCRIBED"
        snap = await gw.recv(ws)
        assert snap["d"] == {"members": [], "count": 1, "truncated": True}
        await a.close()
        await ws.close()


async def publish_refused(srv: Server, api: Api, name: str) -> None:
    g = f"g-{name.lower()}"
    ws, _ = await gw.session(srv.url, srv.token("p", guilds=[g], pub=[g]), {g: None})
    await gw.send(ws, gw.PUBLISH, {"guild": g, "t": name, "d": {}, "nonce": "1"})
    m = await gw.recv(ws)
    assert m["op"] == gw.ERROR, m
    assert m["d"]["code"] == 4403 and m["d"]["nonce"] == "1", m
    assert "reserved" in m["d"]["message"]
    await gw.still_open(ws)  # a refused command; the session stays
    status, body, _ = await api.publish({"guild": g, "t": name, "d": {}})
    assert status == 400 and body["error"] == "reserved_event", body
    batch = {"events": [{"guild": g, "t": "E", "d": 1}, {"guild": g, "t": name, "d": 2}]}
    status, body, _ = await api.publish(batch)
    assert status == 400 and body["error"] == "reserved_event", body
    # Nothing of the refused batch was published: the next event is s=1.
    assert await srv.publish(g, "AFTER", None) == 1
    await ws.close()


async def test_presence_names_are_reserved_on_the_gateway_and_over_http() -> None:
    async with api_server() as srv, Api(srv.api_url) as api:
        for name in ("PRESENCE_JOIN", "PRESENCE_LEAVE", "PRESENCE_SNAPSHOT"):
            await publish_refused(srv, api, name)
