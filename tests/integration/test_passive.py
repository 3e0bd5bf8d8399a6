"""Passive subscriptions (PROTOCOL.md "Passive subscriptions") end to end:
a real node, real sockets, a plain ``websockets`` client that knows only the
protocol text, and our Python client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection

from guildcast import Server
from guildcast.client import Activity, Client, Event
from tests.support import gateway as gw
from tests.support.node import node
from tests.support.wait import TIMEOUT

#: Short notice interval so the tests run quickly (the default is 1 s).
INTERVAL = 0.05
PASSIVE = {"passive": True}


@pytest.fixture
async def fast() -> AsyncIterator[Server]:
    async with node(passive_interval=INTERVAL) as srv:
        yield srv


async def recv_raw(ws: ClientConnection) -> tuple[str, dict[str, Any]]:
    async with asyncio.timeout(TIMEOUT):
        raw = await ws.recv()
    assert isinstance(raw, str)
    return raw, orjson.loads(raw)


async def until_msg(ws: ClientConnection, pred: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read until ``pred(msg)``; returns (messages before it, it)."""
    before: list[dict[str, Any]] = []
    while True:
        m = await gw.recv(ws)
        if pred(m):
            return before, m
        before.append(m)


def is_activity(m: dict[str, Any], gid: str | None = None, s: int | None = None) -> bool:
    return (
        m.get("op") == 0
        and m.get("t") == "GUILD_ACTIVITY"
        and (gid is None or m.get("g") == gid)
        and (s is None or m["d"]["s"] == s)
    )


def is_subscribed(m: dict[str, Any], gid: str) -> bool:
    return m.get("t") == "SUBSCRIBED" and m.get("g") == gid


async def test_a_passive_subscriber_gets_notices_and_never_a_payload(fast: Server) -> None:
    token = fast.token("pam", guilds=["*"])
    ws, subs = await gw.session(fast.url, token, {"p1": PASSIVE, "p2": PASSIVE})
    other, osubs = await gw.session(fast.url, token, {"p1": PASSIVE})
    active, _ = await gw.session(fast.url, token, {"p1": None})
    epoch = subs["p1"]["epoch"]
    assert subs["p1"] == {"epoch": epoch, "s": 0, "recovered": False, "passive": True}
    assert osubs["p1"] == subs["p1"]
    assert fast.metrics().subscriptions == 4  # passive ones count
    for i in range(50):
        await fast.publish("p1", "EV", {"i": i})
    # The active subscriber gets every event; the passive ones only notices,
    # the last of which carries the head.
    got = [await gw.recv(active) for _ in range(50)]
    assert [m["s"] for m in got] == list(range(1, 51))
    before, last = await until_msg(ws, lambda m: is_activity(m, "p1", 50))
    assert all(is_activity(m, "p1") for m in before), before
    assert last == {"op": 0, "t": "GUILD_ACTIVITY", "g": "p1", "d": {"s": 50, "epoch": epoch}}
    assert "s" not in last  # not a guild event
    # The same bytes to every passive subscriber of the guild.
    while True:
        raw, m = await recv_raw(other)
        assert is_activity(m, "p1"), m
        if m["d"]["s"] == 50:
            break
    assert raw == orjson.dumps(last).decode()
    # Only when the head moved: p1 stays at 50 while p2 moves; the next
    # notices (a later tick than p1's last) are p2's alone.
    await fast.publish("p2", "EV", {})
    before, _ = await until_msg(ws, lambda m: is_activity(m, "p2", 1))
    assert before == [], before
    for w in (ws, other, active):
        await w.close()


