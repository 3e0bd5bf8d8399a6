"""The Python client against a real server: commands, errors, fatal codes,
token providers, clean close."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from guildcast import Server
from guildcast.client import (
    AuthenticationFailed,
    Backoff,
    Client,
    Event,
    GuildcastClosed,
    Item,
    Position,
    PublishError,
    ReconnectFailed,
    Resync,
    SubscribeError,
    SubscriptionLost,
)
from tests.support.node import node
from tests.support.wait import until

FAST = {"base": 0.02, "cap": 0.2}


@pytest.fixture
async def srv() -> AsyncIterator[Server]:
    async with node() as s:
        yield s


async def take(c: Client, n: int) -> list[Item]:
    out: list[Item] = []
    async with asyncio.timeout(20):
        async for item in c.events():
            out.append(item)
            if len(out) == n:
                break
    return out


async def test_subscribe_publish_events_unsubscribe(srv: Server) -> None:
    tok = srv.token("alice", guilds=["*"], pub=["*"])
    async with Client(srv.url, tok, backoff=Backoff(**FAST)) as c:
        assert c.connected and c.user == "alice" and c.session_id
        pos = await c.subscribe("board-1")
        assert pos.s == 0 and pos.epoch
        assert await c.subscribe("board-1") == pos  # already subscribed: no-op
        s1 = await c.publish("board-1", "CARD_ADDED", {"title": "a"})
        s2 = await srv.publish("board-1", "CARD_MOVED", [1, 2])
        assert (s1, s2) == (1, 2)
        items = await take(c, 2)
        assert items == [
            Event("board-1", "CARD_ADDED", 1, {"title": "a"}),
            Event("board-1", "CARD_MOVED", 2, [1, 2]),
        ]
        assert c.positions == {"board-1": Position(pos.epoch, 2)}
        await c.unsubscribe("board-1")
        await srv.publish("board-1", "CARD_ADDED", "after")
        await c.subscribe("board-2")
        await srv.publish("board-2", "PING", None)
        assert await take(c, 1) == [Event("board-2", "PING", 1, None)]


async def test_many_concurrent_publishes_get_their_own_acks(srv: Server) -> None:
    tok = srv.token("bob", guilds=["*"], pub=["*"], pub_rate=0)
    async with Client(srv.url, tok) as c:
        ss = await asyncio.gather(*(c.publish("g", "N", i) for i in range(200)))
        assert ss == list(range(1, 201))  # ACKs match nonces, in send order


async def test_publish_with_an_idempotency_key(srv: Server) -> None:
    """Protocol 1.1: a retry with the key gets the original s; the key with
    other data is PublishError 4409; a bad key is refused locally."""
    tok = srv.token("dan", guilds=["*"], pub=["*"], pub_rate=0)
    async with Client(srv.url, tok) as c:
        await c.subscribe("orders")
        s = await c.publish("orders", "PAID", {"n": 1}, idempotency_key="order-1")
        assert await c.publish("orders", "PAID", {"n": 1}, idempotency_key="order-1") == s
        with pytest.raises(PublishError) as pe:
            await c.publish("orders", "PAID", {"n": 2}, idempotency_key="order-1")
        assert pe.value.code == 4409
        with pytest.raises(ValueError):
            await c.publish("orders", "PAID", 1, idempotency_key="not ok")
        assert await c.publish("orders", "END") == s + 1
        assert await take(c, 2) == [
            Event("orders", "PAID", s, {"n": 1}),
            Event("orders", "END", s + 1, None),
        ]


async def test_errors_keep_the_connection(srv: Server) -> None:
    tok = srv.token("carol", guilds=["team-*"], pub=["team-*"], pub_rate=1)
    async with Client(srv.url, tok) as c:
        with pytest.raises(SubscribeError) as se:
            await c.subscribe("other")
        assert se.value.code == 4403 and se.value.guild == "other"
        with pytest.raises(PublishError) as pe:
            await c.publish("other", "X", 1)
        assert pe.value.code == 4403
        with pytest.raises(PublishError) as pe:
            await c.publish("team-1", "X", "x" * 40_000)
        assert pe.value.code == 4413
        await c.publish("team-1", "X", 1)  # the bucket's burst of one
        with pytest.raises(PublishError) as pe:
            await c.publish("team-1", "X", 2)
        assert pe.value.code == 4429
        # Refused locally: these would close the connection for good.
        for bad in (("bad guild!", "X"), ("team-1", "lower"), ("team-1", "READY")):
            with pytest.raises(ValueError):
                await c.publish(*bad)
        with pytest.raises(ValueError):
            await c.publish("team-1", "X", "y" * 70_000)
        assert (await c.subscribe("team-2")).s == 0
        assert c.sessions == 1 and c.connected


async def test_bad_token_is_fatal(srv: Server) -> None:
    with pytest.raises(AuthenticationFailed) as exc:
        async with Client(srv.url, "not-a-token", backoff=Backoff(**FAST)):
            pass
    assert exc.value.code == 4004


async def test_token_provider_is_called_per_connection_and_retries_one_4004(
    srv: Server,
) -> None:
    good = srv.token("dave", guilds=["*"])
    tokens = iter(["stale", good, good, good])
    calls = []

    async def provider() -> str:
        calls.append(1)
        return next(tokens)

    async with Client(srv.url, token_provider=provider, backoff=Backoff(**FAST)) as c:
        assert len(calls) == 2 and c.user == "dave"
        srv.disconnect_all(4000, "test")
        await until(lambda: c.sessions == 2, "reconnect")
        assert len(calls) == 3


async def test_fatal_close_code_raises_from_events_and_calls(srv: Server) -> None:
    tok = srv.token("erin", guilds=["*"], pub=["*"])
    async with Client(srv.url, tok, backoff=Backoff(**FAST)) as c:
        await c.subscribe("g")
        await srv.publish("g", "A", 1)
        await until(lambda: c.positions["g"] == Position(c.positions["g"].epoch, 1), "queued")
        srv.disconnect_all(4002, "fix your client")
        got: list[Item] = []
        with pytest.raises(GuildcastClosed) as exc:
            async with asyncio.timeout(20):
                async for item in c.events():
                    got.append(item)
        assert exc.value.code == 4002 and "fix your client" in str(exc.value)
        assert got == [Event("g", "A", 1, 1)]  # queued items come first
        with pytest.raises(GuildcastClosed):
            await c.publish("g", "A", 2)
        assert c.sessions == 1


async def test_close_is_clean_and_ends_events(srv: Server) -> None:
    tok = srv.token("frank", guilds=["*"])
    c = Client(srv.url, tok)
    await c.connect()
    assert len(srv.gateway.connections) == 1
    await c.close()
    assert [i async for i in c.events()] == []
    await until(lambda: not srv.gateway.connections and not srv.gateway.pending, "gone")
    assert srv.gateway.close_codes == {}  # the server closed nobody: we did
    await c.close()  # idempotent


async def test_heartbeats_keep_a_session_alive(srv: Server) -> None:
    async with node(heartbeat_interval_ms=100) as fast:
        async with Client(fast.url, fast.token("gina")) as c:
            # 15 intervals, ten times the 1.5-interval timeout: only heartbeats
            # keep it open. (The duration is what is tested, not a sync point.)
            await asyncio.sleep(1.5)
            assert c.sessions == 1 and c.connected
            assert fast.gateway.close_codes == {}


async def test_publish_waits_for_the_next_connection(srv: Server) -> None:
    tok = srv.token("hank", guilds=["*"], pub=["*"])
    calls: list[tuple[bool, asyncio.Task[int]]] = []

    def on_disconnect(code: int, reason: str) -> None:
        # Runs between the close and the backoff sleep: surely disconnected.
        calls.append((c.connected, asyncio.create_task(c.publish("g", "A", 1))))

    c = Client(srv.url, tok, backoff=Backoff(**FAST), on_disconnect=on_disconnect)
    async with c:
        srv.disconnect_all(4000, "test")
        await until(lambda: bool(calls), "disconnect seen")
        was_connected, publishing = calls[0]
        assert not was_connected
        assert await asyncio.wait_for(publishing, 20) == 1
        assert c.sessions == 2


async def test_subscribe_from_a_stale_position_resyncs(srv: Server) -> None:
    tok = srv.token("ivy", guilds=["*"])
    unrecovered: list[str] = []
    async with Client(srv.url, tok, on_unrecovered=unrecovered.append) as c:
        await srv.publish("g", "A", 1)
        pos = await c.subscribe("g", Position("an-old-epoch", 7))
        await srv.publish("g", "A", 2)
        assert await take(c, 2) == [Resync("g", pos.epoch, 1), Event("g", "A", 2, 2)]
        assert unrecovered == ["g"]


async def test_event_filter(srv: Server) -> None:
    async with Client(srv.url, srv.token("jo"), guilds=["g"], events=["WANTED"]) as c:
        await until(lambda: c.positions["g"] is not None, "SUBSCRIBED")
        await srv.publish("g", "OTHER", 1)
        await srv.publish("g", "WANTED", 2)
        assert await take(c, 1) == [Event("g", "WANTED", 2, 2)]


async def test_lost_subscription_after_reconnect_is_reported(srv: Server) -> None:
    tokens = [srv.token("kim", guilds=["*"]), srv.token("kim", guilds=["team-*"])]

    def provider() -> str:
        return tokens[0] if not c.sessions else tokens[1]

    c = Client(srv.url, token_provider=provider, backoff=Backoff(**FAST))
    async with c:
        await c.subscribe("secret")
        await c.subscribe("team-1")
        srv.disconnect_all(4000, "test")
        items = await take(c, 1)
        assert isinstance(items[0], SubscriptionLost)
        assert (items[0].guild, items[0].code) == ("secret", 4403)
        assert set(c.positions) == {"team-1"}


async def test_gives_up_after_max_attempts_when_the_server_is_gone(srv: Server) -> None:
    url = srv.url
    await srv.stop()
    rng_delays: list[float] = []
    b = Backoff(base=0.01, cap=0.05, max_attempts=3)
    orig = b.next_delay

    def recording(floor: int = 0, fixed: float | None = None) -> float | None:
        d = orig(floor, fixed)
        rng_delays.append(-1.0 if d is None else d)
        return d

    b.next_delay = recording  # type: ignore[method-assign]
    with pytest.raises(ReconnectFailed) as exc:
        async with asyncio.timeout(20):
            await Client(url, "t", backoff=b).connect()
    assert exc.value.code == 1006  # connection refused
    assert len(rng_delays) == 4 and rng_delays[-1] == -1.0
    assert all(0 <= d <= 0.05 for d in rng_delays[:3])
