"""The one way tests wait for a condition: :func:`until`, bounded by a
generous :data:`TIMEOUT`.

Tests synchronise on conditions, never on sleeps: :func:`until` polls what
has no change notification to wait on (a server's counters, another
process, Redis) every :data:`STEP` seconds and fails the test with what it
was waiting for once ``timeout`` seconds have passed.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

#: Generous bound on any single wait (a shared 2-core machine can be slow).
TIMEOUT = 30.0
#: Seconds between two polls of a condition.
STEP = 0.01


async def until(
    pred: Callable[[], bool | Awaitable[bool]],
    what: str = "a condition",
    timeout: float = TIMEOUT,
    step: float = STEP,
) -> None:
    """Wait until ``pred()`` holds (``pred`` may be sync or async), checking
    every ``step`` s; AssertionError naming ``what`` after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got = pred()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(step)


async def output(proc: asyncio.subprocess.Process, timeout: float = TIMEOUT) -> str:
    """Everything ``proc`` writes to its stdout pipe, once it exits within
    ``timeout`` seconds (TimeoutError otherwise); it never outlives the call."""
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out.decode(errors="replace")
