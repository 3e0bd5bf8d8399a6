"""The broker contract's fixtures: every broker implementation in turn (the
built-in ones and any named in ``GUILDCAST_BROKER_HARNESS``: tests/broker/harness.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from guildcast.broker.base import Broker
from tests.broker.harness import BUILTIN, BrokerHarness, load, third_party

_EXTRA = third_party()


@pytest.fixture(params=[*BUILTIN, *_EXTRA])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BrokerHarness]:
    """Every implementation of the broker contract, in turn, with its faults."""
    name: str = request.param
    cls = BUILTIN[name] if name in BUILTIN else load(_EXTRA[name])
    h = cls(tmp_path)
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
async def broker(harness: BrokerHarness) -> Broker:
    """A started broker of each implementation: 50 events, 300 s of history."""
    return await harness.make(50, 300)
