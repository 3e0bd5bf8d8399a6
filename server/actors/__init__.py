"""Actors: the runtime (actor, registry, process groups) and the fanout actors."""
