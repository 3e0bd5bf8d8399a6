"""The disk broker (server/broker/disk.py) beyond the shared contract:
restarts, repair on load, compaction and its resource bounds."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import orjson
import pytest

from guildcast.broker import disk
from guildcast.broker.base import BrokerUnavailable, Record
from guildcast.broker.disk import COMPACT_SLACK, GUILDS_DIR, STATE_FILE, DiskBroker
from guildcast.core import journal
from guildcast.core.journal import event_prefix
from guildcast.protocol.wire import dispatch_json
from tests.support.wait import until


def append_bytes(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def jpath(data: Path, gid: str) -> Path:
    return journal.journal_path(data / GUILDS_DIR, gid)


async def test_a_restarted_broker_continues_epoch_s_and_history(tmp_path: Path) -> None:
    b = DiskBroker(tmp_path, history_size=100, history_ttl=300)
    await b.start()
    epoch, ss = await b.append("g", [("A", b"1"), ("B", b'{"x":2}')])
    _, ss2 = await b.append("g", [("C", b"3")])
    assert ss + ss2 == [1, 2, 3]
    await b.close()

    b2 = DiskBroker(tmp_path, history_size=100, history_ttl=300)
    await b2.start()
    assert await b2.head("g") == (epoch, 3)
    e, recs = await b2.read("g", 0, 10)
    assert e == epoch and [(r.s, r.t) for r in recs] == [(1, "A"), (2, "B"), (3, "C")]
    assert orjson.loads(recs[1].payload) == {"op": 0, "t": "B", "g": "g", "s": 2, "d": {"x": 2}}
    assert await b2.append("g", [("D", b"4")]) == (epoch, [4])
    await b2.close()


async def test_a_guild_never_written_leaves_no_file(tmp_path: Path) -> None:
    b = DiskBroker(tmp_path, history_size=10, history_ttl=300)
    await b.start()
    await b.head("read-only")
    await b.read("read-only", 0, 10)
    assert not jpath(tmp_path, "read-only").exists()
    await b.close()


async def test_torn_tail_repaired_on_load_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    b = DiskBroker(tmp_path, history_size=100, history_ttl=300)
    await b.start()
    epoch, _ = await b.append("g", [("E", orjson.dumps(i)) for i in range(1, 5)])
    await b.close()
    path = jpath(tmp_path, "g")
    # A crash in the middle of writing event 5: all of its record but 3 bytes
    # reached the file and its high-water mark was never written (the broker
    # writes the mark after a complete write: guildcast.core.marks). Cutting
    # an event that was completely written is a lost tail: see
    # test_a_journal_cut_below_its_mark_starts_a_new_epoch.
    payload = dispatch_json("g", "E", 5, b"5")
    record = event_prefix(5, "E", time.time(), payload) + payload
    append_bytes(path, record[:-3])

    b2 = DiskBroker(tmp_path, history_size=100, history_ttl=300)
    await b2.start()
    with caplog.at_level(logging.WARNING, logger="guildcast.journal"):
        head = await b2.head("g")
    assert head == (epoch, 4)  # event 5 was torn: never acknowledged, same epoch
    warnings = [r for r in caplog.records if r.name == "guildcast.journal"]
    assert len(warnings) == 1 and "torn tail" in warnings[0].getMessage()
    assert b2.repairs == 1
    _, recs = await b2.read("g", 0, 10)
    assert [orjson.loads(r.payload)["d"] for r in recs] == [1, 2, 3, 4]
    await b2.close()


async def test_corruption_starts_a_new_epoch_and_keeps_the_good_events(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    b = DiskBroker(tmp_path, history_size=100, history_ttl=300)
    await b.start()
    epoch, _ = await b.append("g", [("E", orjson.dumps(i)) for i in range(1, 6)])
    await b.close()
    path = jpath(tmp_path, "g")
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x20  # inside event 5's payload
    path.write_bytes(bytes(data))

    b2 = DiskBroker(tmp_path, history_size=100, history_ttl=300)
    await b2.start()
    with caplog.at_level(logging.WARNING, logger="guildcast.journal"):
        new_epoch, head = await b2.head("g")
    assert new_epoch != epoch and head == 4
    assert any("new epoch" in r.getMessage() for r in caplog.records)
    _, recs = await b2.read("g", 0, 10)
    assert [orjson.loads(r.payload)["d"] for r in recs] == [1, 2, 3, 4]
    assert await b2.append("g", [("E", b"5")]) == (new_epoch, [5])
    await b2.close()
    # the file was rewritten under the new epoch: the next load is clean
    again = journal.load(path, "g")
    assert again.repair is None and again.epoch == new_epoch and again.head == 5


async def test_compaction_bounds_the_file(tmp_path: Path) -> None:
    size = 10
    b = DiskBroker(tmp_path, history_size=size, history_ttl=300, fsync="never")
    await b.start()
    total = 3 * (2 * size + COMPACT_SLACK)
    for i in range(total):
        await b.append("g", [("E", orjson.dumps(i))])
    got = journal.load(jpath(tmp_path, "g"), "g")
    assert got.head == total
    assert got.count <= 2 * size + COMPACT_SLACK
    assert got.base == got.head - got.count
    epoch, recs = await b.read("g", 0, 100)
    assert [r.s for r in recs] == list(range(total - size + 1, total + 1))
    await b.close()
    b2 = DiskBroker(tmp_path, history_size=size, history_ttl=300)
    await b2.start()
    assert await b2.head("g") == (epoch, total)
    _, recs2 = await b2.read("g", 0, 100)
    assert recs2 == recs
    await b2.close()


async def test_age_compaction_drops_expired_events_from_the_file(tmp_path: Path) -> None:
    b = DiskBroker(tmp_path, history_size=100, history_ttl=1.0, fsync="never")
    await b.start()
    await b.append("g", [("E", b"1"), ("E", b"2")])
    lg = b._glogs["g"]
    # As if more than COMPACT_MIN_AGE had passed: history drops them by age,
    # and the next write rewrites the file without them.
    later = time.time() + 3600
    lg.log.history.prune(later)
    await b._maybe_compact("g", lg, later)
    got = journal.load(jpath(tmp_path, "g"), "g")
    assert (got.count, got.base, got.head) == (0, 2, 2)
    await b.close()


async def test_fsync_always_syncs_every_append(tmp_path: Path) -> None:
    b = DiskBroker(tmp_path, history_size=10, history_ttl=300, fsync="always")
    await b.start()
    await b.append("g", [("E", b"1")])  # creates the file (temp + fsync + rename)
    before = b.fsyncs
    for _ in range(3):
        await b.append("g", [("E", b"1")])
        assert not b._glogs["g"].journal.dirty
    assert b.fsyncs == before + 3
    await b.close()


async def test_fsync_interval_syncs_in_the_background(tmp_path: Path) -> None:
    b = DiskBroker(tmp_path, history_size=10, history_ttl=300, fsync_interval=0.05)
    await b.start()
    await b.append("g", [("E", b"1")])
    await b.append("g", [("E", b"2")])
    j = b._glogs["g"].journal
    assert j.dirty
    # the file's creation, then one background fsync
    await until(lambda: b.fsyncs >= 2, "the background fsync")
    assert not j.dirty
    await b.close()


async def test_open_files_and_cached_guilds_are_bounded(tmp_path: Path) -> None:
    b = DiskBroker(
        tmp_path, history_size=10, history_ttl=300, fsync="never", max_open=2, max_cached=3
    )
    await b.start()
    for round_ in range(2):
        for k in range(8):
            await b.append(f"g{k}", [("E", orjson.dumps([round_, k]))])
            assert sum(lg.journal.is_open for lg in b._glogs.values()) <= 2
            assert len(b._glogs) <= 3
    # evicted guilds reload from their files, whole
    for k in range(8):
        _, recs = await b.read(f"g{k}", 0, 10)
        assert [orjson.loads(r.payload)["d"] for r in recs] == [[0, k], [1, k]]
    await b.close()


async def test_the_feed_gets_records_only_after_they_are_written(tmp_path: Path) -> None:
    b = DiskBroker(tmp_path, history_size=10, history_ttl=300, fsync="always")
    seen: list[tuple[int, int]] = []

    def feed(gid: str, recs: list[Record] | None) -> None:
        assert recs is not None
        for r in recs:
            seen.append((r.s, journal.load(jpath(tmp_path, gid), gid).head))

    b.set_feed(feed)
    await b.start()
    await b.listen("g")
    for i in range(3):
        await b.append("g", [("E", orjson.dumps(i))])
    assert seen == [(1, 1), (2, 2), (3, 3)]  # each record was on disk when fed
    await b.close()


async def test_unwritable_data_dir_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    b = DiskBroker(blocker, history_size=10, history_ttl=300)
    with pytest.raises(Exception, match="data dir"):
        await b.start()


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        DiskBroker(tmp_path, 10, 300, fsync="sometimes")
    with pytest.raises(ValueError):
        DiskBroker(tmp_path, 10, 300, fsync_interval=0)


def edit_state(data: Path, **changes: object) -> None:
    path = data / STATE_FILE
    state = orjson.loads(path.read_bytes())
    state.update(changes)
    path.write_bytes(orjson.dumps(state))


async def run(data: Path, fsync: str = "interval", **appends: int) -> dict[str, str]:
    """Start a broker on ``data``, append to the given guilds, stop cleanly;
    returns each guild's epoch."""
    b = DiskBroker(data, history_size=10, history_ttl=300, fsync=fsync)
    await b.start()
    epochs = {}
    for gid, n in appends.items():
        for _ in range(n):
            epochs[gid], _ = await b.append(gid, [("E", b"0")])
    for gid in ("a", "b"):
        epochs.setdefault(gid, (await b.head(gid))[0])
    await b.close()
    return epochs


