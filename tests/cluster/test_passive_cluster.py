"""Passive subscriptions in cluster mode (docs/PROTOCOL.md "Passive
subscriptions"): real ``guildcast serve --redis`` processes over a real
redis-server. A session passive on one node hears of events published on
another; switched to active it gets exactly the events it missed, then live
ones; another passive node's notices carry the same head."""

from __future__ import annotations

from typing import Any

from tests.cluster.test_cluster import nodes, token
from tests.support import gateway as gw
from tests.support.redis import RedisProc

PASSIVE = {"passive": True}


async def until(ws: Any, pred: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    before: list[dict[str, Any]] = []
    while True:
        m = await gw.recv(ws)
        if pred(m):
            return before, m
        before.append(m)


def activity(s: int) -> Any:
    return lambda m: m.get("t") == "GUILD_ACTIVITY" and m["d"]["s"] == s


async def test_passive_across_nodes_then_upgrade(redis: RedisProc) -> None:
    async with nodes(redis, 3) as (n0, n1, n2):
        # A live guild on n1 and n2 while it is passive there.
        w1, subs1 = await gw.session(n1.url, token("pam"), {"cg": PASSIVE})
        w2, subs2 = await gw.session(n2.url, token("pia"), {"cg": PASSIVE})
        epoch = subs1["cg"]["epoch"]
        assert subs1["cg"] == {"epoch": epoch, "s": 0, "recovered": False, "passive": True}
        assert subs2["cg"]["epoch"] == epoch
        async with gw.Publisher(n0.url, token("pub")) as pub:
            for i in range(40):
                assert await pub.publish("cg", {"i": i + 1}) == i + 1
            # Notices only, from either node, up to the same head.
            for w in (w1, w2):
                before, last = await until(w, activity(40))
                assert all(m.get("t") == "GUILD_ACTIVITY" for m in before), before
                assert last["d"] == {"s": 40, "epoch": epoch}
            # Upgrade on n1 with the Position it last saw (none: s 0).
            await gw.send(w1, gw.SUBSCRIBE, {"guilds": {"cg": {"epoch": epoch, "s": 0}}})
            before, sub = await until(w1, lambda m: m.get("t") == "SUBSCRIBED")
            assert all(m.get("t") == "GUILD_ACTIVITY" for m in before), before
            assert sub["d"] == {"epoch": epoch, "s": 40, "recovered": True}
            replay = [await gw.recv(w1) for _ in range(40)]
            assert [(m["s"], m["d"]["i"]) for m in replay] == [(s, s) for s in range(1, 41)]
            for i in range(40, 45):
                await pub.publish("cg", {"i": i + 1})
            live = [await gw.recv(w1) for _ in range(5)]
            assert [m["s"] for m in live] == [41, 42, 43, 44, 45]
            # n2 is still passive: it hears of the new head and gets no event.
            before, _ = await until(w2, activity(45))
            assert all(m.get("t") == "GUILD_ACTIVITY" for m in before), before
        for w in (w1, w2):
            await w.close()
