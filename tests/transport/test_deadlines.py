"""Deadline enforcement through the gateway's timer wheel (gateway.py: each
connection is filed under its earliest deadline and visited when it comes
due, not on every sweep): handshake, IDENTIFY, heartbeat and close-handshake
deadlines still close within about one ``sweep_interval`` of passing, also
when a deadline moves earlier than the one the connection was filed under."""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import ClientConnection

from guildcast import Server
from tests.integration.raw import RawWs
from tests.support import gateway as gw
from tests.support.node import node
from tests.support.wait import until

#: Deadlines in these tests are well under a second; a close later than this
#: means the deadline was missed (the far deadlines they set are 60 s).
LATE = 8.0


async def identified(srv: Server) -> ClientConnection:
    ws, _ = await gw.session(srv.url, srv.token("user", guilds=["*"]))
    return ws


async def test_identify_moving_the_deadline_earlier_is_enforced() -> None:
    # Filed under the 60 s IDENTIFY deadline; IDENTIFY brings it to 0.3 s.
    async with node(identify_timeout=60, heartbeat_interval_ms=200) as srv:
        loop = asyncio.get_running_loop()
        ws = await identified(srv)
        t0 = loop.time()
        await gw.expect_close(ws, 4009, timeout=LATE + 2)
        assert 0.3 <= loop.time() - t0 < LATE


async def test_many_sessions_each_get_their_own_deadline() -> None:
    async with node(heartbeat_interval_ms=300, identify_timeout=0.6) as srv:
        loop = asyncio.get_running_loop()
        beating = [await identified(srv) for _ in range(10)]
        silent = [await identified(srv) for _ in range(10)]
        mute: list[ClientConnection] = []
        for _ in range(10):
            ws = await gw.open_ws(srv.url)
            assert (await gw.recv(ws))["op"] == gw.HELLO
            mute.append(ws)
        t0 = loop.time()
        closed = asyncio.gather(
            *(gw.expect_close(ws, 4009, timeout=LATE + 2) for ws in silent),
            *(gw.expect_close(ws, 4003, timeout=LATE + 2) for ws in mute),
        )
        # Heartbeat well inside the 0.45 s deadline, through many wheel slots,
        # until every silent and mute one is gone and a while after.
        rounds = 0
        while not closed.done() or rounds < 15:
            for ws in beating:
                await gw.send(ws, gw.HEARTBEAT)
            for ws in beating:
                assert await gw.recv(ws) == {"op": gw.HEARTBEAT_ACK, "d": None}
            rounds += 1
            assert rounds < 300
            await asyncio.sleep(0.1)  # the clients' heartbeat cadence
        await closed
        assert loop.time() - t0 < LATE + 1.5  # 15 rounds of 0.1 s after the last close
        assert len(srv.gateway.connections) == len(beating)
        for ws in beating:
            await gw.send(ws, gw.HEARTBEAT)
            assert await gw.recv(ws) == {"op": gw.HEARTBEAT_ACK, "d": None}


async def test_handshake_deadline_drops_a_silent_tcp_connection() -> None:
    async with node(handshake_timeout=0.3) as srv:
        c = await RawWs.open(srv.port)
        try:
            await until(lambda: len(srv.gateway.pending) == 1, timeout=10)
            await until(lambda: not srv.gateway.pending, timeout=LATE)
        finally:
            c.close()


async def test_close_deadline_drops_a_client_that_never_answers() -> None:
    async with node(close_timeout=0.3) as srv:
        c = await RawWs.open(srv.port)
        try:
            assert await c.handshake("/gateway") == 101
            assert (await c.next_json())["op"] == gw.HELLO
            await until(lambda: len(srv.gateway.connections) == 1, timeout=10)
            # Never read the close frame nor answer it: dropped after close_timeout.
            srv.disconnect_all(4000, "test")
            await until(lambda: not srv.gateway.connections, timeout=LATE)
        finally:
            c.close()