async def test_after_a_possible_power_failure_every_guild_gets_a_new_epoch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = await run(tmp_path, a=3, b=2)
    # The last run did not stop cleanly and the machine has rebooted since:
    # under --fsync interval its last second of acknowledged events may be gone.
    edit_state(tmp_path, clean=False, boot_id="another-boot")
    with caplog.at_level(logging.WARNING, logger="guildcast.journal"):
        b = DiskBroker(tmp_path, history_size=10, history_ttl=300)
        await b.start()
        epoch_a, head_a = await b.head("a")
        await b.close()
    assert epoch_a != first["a"] and head_a == 3  # events kept, under a new epoch
    assert any("power failure" in r.getMessage() for r in caplog.records)
    # A guild not loaded during that run is reset when it is, later.
    second = await run(tmp_path)
    assert second["a"] == epoch_a
    assert second["b"] != first["b"]
    third = await run(tmp_path)
    assert third == second  # reset once, then stable


async def test_a_kill_9_or_fsync_always_keeps_the_epochs(tmp_path: Path) -> None:
    first = await run(tmp_path, a=2)
    edit_state(tmp_path, clean=False)  # same boot: the process died, the page cache did not
    assert (await run(tmp_path))["a"] == first["a"]
    await run(tmp_path, fsync="always", a=1)
    edit_state(tmp_path, clean=False, boot_id="another-boot")  # nothing acknowledged was lost
    assert (await run(tmp_path))["a"] == first["a"]


