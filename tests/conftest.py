"""Shared fixtures: a real node on 127.0.0.1 and plain websockets clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import uvloop

from guildcast import Config, Server

SECRET = "test-secret-0123456789abcdef0123456789"


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with Server(Config(host="127.0.0.1", port=0, secret=SECRET)) as srv:
        yield srv


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on uvloop, the loop ``guildcast serve`` uses; the
    smoke and TCP_NODELAY tests also run on the stock loop that embedding applications may use."""
    if item.path.name in ("test_smoke.py", "test_nodelay.py"):
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}
