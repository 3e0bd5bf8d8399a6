"""Idle detection of :class:`Actor` (``idle_timeout``): one timer per idle
period, re-armed lazily, so ``on_idle`` runs only after ``idle_timeout`` s
without a message, messages racing the timer are never lost, and a busy
actor is never told it is idle."""

from __future__ import annotations

import asyncio
from typing import Any

from guildcast.actors.actor import Actor
from tests.actors.support import scope


class Watch(Actor):
    """Records when it handled each message and when it was told it is idle."""

    def __init__(self, idle_timeout: float, stop_after: int) -> None:
        super().__init__("watch", idle_timeout=idle_timeout)
        self.loop = asyncio.get_running_loop()
        self.handled: list[float] = []
        self.idle: list[float] = []
        self.stop_after = stop_after
        self.idled = asyncio.Event()

    async def handle(self, msg: Any) -> Any:
        if msg == "slow":
            await asyncio.sleep(0.1)  # busy in a handler longer than idle_timeout
        self.handled.append(self.loop.time())
        return msg

    def on_idle(self) -> bool:
        self.idle.append(self.loop.time())
        self.idled.set()
        return len(self.idle) >= self.stop_after


async def test_on_idle_only_after_idle_timeout_without_a_message() -> None:
    async with scope() as tg:
        a = Watch(idle_timeout=0.05, stop_after=3)
        a.start(tg)
        for _ in range(40):  # messages closer together than the timeout...
            a.cast("m")
            await asyncio.sleep(0.005)
        a.cast("slow")  # ...and one handler that outlasts it
        await a.wait()  # then three idle periods, and it stops
        assert len(a.handled) == 41 and len(a.idle) == 3
        # Every idle call came at least idle_timeout after the message before
        # it (minus the timer slack), whatever the scheduling delays were.
        for t in a.idle:
            last = max([h for h in a.handled if h <= t], default=None)
            assert last is not None and t - last >= 0.05 - 0.002, (t, last)


async def test_a_message_racing_the_idle_timer_is_handled() -> None:
    async with scope() as tg:
        a = Watch(idle_timeout=0.01, stop_after=1_000_000)
        a.start(tg)
        # Cast right as idle periods end, many times: none is lost, no error.
        for i in range(50):
            await a.idled.wait()
            a.idled.clear()
            a.cast(i)
        assert await a.call("done", timeout=10) == "done"
        assert len(a.handled) == 51
        a.stop()
        await a.wait()
        assert a.exit_reason is None
