"""The history byte budget (server/broker/histbudget.py) through the memory
broker: a guild's bound, the node's bound (oldest events of the node first),
and exact accounting as events leave by count and age."""

from __future__ import annotations

from guildcast.broker.histbudget import LOW_WATER, RECORD_OVERHEAD
from guildcast.broker.memory import MemoryBroker

KB = b'"' + b"x" * 1022 + b'"'  # a 1 KiB JSON string


def per_event(gid: str = "g") -> int:
    # the envelope adds the op, t, g and s fields around d
    return (
        len(b'{"op":0,"t":"E","g":"%s","s":1,"d":' % gid.encode()) + len(KB) + 1 + RECORD_OVERHEAD
    )


async def test_a_guild_keeps_at_most_its_bytes_oldest_leave_first() -> None:
    b = MemoryBroker(1000, 300, history_guild_bytes=10 * 1300, history_node_bytes=10**9)
    for _ in range(50):
        await b.append("g", [("E", KB)])
    first = await b.first("g")
    assert first is not None and first > 40
    _, recs = await b.read("g", 0, 100)
    assert [r.s for r in recs] == list(range(first, 51))  # the newest, contiguous
    assert b.budget.total <= 10 * 1300
    assert b.budget.evicted == first - 1


async def test_the_node_bound_evicts_the_oldest_events_of_the_node() -> None:
    bound = 40 * per_event()
    b = MemoryBroker(1000, 300, history_guild_bytes=10**9, history_node_bytes=bound)
    for _ in range(20):
        await b.append("old", [("E", KB)])
    for _ in range(30):
        await b.append("new", [("E", KB)])
    assert b.budget.total <= bound
    # "old" published first: its events left first, "new" kept all of its own
    # until "old" was gone.
    assert await b.first("new") == 1
    first_old = await b.first("old")
    assert first_old is not None and first_old > 10
    assert b.budget.total <= bound and b.budget.total >= LOW_WATER * bound - per_event()
    for _ in range(30):
        await b.append("new", [("E", KB)])
    assert await b.first("old") is None  # all gone
    assert b.budget.total <= bound


async def test_accounting_is_exact_through_count_age_and_sweep() -> None:
    b = MemoryBroker(5, 0.5, history_guild_bytes=10**9, history_node_bytes=10**9)
    for i in range(12):
        await b.append(f"g{i % 3}", [("E", KB)])
    rings = [log.history for log in b._logs.values()]
    assert b.budget.total == sum(h.nbytes for h in rings)
    assert all(len(h.records) <= 5 for h in rings)
    exact = sum(len(r.payload) + RECORD_OVERHEAD for h in rings for r in h.records)
    assert b.budget.total == exact
    for h in rings:  # as if every event had aged out
        for r in list(h.records):
            h.records[h.records.index(r)] = r._replace(ts=0.0)
    assert b.sweep() == 3
    assert b.budget.total == 0 and b.budget.evicted == 0
