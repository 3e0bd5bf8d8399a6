"""The Redis broker's pub/sub feed under faults (through the fault proxy).

- A pub/sub reconnect alone does not refuse publishes.
- A feed that stays open and delivers nothing is found dead within its
  deadline (readiness fails), resubscribed, and its listeners told to catch
  up; dead for longer, they are told FEED_LOST.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from guildcast.broker.base import FEED_LOST, BrokerUnavailable, Record
from guildcast.broker.redis import MAX_REDIS_CONNECTIONS, RedisBroker, pool_exhausted
from guildcast.loadtest.faultproxy import FaultProxy
from tests.support.redis import RedisProc
from tests.support.wait import until


@pytest.fixture
async def proxy(redis_proc: RedisProc) -> AsyncIterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", redis_proc.port)
    await p.start()
    yield p
    await p.close()


class Seen:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.signals: list[str | None] = []

    def __call__(self, gid: str, recs: list[Record] | str | None) -> None:
        if isinstance(recs, list):
            self.records.extend(recs)
        else:
            self.signals.append(recs)


async def test_a_pubsub_reconnect_does_not_refuse_publishes(proxy: FaultProxy) -> None:
    b = RedisBroker(f"redis://127.0.0.1:{proxy.port}/0", 50, 300, feed_deadline=5)
    seen = Seen()
    await b.start()
    b.set_feed(seen)
    try:
        await b.listen("g")
        for i in range(5):
            proxy.drop(only=b"SUBSCRIBE")  # the feed's connection only
            t0 = time.monotonic()
            while time.monotonic() - t0 < 0.3:  # publishes go on meanwhile
                await b.append("g", [("EV", b"%d" % i)])

            async def resubscribed(n: int = i + 1) -> bool:
                return seen.signals.count(None) >= n

            await until(resubscribed, timeout=10)  # and the listener is told to catch up
        assert b.feed_deaths >= 5
    finally:
        await b.close()


async def test_a_silent_feed_is_found_dead_resubscribed_then_lost(proxy: FaultProxy) -> None:
    b = RedisBroker(
        f"redis://127.0.0.1:{proxy.port}/0", 50, 300, feed_deadline=0.6, health_interval=0.1
    )
    seen = Seen()
    await b.start()
    b.set_feed(seen)
    try:
        await b.listen("g")
        await b.append("g", [("EV", b"1")])

        async def delivered(n: int) -> bool:
            return len(seen.records) >= n

        await until(lambda: delivered(1))
        assert b.healthy
        proxy.set_mode("zombie", only=b"SUBSCRIBE")

        async def dead() -> bool:
            return not b.healthy and b.unhealthy_reason == "broker feed dead"

        await until(dead, timeout=10)
        await b.append("g", [("EV", b"2")])  # sequencing goes on: the link is fine
        proxy.heal()

        async def live() -> bool:
            return b.healthy and None in seen.signals

        await until(live, timeout=10)  # resubscribed; the listener catches up with read()
        _, recs = await b.read("g", 1, 10)
        assert [r.s for r in recs] == [2]
        proxy.set_mode("zombie", only=b"SUBSCRIBE")

        async def lost() -> bool:
            return FEED_LOST in seen.signals

        await until(lost, timeout=10)  # dead past FEED_LOST_AFTER deadlines
        proxy.heal()
    finally:
        await b.close()


async def test_listen_unlisten_listen_waits_for_the_last_subscribe(redis_proc: RedisProc) -> None:
    """After listen, unlisten, listen with the first SUBSCRIBE unanswered,
    Redis answers subscribe, unsubscribe, subscribe in that order: the first
    answer is the old SUBSCRIBE's, so it must not tell the second listen the
    channel is subscribed (it is not, between the UNSUBSCRIBE and the new
    SUBSCRIBE). The feed connection's replies are handed to the broker in
    separate reads, as they may arrive."""
    b = RedisBroker(f"redis://127.0.0.1:{redis_proc.port}/0", 50, 300)
    seen = Seen()
    await b.start()
    b.set_feed(seen)
    try:
        await b.listen("warm")  # the feed's connection is up
        sub = b._sub
        assert sub is not None
        real_sink = sub.sink
        held: list[list[object]] = []
        sub.sink = held.append  # hold what Redis answers, read by read
        first = asyncio.ensure_future(b.listen("g"))
        await asyncio.sleep(0)
        await b.unlisten("g")
        second = asyncio.ensure_future(b.listen("g"))
        await asyncio.sleep(0)

        async def answered() -> bool:
            return sum(len(r) for r in held) >= 3

        await until(answered, "Redis's three answers")
        replies = [r for read in held for r in read]
        kinds = [r[0] for r in replies if isinstance(r, list)]
        assert kinds == [b"subscribe", b"unsubscribe", b"subscribe"], replies

        def confirmed() -> bool:
            fut = b._listening["g"]
            return fut is None or fut.done()

        real_sink([replies[0]])
        assert not confirmed()  # the old SUBSCRIBE's answer
        real_sink([replies[1]])
        assert not confirmed()
        real_sink([replies[2]])
        assert confirmed()
        await asyncio.wait_for(second, 5)
        await asyncio.wait([first], timeout=5)
        assert first.cancelled()  # its listener was the one unlistened
        sub.sink = real_sink
        await b.append("g", [("EV", b"x")])

        async def delivered() -> bool:
            return len(seen.records) >= 1

        await until(delivered, "the event on the re-listened guild")
    finally:
        await b.close()


async def test_a_busy_pool_fails_the_command_but_not_the_broker(redis_proc: RedisProc) -> None:
    """Every pooled connection checked out past the timeout (a node's own
    reconnect storm reading history): the read that waited fails
    (BrokerUnavailable) but Redis is not marked unreachable, so appends go
    on; a real failure (Redis answering nothing) still marks it down."""
    b = RedisBroker(f"redis://127.0.0.1:{redis_proc.port}/0", 50, 300, op_timeout=0.3)
    await b.start()
    pool = b.redis.connection_pool
    held = []
    try:
        epoch, s = await b.append("busy", [("EV", b"{}")])
        assert s == [1]
        while True:  # take every connection the pool has to give
            try:
                async with asyncio.timeout(1):
                    held.append(await pool.get_connection())
            except (RedisConnectionError, TimeoutError):
                break
        assert len(held) == MAX_REDIS_CONNECTIONS
        with pytest.raises(BrokerUnavailable):
            await b.read("busy", 0, 10)
        assert b.healthy, b.unhealthy_reason
        for c in held:
            await pool.release(c)
        held = []
        assert (await b.read("busy", 0, 10))[1][0].s == 1
        epoch2, s2 = await b.append("busy", [("EV", b"{}")])
        assert (epoch2, s2) == (epoch, [2])
    finally:
        for c in held:
            await pool.release(c)
        await b.close()


def test_pool_exhausted_tells_a_busy_pool_from_a_dead_link() -> None:
    busy = RedisConnectionError("No connection available.")
    busy.__cause__ = TimeoutError()
    assert pool_exhausted(busy)
    assert not pool_exhausted(RedisConnectionError("Error 111 connecting to 127.0.0.1:1."))
    assert not pool_exhausted(TimeoutError())
