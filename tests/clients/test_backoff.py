"""The reconnect schedule (clients/backoff.py): bounded, jittered, growing."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from guildcast.client.backoff import Backoff, full_jitter, window


def test_full_jitter_is_bounded_uniform_and_grows_until_the_cap() -> None:
    rng = random.Random(1234)
    base, cap = 0.5, 8.0
    means = []
    for n in range(10):
        hi = min(cap, base * 2**n)
        xs = [full_jitter(n, base, cap, rng) for _ in range(4000)]
        assert all(0.0 <= x <= hi for x in xs), n
        # Uniform on [0, hi]: mean hi/2, spread over the whole window.
        assert statistics.fmean(xs) == pytest.approx(hi / 2, rel=0.05)
        assert max(xs) > 0.95 * hi and min(xs) < 0.05 * hi
        means.append(statistics.fmean(xs))
    growing = [n for n in range(10) if base * 2**n <= cap]
    assert all(means[a] < means[b] for a, b in itertools.pairwise(growing))
    assert window(10_000, base, cap) == cap  # no overflow, the cap holds
    with pytest.raises(ValueError):
        full_jitter(-1, base, cap, rng)


def test_backoff_limits_floor_and_reset() -> None:
    top = random.Random()
    top.uniform = lambda a, b: b  # type: ignore[method-assign]  # always the window's top
    b = Backoff(base=1.0, cap=4.0, max_attempts=4, rng=top)
    assert [b.next_delay() for _ in range(5)] == [1.0, 2.0, 4.0, 4.0, None]
    b.reset()
    assert b.next_delay(floor=2) == 4.0  # "back off" codes skip the short windows
    assert b.next_delay() == 2.0  # the floor never lowers later attempts' base

    now = [0.0]
    e = Backoff(base=1.0, cap=10.0, max_elapsed=5.0, rng=top, clock=lambda: now[0])
    assert e.next_delay() == 1.0
    now[0] = 4.5
    assert e.next_delay() == pytest.approx(0.5)  # never sleeps past the deadline
    now[0] = 5.0
    assert e.next_delay() is None
    e.reset()
    assert e.next_delay() == 1.0


def test_a_crowd_spreads_out() -> None:
    """1000 clients cut off at once: their first retries cover the whole
    first window, with no 5 % slice holding much more than its share."""
    rng = random.Random(99)
    delays = [Backoff(base=1.0, rng=rng).next_delay() for _ in range(1000)]
    buckets = [0] * 20
    for d in delays:
        assert d is not None
        buckets[min(int(d / 0.05), 19)] += 1
    assert max(buckets) < 90  # expected 50 per slice; 90 is > 5 sigma away
    assert min(buckets) > 15


def test_a_fixed_delay_is_handed_out_within_the_limits_and_does_not_grow_the_window() -> None:
    """A refused connect's delay (PROTOCOL.md "Pacing") is passed as
    ``fixed``: handed out as is, counted by ``max_attempts``, and the next
    jittered delay is drawn from the window it would have had anyway."""
    b = Backoff(base=1.0, cap=64.0, max_attempts=5, rng=random.Random(3))
    assert b.next_delay() is not None and b.attempt == 1
    for _ in range(3):
        assert b.next_delay(fixed=0.25) == 0.25
    assert b.attempt == 1 and b.handed == 4
    d = b.next_delay()
    assert d is not None and d <= 2.0  # window(1), not window(4) = 16
    assert b.next_delay(fixed=0.25) is None  # five handed out: the limit
    b.reset()
    assert b.attempt == 0 and b.handed == 0 and b.next_delay(fixed=-1.0) == 0.0
