"""The broker contract's fixture: every broker implementation in turn."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from guildcast.broker.base import Broker
from guildcast.broker.disk import DiskBroker
from guildcast.broker.memory import MemoryBroker
from guildcast.broker.redis import RedisBroker
from tests.support.redis import RedisProc


@pytest.fixture(params=["memory", "disk", "redis"])
async def broker(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Broker]:
    """Every implementation of the broker contract, in turn."""
    b: Broker
    proc = None
    if request.param == "memory":
        b = MemoryBroker(history_size=50, history_ttl=300)
    elif request.param == "disk":
        b = DiskBroker(tmp_path / "data", history_size=50, history_ttl=300, fsync="always")
    else:
        proc = RedisProc(tmp_path)
        proc.start()
        b = RedisBroker(proc.url, history_size=50, history_ttl=300)
    await b.start()
    yield b
    await b.close()
    if proc is not None:
        proc.stop()
