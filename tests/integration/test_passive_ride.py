"""Passive notices riding on active writes (docs/PROTOCOL.md "Passive
subscriptions", server/actors/passive.py): a session active in one guild
and passive in another gets the passive guild's notice in front of an event
of its active guild, in the same write, and the ticker makes no write of its
own for it. A real node, real sockets, a plain ``websockets`` client."""

from __future__ import annotations

import asyncio

from guildcast.actors.passive import HOLD
from tests.support import gateway as gw
from tests.support.node import node
from tests.support.wait import TIMEOUT

#: Long enough that a publish-and-read loop on the active guild (a few
#: milliseconds a turn) has an event delivered inside the hold
#: (``HOLD`` of it) however loaded the machine.
INTERVAL = 2.0
#: A bound on the loop's publishes (it stops at the first notice).
MAX_PUBLISHES = 20_000


async def test_a_notice_rides_in_front_of_an_active_event() -> None:
    assert 0 < HOLD < 1
    async with node(passive_interval=INTERVAL) as srv:
        token = srv.token("rider", guilds=["*"])
        ws, subs = await gw.session(srv.url, token, {"act": None, "pas": {"passive": True}})
        assert subs["pas"]["passive"] is True
        await srv.publish("pas", "EV", {"n": 0})
        order: list[tuple[str | None, str | None]] = []
        async with asyncio.timeout(TIMEOUT + INTERVAL):
            for n in range(1, MAX_PUBLISHES + 1):
                await srv.publish("act", "EV", {"n": n})
                while True:  # read up to this event of the active guild
                    m = await gw.recv(ws)
                    order.append((m.get("t"), m.get("g")))
                    if m.get("t") == "EV":
                        assert m["g"] == "act" and m["d"] == {"n": n}, m  # never a passive one
                        break
                    assert m.get("t") == "GUILD_ACTIVITY" and m["g"] == "pas", m
                    assert m["d"]["s"] == 1, m
                if ("GUILD_ACTIVITY", "pas") in order:
                    break
        # The notice came just before an active event: they shared one write.
        i = order.index(("GUILD_ACTIVITY", "pas"))
        assert order[i + 1] == ("EV", "act")
        assert order.count(("GUILD_ACTIVITY", "pas")) == 1
        board = srv.passive
        assert (board.rode, board.writes, board.notices_sent) == (1, 0, 1)
        await ws.close()