async def test_one_node_per_data_dir(tmp_path: Path) -> None:
    a = DiskBroker(tmp_path, history_size=10, history_ttl=300)
    await a.start()
    b = DiskBroker(tmp_path, history_size=10, history_ttl=300)
    with pytest.raises(BrokerUnavailable, match="in use"):
        await b.start()
    await a.close()
    await b.start()  # released on close
    await b.close()


async def test_a_journal_cut_below_its_mark_starts_a_new_epoch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    b = DiskBroker(tmp_path, history_size=100, history_ttl=300)
    await b.start()
    for i in range(1, 6):
        epoch, _ = await b.append("g", [("E", orjson.dumps(i))])
    await b.close()
    path = jpath(tmp_path, "g")
    data = path.read_bytes()
    loaded = journal.load(path, "g")
    last = len(loaded.events[-1].payload) + len(event_prefix(5, "E", 0.0, b""))
    path.write_bytes(data[: len(data) - last])  # event 5 gone, at a record boundary

    b2 = DiskBroker(tmp_path, history_size=100, history_ttl=300)
    await b2.start()
    with caplog.at_level(logging.WARNING, logger="guildcast.journal"):
        new_epoch, head = await b2.head("g")
    assert new_epoch != epoch and head == 4
    assert b2.cuts == 1
    assert any("high-water mark is s=5" in r.getMessage() for r in caplog.records)
    assert await b2.append("g", [("E", b"5")]) == (new_epoch, [5])
    await b2.close()
    b3 = DiskBroker(tmp_path, history_size=100, history_ttl=300)
    await b3.start()
    assert await b3.head("g") == (new_epoch, 5)  # the new epoch's mark holds
    assert b3.cuts == 0
    await b3.close()


