"""The journal file format (server/core/journal.py): names, records, repair."""

from __future__ import annotations

import os
import re
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from guildcast.core import journal
from guildcast.core.journal import Journal, event_prefix, file_name, guild_of, load


def payload(gid: str, t: str, s: int, d: object) -> bytes:
    return orjson.dumps({"op": 0, "t": t, "g": gid, "s": s, "d": d})


def parts(gid: str, first: int, n: int, ts: float = 1000.0) -> list[bytes]:
    out: list[bytes] = []
    for s in range(first, first + n):
        p = payload(gid, "EV", s, {"i": s})
        out += [event_prefix(s, "EV", ts + s, p), p]
    return out


def make(tmp_path: Path, gid: str = "g", n: int = 5, base: int = 0) -> tuple[Path, Journal]:
    """A journal of ``gid`` with events base+1 .. base+n, written as the broker does."""
    path = journal.journal_path(tmp_path, gid)
    j = Journal(path, gid)
    j.rewrite("ep0", base, parts(gid, base + 1, 2), 2, 1000.0 + base + 1)
    if n > 2:
        data = b"".join(parts(gid, base + 3, n - 2))
        j.append(data, n - 2, 1000.0 + base + 3)
    j.close()
    return path, j


def record_offsets(path: Path) -> list[int]:
    """Start offsets of every record in the file (header first)."""
    data = path.read_bytes()
    offs, off = [], 0
    while off < len(data):
        offs.append(off)
        length = int.from_bytes(data[off : off + 4], "big")
        off += journal.RECORD_OVERHEAD + length
    assert off == len(data)
    return offs


guild_ids = st.from_regex(r"[A-Za-z0-9_.:\-]{1,128}", fullmatch=True)


@given(guild_ids)
def test_file_names_are_safe_and_reversible(gid: str) -> None:
    name = file_name(gid)
    assert re.fullmatch(r"g-[a-z2-7]*\.log", name), name
    assert len(name.encode()) <= 255
    assert guild_of(name) == gid


def test_dot_ids_never_escape_the_directory(tmp_path: Path) -> None:
    for gid in (".", "..", "...", "a:b", "A", "a"):
        path = journal.journal_path(tmp_path, gid)
        assert path.parent == tmp_path
        assert ".." not in path.name.removesuffix(".log")
    # case matters in ids but file systems may ignore it: names never collide
    assert file_name("A") != file_name("a")
    assert file_name("A").lower() == file_name("A")
    assert guild_of("not-a-journal.txt") is None
    assert guild_of("g-!!.log") is None


def test_round_trip(tmp_path: Path) -> None:
    path, _ = make(tmp_path, "g-1", n=5)
    got = load(path, "g-1")
    assert (got.epoch, got.base, got.head, got.count) == ("ep0", 0, 5, 5)
    assert got.repair is None and not got.lost
    assert [e.s for e in got.events] == [1, 2, 3, 4, 5]
    assert all(e.t == "EV" for e in got.events)
    assert orjson.loads(got.events[2].payload)["d"] == {"i": 3}
    assert got.first_ts == 1001.0
    assert got.size == path.stat().st_size


def test_keep_bounds_the_events_returned(tmp_path: Path) -> None:
    path, _ = make(tmp_path, n=9, base=40)
    got = load(path, "g", keep=3)
    assert [e.s for e in got.events] == [47, 48, 49]
    assert (got.base, got.head, got.count) == (40, 49, 9)


def test_missing_file_is_empty(tmp_path: Path) -> None:
    got = load(tmp_path / "nothing.log", "g")
    assert got.epoch is None and got.head == 0 and got.repair is None


@pytest.mark.parametrize("keep_bytes", [1, 5, 11, 12, 13, 30])
def test_torn_tail_is_truncated_and_keeps_the_epoch(tmp_path: Path, keep_bytes: int) -> None:
    path, _ = make(tmp_path, n=5)
    last = record_offsets(path)[-1]
    with open(path, "r+b") as f:
        f.truncate(last + keep_bytes)  # a crash in the middle of writing event 5
    got = load(path, "g")
    assert got.repair is not None and "torn tail" in got.repair
    assert not got.lost and got.epoch == "ep0"
    assert [e.s for e in got.events] == [1, 2, 3, 4]
    assert path.stat().st_size == last == got.size
    # the repaired file takes appends and reads back clean
    j = Journal(path, "g")
    j.adopt(got)
    j.append(b"".join(parts("g", 5, 1)), 1, 2000.0)
    j.close()
    again = load(path, "g")
    assert again.repair is None and [e.s for e in again.events] == [1, 2, 3, 4, 5]


