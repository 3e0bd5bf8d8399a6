"""The actor runtime, public for applications (docs/ACTORS.md), and the
fanout actors built on it (guild, partition, hub).

``from guildcast.actors import Actor, Registry, Groups``: one actor per
entity, started on demand by a registry, stopped when idle, members of
pg-style process groups.
"""

from guildcast.actors.actor import (
    DEFAULT_MAILBOX_BOUND,
    Actor,
    ActorExited,
    CallTimeout,
    MailboxFull,
    Monitor,
)
from guildcast.actors.groups import GroupEvent, GroupMonitor, Groups
from guildcast.actors.registry import Registry, RegistryFull

__all__ = [
    "DEFAULT_MAILBOX_BOUND",
    "Actor",
    "ActorExited",
    "CallTimeout",
    "GroupEvent",
    "GroupMonitor",
    "Groups",
    "MailboxFull",
    "Monitor",
    "Registry",
    "RegistryFull",
]
