"""Keyed appends (``Broker.append_keyed``, PROTOCOL.md "Idempotent publish")
against every broker (memory, disk, a real redis-server), plus what only
the disk broker (a restart, a compaction, old journals) and the Redis
broker (its window's bounds, an epoch change) must show."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from guildcast.broker.base import Broker, Record
from guildcast.broker.disk import DiskBroker
from guildcast.broker.redis import RedisBroker, guild_keys, window_keys
from guildcast.core import journal
from guildcast.core.idempotency import KeyWindows, Replayed
from tests.support.redis import RedisProc
from tests.support.wait import until


async def test_a_repeated_key_returns_the_original_and_sequences_nothing(broker: Broker) -> None:
    got: list[Record] = []
    broker.set_feed(lambda gid, recs: got.extend(recs) if isinstance(recs, list) else None)
    await broker.listen("g")
    epoch, out = await broker.append_keyed("g", [("A", b"1"), ("B", b"2")], ["k1", None])
    assert out == [1, 2]
    epoch2, again = await broker.append_keyed("g", [("A", b"1")], ["k1"])
    assert (epoch2, again) == (epoch, [Replayed(1, False)])
    assert await broker.head("g") == (epoch, 2)
    _, recs = await broker.read("g", 0, 100)
    assert [r.s for r in recs] == [1, 2]
    # An unkeyed append after it goes on from the head.
    _, ss = await broker.append("g", [("C", b"3")])
    assert ss == [3]
    await until(lambda: len(got) == 3, "the feed's records")
    assert [r.s for r in got] == [1, 2, 3]
    await broker.unlisten("g")


async def test_a_reused_key_with_other_content_is_a_conflict(broker: Broker) -> None:
    await broker.append_keyed("g", [("A", b"1")], ["k"])
    _, out = await broker.append_keyed("g", [("A", b"2"), ("B", b"1"), ("A", b"1")], ["k"] * 3)
    assert out == [Replayed(1, True), Replayed(1, True), Replayed(1, False)]
    assert (await broker.head("g"))[1] == 1


async def test_keys_repeated_within_one_batch_sequence_once(broker: Broker) -> None:
    _, out = await broker.append_keyed(
        "g", [("A", b"1"), ("A", b"1"), ("A", b"2"), ("A", b"3")], ["x", "x", "x", "y"]
    )
    assert out == [1, Replayed(1, False), Replayed(1, True), 2]
    assert (await broker.head("g"))[1] == 2


async def test_keys_are_per_guild(broker: Broker) -> None:
    _, a = await broker.append_keyed("a", [("E", b"1")], ["k"])
    _, b = await broker.append_keyed("b", [("E", b"1")], ["k"])
    assert a == b == [1]


async def test_concurrent_appends_with_one_key_sequence_it_once(broker: Broker) -> None:
    """A retry racing its original: 20 appends of one key at once, one sequences."""
    results = await asyncio.gather(
        *(broker.append_keyed("race", [("E", b"{}")], ["same"]) for _ in range(20))
    )
    outs = [out[0] for _, out in results]
    assert outs.count(1) == 1
    assert all(o == 1 or o == Replayed(1, False) for o in outs)
    assert (await broker.head("race"))[1] == 1


# --- disk: the keys survive a restart and a compaction -----------------------------


async def test_disk_keys_survive_a_restart(tmp_path: Path) -> None:
    b = DiskBroker(tmp_path, history_size=50, history_ttl=300, fsync="never")
    await b.start()
    epoch, out = await b.append_keyed("g", [("A", b"1"), ("B", b"2")], ["k1", "k2"])
    assert out == [1, 2]
    await b.close()
    b2 = DiskBroker(tmp_path, history_size=50, history_ttl=300, fsync="never")
    await b2.start()
    try:
        e2, again = await b2.append_keyed("g", [("B", b"2"), ("A", b"9")], ["k2", "k1"])
        assert e2 == epoch
        assert again == [Replayed(2, False), Replayed(1, True)]
        assert await b2.head("g") == (epoch, 2)
    finally:
        await b2.close()


async def test_disk_keys_survive_a_compaction(tmp_path: Path) -> None:
    """History of 5 events: the journal is rewritten down to them, and the
    keys of the events it drops are written out beside them (``K``)."""
    b = DiskBroker(tmp_path, history_size=5, history_ttl=300, fsync="never")
    await b.start()
    for i in range(300):  # past 2 * 5 + COMPACT_SLACK events: compacted
        await b.append_keyed("g", [("E", str(i).encode())], [f"key-{i}"])
    epoch, _ = await b.head("g")
    await b.close()
    path = journal.journal_path(tmp_path / "guilds", "g")
    loaded = journal.load(path, "g")
    assert loaded.count < 300  # compacted
    assert {k.key for k in loaded.keys} == {f"key-{i}" for i in range(300)}
    b2 = DiskBroker(tmp_path, history_size=5, history_ttl=300, fsync="never")
    await b2.start()
    try:
        _, out = await b2.append_keyed("g", [("E", b"0"), ("E", b"299")], ["key-0", "key-299"])
        assert out == [Replayed(1, False), Replayed(300, False)]
        assert await b2.head("g") == (epoch, 300)
    finally:
        await b2.close()


async def test_disk_journal_without_keys_keeps_the_old_format(tmp_path: Path) -> None:
    """Events published without a key are written as before (``E`` records
    only), so a journal of an earlier version and one written now without
    keys are the same format; a journal with keys loads them."""
    b = DiskBroker(tmp_path, history_size=50, history_ttl=300, fsync="never")
    await b.start()
    await b.append("plain", [("A", b"1")])
    await b.append_keyed("plain", [("B", b"2")], [None])
    await b.close()
    data = journal.journal_path(tmp_path / "guilds", "plain").read_bytes()
    body_kinds = []
    off = 0
    while off < len(data):
        length = int.from_bytes(data[off : off + 4], "big")
        start = off + journal.RECORD_OVERHEAD
        body_kinds.append(data[start : start + 1])
        off = start + length
    assert body_kinds == [b"H", b"E", b"E"]


async def test_disk_a_new_epoch_forgets_the_keys(tmp_path: Path) -> None:
    """A journal found cut (here: a corrupt record) starts a new epoch: the
    window of the old one is gone with its history."""
    b = DiskBroker(tmp_path, history_size=50, history_ttl=300, fsync="never")
    await b.start()
    epoch, _ = await b.append_keyed("g", [("A", b"1")], ["k"])
    await b.append("g", [("B", b"2")])
    await b.close()
    path = journal.journal_path(tmp_path / "guilds", "g")
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF  # the last record's payload: a complete record with a bad CRC
    path.write_bytes(bytes(data))
    b2 = DiskBroker(tmp_path, history_size=50, history_ttl=300, fsync="never")
    await b2.start()
    try:
        e2, out = await b2.append_keyed("g", [("A", b"1")], ["k"])
        assert e2 != epoch
        assert out == [2]  # sequenced again, under the new epoch
    finally:
        await b2.close()


async def test_disk_node_window_bounds_apply(tmp_path: Path) -> None:
    keys = KeyWindows(ttl=300, guild_keys=2, node_keys=100)
    b = DiskBroker(tmp_path, history_size=50, history_ttl=300, fsync="never", idempotency=keys)
    await b.start()
    try:
        for i in range(3):
            await b.append_keyed("g", [("E", b"1")], [f"k{i}"])
        _, out = await b.append_keyed("g", [("E", b"1")] * 3, ["k0", "k1", "k2"])
        assert out == [4, Replayed(2, False), Replayed(3, False)]  # k0 was evicted
    finally:
        await b.close()


# --- redis: the window's bounds live in Redis ----------------------------------------


async def test_redis_window_is_bounded_by_count_oldest_first(tmp_path: Path) -> None:
    proc = RedisProc(tmp_path)
    proc.start()
    b = RedisBroker(proc.url, history_size=50, history_ttl=300, idempotency_keys=3)
    await b.start()
    try:
        for i in range(5):
            await b.append_keyed("g", [("E", b"1")], [f"k{i}"])
        zset = window_keys("g")[1]
        assert await b.redis.zcard(zset) == 3
        assert await b.redis.hlen(window_keys("g")[0]) == 3
        _, out = await b.append_keyed("g", [("E", b"1")] * 3, ["k2", "k3", "k4"])
        assert out == [Replayed(3, False), Replayed(4, False), Replayed(5, False)]
        _, out = await b.append_keyed("g", [("E", b"1")], ["k0"])  # evicted: new
        assert out == [6]
    finally:
        await b.close()
        proc.stop()


async def test_redis_window_expires_by_time(tmp_path: Path) -> None:
    proc = RedisProc(tmp_path)
    proc.start()
    b = RedisBroker(proc.url, history_size=50, history_ttl=300, idempotency_ttl=0.3)
    await b.start()
    try:
        await b.append_keyed("g", [("E", b"1")], ["k"])
        assert await b.redis.ttl(window_keys("g")[0]) >= 0
        hash_key = window_keys("g")[0]

        async def gone() -> bool:
            return not await b.redis.exists(hash_key)

        await until(gone, "Redis to expire the window after its TTL")
        _, out = await b.append_keyed("g", [("E", b"1")], ["k"])
        assert out == [2]
    finally:
        await b.close()
        proc.stop()


async def test_redis_a_new_epoch_forgets_the_keys(tmp_path: Path) -> None:
    proc = RedisProc(tmp_path)
    proc.start()
    b = RedisBroker(proc.url, history_size=50, history_ttl=300)
    await b.start()
    try:
        epoch, _ = await b.append_keyed("g", [("E", b"1")], ["k"])
        await b.redis.delete(guild_keys("g")[1])  # the sequence lost: a new epoch
        e2, out = await b.append_keyed("g", [("E", b"1")], ["k"])
        assert e2 != epoch and out == [1]
        _, recs = await b.read("g", 0, 10)
        assert [orjson.loads(r.payload)["s"] for r in recs] == [1]
    finally:
        await b.close()
        proc.stop()
