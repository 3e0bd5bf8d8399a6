"""Presence on one node: the HTTP listing and PRESENCE_JOIN/LEAVE dispatches."""

from __future__ import annotations

import orjson

from tests.support import gateway as gw
from tests.support.api import Api
from tests.support.node import api_server

PRESENCE_KINDS = ("PRESENCE_JOIN", "PRESENCE_LEAVE")


async def next_presence(ws: gw.ClientConnection) -> dict[str, object]:
    while True:
        m = await gw.recv(ws)
        if m.get("t") in PRESENCE_KINDS:
            return m


async def test_presence_listing_and_dispatches_for_sessions_that_ask() -> None:
    async with api_server() as srv, Api(srv.api_url) as api:
        watcher = await gw.open_ws(srv.url)
        hello = await gw.recv(watcher)
        assert hello["op"] == gw.HELLO
        tok = srv.token("watcher", guilds=["room"])
        await gw.send(
            watcher, gw.IDENTIFY, {"token": tok, "guilds": {"room": None}, "presence": True}
        )
        assert (await gw.recv(watcher))["t"] == "READY"
        # Its own join comes first, after its SUBSCRIBED.
        assert (await gw.recv(watcher))["t"] == "SUBSCRIBED"
        own = await next_presence(watcher)
        assert own["t"] == "PRESENCE_JOIN" and own["g"] == "room"
        assert "s" not in own  # presence is not part of the guild's sequence

        # A session that did not ask gets no presence dispatches at all.
        quiet, _ = await gw.session(srv.url, srv.token("quiet", guilds=["room"]), {"room": None})
        joined = await next_presence(watcher)
        assert joined["t"] == "PRESENCE_JOIN"
        assert joined["d"]["user"] == "quiet"  # type: ignore[index]

        status, body, _ = await api.get("/v1/guilds/room/presence")
        assert status == 200
        assert sorted(m["user"] for m in body["members"]) == ["quiet", "watcher"]

        # An event published now reaches "quiet" with no presence before it.
        s = await srv.publish("room", "NOTE", 1)
        m = await gw.recv(quiet)
        assert (m["t"], m["s"]) == ("NOTE", s), m

        await gw.send(quiet, gw.UNSUBSCRIBE, {"guilds": ["room"]})
        left = await next_presence(watcher)
        assert left["t"] == "PRESENCE_LEAVE"
        assert left["d"]["user"] == "quiet"  # type: ignore[index]
        status, body, _ = await api.get("/v1/guilds/room/presence")
        assert [m["user"] for m in body["members"]] == ["watcher"]
        await quiet.close()
        await watcher.close()


async def test_presence_flag_must_be_a_boolean() -> None:
    async with api_server() as srv:
        ws = await gw.open_ws(srv.url)
        await gw.recv(ws)
        await ws.send(
            orjson.dumps({"op": 2, "d": {"token": srv.token("u"), "presence": 1}}).decode()
        )
        code, _ = await gw.close_code(ws)
        assert code == 4002