def test_zero_filled_tail_is_torn(tmp_path: Path) -> None:
    path, _ = make(tmp_path, n=3)
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)  # what a power failure can leave past the data
    got = load(path, "g")
    assert got.repair is not None and not got.lost
    assert [e.s for e in got.events] == [1, 2, 3] and path.stat().st_size == size


def test_a_flipped_byte_is_corruption_and_never_a_wrong_event(tmp_path: Path) -> None:
    path, _ = make(tmp_path, n=5)
    offs = record_offsets(path)
    data = bytearray(path.read_bytes())
    data[offs[-1] + journal.RECORD_OVERHEAD + 20] ^= 0x01  # inside event 5's body
    path.write_bytes(bytes(data))
    got = load(path, "g")
    assert got.repair is not None and "corrupt" in got.repair
    assert got.lost  # complete records were damaged: the caller starts a new epoch
    assert [e.s for e in got.events] == [1, 2, 3, 4]
    for e in got.events:
        assert orjson.loads(e.payload)["d"] == {"i": e.s}
    assert path.stat().st_size == offs[-1]


def test_a_flipped_byte_in_a_middle_header_drops_the_rest(tmp_path: Path) -> None:
    path, _ = make(tmp_path, n=6)
    offs = record_offsets(path)
    data = bytearray(path.read_bytes())
    data[offs[3] + 1] ^= 0x40  # the length field of event 3
    path.write_bytes(bytes(data))
    got = load(path, "g")
    assert got.lost and [e.s for e in got.events] == [1, 2]
    assert path.stat().st_size == offs[3]


def test_an_unreadable_header_moves_the_file_aside(tmp_path: Path) -> None:
    path, _ = make(tmp_path, n=3)
    data = bytearray(path.read_bytes())
    data[journal.RECORD_OVERHEAD + 3] ^= 0xFF
    path.write_bytes(bytes(data))
    got = load(path, "g")
    assert got.epoch is None and got.lost and got.repair is not None
    assert not path.exists()
    assert path.with_name(path.name + ".corrupt").read_bytes() == bytes(data)


def test_a_file_of_another_guild_is_not_trusted(tmp_path: Path) -> None:
    path, _ = make(tmp_path, "a", n=2)
    other = journal.journal_path(tmp_path, "b")
    os.replace(path, other)
    got = load(other, "b")
    assert got.epoch is None and got.lost


def test_a_gap_in_s_is_corruption(tmp_path: Path) -> None:
    path, j = make(tmp_path, n=2)
    j.adopt(load(path, "g"))
    j.append(b"".join(parts("g", 4, 1)), 1, 3000.0)  # s=3 is missing
    j.close()
    got = load(path, "g")
    assert got.lost and got.head == 2 and "expected 3" in (got.repair or "")


def test_compaction_rewrite_keeps_the_sequence(tmp_path: Path) -> None:
    path, j = make(tmp_path, n=8)
    j.rewrite("ep0", 6, parts("g", 7, 2), 2, 1007.0)
    got = load(path, "g")
    assert (got.base, got.head, got.count) == (6, 8, 2)
    assert [e.s for e in got.events] == [7, 8]
    assert not path.with_name(path.name + ".tmp").exists()


def test_sync_reopens_a_closed_journal(tmp_path: Path) -> None:
    path, j = make(tmp_path, n=3)
    j.adopt(load(path, "g"))
    j.append(b"".join(parts("g", 4, 1)), 1, 4000.0)
    j.close()
    assert j.dirty and not j.is_open
    j.sync()
    assert not j.dirty and j.broken is None


def test_a_failed_write_that_cannot_be_undone_stops_the_journal() -> None:
    # /dev/full refuses every write (ENOSPC) and cannot be truncated.
    j = Journal(Path("/dev/full"), "g")
    j.size = 10  # as if it held a header
    with pytest.raises(OSError):
        j.append(b"x" * 100, 1, 1.0)
    assert j.broken is not None
    with pytest.raises(OSError, match="unusable"):
        j.append(b"y", 1, 1.0)
    j.close()
