"""Shared fixtures: a real node on 127.0.0.1 and plain websockets clients."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from server import Config, Server

SECRET = "test-secret-0123456789abcdef0123456789"


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with Server(Config(host="127.0.0.1", port=0, secret=SECRET)) as srv:
        yield srv
