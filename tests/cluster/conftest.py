"""Fixtures of the cluster tests: each test its own redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis import RedisProc


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProc]:
    """A redis-server of the test's own (no persistence), stopped after it."""
    r = RedisProc(tmp_path)
    r.start()
    yield r
    r.stop()
