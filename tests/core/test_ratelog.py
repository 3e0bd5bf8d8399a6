"""server/core/ratelog.py: at most one line per kind per interval, with counts."""

from __future__ import annotations

import logging

import pytest

from guildcast.core.ratelog import RateLimitedLog


def test_floods_become_one_line_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("guildcast.test.ratelog")
    flood = RateLimitedLog(logger, interval=3600)
    with caplog.at_level(logging.INFO, logger=logger.name):
        emitted = [flood.log(logging.INFO, "refused", "refused %d", i) for i in range(5)]
        other = flood.log(logging.WARNING, "slow", "slow one", extra={"peer": "p"})
    assert emitted == [True, False, False, False, False] and other
    assert [r.getMessage() for r in caplog.records] == ["refused 0", "slow one"]
    assert caplog.records[0].event == "refused"  # type: ignore[attr-defined]
    assert caplog.records[1].peer == "p"  # type: ignore[attr-defined]


def test_the_next_line_says_how_many_were_left_out(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("guildcast.test.ratelog2")
    flood = RateLimitedLog(logger, interval=3600)
    with caplog.at_level(logging.INFO, logger=logger.name):
        flood.log(logging.INFO, "k", "first")
        flood.log(logging.INFO, "k", "second")
        flood.log(logging.INFO, "k", "third")
        flood.interval = 0  # the interval has passed
        flood.log(logging.INFO, "k", "fourth")
    assert caplog.records[-1].getMessage() == "fourth (2 more like this since the last line)"
    assert caplog.records[-1].suppressed == 2  # type: ignore[attr-defined]


def test_disabled_levels_cost_nothing(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("guildcast.test.ratelog3")
    logger.setLevel(logging.WARNING)
    flood = RateLimitedLog(logger)
    assert flood.log(logging.INFO, "k", "hidden") is False
    assert not caplog.records
