"""Registry: unique names to live actors, started on demand (Elixir's Registry).

Consistency model: single event loop, so a name maps to at most one live
actor at any time. ``lookup_or_start`` checks and registers with no await in
between, so concurrent lookups of one name start exactly one actor. An actor
is unregistered by its own exit hook, before its monitors run; the next
``lookup_or_start`` of that name starts a fresh one (restart on demand).

Full registry: when ``max_actors`` are alive, a start first looks for an
actor the ``evictable`` predicate accepts (for guilds: no subscriber,
nothing queued), oldest first, at most :data:`EVICT_SCAN` per start; it is
asked to stop and its name is freed at once (its successor may overlap its
last step, which the brokers allow). Actors found not evictable move to the
back, so the next scan sees others. Only when none is found is the start
refused (:class:`RegistryFull`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Generic, TypeVar

from guildcast.actors.actor import Actor

A = TypeVar("A", bound=Actor)

#: Actors one start may look at for one to evict: bounds the work of a start
#: at about a hundred microseconds when the registry is full.
EVICT_SCAN = 1024


class Registry(Generic[A]):
    """Maps names to actors of one kind, made by ``factory(name)``.

    ``max_actors`` bounds how many may be alive at once; past it
    ``lookup_or_start`` raises :class:`RegistryFull` (memory stays bounded).
    """

    def __init__(
        self,
        factory: Callable[[str], A],
        tg: asyncio.TaskGroup,
        max_actors: int | None = None,
        evictable: Callable[[A], bool] | None = None,
    ) -> None:
        self._factory = factory
        self._tg = tg
        #: In start order, except that scans move unevictable actors back.
        self._actors: dict[str, A] = {}
        self.max_actors = max_actors
        self.evictable = evictable
        self.started = 0
        #: Actors stopped to make room (``guildcast_guild_actors_evicted_total``).
        self.evicted = 0

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
            if not self._evict_one():
                raise RegistryFull(f"{len(self._actors)} actors alive")
        new = self._factory(name)
        self._actors[name] = new
        new.add_exit_hook(self._unregister)
        new.start(self._tg)
        self.started += 1
        return new

    def _evict_one(self) -> bool:
        """Stop the oldest evictable actor and free its name; False if none."""
        pred = self.evictable
        if pred is None:
            return False
        actors = self._actors
        for name in list(islice(actors, EVICT_SCAN)):
            actor = actors[name]
            if actor.alive and not pred(actor):
                del actors[name]  # to the back: the next scan looks at others
                actors[name] = actor
                continue
            del actors[name]
            actor.stop()
            self.evicted += 1
            return True
        return False

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
