"""1.1 ``activity_batch`` (PROTOCOL.md "Passive subscriptions") end to end: a
session that asks for it gets a notice interval's heads of all its passive
guilds in one GUILD_ACTIVITY (no ``g``, no epoch), a session that does not
gets one notice per guild from the same tick, our Python client reads both
the same way, and /metrics counts the notices. A real node, real sockets,
a plain ``websockets`` client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from guildcast import Server
from guildcast.client import Activity, Client
from tests.integration.test_metrics import scrape, value
from tests.support import gateway as gw
from tests.support.api import Api
from tests.support.node import api_server, node
from tests.support.wait import TIMEOUT, until

INTERVAL = 0.05
PASSIVE = {"passive": True}
BATCH = {"activity_batch": True}
#: Pairs of events published before both guilds' heads land in one tick:
#: two publishes take well under a millisecond against a 50 ms interval.
MAX_PAIRS = 20


@pytest.fixture
async def fast() -> AsyncIterator[Server]:
    async with node(passive_interval=INTERVAL) as srv:
        yield srv


async def heads_until(
    ws: ClientConnection, want: dict[str, int], batch: bool
) -> list[dict[str, Any]]:
    """Read notices until each guild of ``want`` reached its head; returns
    them (each checked to be of its form)."""
    seen: dict[str, int] = {}
    got: list[dict[str, Any]] = []
    while any(seen.get(g, 0) < s for g, s in want.items()):
        m = await gw.recv(ws)
        assert m.get("op") == 0 and m.get("t") == "GUILD_ACTIVITY", m
        if batch:
            assert "g" not in m and "s" not in m, m
            heads = m["d"]
            assert heads and all(type(s) is int for s in heads.values()), m
        else:
            assert set(m["d"]) == {"s", "epoch"}, m
            heads = {m["g"]: m["d"]["s"]}
        for g, s in heads.items():
            assert s > seen.get(g, 0), m  # a head moves forward
            seen[g] = s
        got.append(m)
    return got


async def test_a_batch_session_gets_one_message_per_tick_and_a_plain_one_a_notice_per_guild(
    fast: Server,
) -> None:
    token = fast.token("bea", guilds=["*"])
    guilds = {"b1": PASSIVE, "b2": PASSIVE}
    batch, subs = await gw.session(fast.url, token, guilds, extra=BATCH)
    plain, psubs = await gw.session(fast.url, token, guilds)
    assert subs == psubs and all(d["passive"] for d in subs.values())
    both = None
    for n in range(1, MAX_PAIRS + 1):
        await fast.publish("b1", "EV", {})
        await fast.publish("b2", "EV", {})
        got = await heads_until(batch, {"b1": n, "b2": n}, batch=True)
        await heads_until(plain, {"b1": n, "b2": n}, batch=False)
        both = next((m for m in got if len(m["d"]) == 2), None)
        if both is not None:
            break
    assert both == {"op": 0, "t": "GUILD_ACTIVITY", "d": {"b1": n, "b2": n}}
    for w in (batch, plain):
        await w.close()


@pytest.mark.parametrize("bad", [1, "yes", None, {}])
async def test_activity_batch_must_be_a_boolean(fast: Server, bad: Any) -> None:
    ws = await gw.open_ws(fast.url)
    assert (await gw.recv(ws))["op"] == gw.HELLO
    token = fast.token("bad", guilds=["*"])
    await gw.send(ws, gw.IDENTIFY, {"token": token, "guilds": {}, "activity_batch": bad})
    await gw.expect_close(ws, 4002)


async def test_python_client_reads_batches_as_activity_items(fast: Server) -> None:
    token = fast.token("cli", guilds=["*"])
    async with Client(fast.url, token, activity_batch=True) as c:
        p1 = await c.subscribe("c1", passive=True)
        p2 = await c.subscribe("c2", passive=True)
        for _ in range(3):
            await fast.publish("c1", "EV", {})
        for _ in range(5):
            await fast.publish("c2", "EV", {})
        items = c.events()
        last: dict[str, Activity] = {}
        async with asyncio.timeout(TIMEOUT):
            async for item in items:
                assert isinstance(item, Activity), item
                last[item.guild] = item
                if {g: a.s for g, a in last.items()} == {"c1": 3, "c2": 5}:
                    break
        # Each guild's epoch is its passive SUBSCRIBED's.
        assert (last["c1"].epoch, last["c2"].epoch) == (p1.epoch, p2.epoch)
        assert (c.unread("c1"), c.unread("c2")) == (3, 5)
        with contextlib.suppress(Exception):
            await items.aclose()


async def test_metrics_count_passive_sessions_and_notices() -> None:
    async with api_server(passive_interval=INTERVAL) as srv, Api(srv.api_url) as api:
        m0, families = await scrape(api)
        assert {
            "guildcast_passive_guilds",
            "guildcast_passive_subscriptions",
            "guildcast_notice_ticks",
            "guildcast_notices_built",
            "guildcast_notices_sent",
            "guildcast_notice_frames",
            "guildcast_notice_writes",
            "guildcast_notice_bytes",
        } <= families
        assert value(m0, "guildcast_passive_subscriptions") == 0
        token = srv.token("met", guilds=["*"])
        guilds = {"m1": PASSIVE, "m2": PASSIVE}
        batch, _ = await gw.session(srv.url, token, guilds, extra=BATCH)
        plain, _ = await gw.session(srv.url, token, {"m1": PASSIVE})
        await srv.publish("m1", "EV", {})
        await srv.publish("m2", "EV", {})
        await heads_until(batch, {"m1": 1, "m2": 1}, batch=True)
        await heads_until(plain, {"m1": 1}, batch=False)
        await until(lambda: srv.passive.notices_sent >= 3, "the notices counted")
        m1, _ = await scrape(api)
        assert value(m1, "guildcast_passive_guilds") == 2
        assert value(m1, "guildcast_passive_subscriptions") == 3
        assert value(m1, "guildcast_notice_ticks_total") >= 1
        assert value(m1, "guildcast_notices_built_total") >= 2
        assert value(m1, "guildcast_notices_sent_total") == 3
        frames = value(m1, "guildcast_notice_frames_total")
        writes = value(m1, "guildcast_notice_writes_total")
        assert 2 <= writes <= frames <= 3
        assert value(m1, "guildcast_notice_bytes_total") > 0
        for w in (batch, plain):
            await w.close()
