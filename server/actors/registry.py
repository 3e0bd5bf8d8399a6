"""Registry: unique names to live actors, started on demand (Elixir's Registry).

Consistency model: single event loop, so a name maps to at most one actor at
any time, and **two instances of one name never run at once**.
``lookup_or_start`` checks and registers with no await in between, so
concurrent lookups of one name get one actor. An actor that is exiting (its
``on_stop`` may still be awaiting, saving its file, say) keeps its name until
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

A registry is an async context manager: ``async with Registry(factory) as
reg`` owns a TaskGroup for its actors and stops them all on exit (so the
block ends even while actors are alive); given a TaskGroup, it uses that
one and still stops its actors on exit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Generic, TypeVar

from guildcast.actors.actor import Actor, ActorExited

A = TypeVar("A", bound=Actor)


class Registry(Generic[A]):
    """Maps names to actors of one kind, made by ``factory(name)``.

    ``max_actors`` bounds how many may be registered at once; past it
    ``lookup_or_start`` raises :class:`RegistryFull` (memory stays bounded).
    ``tg`` is the TaskGroup that owns the actors' tasks; without one, the
    registry must be entered (``async with``) and owns its own.
    """

    def __init__(
        self,
        factory: Callable[[str], A],
        tg: asyncio.TaskGroup | None = None,
        max_actors: int | None = None,
    ) -> None:
        self._factory = factory
        self._tg = tg
        self._own_tg: asyncio.TaskGroup | None = None
        self._actors: dict[str, A] = {}
        self.max_actors = max_actors
        self.started = 0

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
            successor = self._new(name)
            self._actors[name] = successor
            actor.add_exit_hook(lambda _old: self._start(successor))
            return successor
        if self.max_actors is not None and len(self._actors) >= self.max_actors:
            raise RegistryFull(f"{len(self._actors)} actors alive")
        new = self._new(name)
        self._actors[name] = new
        self._start(new)
        return new

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
        """Stop every registered actor (successors included) and wait until
        each has finished."""
        while self._actors:
            actors = list(self._actors.values())
            for a in actors:
                a.stop()
            for a in actors:
                await a.wait()


class RegistryFull(Exception):
    """``max_actors`` are alive already."""
