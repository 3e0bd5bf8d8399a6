"""The Python client survives every "reconnect" close code and server
restarts, delivering each event exactly once and in order (issue 4, "What
the tests must show")."""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from guildcast import Server
from guildcast.client import Backoff, Client, Event, Item, Resync
from tests.support.node import Restartable, node, restartable
from tests.support.wait import until

FAST = {"base": 0.02, "cap": 0.2}


class App:
    """An application reading ``c.events()`` into ``items`` in a task."""

    def __init__(self, c: Client) -> None:
        self.c = c
        self.items: list[Item] = []
        self.codes: list[int] = []

    def events(self) -> list[Event]:
        return [i for i in self.items if isinstance(i, Event)]

    def data(self) -> list[object]:
        return [e.data for e in self.events()]

    async def consume(self, last: int) -> None:
        async for item in self.c.events():
            self.items.append(item)
            if isinstance(item, Event) and item.data == last:
                return


async def stream(
    srv: Callable[[], Server],
    c: Client,
    app: App,
    gid: str,
    n: int,
    disrupt_at: int,
    disrupt: Callable[[], Awaitable[None]],
) -> None:
    """Publish events with data 1..n to ``gid`` while ``app`` consumes;
    ``disrupt`` runs after event ``disrupt_at``. Returns when all arrived."""
    consumer = asyncio.create_task(app.consume(n))
    try:
        async with asyncio.timeout(60):
            for i in range(1, n + 1):
                await srv().publish(gid, "N", i)
                if i == disrupt_at:
                    await disrupt()
                if i % 10 == 0:
                    await asyncio.sleep(0.005)  # pacing: spread the stream over time
            await consumer
    finally:
        consumer.cancel()


def client(url: str, srv: Server, app_codes: list[int], **kw: object) -> Client:
    return Client(
        url,
        srv.token("app", guilds=["*"], pub=["*"]),
        backoff=Backoff(**FAST),  # type: ignore[arg-type]
        on_disconnect=lambda code, reason: app_codes.append(code),
        **kw,  # type: ignore[arg-type]
    )


async def test_4009_session_timeout_recovers_everything() -> None:
    async with node(heartbeat_interval_ms=200) as srv:
        codes: list[int] = []
        async with client(srv.url, srv, codes, guilds=["g"]) as c:
            app = App(c)
            await until(lambda: c.positions["g"] is not None, "SUBSCRIBED")

            async def stop_heartbeating() -> None:
                c.pause_heartbeats(1.2)
                await until(lambda: 4009 in codes, "close 4009")

            await stream(lambda: srv, c, app, "g", 400, 100, stop_heartbeating)
        assert app.data() == list(range(1, 401))
        assert codes[0] == 4009 and c.sessions >= 2
        assert not any(isinstance(i, Resync) for i in app.items)
        assert srv.gateway.close_codes.get(4009, 0) >= 1


@pytest.mark.parametrize("code", [4010, 4000, 1013, 1001])
async def test_server_close_codes_recover_everything(code: int) -> None:
    async with node() as srv:
        codes: list[int] = []
        async with client(srv.url, srv, codes, guilds=["g", "h"]) as c:
            app = App(c)
            await until(lambda: all(p is not None for p in c.positions.values()), "SUBSCRIBED")

            async def cut() -> None:
                assert srv.disconnect_all(code, "test") == 1

            await stream(lambda: srv, c, app, "g", 500, 150, cut)
        assert app.data() == list(range(1, 501))
        assert [e.s for e in app.events()] == list(range(1, 501))
        assert codes[0] == code and c.sessions == 2
        assert not any(isinstance(i, Resync) for i in app.items)


async def test_real_slow_consumer_4010_loses_nothing() -> None:
    """The application stops reading; backpressure fills the server's buffer
    for this client past max_buffer; the server closes with 4010; the client
    reconnects from its positions and the application still gets everything."""
    async with node(max_buffer=64 * 1024, history_size=10_000) as srv:
        codes: list[int] = []
        async with client(srv.url, srv, codes, guilds=["g"], max_pending_events=8) as c:
            await until(lambda: c.positions["g"] is not None, "SUBSCRIBED")
            # Random text: the client negotiates permessage-deflate, and a
            # blob that compresses to nothing would never fill a buffer.
            blob = base64.b64encode(random.Random(7).randbytes(3000)).decode()
            n = 0
            async with asyncio.timeout(60):
                while srv.gateway.slow_consumers == 0:
                    assert n < 9000, "never became a slow consumer"
                    for _ in range(100):
                        n += 1
                        await srv.publish("g", "N", {"i": n, "blob": blob})
                    await asyncio.sleep(0.01)
            app = App(c)
            got: list[int] = []
            async with asyncio.timeout(60):
                async for item in c.events():
                    app.items.append(item)
                    assert isinstance(item, Event)
                    got.append(item.data["i"])
                    if got[-1] == n:
                        break
        assert got == list(range(1, n + 1))
        assert 4010 in codes and c.sessions >= 2


