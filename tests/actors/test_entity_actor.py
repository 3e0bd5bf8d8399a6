"""The runtime as an application uses it: one actor per entity, owning its
file (loaded in ``on_start``, saved in ``on_stop``), started on demand by a
registry and stopped when idle (docs/ACTORS.md)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from guildcast.actors import Actor, ActorExited, Registry
from tests.actors.support import Boom
from tests.support.wait import TIMEOUT


class Card(Actor):
    """A card that keeps a list of notes in ``<dir>/<name>.json``. Its save
    in ``on_stop`` awaits ``gate`` (a slow disk), to hold the window open."""

    def __init__(self, name: str, folder: Path, gate: asyncio.Event | None = None) -> None:
        super().__init__(name)
        self.path = folder / f"{name}.json"
        self.gate = gate
        self.notes: list[str] = []
        self.saving = asyncio.Event()

    async def on_start(self) -> None:
        if self.path.exists():
            self.notes = json.loads(await asyncio.to_thread(self.path.read_text))

    async def on_stop(self, reason: BaseException | None) -> None:
        self.saving.set()
        if self.gate is not None:
            await self.gate.wait()
        data = json.dumps(self.notes)
        tmp = self.path.with_suffix(".tmp")
        await asyncio.to_thread(tmp.write_text, data)
        await asyncio.to_thread(tmp.replace, self.path)

    async def handle(self, msg: Any) -> Any:
        if msg == "crash":
            raise Boom(self.name)
        self.notes.append(msg)
        return len(self.notes)  # the acknowledgement


async def test_a_lookup_during_on_stop_waits_for_the_save(tmp_path: Path) -> None:
    """Two acknowledged updates, the second sent while the first instance is
    still saving in ``on_stop``: both are in the file. (The registry used to
    start the second instance at once; it loaded the file before the first
    had saved, and its own save lost the first update.)"""
    gate = asyncio.Event()
    async with asyncio.timeout(TIMEOUT), Registry(lambda n: Card(n, tmp_path, gate)) as reg:
        first = reg.lookup_or_start("card-1")
        assert await first.call("first note") == 1
        first.stop()
        await first.saving.wait()  # inside on_stop, its save not yet written
        second = reg.lookup_or_start("card-1")
        assert second is not first
        ack = second.call_nowait("second note")
        gate.set()
        assert await ack == 2  # it started from the first one's file
    assert json.loads((tmp_path / "card-1.json").read_text()) == ["first note", "second note"]


async def test_the_registry_block_ends_with_live_actors_and_saves_them(tmp_path: Path) -> None:
    """Leaving ``async with Registry(...)`` stops every actor (their
    ``on_stop`` runs to the end) even though none was idle."""
    async with asyncio.timeout(TIMEOUT):
        async with Registry(lambda n: Card(n, tmp_path)) as reg:
            for i in range(20):
                assert await reg.lookup_or_start(f"c{i}").call(f"note {i}") == 1
            assert len(reg) == 20
        assert len(reg) == 0
    for i in range(20):
        assert json.loads((tmp_path / f"c{i}.json").read_text()) == [f"note {i}"]


async def test_crash_policy_is_restart_on_next_lookup(tmp_path: Path) -> None:
    """A crash is logged, the actor's ``on_stop`` still runs (its state up
    to the crash is saved), monitors see the exception, and the next lookup
    starts a fresh instance from the file."""
    async with asyncio.timeout(TIMEOUT), Registry(lambda n: Card(n, tmp_path)) as reg:
        a = reg.lookup_or_start("c")
        assert await a.call("kept") == 1
        reasons: list[BaseException | None] = []
        a.monitor(lambda _a, why: reasons.append(why))
        with pytest.raises(Boom):
            await a.call("crash")
        await a.wait()
        assert len(reasons) == 1 and isinstance(reasons[0], Boom)
        with pytest.raises(ActorExited):
            a.call_nowait("late")
        b = reg.lookup_or_start("c")
        assert b is not a
        assert await b.call("after") == 2
    assert json.loads((tmp_path / "c.json").read_text()) == ["kept", "after"]


async def test_a_registry_without_a_task_group_must_be_entered(tmp_path: Path) -> None:
    reg: Registry[Card] = Registry(lambda n: Card(n, tmp_path))
    with pytest.raises(RuntimeError, match="async with"):
        reg.lookup_or_start("c")


async def test_leaving_the_registry_runs_a_waiting_successor(tmp_path: Path) -> None:
    """When the block ends while a predecessor is still saving, the
    successor runs once it is free (stop_all waits for it) and its queued call
    is answered, not dropped."""
    gate = asyncio.Event()
    async with asyncio.timeout(TIMEOUT):
        async with Registry(lambda n: Card(n, tmp_path, gate)) as reg:
            first = reg.lookup_or_start("x")
            assert await first.call("one") == 1
            first.stop()
            await first.saving.wait()
            second = reg.lookup_or_start("x")
            ack = second.call_nowait("two")
            gate.set()
        assert await ack == 2
    assert json.loads((tmp_path / "x.json").read_text()) == ["one", "two"]
