"""A kanban service on Guildcast's actor runtime: one actor per card owning
its file, one actor per board owning its columns and its guild, and an
embedded Guildcast fanning every accepted change out to the open pages.
See ``examples/kanban/README.md`` and docs/ACTORS.md."""

from .app import Kanban, Settings, make_app

__all__ = ["Kanban", "Settings", "make_app"]
