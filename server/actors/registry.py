"""Registry: unique names to live actors, started on demand (Elixir's Registry).

Consistency model: single event loop, so a name maps to at most one live
actor at any time. ``lookup_or_start`` checks and registers with no await in
between, so concurrent lookups of one name start exactly one actor. An actor
is unregistered by its own exit hook, before its monitors run; the next
``lookup_or_start`` of that name starts a fresh one (restart on demand).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from guildcast.actors.actor import Actor

A = TypeVar("A", bound=Actor)


class Registry(Generic[A]):
    """Maps names to actors of one kind, made by ``factory(name)``.

    ``max_actors`` bounds how many may be alive at once; past it
    ``lookup_or_start`` raises :class:`RegistryFull` (memory stays bounded).
    """

    def __init__(
        self, factory: Callable[[str], A], tg: asyncio.TaskGroup, max_actors: int | None = None
    ) -> None:
        self._factory = factory
        self._tg = tg
        self._actors: dict[str, A] = {}
        self.max_actors = max_actors
        self.started = 0

    def lookup(self, name: str) -> A | None:
        """The live actor registered as ``name``, or None."""
        actor = self._actors.get(name)
        return actor if actor is not None and actor.alive else None

    def lookup_or_start(self, name: str) -> A:
        """The live actor for ``name``, starting one through the factory if none."""
        actor = self._actors.get(name)
        if actor is not None:
            if actor.alive:
                return actor
            # Exiting (in ``on_stop``, before its exit hooks ran): casts to it
            # would be dropped, so a fresh actor takes the name now.
            del self._actors[name]
        if self.max_actors is not None and len(self._actors) >= self.max_actors:
            raise RegistryFull(f"{len(self._actors)} actors alive")
        new = self._factory(name)
        self._actors[name] = new
        new.add_exit_hook(self._unregister)
        new.start(self._tg)
        self.started += 1
        return new

    def _unregister(self, actor: object) -> None:
        assert isinstance(actor, Actor)
        name = actor.name
        if self._actors.get(name) is actor:
            del self._actors[name]

    def __len__(self) -> int:
        return len(self._actors)

    def __iter__(self) -> Iterator[A]:
        return iter(list(self._actors.values()))

    def names(self) -> list[str]:
        return list(self._actors)

    async def stop_all(self) -> None:
        """Stop every registered actor and wait for them to exit."""
        actors = list(self._actors.values())
        for a in actors:
            a.stop()
        for a in actors:
            await a.wait()


class RegistryFull(Exception):
    """``max_actors`` are alive already."""
