"""The Redis broker's feed and script, against a real redis-server.

- The DISPATCH bytes the append script builds equal
  ``guildcast.protocol.wire.dispatch_payload``'s, on the feed and in history;
  the feed record carries the epoch beside them, never inside.
- A guild whose ``seq`` key was lost (evicted) starts a new epoch rather than
  restart ``s`` under the old one.
- An append whose answer comes after the command timeout is "outcome unknown"
  (it was sequenced); one that cannot be sent is "not published".
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from guildcast.broker.base import BrokerUnavailable, OutcomeUnknown, Record
from guildcast.broker.redis import RedisBroker, channel, guild_keys, parse_record
from guildcast.loadtest.faultproxy import FaultProxy
from guildcast.protocol import wire
from tests.support.redis import RedisProc
from tests.support.wait import until

CASES: list[tuple[str, str, Any]] = [
    ("g-1", "EV", {"x": 1}),
    ("team.a:b_c", "MSG_2", [1, "two", None, True, 3.5]),
    ("g", "E", 'text with "quotes" and unicode é ✓'),
    ("g", "E", None),
    ("g", "E", {"nested": {"deep": [{"k": "v"}]}, "n": -12345678901234}),
]


async def test_script_dispatch_bytes_equal_the_wire_builder(redis_proc: RedisProc) -> None:
    b = RedisBroker(redis_proc.url, history_size=50, history_ttl=300)
    got: list[tuple[str, Record]] = []
    arrived = asyncio.Event()

    def feed(gid: str, recs: list[Record] | str | None) -> None:
        if isinstance(recs, list):
            got.extend((gid, r) for r in recs)
            arrived.set()

    await b.start()
    b.set_feed(feed)
    try:
        for gid in {g for g, _, _ in CASES}:
            await b.listen(gid)
        raw = aioredis.Redis(port=redis_proc.port)
        acked: list[tuple[str, str, int, bytes]] = []
        for gid, t, d in CASES:
            epoch, (s,) = await b.append(gid, [(t, orjson.dumps(d))])
            acked.append((gid, epoch, s, wire.dispatch_payload(gid, t, s, d)))
        async with asyncio.timeout(10):
            while len(got) < len(CASES):
                arrived.clear()
                await arrived.wait()
        for (gid, epoch, s, want), (fgid, rec) in zip(acked, got, strict=True):
            assert fgid == gid
            assert rec.s == s and rec.epoch == epoch
            assert rec.payload == want  # the epoch is beside the bytes, not in them
            e2, recs = await b.read(gid, s - 1, 1)
            assert e2 == epoch and recs[0].payload == want
            assert recs[0].epoch == ""  # history: the epoch comes with the read
        # The channel message itself: s|t|ts|epoch|payload.
        ps = raw.pubsub()
        await ps.subscribe(channel("g-1"))
        await ps.get_message(timeout=5)
        epoch, (s,) = await b.append("g-1", [("EV", b'{"x":2}')])
        async with asyncio.timeout(10):
            while (m := await ps.get_message(timeout=5)) is None:
                pass
        assert parse_record(m["data"]) == Record(
            s,
            "EV",
            parse_record(m["data"]).ts,
            wire.dispatch_payload("g-1", "EV", s, {"x": 2}),
            epoch,
        )
        assert m["data"].split(b"|", 4)[3] == epoch.encode()
        await ps.aclose()
        await raw.aclose()
    finally:
        await b.close()


def test_a_record_from_an_earlier_node_version_has_no_epoch() -> None:
    rec = parse_record(b'7|EV|1700000000000|{"op":0,"t":"EV","g":"g","s":7,"d":"a|b"}')
    assert rec == Record(7, "EV", 1700000000.0, b'{"op":0,"t":"EV","g":"g","s":7,"d":"a|b"}', "")


async def test_an_evicted_seq_starts_a_new_epoch(redis_proc: RedisProc) -> None:
    b = RedisBroker(redis_proc.url, history_size=50, history_ttl=300)
    await b.start()
    try:
        e1, ss = await b.append("g", [("EV", b"1"), ("EV", b"2")])
        assert ss == [1, 2]
        raw = aioredis.Redis(port=redis_proc.port)
        await raw.delete(guild_keys("g")[1])  # what an evicting maxmemory-policy does
        await raw.aclose()
        e2, ss = await b.append("g", [("EV", b"3")])
        assert e2 != e1 and ss == [1], "an (epoch, s) was reused"
        assert await b.head("g") == (e2, 1)
        e3, recs = await b.read("g", 0, 10)
        assert e3 == e2 and [r.s for r in recs] == [1]
    finally:
        await b.close()


async def test_a_late_answer_is_outcome_unknown_and_a_refused_one_is_not(
    redis_proc: RedisProc,
) -> None:
    proxy = FaultProxy("127.0.0.1", redis_proc.port)
    port = await proxy.start()
    b = RedisBroker(f"redis://127.0.0.1:{port}/0", 50, 300, op_timeout=0.5, feed_deadline=30)
    await b.start()
    try:
        await b.append("g", [("EV", b"0")])
        proxy.set_mode("delay", 1.5)  # the answer comes after the 0.5 s timeout
        with pytest.raises(OutcomeUnknown):
            await b.append("g", [("EV", b"1")])
        # It was sequenced all the same (the delayed request still reaches
        # Redis): "unknown" was the honest answer.
        raw = aioredis.Redis(port=redis_proc.port)

        async def sequenced() -> bool:
            return int(await raw.get(guild_keys("g")[1])) == 2

        await until(sequenced, timeout=10)
        await raw.aclose()
        proxy.heal()
        redis_proc.stop()
        await proxy.close()  # every connection reset, nothing listening
        with pytest.raises(BrokerUnavailable) as refused:
            await b.append("g", [("EV", b"2")])
        assert not isinstance(refused.value, OutcomeUnknown)
    finally:
        await b.close()
        await proxy.close()