async def test_an_upgrade_after_500_missed_events_delivers_exactly_those_then_live(
    fast: Server,
) -> None:
    token = fast.token("ula", guilds=["*"])
    ws, subs = await gw.session(fast.url, token, {"up": None})
    epoch = subs["up"]["epoch"]
    for i in range(5):
        await fast.publish("up", "EV", {"i": i + 1})
    seen = [await gw.recv(ws) for _ in range(5)]
    assert [m["s"] for m in seen] == [1, 2, 3, 4, 5]
    # Downgrade on the live connection.
    await gw.send(ws, gw.SUBSCRIBE, {"guilds": {"up": PASSIVE}})
    before, sub = await until_msg(ws, lambda m: is_subscribed(m, "up"))
    assert before == []
    assert sub["d"] == {"epoch": epoch, "s": 5, "recovered": False, "passive": True}
    for i in range(5, 505):
        await fast.publish("up", "EV", {"i": i + 1})
    before, _ = await until_msg(ws, lambda m: is_activity(m, "up", 505))
    assert all(is_activity(m, "up") for m in before), before
    # Upgrade with the Position last seen: exactly the 500 missed, then live.
    await gw.send(ws, gw.SUBSCRIBE, {"guilds": {"up": {"epoch": epoch, "s": 5}}})
    before, sub = await until_msg(ws, lambda m: is_subscribed(m, "up"))
    assert all(is_activity(m, "up") for m in before), before
    assert sub["d"] == {"epoch": epoch, "s": 505, "recovered": True}
    replay = [await gw.recv(ws) for _ in range(500)]
    assert replay == [{"op": 0, "t": "EV", "g": "up", "s": s, "d": {"i": s}} for s in range(6, 506)]
    for i in range(505, 508):
        await fast.publish("up", "LIVE", {"i": i + 1})
    live = [await gw.recv(ws) for _ in range(3)]
    assert [(m["t"], m["s"]) for m in live] == [("LIVE", 506), ("LIVE", 507), ("LIVE", 508)]
    # Active again: no notice follows. A passive witness hears of s 509, so a
    # tick ran after the head moved; a notice to ws in that tick would come
    # before the answer to a HEARTBEAT sent now.
    witness, _ = await gw.session(fast.url, token, {"up": PASSIVE})
    await fast.publish("up", "LIVE", {"i": 509})
    assert (await gw.recv(ws))["s"] == 509
    await until_msg(witness, lambda m: is_activity(m, "up", 509))
    await gw.send(ws, gw.HEARTBEAT)
    assert await gw.recv(ws) == {"op": gw.HEARTBEAT_ACK, "d": None}
    for w in (ws, witness):
        await w.close()


async def test_an_upgrade_past_the_history_window_says_not_recovered() -> None:
    async with node(passive_interval=INTERVAL, history_size=100) as srv:
        token = srv.token("hal", guilds=["*"])
        ws, subs = await gw.session(srv.url, token, {"old": PASSIVE})
        epoch = subs["old"]["epoch"]
        assert subs["old"]["s"] == 0
        for i in range(300):
            await srv.publish("old", "EV", {"i": i})
        await until_msg(ws, lambda m: is_activity(m, "old", 300))
        await gw.send(ws, gw.SUBSCRIBE, {"guilds": {"old": {"epoch": epoch, "s": 0}}})
        _, sub = await until_msg(ws, lambda m: is_subscribed(m, "old"))
        assert sub["d"] == {"epoch": epoch, "s": 300, "recovered": False}
        await srv.publish("old", "LIVE", {})
        m = await gw.recv(ws)
        assert (m["t"], m["s"]) == ("LIVE", 301), m  # nothing replayed: live next
        await ws.close()


