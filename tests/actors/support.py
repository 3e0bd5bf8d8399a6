"""Test helpers for the actor tests: a task-group scope and a recording actor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from guildcast.actors.actor import Actor
from tests.support.wait import TIMEOUT


@asynccontextmanager
async def scope(timeout: float = TIMEOUT) -> AsyncIterator[asyncio.TaskGroup]:
    """A task group that owns the test's actors, bounded by ``timeout`` (a
    hang fails instead of blocking the suite); on exit every actor task
    still running is cancelled, so a test never waits on a forgotten actor."""
    async with asyncio.timeout(timeout), asyncio.TaskGroup() as tg:
        try:
            yield tg
        finally:
            me = asyncio.current_task()
            for t in asyncio.all_tasks():
                if t is not me and t.get_name().startswith("actor:"):
                    t.cancel()


class Boom(Exception):
    """The exception a crashing test actor raises."""


class Recorder(Actor):
    """Records what it handles. ``"crash"`` raises :class:`Boom`; ``"block"``
    waits for :attr:`gate`; ``("slow-crash",)`` waits for the gate then raises;
    an :class:`asyncio.Event` is set (and recorded as ``"mark"``)."""

    def __init__(self, name: str = "rec", **kw: Any) -> None:
        super().__init__(name, **kw)
        self.seen: list[Any] = []
        self.gate = asyncio.Event()
        self.handling = asyncio.Event()
        self.started = asyncio.Event()
        self.stop_reasons: list[BaseException | None] = []

    async def on_start(self) -> None:
        self.started.set()

    async def on_stop(self, reason: BaseException | None) -> None:
        self.stop_reasons.append(reason)

    async def handle(self, msg: Any) -> Any:
        if isinstance(msg, asyncio.Event):  # a marker: "you got this far"
            msg.set()
            self.seen.append("mark")
            return None
        if msg == "crash":
            raise Boom(f"{self.name} crashed")
        if msg == "block" or msg == ("slow-crash",):
            self.handling.set()
            await self.gate.wait()
            if msg == ("slow-crash",):
                raise Boom(f"{self.name} crashed late")
        self.seen.append(msg)
        return ("reply", msg)
