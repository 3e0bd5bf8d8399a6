"""High-water marks (server/core/marks.py): the file survives restarts, a
torn last line is skipped, deleted guilds are forgotten, and the file is
compacted."""

from __future__ import annotations

from pathlib import Path

from guildcast.core import marks
from guildcast.core.marks import Marks


def test_marks_survive_a_reopen_and_the_last_line_wins(tmp_path: Path) -> None:
    m = Marks(tmp_path)
    assert m.open() is False
    m.set("a", "e1", 1)
    m.set("a", "e1", 5)
    m.set("b", "e2", 3)
    m.close()
    again = Marks(tmp_path)
    assert again.open() is True
    assert again.get("a") == ("e1", 5) and again.get("b") == ("e2", 3)
    # reopening compacted it: one line per guild
    assert len(again.path.read_bytes().splitlines()) == 2
    again.close()


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    m = Marks(tmp_path)
    m.open()
    m.set("a", "e1", 7)
    m.close()
    with open(m.path, "ab") as f:
        f.write(b'["a","e1",9')  # a crash in the middle of the write of s=9's mark
    again = Marks(tmp_path)
    again.open()
    assert again.get("a") == ("e1", 7)
    again.close()


def test_forget_removes_a_guild_for_good(tmp_path: Path) -> None:
    m = Marks(tmp_path)
    m.open()
    m.set("a", "e1", 7)
    m.forget("a")
    m.forget("never-marked")
    m.close()
    again = Marks(tmp_path)
    again.open()
    assert again.get("a") is None and again.table == {}
    again.close()


def test_the_file_is_compacted_when_it_grows(tmp_path: Path, monkeypatch: object) -> None:
    m = Marks(tmp_path)
    m.open()
    n = 0
    while not m.needs_compaction:
        n += 1
        m.set("g", "e", n)
    assert m.path.stat().st_size > marks.COMPACT_MIN
    m.compact()
    assert m.path.read_bytes() == b'["g","e",%d]\n' % n
    assert not m.needs_compaction
    m.set("g", "e", n + 1)
    m.close()
    again = Marks(tmp_path)
    again.open()
    assert again.get("g") == ("e", n + 1)
    again.close()


def test_a_compaction_in_two_steps_keeps_the_marks_set_meanwhile(tmp_path: Path) -> None:
    m = Marks(tmp_path)
    m.open()
    for n in range(1, 100):
        m.set(f"g{n % 7}", "e", n)
    snapshot = m.begin_compaction()
    size = m.write_snapshot(snapshot)  # the broker runs this in a thread
    m.set("g1", "e", 500)  # meanwhile, on the loop
    m.set("new", "e2", 1)
    m.forget("g2")
    m.finish_compaction(size)
    m.set("g3", "e", 600)  # after: into the new file
    m.close()
    assert not (tmp_path / "marks.log.tmp").exists()
    again = Marks(tmp_path)
    again.open()
    assert again.get("g1") == ("e", 500) and again.get("new") == ("e2", 1)
    assert again.get("g2") is None and again.get("g3") == ("e", 600)
    assert again.get("g4") == m.table["g4"]
    again.close()
