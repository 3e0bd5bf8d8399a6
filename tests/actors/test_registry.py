"""The registry (server/actors/registry.py): unique names, start on demand, restart."""

from __future__ import annotations

import asyncio

import pytest

from guildcast.actors.registry import Registry, RegistryFull
from tests.actors.support import Recorder, scope


class SlowStart(Recorder):
    """An actor whose ``on_start`` awaits ``opened`` before any message."""

    def __init__(self, name: str, opened: asyncio.Event) -> None:
        super().__init__(name)
        self.opened = opened

    async def on_start(self) -> None:
        await self.opened.wait()
        self.started.set()


async def test_concurrent_lookup_or_start_starts_exactly_one_actor() -> None:
    opened = asyncio.Event()
    made: list[SlowStart] = []

    def factory(name: str) -> SlowStart:
        a = SlowStart(name, opened)
        made.append(a)
        return a

    async with scope() as tg:
        reg: Registry[SlowStart] = Registry(factory, tg)
        go = asyncio.Event()

        async def lookup() -> SlowStart:
            await go.wait()
            await asyncio.sleep(0)
            a = reg.lookup_or_start("guild-1")
            a.cast(("from", id(asyncio.current_task())))
            return a

        tasks = [asyncio.create_task(lookup()) for _ in range(200)]
        await asyncio.sleep(0)
        go.set()
        first = await asyncio.gather(*tasks)
        assert len(made) == 1 and reg.started == 1
        assert all(a is made[0] for a in first)
        # A second wave while the first actor is still inside on_start.
        assert not made[0].started.is_set()
        second = await asyncio.gather(*(lookup() for _ in range(50)))
        assert all(a is made[0] for a in second)
        assert len(made) == 1 and len(reg) == 1 and reg.names() == ["guild-1"]
        # Once started, it handles everything that was cast meanwhile.
        opened.set()
        assert await made[0].call("done") == ("reply", "done")
        assert len(made[0].seen) == 251


async def test_lookup_does_not_start() -> None:
    async with scope() as tg:
        reg: Registry[Recorder] = Registry(Recorder, tg)
        assert reg.lookup("x") is None and len(reg) == 0
        a = reg.lookup_or_start("x")
        assert reg.lookup("x") is a and list(reg) == [a]


async def test_crashed_actor_is_unregistered_and_restarted_on_next_lookup() -> None:
    async with scope() as tg:
        reg: Registry[Recorder] = Registry(Recorder, tg)
        a = reg.lookup_or_start("g")
        a.cast("crash")
        await a.wait()
        assert reg.lookup("g") is None
        b = reg.lookup_or_start("g")
        assert b is not a and b.alive and reg.started == 2
        assert await b.call("hello") == ("reply", "hello")
        # The old actor's exit does not unregister its successor.
        assert reg.lookup("g") is b


async def test_stopped_and_idle_actors_are_unregistered() -> None:
    async with scope() as tg:
        reg: Registry[Recorder] = Registry(lambda n: Recorder(n, idle_timeout=0.02), tg)
        a = reg.lookup_or_start("idle")
        await a.wait()
        assert reg.lookup("idle") is None
        b = reg.lookup_or_start("idle")
        assert b is not a


async def test_max_actors() -> None:
    async with scope() as tg:
        reg: Registry[Recorder] = Registry(Recorder, tg, max_actors=2)
        a = reg.lookup_or_start("a")
        reg.lookup_or_start("b")
        assert reg.lookup_or_start("a") is a  # a live one is still found
        with pytest.raises(RegistryFull):
            reg.lookup_or_start("c")
        a.stop()
        await a.wait()
        assert reg.lookup_or_start("c").name == "c"


async def test_stop_all() -> None:
    async with scope() as tg:
        reg: Registry[Recorder] = Registry(Recorder, tg)
        actors = [reg.lookup_or_start(f"a{i}") for i in range(10)]
        for a in actors:
            a.cast("work")
        await reg.stop_all()
        assert len(reg) == 0
        assert all(not a.alive and a.seen == ["work"] for a in actors)


class SlowStop(Recorder):
    """An actor whose ``on_stop`` awaits ``release`` (say, a broker round trip)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.stopping = asyncio.Event()
        self.release = asyncio.Event()

    async def on_stop(self, reason: BaseException | None) -> None:
        self.stopping.set()
        await self.release.wait()


async def test_an_exiting_actor_is_not_handed_out() -> None:
    """Between its last message and its exit hooks an actor is already dead
    (casts to it are dropped): lookups must not return it. They get the
    successor, which answers only once the predecessor has finished."""
    async with scope() as tg:
        reg: Registry[SlowStop] = Registry(SlowStop, tg)
        old = reg.lookup_or_start("g")
        old.stop()
        await old.stopping.wait()
        assert not old.alive
        assert reg.lookup("g") is None
        new = reg.lookup_or_start("g")
        assert new is not old and new.alive
        assert reg.lookup_or_start("g") is new  # one successor, not one per lookup
        reply = new.call_nowait("hello")
        await asyncio.sleep(0)  # give a (wrongly) running successor its chance
        assert not new.has_started and not reply.done()
        old.release.set()
        await old.wait()
        assert await reply == ("reply", "hello")
        # The old actor's exit does not unregister its successor.
        assert reg.lookup("g") is new and len(reg) == 1
        new.release.set()
