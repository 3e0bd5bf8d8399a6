"""Each close code and ERROR code of PROTOCOL.md, produced by the input that
should produce it, seen by a plain ``websockets`` client. (4010 has its own
file: test_slow_consumer.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection

from guildcast import Server
from guildcast.core.tokens import make_token
from tests.support import gateway as gw
from tests.support.node import SECRET, node
from tests.support.wait import until


async def identified(srv: Server, **claims: Any) -> ClientConnection:
    claims.setdefault("guilds", ["*"])
    ws, _ = await gw.session(srv.url, srv.token("user", **claims))
    return ws


async def still_open(ws: ClientConnection) -> None:
    await gw.send(ws, gw.HEARTBEAT)
    assert await gw.recv(ws) == {"op": gw.HEARTBEAT_ACK, "d": None}


# --- 1009 -------------------------------------------------------------------------


async def test_1009_message_over_max_frame(server: Server) -> None:
    ws = await identified(server)
    await ws.send("x" * (64 * 1024 + 1))
    await gw.expect_close(ws, 1009)


async def test_1009_fragmented_message_over_max_frame(server: Server) -> None:
    ws = await identified(server)
    await ws.send(["y" * 40_000, "y" * 40_000])  # two fragments, 80 kB in all
    await gw.expect_close(ws, 1009)


async def test_message_of_exactly_max_frame_is_accepted(server: Server) -> None:
    ws = await identified(server)
    head = b'{"op":1,"d":"'
    tail = b'"}'
    msg = head + b"z" * (64 * 1024 - len(head) - len(tail)) + tail
    assert len(msg) == 64 * 1024
    await ws.send(msg.decode())
    assert await gw.recv(ws) == {"op": gw.HEARTBEAT_ACK, "d": None}
    await ws.close()


# --- 1013 -------------------------------------------------------------------------


async def test_1013_when_max_connections_reached() -> None:
    async with node(max_connections=2) as srv:
        a = await identified(srv)
        b = await identified(srv)
        c = await gw.open_ws(srv.url)  # the upgrade succeeds, then 1013
        seen = await gw.expect_close(c, 1013)
        assert seen == []  # no HELLO
        await still_open(a)
        await a.close()
        await until(lambda: len(srv.gateway.connections) < 2)
        d = await identified(srv)  # room again
        await still_open(d)
        assert srv.gateway.stats()["refused"] == 1
        for ws in (b, d):
            await ws.close()


# --- 4001 -------------------------------------------------------------------------


@pytest.mark.parametrize("op", [0, 6, 7, 8, 10, 11, 12, 13, 99, -3])
async def test_4001_unknown_opcode(server: Server, op: int) -> None:
    ws = await identified(server)
    await gw.send(ws, op, None)
    await gw.expect_close(ws, 4001)


async def test_4001_before_identify(server: Server) -> None:
    ws = await gw.open_ws(server.url)
    assert (await gw.recv(ws))["op"] == gw.HELLO
    await gw.send(ws, 42)
    await gw.expect_close(ws, 4001)


# --- 4002 -------------------------------------------------------------------------

DECODE_ERRORS: list[Any] = [
    "not json",
    "{",
    "[1, 2, 3]",
    '"a string"',
    "12",
    "null",
    "{}",
    '{"op": "1"}',
    '{"op": 1.0}',
    '{"op": null, "d": null}',
    {"op": gw.SUBSCRIBE, "d": {"guilds": {"bad guild": None}}},
    {"op": gw.SUBSCRIBE, "d": {"guilds": {"": None}}},
    {"op": gw.SUBSCRIBE, "d": {"guilds": {"g" * 129: None}}},
    {"op": gw.SUBSCRIBE, "d": {"guilds": ["g"]}},
    {"op": gw.SUBSCRIBE, "d": {"guilds": {"g": {"epoch": "e", "s": -1}}}},
    {"op": gw.SUBSCRIBE, "d": {"guilds": {"g": {"epoch": 5, "s": 1}}}},
    {"op": gw.SUBSCRIBE, "d": {"guilds": {"g": "pos"}}},
    {"op": gw.SUBSCRIBE, "d": "guilds"},
    {"op": gw.UNSUBSCRIBE, "d": {"guilds": {"g": None}}},
    {"op": gw.UNSUBSCRIBE, "d": {"guilds": ["no/slash"]}},
    # A string t outside the grammar is ERROR 4422 since protocol 1.1
    # (test_protocol_1_1.py); a t that is not a string is still 4002.
    {"op": gw.PUBLISH, "d": {"guild": "g", "t": 1, "d": 1}},
    {"op": gw.PUBLISH, "d": {"guild": "g!", "t": "E", "d": 1}},
    {"op": gw.PUBLISH, "d": {"guild": "g", "t": "E", "nonce": 7}},
    {"op": gw.PUBLISH, "d": [1]},
]


@pytest.mark.parametrize("bad", DECODE_ERRORS)
async def test_4002_decode_error(server: Server, bad: Any) -> None:
    ws = await identified(server, pub=["*"], pub_rate=0)
    await ws.send(bad if isinstance(bad, str) else orjson.dumps(bad).decode())
    await gw.expect_close(ws, 4002)


@pytest.mark.parametrize(
    "d",
    [
        [],
        {"token": 5},
        {"token": "t", "guilds": ["g"]},
        {"token": "t", "guilds": {"bad id": None}},
        {"token": "t", "events": ["not-an-event"]},
    ],
)
async def test_4002_bad_identify(server: Server, d: Any) -> None:
    ws = await gw.open_ws(server.url)
    await gw.recv(ws)
    if isinstance(d, dict) and d.get("token") == "t":
        d = {**d, "token": server.token("u")}
    await gw.send(ws, gw.IDENTIFY, d)
    await gw.expect_close(ws, 4002)


@pytest.mark.parametrize("identify_first", [False, True])
async def test_4002_binary_frame(server: Server, identify_first: bool) -> None:
    if identify_first:
        ws = await identified(server)
    else:
        ws = await gw.open_ws(server.url)
        await gw.recv(ws)
    await ws.send(b'{"op": 1, "d": null}')
    await gw.expect_close(ws, 4002)


# --- 4003 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op,d",
    [
        (gw.SUBSCRIBE, {"guilds": {"g": None}}),
        (gw.UNSUBSCRIBE, {"guilds": ["g"]}),
        (gw.PUBLISH, {"guild": "g", "t": "E", "d": None}),
    ],
)
async def test_4003_command_before_identify(server: Server, op: int, d: Any) -> None:
    ws = await gw.open_ws(server.url)
    await gw.recv(ws)
    await gw.send(ws, op, d)
    await gw.expect_close(ws, 4003)


async def test_4003_no_identify_in_time() -> None:
    async with node(identify_timeout=0.5) as srv:
        loop = asyncio.get_running_loop()
        t0 = loop.time()  # before the server's clock starts for this session
        ws = await gw.open_ws(srv.url)
        assert (await gw.recv(ws))["op"] == gw.HELLO
        await gw.send(ws, gw.HEARTBEAT)  # heartbeats do not stand in for IDENTIFY
        seen = await gw.expect_close(ws, 4003, timeout=10)
        assert seen == [{"op": gw.HEARTBEAT_ACK, "d": None}]
        assert loop.time() - t0 >= 0.5


# --- 4004, 4005 ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        make_token("not-the-server-secret-0123456789abcdef", "eve"),
        make_token(SECRET, "late", ttl=-60),
    ],
)
async def test_4004_authentication_failed(server: Server, token: str) -> None:
    ws = await gw.open_ws(server.url)
    await gw.recv(ws)
    await gw.send(ws, gw.IDENTIFY, {"token": token, "guilds": {"g": None}})
    seen = await gw.expect_close(ws, 4004)
    assert seen == []  # no READY, no SUBSCRIBED


async def test_4005_already_identified(server: Server) -> None:
    ws = await identified(server)
    await gw.send(ws, gw.IDENTIFY, {"token": server.token("user"), "guilds": {}})
    await gw.expect_close(ws, 4005)


# --- 4008 ---------------------------------------------------------------------------


async def test_4008_too_many_commands() -> None:
    async with node(command_limit=3) as srv:
        ws = await identified(srv, pub=["*"], pub_rate=0)  # IDENTIFY: command 1
        for _ in range(10):  # neither HEARTBEAT nor PUBLISH counts
            await gw.send(ws, gw.HEARTBEAT)
            await gw.send(ws, gw.PUBLISH, {"guild": "g", "t": "E", "d": None})
        replies = [(await gw.recv(ws))["op"] for _ in range(20)]
        assert sorted(replies) == [gw.HEARTBEAT_ACK] * 10 + [gw.ACK] * 10
        for gid in ("a", "b"):  # commands 2 and 3
            await gw.send(ws, gw.SUBSCRIBE, {"guilds": {gid: None}})
            m = await gw.recv(ws)
            assert (m["t"], m["g"]) == ("SUBSCRIBED", gid)
        await gw.send(ws, gw.SUBSCRIBE, {"guilds": {"c": None}})
        seen = await gw.expect_close(ws, 4008)
        assert [m for m in seen if m.get("g") == "c"] == []


# --- 4009 ---------------------------------------------------------------------------


async def test_4009_no_heartbeat() -> None:
    async with node(heartbeat_interval_ms=300) as srv:
        ws = await gw.open_ws(srv.url)
        hello = await gw.recv(ws)
        assert hello == {"op": gw.HELLO, "d": {"heartbeat_interval": 300}}
        await gw.send(ws, gw.IDENTIFY, {"token": srv.token("quiet"), "guilds": {}})
        assert (await gw.recv(ws))["t"] == "READY"
        await gw.expect_close(ws, 4009, timeout=10)


async def test_heartbeating_client_stays() -> None:
    async with node(heartbeat_interval_ms=300) as srv:
        ws = await identified(srv)
        quiet = await identified(srv)
        closed = asyncio.create_task(gw.expect_close(quiet, 4009, timeout=10))
        # Keep heartbeating until the silent one is gone, and a while more.
        beats = 0
        while not closed.done() or beats < 10:
            await gw.send(ws, gw.HEARTBEAT)
            assert await gw.recv(ws) == {"op": gw.HEARTBEAT_ACK, "d": None}
            beats += 1
            assert beats < 500
            await asyncio.sleep(0.1)  # the client's heartbeat cadence
        await closed
        await still_open(ws)


# --- 4010 (see also test_slow_consumer.py) -------------------------------------------


async def test_4010_plain_client_that_stops_reading() -> None:
    async with node(max_buffer=256 * 1024) as srv:
        ws, _ = await gw.session(srv.url, srv.token("sloth"), {"big": None})
        other, _ = await gw.session(srv.url, srv.token("quick"), {"big": None})
        ws.transport.pause_reading()
        n = 0
        while srv.gateway.slow_consumers == 0:
            n += 1
            assert n <= 2000, "no 4010"
            s = await srv.publish("big", "BIG", "b" * 60_000)
            assert (await gw.recv(other))["s"] == s  # the other one keeps up
        ws.transport.resume_reading()
        seen = await gw.expect_close(ws, 4010)
        assert [m["s"] for m in seen] == list(range(1, len(seen) + 1))
        assert len(seen) <= n  # nothing after the close
        await still_open(other)
        await other.close()


# --- ERROR 4403, 4413, 4429, 4430 -------------------------------------------------------


async def test_error_4403_forbidden_subscribe(server: Server) -> None:
    ws = await gw.open_ws(server.url)
    await gw.identify(ws, server.token("u", guilds=["team-*"]), {"team-1": None, "x": None})
    first, second = await gw.recv(ws), await gw.recv(ws)
    by_op = {m["op"]: m for m in (first, second)}
    assert by_op[gw.DISPATCH]["t"] == "SUBSCRIBED" and by_op[gw.DISPATCH]["g"] == "team-1"
    err = by_op[gw.ERROR]["d"]
    assert err["code"] == 4403 and err["g"] == "x" and isinstance(err["message"], str)
    await gw.send(ws, gw.SUBSCRIBE, {"guilds": {"other": None}})
    err = (await gw.recv(ws))["d"]
    assert err["code"] == 4403 and err["g"] == "other"
    await still_open(ws)
    # No event of a forbidden guild arrives.
    await server.publish("x", "E", None)
    s = await server.publish("team-1", "E", None)
    m = await gw.recv(ws)
    assert (m["g"], m["s"]) == ("team-1", s)


async def test_error_4403_forbidden_publish_and_reserved_names(server: Server) -> None:
    ws = await identified(server, pub=["mine"], pub_rate=0)
    await gw.send(ws, gw.PUBLISH, {"guild": "theirs", "t": "E", "d": 1, "nonce": "a"})
    await gw.send(ws, gw.PUBLISH, {"guild": "mine", "t": "READY", "d": 1, "nonce": "b"})
    await gw.send(ws, gw.PUBLISH, {"guild": "mine", "t": "SUBSCRIBED", "d": 1, "nonce": "c"})
    await gw.send(ws, gw.PUBLISH, {"guild": "mine", "t": "UNSUBSCRIBED", "d": 1, "nonce": "d"})
    await gw.send(ws, gw.PUBLISH, {"guild": "mine", "t": "OK", "d": 1, "nonce": "e"})
    got = [await gw.recv(ws) for _ in range(5)]
    assert [(m["op"], m["d"].get("code"), m["d"]["nonce"], m["d"]["g"]) for m in got] == [
        (gw.ERROR, 4403, "a", "theirs"),
        (gw.ERROR, 4403, "b", "mine"),
        (gw.ERROR, 4403, "c", "mine"),
        (gw.ERROR, 4403, "d", "mine"),
        (gw.ACK, None, "e", "mine"),
    ]
    assert got[4]["d"]["s"] == 1  # nothing rejected was sequenced
    await still_open(ws)


async def test_error_4413_payload_too_large() -> None:
    async with node(max_payload=1024) as srv:
        ws = await identified(srv, pub=["*"], pub_rate=0)
        await gw.send(ws, gw.PUBLISH, {"guild": "g", "t": "E", "d": "x" * 2000, "nonce": "big"})
        await gw.send(ws, gw.PUBLISH, {"guild": "g", "t": "E", "d": "x" * 100, "nonce": "ok"})
        err, ack = await gw.recv(ws), await gw.recv(ws)
        assert err["op"] == gw.ERROR
        assert err["d"]["code"] == 4413 and err["d"]["nonce"] == "big" and err["d"]["g"] == "g"
        assert ack["op"] == gw.ACK and ack["d"]["nonce"] == "ok" and ack["d"]["s"] == 1
        await still_open(ws)


async def test_error_4429_publish_rate() -> None:
    async with node(publish_rate=1000) as srv:
        ws = await identified(srv, pub=["*"], pub_rate=2)  # the claim wins
        for i in range(4):
            await gw.send(ws, gw.PUBLISH, {"guild": "g", "t": "E", "d": i, "nonce": f"n{i}"})
        got = [await gw.recv(ws) for _ in range(4)]
        assert [m["op"] for m in got[:2]] == [gw.ACK, gw.ACK]
        assert [m["d"]["s"] for m in got[:2]] == [1, 2]
        for i, m in enumerate(got[2:], start=2):
            assert m["op"] == gw.ERROR and m["d"]["code"] == 4429
            assert m["d"]["nonce"] == f"n{i}" and m["d"]["g"] == "g"
        await still_open(ws)
        assert await srv.publish("g", "E", None) == 3  # the rejected ones took no s


async def test_error_4429_server_default_rate() -> None:
    async with node(publish_rate=1) as srv:
        ws = await identified(srv, pub=["*"])  # no pub_rate claim
        for i in range(2):
            await gw.send(ws, gw.PUBLISH, {"guild": "g", "t": "E", "d": i, "nonce": str(i)})
        first, second = await gw.recv(ws), await gw.recv(ws)
        assert first["op"] == gw.ACK
        assert second["op"] == gw.ERROR and second["d"]["code"] == 4429
        assert second["d"]["nonce"] == "1"


async def test_error_4430_too_many_subscriptions() -> None:
    async with node(max_subscriptions=2) as srv:
        ws = await identified(srv)
        await gw.send(ws, gw.SUBSCRIBE, {"guilds": {"a": None, "b": None, "c": None}})
        got = [await gw.recv(ws) for _ in range(3)]
        assert sorted(m["g"] for m in got if m["op"] == gw.DISPATCH) == ["a", "b"]
        (err,) = [m for m in got if m["op"] == gw.ERROR]
        assert err["d"]["code"] == 4430 and err["d"]["g"] == "c"
        await still_open(ws)


# --- UNSUBSCRIBE --------------------------------------------------------------------------


async def test_unsubscribe_answers_and_stops_events(server: Server) -> None:
    token = server.token("u")
    ws, _ = await gw.session(server.url, token, {"u1": None, "u2": None})
    witness, _ = await gw.session(server.url, token, {"u1": None})
    s1 = await server.publish("u1", "E", 1)
    assert (await gw.recv(ws))["s"] == s1
    assert (await gw.recv(witness))["s"] == s1
    await gw.send(ws, gw.UNSUBSCRIBE, {"guilds": ["u1", "never"]})
    replies = [await gw.recv(ws), await gw.recv(ws)]
    assert sorted((m["t"], m["g"], m["d"]) for m in replies) == [
        ("UNSUBSCRIBED", "never", None),
        ("UNSUBSCRIBED", "u1", None),
    ]
    s2 = await server.publish("u1", "E", 2)
    # The witness shares the partition: once it has event s2, that event
    # was written (or not) to ``ws`` before the heartbeat below is answered.
    assert (await gw.recv(witness))["s"] == s2
    await still_open(ws)
    # Still subscribed to u2.
    s = await server.publish("u2", "E", 3)
    m = await gw.recv(ws)
    assert (m["g"], m["s"]) == ("u2", s)


async def test_unsubscribe_then_subscribe_again_at_once(server: Server) -> None:
    ws, subs = await gw.session(server.url, server.token("u"), {"re": None})
    epoch = subs["re"]["epoch"]
    s1 = await server.publish("re", "E", 1)
    assert (await gw.recv(ws))["s"] == s1
    # Both commands in flight together: answered in order, and the stream
    # resumes from the new SUBSCRIBED's head.
    await gw.send(ws, gw.UNSUBSCRIBE, {"guilds": ["re"]})
    await gw.send(ws, gw.SUBSCRIBE, {"guilds": {"re": {"epoch": epoch, "s": 0}}})
    unsub, sub = await gw.recv(ws), await gw.recv(ws)
    assert (unsub["t"], unsub["g"]) == ("UNSUBSCRIBED", "re")
    assert sub["t"] == "SUBSCRIBED" and sub["d"] == {"epoch": epoch, "s": 1, "recovered": True}
    assert (await gw.recv(ws))["s"] == 1  # the replay
    s2 = await server.publish("re", "E", 2)
    assert (await gw.recv(ws))["s"] == s2
    await still_open(ws)
    await ws.close()


async def test_error_1013_when_no_more_guilds_fit() -> None:
    async with node(max_guilds=1) as srv:
        ws = await identified(srv, pub=["*"], pub_rate=0)
        await gw.send(ws, gw.SUBSCRIBE, {"guilds": {"one": None}})
        assert (await gw.recv(ws))["t"] == "SUBSCRIBED"
        await gw.send(ws, gw.SUBSCRIBE, {"guilds": {"two": None}})
        err = await gw.recv(ws)
        assert err["op"] == gw.ERROR and err["d"]["code"] == 1013 and err["d"]["g"] == "two"
        await gw.send(ws, gw.PUBLISH, {"guild": "three", "t": "E", "d": 1, "nonce": "n"})
        err = await gw.recv(ws)
        assert err["op"] == gw.ERROR and err["d"]["code"] == 1013
        assert err["d"]["nonce"] == "n" and err["d"]["g"] == "three"
        await still_open(ws)
        # The guild that fits works as ever.
        s = await srv.publish("one", "E", None)
        assert (await gw.recv(ws))["s"] == s