async def test_temp_files_are_removed_at_start(tmp_path: Path) -> None:
    b = DiskBroker(tmp_path, history_size=10, history_ttl=300)
    await b.start()
    await b.append("g", [("E", b"1")])
    await b.close()
    left = [tmp_path / GUILDS_DIR / f"g-{i}.log.tmp" for i in range(5)]
    for p in left:
        p.write_bytes(b"half a rewrite")
    b2 = DiskBroker(tmp_path, history_size=10, history_ttl=300)
    await b2.start()
    assert not any(p.exists() for p in left)
    assert (await b2.head("g"))[1] == 1
    await b2.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_open_descriptors_stay_bounded_while_the_syncer_runs(tmp_path: Path) -> None:
    """Issue "Hardening 2", item 6: the interval syncer held every dirty
    journal busy for a whole round of fsyncs, and a busy journal's
    descriptor was never closed, so appends to other guilds meanwhile opened
    descriptors past ``max_open``. Now the syncer fsyncs through descriptors
    of its own and the bound is strict."""
    max_open = 32
    b = DiskBroker(
        tmp_path, history_size=10, history_ttl=300, fsync_interval=0.001, max_open=max_open
    )
    await b.start()
    base = open_fds()
    guilds = [f"g{i}" for i in range(20 * max_open)]
    peak = 0
    for round_ in range(4):
        # Concurrent appends to more guilds than the bound, while fsync rounds run.
        for chunk in range(0, len(guilds), 64):
            await asyncio.gather(
                *(b.append(g, [("E", b"%d" % round_)]) for g in guilds[chunk : chunk + 64])
            )
            peak = max(peak, open_fds() - base)
    # The syncer's own descriptor and a thread pool's loads are the margin.
    assert peak <= max_open + 8, peak
    assert len(b._open) <= max_open
    for g in guilds[:: len(guilds) // 10]:
        assert (await b.head(g))[1] == 4
    await b.close()


async def test_journals_whose_history_aged_out_are_deleted(tmp_path: Path) -> None:
    b = DiskBroker(tmp_path, history_size=10, history_ttl=30)
    await b.start()
    old_epochs = {}
    for g in ("old-1", "old-2", "fresh"):
        old_epochs[g], _ = await b.append(g, [("E", b"1")])
    await b.close()
    long_ago = time.time() - 30 - disk.JANITOR_GRACE - 5
    for g in ("old-1", "old-2"):
        os.utime(jpath(tmp_path, g), (long_ago, long_ago))

    b2 = DiskBroker(tmp_path, history_size=10, history_ttl=30)
    await b2.start()
    await until(lambda: b2.journals_deleted == 2, "the janitor to delete two journals")
    assert not jpath(tmp_path, "old-1").exists() and not jpath(tmp_path, "old-2").exists()
    assert jpath(tmp_path, "fresh").exists()
    assert "old-1" not in b2.marks.table and "fresh" in b2.marks.table
    # A deleted guild starts over under a new epoch; the fresh one goes on.
    epoch, head = await b2.head("old-1")
    assert epoch != old_epochs["old-1"] and head == 0
    assert await b2.head("fresh") == (old_epochs["fresh"], 1)
    await b2.close()


async def test_a_write_whose_mark_fails_is_taken_back(tmp_path: Path) -> None:
    """Events in the journal without their mark would give their s to other
    events later: a failed mark write undoes the journal write."""
    b = DiskBroker(tmp_path, history_size=10, history_ttl=300)
    await b.start()
    epoch, _ = await b.append("g", [("E", b"1"), ("E", b"2")])
    b.marks.close()  # every mark write now fails
    with pytest.raises(BrokerUnavailable, match="high-water mark"):
        await b.append("g", [("E", b"3")])
    with pytest.raises(BrokerUnavailable, match="high-water mark"):
        await b.append("new", [("E", b"1")])
    assert journal.load(jpath(tmp_path, "g"), "g").head == 2
    assert not jpath(tmp_path, "new").exists()
    assert not b.healthy
    b.marks.open()
    assert await b.append("g", [("E", b"3")]) == (epoch, [3])
    assert (await b.append("new", [("E", b"1")]))[1] == [1]
    assert b.healthy
    await b.close()
    b2 = DiskBroker(tmp_path, history_size=10, history_ttl=300)
    await b2.start()
    assert await b2.head("g") == (epoch, 3) and b2.cuts == 0
    await b2.close()


async def test_close_fsyncs_every_dirty_journal_on_several_threads(tmp_path: Path) -> None:
    """A stop fsyncs the dirty journals in slices on ``SYNC_THREADS``
    threads at once (a full node's 1,000 took 0.5-1.9 s one after another);
    every one of them is fsynced before the clean stop is recorded, and the
    next start finds every event."""
    b = DiskBroker(tmp_path, history_size=10, history_ttl=300, fsync_interval=3600)
    await b.start()
    guilds = [f"g{i}" for i in range(disk.SYNC_CHUNK * disk.SYNC_THREADS + 5)]
    for g in guilds:  # a new journal is written whole and fsynced; then appended to
        await b.append(g, [("E", b"1")])
        await b.append(g, [("E", b"2")])
    assert sum(lg.journal.dirty for lg in b._glogs.values()) == len(guilds)
    before = b.fsyncs
    await b.close()
    assert b.fsyncs - before == len(guilds)
    assert b._sync_pool is None
    b2 = DiskBroker(tmp_path, history_size=10, history_ttl=300)
    await b2.start()
    for g in guilds[::7]:
        assert (await b2.head(g))[1] == 2
    await b2.close()
