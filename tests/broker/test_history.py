"""The history ring (server/broker/history.py) on its own: the count, age
and byte bounds, reads after any ``s``, and exact byte accounting through
every way a record leaves."""

from __future__ import annotations

from guildcast.broker.base import Record
from guildcast.broker.histbudget import RECORD_OVERHEAD, HistoryBudget
from guildcast.broker.history import History

NOW = 1_000_000.0


def recs(first: int, n: int, ts: float = NOW, size: int = 10) -> list[Record]:
    return [Record(s, "E", ts, b"x" * size) for s in range(first, first + n)]


def ring(size: int = 5, ttl: float = 60.0, guild_bytes: int = 10**9) -> History:
    return History(size, ttl, HistoryBudget(guild_bytes, 10**9))


def exact(h: History) -> bool:
    return h.nbytes == h.budget.total == sum(len(r.payload) + RECORD_OVERHEAD for r in h.records)


def test_the_count_bound_keeps_the_newest() -> None:
    h = ring(size=5)
    h.add(recs(1, 3), NOW)
    h.add(recs(4, 4), NOW)
    assert [r.s for r in h.records] == [3, 4, 5, 6, 7]
    assert h.first(NOW) == 3 and len(h) == 5 and exact(h)


def test_reads_after_any_s() -> None:
    h = ring(size=5)
    h.add(recs(1, 7), NOW)  # keeps 3..7
    assert [r.s for r in h.read(0, 100, NOW)] == [3, 4, 5, 6, 7]  # before the first
    assert [r.s for r in h.read(4, 2, NOW)] == [5, 6]  # a limit
    assert [r.s for r in h.read(6, 100, NOW)] == [7]
    assert h.read(7, 100, NOW) == [] and h.read(99, 100, NOW) == []  # at or past the head


def test_the_age_bound_drops_the_old_on_every_access() -> None:
    h = ring(size=100, ttl=10.0)
    h.add(recs(1, 2, ts=NOW - 20), NOW - 20)
    assert h.first(NOW - 15) == 1  # 5 s old
    h.add(recs(3, 2, ts=NOW - 5), NOW - 5)  # 1 and 2 are 15 s old now
    assert [r.s for r in h.records] == [3, 4] and h.first(NOW) == 3
    assert [r.s for r in h.read(0, 10, NOW + 6)] == []  # all aged out
    assert h.first(NOW + 6) is None and exact(h)


def test_the_guild_byte_bound_evicts_oldest_first() -> None:
    per = 10 + RECORD_OVERHEAD
    h = ring(size=100, guild_bytes=3 * per)
    h.add(recs(1, 5), NOW)
    assert [r.s for r in h.records] == [3, 4, 5]
    assert h.budget.evicted == 2 and exact(h)


def test_history_off_keeps_nothing() -> None:
    h = ring(size=0)
    h.add(recs(1, 3), NOW)
    h.restore(recs(1, 3), NOW)
    assert len(h) == 0 and h.first(NOW) is None and h.read(0, 10, NOW) == []
    assert h.budget.total == 0


def test_clear_gives_back_every_byte() -> None:
    h = ring()
    h.add(recs(1, 4), NOW)
    assert h.budget.total > 0
    h.clear()
    assert len(h) == 0 and h.nbytes == 0 and h.budget.total == 0


def test_a_restored_ring_is_bounded_then_counted_on_the_loop() -> None:
    h = ring(size=3, ttl=10.0)
    h.restore([*recs(1, 2, ts=NOW - 20), *recs(3, 4)], NOW)  # 1, 2 too old; count keeps 3
    assert [r.s for r in h.records] == [4, 5, 6]
    assert h.budget.total == 0  # not counted in the thread
    h.count_restored()
    assert exact(h)
    h.add(recs(7, 1), NOW)
    assert [r.s for r in h.records] == [5, 6, 7] and exact(h)
