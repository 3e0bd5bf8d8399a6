"""The one token bucket (guildcast.protocol.bucket): burst, refill, debt."""

from __future__ import annotations

import pytest

from guildcast.protocol.bucket import TokenBucket


def test_burst_is_one_second_but_at_least_one_event() -> None:
    b = TokenBucket(3.0, 0.0)
    assert [b.take(1, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(1, 0.0) == pytest.approx(1 / 3)
    slow = TokenBucket(0.5, 0.0)
    assert slow.take(1, 0.0) == 0.0
    assert slow.take(1, 1.0) == pytest.approx(1.0)  # half a token back after 1 s
    assert slow.take(1, 2.0) == 0.0


def test_refill_is_capped_and_a_refusal_takes_nothing() -> None:
    b = TokenBucket(2.0, 0.0)
    assert b.take(2, 0.0) == 0.0
    assert b.take(1, 0.25) == pytest.approx(0.25)
    assert b.take(1, 0.5) == 0.0  # the refused request took nothing
    assert b.take(2, 100.0) == 0.0 and b.take(1, 100.0) > 0  # never more than the cap


def test_a_batch_larger_than_the_burst_goes_into_debt() -> None:
    b = TokenBucket(10.0, 0.0)
    assert b.take(25, 0.0) == 0.0  # full bucket: granted, 15 tokens of debt
    assert b.take(1, 1.0) == pytest.approx(0.6)  # -5 after 1 s: 0.6 s more to reach 1
    with pytest.raises(ValueError):
        TokenBucket(0.0, 0.0)
