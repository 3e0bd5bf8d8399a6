"""A real redis-server on a free loopback port, for tests.

Started from Debian's ``redis-server`` (``.ci/run`` installs it); tests that
need it are skipped with a clear reason only when the binary is missing
outside CI (in CI a missing binary is a failure). The ``redis_proc``
fixture (tests/conftest.py) gives a test one, stopped after it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from guildcast.loadtest.redisserver import RedisServer, free_port

__all__ = ["RedisProc", "free_port"]


class RedisProc(RedisServer):
    """A :class:`~guildcast.loadtest.redisserver.RedisServer` for a test: a
    missing binary skips the test with its reason (in CI it is a failure)."""

    def __init__(self, workdir: Path, persist: bool = False) -> None:
        if shutil.which("redis-server") is None:
            if os.environ.get("CI"):
                raise RuntimeError("redis-server is not installed (.ci/run should install it)")
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        super().__init__(workdir, persist)