@pytest.mark.parametrize("partition_size", [512, 1], ids=["guild-writer", "partition-actor"])
async def test_downgrade_and_upgrade_in_a_loop_while_events_race(partition_size: int) -> None:
    """Switch modes over and over while a publisher runs: the events seen
    while active plus those replayed at each upgrade are 1..N exactly once,
    in order; no event while passive, no notice while active. With
    ``partition_size`` 1 the session is written by a partition actor."""
    n_events = 1500
    # Two SUBSCRIBEs a switch, as fast as events flow: more than the default
    # command limit (120 a minute) on a slow machine; the limit is not tested here.
    async with node(
        passive_interval=0.01, partition_size=partition_size, command_limit=100_000
    ) as srv:
        token = srv.token("lou", guilds=["*"])
        # A first session takes the guild's own writer: with partition_size 1
        # the tested one is placed in a partition actor. (It filters every
        # event out, so it has nothing unread when it closes.)
        first, _ = await gw.session(srv.url, token, {"loop": None}, events=["NONE"])
        ws, subs = await gw.session(srv.url, token, {"loop": None})
        epoch = subs["loop"]["epoch"]

        async def publish() -> None:
            for i in range(n_events):
                await srv.publish("loop", "EV", {"i": i + 1})
                if i % 8 == 0:
                    await asyncio.sleep(0.001)

        seen: list[int] = []

        def take(m: dict[str, Any]) -> None:
            assert m.get("t") == "EV", f"not an event while active: {m}"
            assert m["s"] == (seen[-1] if seen else 0) + 1, (m, seen[-3:])
            seen.append(m["s"])

        switches = 0
        async with asyncio.TaskGroup() as tg:
            pub = tg.create_task(publish())
            while not pub.done() or not seen or seen[-1] < n_events:
                # Active: take a few events (or whatever is left).
                target = min(n_events, (seen[-1] if seen else 0) + 7)
                while (seen[-1] if seen else 0) < target:
                    take(await gw.recv(ws))
                # Downgrade: the events already sent come first, then SUBSCRIBED.
                await gw.send(ws, gw.SUBSCRIBE, {"guilds": {"loop": PASSIVE}})
                while True:
                    m = await gw.recv(ws)
                    if is_subscribed(m, "loop"):
                        break
                    take(m)
                assert m["d"]["passive"] is True and m["d"]["s"] == seen[-1], (m, seen[-1])
                # Passive: notices only; wait for one when the head will move.
                if m["d"]["s"] < n_events:
                    m = await gw.recv(ws)
                    assert is_activity(m, "loop"), m
                # Upgrade with the Position last seen.
                pos = {"epoch": epoch, "s": seen[-1]}
                await gw.send(ws, gw.SUBSCRIBE, {"guilds": {"loop": pos}})
                while True:
                    m = await gw.recv(ws)
                    if is_subscribed(m, "loop"):
                        break
                    assert is_activity(m, "loop"), f"an event while passive: {m}"
                assert m["d"]["recovered"] is True and "passive" not in m["d"], m
                switches += 1
                head = m["d"]["s"]
                while seen[-1] < head:
                    take(await gw.recv(ws))
        assert seen == list(range(1, n_events + 1))
        assert switches >= 5
        await gw.send(ws, gw.HEARTBEAT)
        assert await gw.recv(ws) == {"op": gw.HEARTBEAT_ACK, "d": None}
        for w in (first, ws):
            await w.close()


async def test_publishing_the_notice_name_is_refused(server: Server) -> None:
    token = server.token("pia", guilds=["*"], pub=["*"], pub_rate=0)
    ws, _ = await gw.session(server.url, token, {})
    await gw.send(ws, gw.PUBLISH, {"guild": "g", "t": "GUILD_ACTIVITY", "d": {}, "nonce": "1"})
    m = await gw.recv(ws)
    assert m["op"] == gw.ERROR and m["d"]["code"] == 4403, m
    with pytest.raises(ValueError):
        await server.publish("g", "GUILD_ACTIVITY", {})
    await ws.close()


@pytest.mark.parametrize(
    "value",
    [
        {"passive": 1},
        {"passive": "yes"},
        {"epoch": "e"},
        {"s": 3, "passive": True},
        {},
        {"rewind": 5, "passive": True},  # a passive subscriber receives no events
    ],
)
async def test_a_malformed_guild_request_is_a_decode_error(server: Server, value: Any) -> None:
    token = server.token("mia", guilds=["*"])
    ws, _ = await gw.session(server.url, token, {})
    await gw.send(ws, gw.SUBSCRIBE, {"guilds": {"g": value}})
    await gw.expect_close(ws, 4002)


async def test_passive_members_are_in_presence_and_get_no_presence_dispatch(
    fast: Server,
) -> None:
    tok = fast.token("pat", guilds=["*"])
    ws = await gw.open_ws(fast.url)
    hello = await gw.recv(ws)
    assert hello["op"] == gw.HELLO
    await gw.send(ws, gw.IDENTIFY, {"token": tok, "guilds": {"pr": PASSIVE}, "presence": True})
    _, sub = await until_msg(ws, lambda m: is_subscribed(m, "pr"))
    assert sub["d"]["passive"] is True
    bob, _ = await gw.session(fast.url, fast.token("bob", guilds=["*"]), {"pr": None})
    await fast.publish("pr", "EV", {})
    # The join of bob would come before the event's notice: it never comes.
    before, _ = await until_msg(ws, lambda m: is_activity(m, "pr", 1))
    assert before == [], before
    # Upgraded, the session gets presence dispatches again, after a
    # PRESENCE_SNAPSHOT of the members now (the changes meanwhile in it).
    await gw.send(ws, gw.SUBSCRIBE, {"guilds": {"pr": None}})
    await until_msg(ws, lambda m: is_subscribed(m, "pr"))
    snap = await gw.recv(ws)
    assert snap["t"] == "PRESENCE_SNAPSHOT" and snap["g"] == "pr", snap
    assert sorted(m["user"] for m in snap["d"]["members"]) == ["bob", "pat"], snap
    assert snap["d"]["count"] == 2 and snap["d"]["truncated"] is False, snap
    await bob.close()
    _, left = await until_msg(ws, lambda m: m.get("t") == "PRESENCE_LEAVE")
    assert left["d"]["user"] == "bob"
    await ws.close()