async def test_rate_limited_4008_reconnects_with_all_guilds() -> None:
    async with node(command_limit=3) as srv:
        codes: list[int] = []
        async with client(srv.url, srv, codes) as c:  # IDENTIFY is command 1
            await c.subscribe("a")
            await c.subscribe("b")
            sub = asyncio.create_task(c.subscribe("c"))  # command 4: closed with 4008
            await until(lambda: codes == [4008], "close 4008")
            await asyncio.wait_for(sub, 20)  # re-sent in the next IDENTIFY
            assert set(c.positions) == {"a", "b", "c"} and c.sessions == 2
            for gid in "abc":
                await srv.publish(gid, "N", gid)
            app = App(c)
            async with asyncio.timeout(20):
                async for item in c.events():
                    app.items.append(item)
                    if len(app.items) == 3:
                        break
            assert sorted(app.data()) == ["a", "b", "c"]  # type: ignore[type-var]


async def test_server_full_1013_backs_off_then_gets_in() -> None:
    async with node(max_connections=1) as srv:
        first = Client(srv.url, srv.token("first"))
        await first.connect()
        codes: list[int] = []
        second = client(srv.url, srv, codes)
        joining = asyncio.create_task(second.connect())
        await until(lambda: codes.count(1013) >= 2, "two refusals")
        await first.close()
        await asyncio.wait_for(joining, 20)
        assert second.connected and set(codes) == {1013}
        await second.close()


async def restart_stream(r: Restartable, wait_for_resync: bool) -> tuple[App, list[int], Client]:
    codes: list[int] = []
    c = client(r.url, r.srv, codes, guilds=["g"])
    await c.connect()
    app = App(c)
    k, n = 150, 300
    consumer = asyncio.create_task(app.consume(n))
    try:
        async with asyncio.timeout(60):
            for i in range(1, k + 1):
                await r.srv.publish("g", "N", i)
            await until(lambda: len(app.events()) == k, "first half")
            await r.restart()
            if wait_for_resync:
                # No durable history: events published before the client is
                # back would be unrecoverable by design; the Resync says so.
                await until(lambda: c.connected and c.positions["g"].s == 0, "resubscribed")  # type: ignore[union-attr]
            for i in range(k + 1, n + 1):
                await r.srv.publish("g", "N", i)
            await consumer
    finally:
        consumer.cancel()
        await c.close()
    return app, codes, c


async def test_restart_without_data_dir_resyncs_then_delivers_in_order() -> None:
    async with restartable() as r:
        old = (await r.srv.publish_ex("warmup", "N", 0))[1]
        app, codes, c = await restart_stream(r, wait_for_resync=True)
    assert codes[0] == 1001 and c.sessions == 2
    assert app.data() == list(range(1, 301))
    resyncs = [i for i, item in enumerate(app.items) if isinstance(item, Resync)]
    assert resyncs == [150]  # exactly one, between event 150 and event 151
    resync = app.items[150]
    assert isinstance(resync, Resync) and resync.epoch != old and resync.s == 0
    assert [e.s for e in app.events()][150:] == list(range(1, 151))  # the new epoch


async def test_restart_with_data_dir_loses_nothing(tmp_path: Path) -> None:
    async with restartable(data_dir=str(tmp_path)) as r:  # type: ignore[arg-type]
        app, codes, c = await restart_stream(r, wait_for_resync=False)
    assert codes[0] == 1001 and c.sessions == 2
    assert app.data() == list(range(1, 301))
    assert [e.s for e in app.events()] == list(range(1, 301))
    assert not any(isinstance(i, Resync) for i in app.items)


async def test_no_reconnect_storm() -> None:
    """20 clients cut off at once come back spread over their first backoff
    window (full jitter), not all in the same 50 ms."""
    async with node() as srv:
        ready_at: dict[int, list[float]] = {i: [] for i in range(20)}

        def make(i: int) -> Client:
            return Client(
                srv.url,
                srv.token(f"u{i}"),
                backoff=Backoff(base=1.0, cap=30.0),
                on_ready=lambda _sid: ready_at[i].append(time.monotonic()),
            )

        clients = [make(i) for i in range(20)]
        await asyncio.gather(*(c.connect() for c in clients))
        try:
            cut = time.monotonic()
            assert srv.disconnect_all(4000, "test") == 20
            await until(lambda: all(len(t) == 2 for t in ready_at.values()), "all back")
            back = sorted(t[1] - cut for t in ready_at.values())
        finally:
            await asyncio.gather(*(c.close() for c in clients))
    assert back[-1] < 1.0 + 2.0  # bounded by the first window (+ slack for a busy box)
    assert back[-1] - back[0] > 0.3, back
    busiest = max(sum(1 for t in back if a <= t < a + 0.05) for a in back)
    assert busiest <= 10, back  # P(> 10 of 20 uniform in one 50 ms window) < 1e-6
