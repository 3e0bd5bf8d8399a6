"""Protocol 1.1 additions (PROTOCOL.md), end to end with a plain ``websockets``
client: the ``guildcast.v1`` subprotocol (offered, not offered, unknown),
ERROR 4422 for a bad event name, WebSocket pings as a sign of life, the
gateway path's accepted spellings, and what the server does with the order
of a publisher's own DISPATCH and its ACK."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from guildcast import Server
from guildcast.protocol.codes import SUBPROTOCOL
from tests.support import gateway as gw
from tests.support.node import node


def _base(srv: Server) -> str:
    url = srv.url
    assert url.endswith("/gateway"), url
    return url[: -len("/gateway")]


async def _works(ws: Any, srv: Server, gid: str = "g") -> None:
    """A full 1.0 session on ``ws``: IDENTIFY, READY, SUBSCRIBED, heartbeat."""
    await gw.identify(ws, srv.token("u", guilds=["*"]), {gid: None})
    m = await gw.recv(ws)
    assert m["t"] == "SUBSCRIBED" and m["g"] == gid, m
    await gw.still_open(ws)


# --- subprotocol ----------------------------------------------------------------


@pytest.mark.parametrize(
    "offer", [[SUBPROTOCOL], ["chat", SUBPROTOCOL], [SUBPROTOCOL, "guildcast.v2"]]
)
async def test_subprotocol_offered_is_echoed(server: Server, offer: list[str]) -> None:
    ws = await gw.open_ws(server.url, subprotocols=offer)
    assert ws.subprotocol == "guildcast.v1"
    assert ws.response is not None
    assert ws.response.headers["Sec-WebSocket-Protocol"] == "guildcast.v1"
    await _works(ws, server)
    await ws.close()


async def test_no_subprotocol_works_as_in_1_0(server: Server) -> None:
    ws = await gw.open_ws(server.url)
    assert ws.subprotocol is None
    assert ws.response is not None and "Sec-WebSocket-Protocol" not in ws.response.headers
    await _works(ws, server)
    await ws.close()


@pytest.mark.parametrize("offer", [["chat"], ["guildcast.v2", "mqtt"], ["GUILDCAST.V1"]])
async def test_unknown_subprotocol_is_refused_with_400(server: Server, offer: list[str]) -> None:
    with pytest.raises(InvalidStatus) as info:
        await gw.open_ws(server.url, subprotocols=offer)
    resp = info.value.response
    assert resp.status_code == 400
    assert resp.headers["Content-Type"].startswith("text/plain")
    body = resp.body.decode()
    assert "guildcast.v1" in body and "unsupported subprotocol" in body, body
    assert offer[0] in body, body
    # The refusal costs the server nothing: the next client is served.
    ws = await gw.open_ws(server.url, subprotocols=[SUBPROTOCOL])
    await _works(ws, server)
    await ws.close()


# --- ERROR 4422 -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["message_create", "Mixed", "", "A-B", "X" * 65])
async def test_bad_event_name_is_error_4422_and_the_connection_stays(
    server: Server, bad: str
) -> None:
    ws, _ = await gw.session(server.url, server.token("p", guilds=["*"], pub=["*"]), {"g": None})
    await gw.send(ws, gw.PUBLISH, {"guild": "g", "t": bad, "d": 1, "nonce": "n1"})
    err = await gw.recv(ws)
    assert err["op"] == gw.ERROR, err
    assert err["d"]["code"] == 4422 and err["d"]["nonce"] == "n1" and err["d"]["g"] == "g"
    # Still served: a good PUBLISH is sequenced as s = 1 (the bad one took no s).
    await gw.send(ws, gw.PUBLISH, {"guild": "g", "t": "OK", "d": 2, "nonce": "n2"})
    got = [await gw.recv(ws), await gw.recv(ws)]
    ack = next(m for m in got if m["op"] == gw.ACK)
    assert ack["d"]["nonce"] == "n2" and ack["d"]["s"] == 1
    await ws.close()


@pytest.mark.parametrize("bad", [1, None, ["X"]])
async def test_event_name_of_wrong_type_still_closes_4002(server: Server, bad: Any) -> None:
    ws, _ = await gw.session(server.url, server.token("p", guilds=["*"], pub=["*"]))
    await gw.send(ws, gw.PUBLISH, {"guild": "g", "t": bad, "d": 1, "nonce": "n1"})
    await gw.expect_close(ws, 4002)


# --- WebSocket ping/pong as a sign of life ----------------------------------------------


async def test_websocket_pings_keep_a_session_alive() -> None:
    """A library that pings on its own (websockets' ``ping_interval``) needs
    no HEARTBEAT. A control session that neither pings nor heartbeats,
    identified after it, is closed with 4009: once it is, the pinging one,
    silent at the protocol level for longer, must still be served."""
    async with node(heartbeat_interval_ms=300) as srv:
        tok = srv.token("u", guilds=["*"])
        pinger = await gw.open_ws(srv.url, ping_interval=0.1, ping_timeout=5)
        await gw.identify(pinger, tok)
        silent = await gw.open_ws(srv.url)
        await gw.identify(silent, tok)
        await gw.expect_close(silent, 4009)
        # Still open after more than 1.5 intervals with no HEARTBEAT.
        assert pinger.close_code is None
        await gw.still_open(pinger)
        await pinger.close()


async def test_unsolicited_pongs_keep_a_session_alive() -> None:
    async with node(heartbeat_interval_ms=300) as srv:
        tok = srv.token("u", guilds=["*"])
        ponger = await gw.open_ws(srv.url)
        await gw.identify(ponger, tok)
        silent = await gw.open_ws(srv.url)
        await gw.identify(silent, tok)

        async def pong_until_closed() -> None:
            while silent.close_code is None:
                await ponger.pong(b"alive")
                await asyncio.sleep(0.1)

        pongs = asyncio.create_task(pong_until_closed())
        try:
            await gw.expect_close(silent, 4009)
        finally:
            await pongs
        assert ponger.close_code is None
        await gw.still_open(ponger)
        await ponger.close()


# --- the gateway path -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/gateway", "/gateway/", "/gateway?v=1", "/gateway/?v=1&x=y"])
async def test_gateway_path_spellings(server: Server, path: str) -> None:
    ws = await gw.open_ws(_base(server) + path)
    await _works(ws, server)
    await ws.close()


@pytest.mark.parametrize("path", ["/", "/gateway//", "/gateway/x", "/gatewayx", "/Gateway", "/v1"])
async def test_other_paths_are_404(server: Server, path: str) -> None:
    with pytest.raises(InvalidStatus) as info:
        await gw.open_ws(_base(server) + path)
    assert info.value.response.status_code == 404
    assert b"/gateway" in info.value.response.body


# --- a publisher's own DISPATCH and its ACK ------------------------------------------


@pytest.mark.parametrize("mode", ["memory", "data_dir", "cluster"])
async def test_own_dispatch_and_ack_both_arrive_consistent(
    mode: str, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    """PROTOCOL.md "Publishing" promises both, with the same ``s`` and epoch,
    in no particular order relative to each other; ACKs among themselves
    and DISPATCHes among themselves keep their orders. Checks what the
    single-node brokers do (memory and --data-dir: DISPATCH first), and
    that a cluster node keeps the promised part."""
    settings: dict[str, Any] = {}
    if mode == "data_dir":
        settings["data_dir"] = str(tmp_path)
    elif mode == "cluster":
        settings["redis"] = request.getfixturevalue("redis_proc").url
    async with node(**settings) as srv:
        tok = srv.token("p", guilds=["*"], pub=["*"], pub_rate=0)
        ws, subs = await gw.session(srv.url, tok, {"g": None})
        n = 20
        for i in range(n):
            await gw.send(ws, gw.PUBLISH, {"guild": "g", "t": "E", "d": i, "nonce": str(i)})
        acks: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        order: list[str] = []
        while len(acks) < n or len(events) < n:
            m = await gw.recv(ws)
            if m["op"] == gw.ACK:
                acks.append(m["d"])
                order.append("A")
            elif m["op"] == gw.DISPATCH and m.get("t") == "E":
                events.append(m)
                order.append("D")
        assert [a["nonce"] for a in acks] == [str(i) for i in range(n)]
        assert [a["s"] for a in acks] == [e["s"] for e in events] == list(range(1, n + 1))
        assert {a["epoch"] for a in acks} == {subs["g"]["epoch"]}
        assert [e["d"] for e in events] == list(range(n))
        # What a single node does today (PROTOCOL.md says so, and promises
        # no order): each event's DISPATCH leaves while the guild fans it
        # out, its ACK when the publish's answer is carried out after that.
        if mode == "cluster":
            # Over Redis the ACK usually comes first (seen: 12 ACKs before the
            # first DISPATCH of 20): the reason PROTOCOL.md promises no order.
            await ws.close()
            return
        seen: dict[int, str] = {}
        ai = di = 0
        for kind in order:
            if kind == "A":
                s = acks[ai]["s"]
                ai += 1
                assert seen.get(s) == "D", f"ACK of s={s} before its DISPATCH: {order}"
            else:
                seen[events[di]["s"]] = "D"
                di += 1
        await ws.close()