async def test_python_client_passive_then_activate(fast: Server) -> None:
    token = fast.token("cli", guilds=["*"])
    async with Client(fast.url, token) as c:
        await c.subscribe("busy", passive=True)
        await c.subscribe("here")
        assert c.is_passive("busy") and not c.is_passive("here")
        assert c.unread("busy") == 0
        for i in range(30):
            await fast.publish("busy", "EV", {"i": i + 1})
        await fast.publish("here", "HI", {})
        items = c.events()
        got: list[Any] = []
        async with asyncio.timeout(TIMEOUT):
            async for item in items:
                got.append(item)
                if isinstance(item, Activity) and item.s == 30:
                    break
        assert not any(isinstance(i, Event) and i.guild == "busy" for i in got), got
        assert any(isinstance(i, Event) and i.guild == "here" for i in got), got
        assert c.unread("busy") == 30
        pos = await c.activate("busy")
        assert pos.s == 0 and not c.is_passive("busy")
        replay: list[int] = []
        async with asyncio.timeout(TIMEOUT):
            async for item in items:
                if isinstance(item, Event) and item.guild == "busy":
                    replay.append(item.s)
                    if item.s == 30:
                        break
        assert replay == list(range(1, 31))
        assert c.unread("busy") == 0
        # And back to passive with the same command.
        pos = await c.subscribe("busy", passive=True)
        assert pos.s == 30 and c.is_passive("busy")
        with contextlib.suppress(Exception):
            await items.aclose()


async def test_identify_passive_with_a_position_then_activate_replays_from_it(
    fast: Server,
) -> None:
    """Recovery: a reconnect may come back passive with its Position, and the
    activation replays from that Position; an ``events`` filter applies to
    the replay, not to the notices (they carry the guild's head)."""
    token = fast.token("rex", guilds=["*"])
    ws, subs = await gw.session(fast.url, token, {"rx": None})
    epoch = subs["rx"]["epoch"]
    for i in range(10):
        await fast.publish("rx", "KEEP" if i % 2 else "DROP", {"i": i + 1})
    got = [await gw.recv(ws) for _ in range(10)]
    assert [m["s"] for m in got] == list(range(1, 11))
    await ws.close()
    for i in range(10, 20):
        await fast.publish("rx", "KEEP" if i % 2 else "DROP", {"i": i + 1})
    ws = await gw.open_ws(fast.url)
    await gw.identify(
        ws, token, {"rx": {"epoch": epoch, "s": 10, "passive": True}}, events=["KEEP"]
    )
    _, sub = await until_msg(ws, lambda m: is_subscribed(m, "rx"))
    assert sub["d"] == {"epoch": epoch, "s": 20, "recovered": False, "passive": True}
    await fast.publish("rx", "DROP", {"i": 21})
    before, _ = await until_msg(ws, lambda m: is_activity(m, "rx", 21))
    assert all(is_activity(m, "rx") for m in before), before
    await gw.send(ws, gw.SUBSCRIBE, {"guilds": {"rx": {"epoch": epoch, "s": 10}}})
    before, sub = await until_msg(ws, lambda m: is_subscribed(m, "rx"))
    assert sub["d"] == {"epoch": epoch, "s": 21, "recovered": True}
    replay = [await gw.recv(ws) for _ in range(5)]
    assert [(m["t"], m["s"]) for m in replay] == [("KEEP", s) for s in (12, 14, 16, 18, 20)]
    await fast.publish("rx", "KEEP", {"i": 22})
    m = await gw.recv(ws)
    assert (m["t"], m["s"]) == ("KEEP", 22), m
    await ws.close()
