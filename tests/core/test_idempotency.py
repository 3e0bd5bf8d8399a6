"""The idempotency window (server/core/idempotency.py): bounds per guild, per
node and by age, eviction oldest first, epochs, and the split of a batch."""

from __future__ import annotations

import pytest

from guildcast.core.idempotency import KeyWindows, Replayed, Seen, digest, settle

D1 = digest("A", b"1")


def seen(s: int, ts: float = 1000.0, epoch: str = "e", dg: bytes = D1) -> Seen:
    return Seen(s, epoch, dg, ts)


def test_lookup_finds_a_key_of_its_guild_and_epoch_only() -> None:
    w = KeyWindows(ttl=60, guild_keys=10, node_keys=100)
    w.add("g", "k", seen(3))
    assert w.lookup("g", "k", "e", now=1000.0) == seen(3)
    assert w.lookup("h", "k", "e", now=1000.0) is None  # per guild
    assert w.lookup("g", "other", "e", now=1000.0) is None
    # Another epoch: the history the key named is lost, and the key with it.
    assert w.lookup("g", "k", "e2", now=1000.0) is None


def test_a_key_expires_after_the_ttl() -> None:
    w = KeyWindows(ttl=60, guild_keys=10, node_keys=100)
    w.add("g", "k", seen(1, ts=1000.0))
    assert w.lookup("g", "k", "e", now=1060.0) is not None
    assert w.lookup("g", "k", "e", now=1060.5) is None
    assert w.expire(1060.5) == 1
    assert len(w) == 0


def test_the_guild_bound_evicts_that_guilds_oldest_first() -> None:
    w = KeyWindows(ttl=60, guild_keys=3, node_keys=100)
    for i in range(5):
        w.add("g", f"k{i}", seen(i + 1))
    w.add("h", "x", seen(1))
    assert [k for k in ("k0", "k1", "k2", "k3", "k4") if w.lookup("g", k, "e", 1000.0)] == [
        "k2",
        "k3",
        "k4",
    ]
    assert w.lookup("h", "x", "e", 1000.0) is not None  # another guild keeps its own
    assert w.evicted == 2
    assert len(w) == 4


def test_the_node_bound_evicts_the_nodes_oldest_first_whichever_guild() -> None:
    w = KeyWindows(ttl=60, guild_keys=100, node_keys=4)
    w.add("a", "1", seen(1))
    w.add("b", "1", seen(1))
    w.add("a", "2", seen(2))
    w.add("c", "1", seen(1))
    w.add("b", "2", seen(2))  # the fifth: a/1, the oldest of the node, leaves
    assert w.lookup("a", "1", "e", 1000.0) is None
    assert all(w.lookup(g, k, "e", 1000.0) for g, k in [("b", "1"), ("a", "2"), ("c", "1")])
    w.add("c", "2", seen(2))  # then b/1
    assert w.lookup("b", "1", "e", 1000.0) is None
    assert len(w) == 4


def test_the_node_order_never_outgrows_its_bound() -> None:
    """Entries evicted by the guild bound stay in the node's order until they
    reach its front: the order itself is bounded by ``node_keys``."""
    w = KeyWindows(ttl=60, guild_keys=1, node_keys=10)
    for i in range(1000):
        w.add("g", f"k{i}", seen(i + 1))
    assert len(w) == 1
    assert len(w._order) <= 10


def test_restore_adds_what_is_not_known_and_not_expired() -> None:
    w = KeyWindows(ttl=60, guild_keys=10, node_keys=100)
    w.restore("g", "old", seen(1, ts=900.0), now=1000.0)  # older than the ttl
    w.restore("g", "k", seen(2, ts=990.0), now=1000.0)
    w.restore("g", "k", seen(7, ts=995.0), now=1000.0)  # already known: kept as it was
    assert w.lookup("g", "old", "e", 1000.0) is None
    assert w.lookup("g", "k", "e", 1000.0) == seen(2, ts=990.0)


def test_entries_are_oldest_first_and_of_one_epoch() -> None:
    w = KeyWindows(ttl=60, guild_keys=10, node_keys=100)
    w.add("g", "a", seen(1))
    w.add("g", "b", seen(2, epoch="other"))
    w.add("g", "c", seen(3))
    assert [k for k, _ in w.entries("g", "e", now=1000.0)] == ["a", "c"]


def test_a_disabled_window_remembers_nothing() -> None:
    w = KeyWindows(ttl=0, guild_keys=10, node_keys=100)
    w.add("g", "k", seen(1))
    assert w.lookup("g", "k", "e", 1000.0) is None
    with pytest.raises(ValueError):
        KeyWindows(ttl=-1)


def test_resolve_and_settle_split_a_batch() -> None:
    w = KeyWindows(ttl=60, guild_keys=10, node_keys=100)
    w.add("g", "known", Seen(5, "e", digest("A", b"1"), 1000.0))
    items = [("A", b"1"), ("A", b"2"), ("A", b"3"), ("A", b"2"), ("A", b"9"), ("A", b"7")]
    keys = ["known", "new", None, "new", "new", "known"]
    fresh, replayed, digests = w.resolve("g", "e", items, keys, 1000.0)
    assert fresh == [1, 2]  # the first "new" and the unkeyed item
    assert digests[2] is None and digests[1] == digest("A", b"2")
    out = settle(fresh, [6, 7], replayed)
    assert out == [
        Replayed(5, False),  # the window's, same content
        6,
        7,
        Replayed(6, False),  # a repeat within the batch: the first's s
        Replayed(6, True),  # the same key with other data: a conflict
        Replayed(5, True),
    ]


def test_the_digest_covers_name_and_data() -> None:
    assert digest("A", b"1") == digest("A", b"1")
    assert digest("A", b"1") != digest("B", b"1")
    assert digest("A", b"1") != digest("A", b"2")
    assert digest("AB", b"1") != digest("A", b"B1")
