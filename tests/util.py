"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def eventually(cond: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    """Wait until ``await cond()`` is true, polling state we cannot be notified
    of (another process, Redis); fails with TimeoutError after ``timeout`` s."""
    async with asyncio.timeout(timeout):
        while not await cond():  # noqa: ASYNC110 - polling remote state on purpose
            await asyncio.sleep(0.02)
