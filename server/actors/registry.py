"""Registry: unique names to live actors, started on demand (Elixir's Registry).

Consistency model: single event loop, so a name maps to at most one actor at
any time, and **two instances of one name never run at once**.
``lookup_or_start`` checks and registers with no await in between, so
concurrent lookups of one name get one actor. An actor that is exiting (its
``on_stop`` may still be awaiting, saving its file, say) holds its name until
it has finished: a lookup in that window gets the *successor*, registered at
once and accepting casts and calls into its mailbox, but started only after
the predecessor's ``on_stop`` has returned and its exit hooks have run. So a
successor's ``on_start`` always sees what its predecessor's ``on_stop``
saved, and nothing sent to the name in between is lost or handled twice.

Crash policy: restart on next lookup. An actor that crashes is logged,
unregistered and its monitors told why; the next ``lookup_or_start`` of its
name starts a fresh instance from the factory. There is no restart intensity
limit: an actor that crashes on every message crashes once per lookup, which
its callers see as :class:`~guildcast.actors.actor.ActorExited`.

Full registry: when ``max_actors`` are registered, a start first looks for
an actor the ``evictable`` predicate accepts (for guilds: no subscriber,
nothing queued), oldest first, at most :data:`EVICT_SCAN` per start; it is
asked to stop and stops counting against ``max_actors`` at once (while its
last step runs it is *exiting*: a lookup of its name gets a successor that
waits for it, as above). Actors found not evictable move to the back, so the
next scan sees others. Only when none is found is the start refused
(:class:`RegistryFull`).

A registry is an async context manager: ``async with Registry(factory) as
reg`` owns a TaskGroup for its actors and stops them all on exit (so the
block ends even while actors are alive); given a TaskGroup, it uses that
one and still stops its actors on exit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from itertools import islice
from types import TracebackType
from typing import Generic, TypeVar

from guildcast.actors.actor import Actor, ActorExited
from guildcast.core.failures import Kind, Overloaded

A = TypeVar("A", bound=Actor)

#: Actors one start may look at for one to evict: bounds the work of a start
#: at about a hundred microseconds when the registry is full.
EVICT_SCAN = 1024


class Registry(Generic[A]):
    """Maps names to actors of one kind, made by ``factory(name)``.

    ``max_actors`` bounds how many may be registered at once; past it (and
    with nothing ``evictable``) ``lookup_or_start`` raises
    :class:`RegistryFull`, so memory stays bounded. ``tg`` is the TaskGroup
    that owns the actors' tasks; without one, the registry must be entered
    (``async with``) and owns its own.
    """

    def __init__(
        self,
        factory: Callable[[str], A],
        tg: asyncio.TaskGroup | None = None,
        max_actors: int | None = None,
        evictable: Callable[[A], bool] | None = None,
    ) -> None:
        self._factory = factory
        self._tg = tg
        self._own_tg: asyncio.TaskGroup | None = None
        #: In start order, except that scans move unevictable actors back.
        self._actors: dict[str, A] = {}
        #: Evicted actors still running their last step, by name.
        self._exiting: dict[str, A] = {}
        self.max_actors = max_actors
        self.evictable = evictable
        self.started = 0
        #: Actors stopped to make room (``guildcast_guild_actors_evicted_total``).
        self.evicted = 0

    async def __aenter__(self) -> Registry[A]:
        if self._tg is None:
            self._own_tg = asyncio.TaskGroup()
            self._tg = await self._own_tg.__aenter__()
        return self

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.stop_all()
        finally:
            own, self._own_tg = self._own_tg, None
            if own is not None:
                self._tg = None
                await own.__aexit__(et, exc, tb)

    def lookup(self, name: str) -> A | None:
        """The live actor registered as ``name`` (maybe a successor waiting
        for its predecessor to finish), or None."""
        actor = self._actors.get(name)
        return actor if actor is not None and actor.alive else None

    def lookup_or_start(self, name: str) -> A:
        """The live actor for ``name``, starting one through the factory if none.

        Raises :class:`RegistryFull` past ``max_actors``, and RuntimeError if
        the registry has no TaskGroup (not entered, or already exited).
        """
        actor = self._actors.get(name)
        if actor is not None:
            if actor.alive:
                return actor
            # Exiting: its on_stop may still run. The successor takes the name
            # now (so casts queue in its mailbox) and starts when it has finished.
            return self._succeed(actor)
        if self.max_actors is not None and len(self._actors) >= self.max_actors:
            if not self._evict_one():
                raise RegistryFull(
                    f"{len(self._actors)} actors alive: the most this registry holds"
                )
        evicted = self._exiting.get(name)
        if evicted is not None:
            return self._succeed(evicted)
        new = self._new(name)
        self._actors[name] = new
        self._start(new)
        return new

    def _succeed(self, predecessor: A) -> A:
        successor = self._new(predecessor.name)
        self._actors[predecessor.name] = successor
        predecessor.add_exit_hook(lambda _old: self._start(successor))
        return successor

    def _new(self, name: str) -> A:
        if self._tg is None:
            raise RuntimeError("the registry has no TaskGroup: use `async with Registry(...)`")
        new = self._factory(name)
        new.add_exit_hook(self._unregister)
        return new

    def _start(self, actor: A) -> None:
        if actor.has_started or actor.has_finished:
            return
        try:
            if self._tg is None:
                raise RuntimeError("the registry has exited")
            actor.start(self._tg)
        except RuntimeError as e:  # the TaskGroup is finished: nothing can run it
            actor.discard(ActorExited(f"{actor.name}: not started ({e})"))
            return
        self.started += 1

    def _evict_one(self) -> bool:
        """Stop the oldest evictable actor and free its slot; False if none."""
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
            if not actor.has_finished:
                self._exiting[name] = actor
                actor.add_exit_hook(self._forget_exiting)
            actor.stop()
            self.evicted += 1
            return True
        return False

    def _forget_exiting(self, actor: object) -> None:
        assert isinstance(actor, Actor)
        name = actor.name
        if self._exiting.get(name) is actor:
            del self._exiting[name]

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
        """Stop every actor (successors and evicted ones included) and wait
        until each has finished."""
        while self._actors or self._exiting:
            actors = [*self._actors.values(), *self._exiting.values()]
            for a in actors:
                a.stop()
            for a in actors:
                await a.wait()


class RegistryFull(Overloaded):
    """``max_actors`` are alive already."""

    kind = Kind.REGISTRY_FULL
