"""Process groups in the manner of Erlang's ``pg``.

A :class:`Groups` is one scope: a table of group name -> members. Members
are any objects with ``add_exit_hook`` (actors, gateway connections); a
member that exits leaves all its groups by itself. ``monitor(group, fn)``
calls ``fn(event, group, member)`` on every join and leave of that group,
synchronously and in order, so a monitor that forwards into an actor's
mailbox sees changes in the order they happened.

Consistency model: one scope is local to one node and one event loop, so
``members`` is exact and equals ``local_members``. There is no cluster
implementation of this interface: in cluster mode the groups stay local to
each node (a node's guild actor fans out to its own sessions) and what spans
nodes is presence, kept by the Redis broker (``guildcast.broker.redis``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from enum import Enum
from typing import Any, Protocol


class GroupEvent(Enum):
    JOIN = "join"
    LEAVE = "leave"


GroupMonitor = Callable[[GroupEvent, str, Any], None]


class GroupScope(Protocol):
    """The interface of a group scope (:class:`Groups` is the one implementation)."""

    scope: str

    def join(self, group: str, member: Any) -> None: ...
    def leave(self, group: str, member: Any) -> bool: ...
    def members(self, group: str) -> list[Any]: ...
    def local_members(self, group: str) -> list[Any]: ...
    def which_groups(self, member: Any = None) -> list[str]: ...
    def monitor(self, group: str, fn: GroupMonitor) -> Callable[[], None]: ...


class Groups:
    """One pg scope on this node."""

    def __init__(self, scope: str = "default") -> None:
        self.scope = scope
        # Insertion-ordered dicts used as sets: stable member order.
        self._groups: dict[str, dict[Hashable, None]] = {}
        self._member_groups: dict[Hashable, dict[str, None]] = {}
        self._monitors: dict[str, list[GroupMonitor]] = {}

    def join(self, group: str, member: Any) -> None:
        """Add ``member`` to ``group`` (no-op if already in it)."""
        g = self._groups.setdefault(group, {})
        if member in g:
            return
        g[member] = None
        mg = self._member_groups.get(member)
        if mg is None:
            mg = self._member_groups[member] = {}
            member.add_exit_hook(self._member_exited)
        mg[group] = None
        self._notify(GroupEvent.JOIN, group, member)

    def leave(self, group: str, member: Any) -> bool:
        """Remove ``member`` from ``group``; False if it was not in it."""
        g = self._groups.get(group)
        if g is None or member not in g:
            return False
        del g[member]
        if not g:
            del self._groups[group]
        mg = self._member_groups.get(member)
        if mg is not None:
            # The row stays (possibly empty) until the member exits, so its
            # one exit hook is registered once however often it rejoins.
            mg.pop(group, None)
        self._notify(GroupEvent.LEAVE, group, member)
        return True

    def members(self, group: str) -> list[Any]:
        """All members of ``group`` (on one node: the local ones)."""
        return list(self._groups.get(group, ()))

    def local_members(self, group: str) -> list[Any]:
        return list(self._groups.get(group, ()))

    def count(self, group: str) -> int:
        return len(self._groups.get(group, ()))

    def which_groups(self, member: Any = None) -> list[str]:
        """Groups ``member`` is in, or every non-empty group if ``member`` is None."""
        if member is None:
            return list(self._groups)
        return list(self._member_groups.get(member, ()))

    def monitor(self, group: str, fn: GroupMonitor) -> Callable[[], None]:
        """Call ``fn(event, group, member)`` on each join/leave; returns a demonitor."""
        fns = self._monitors.setdefault(group, [])
        fns.append(fn)

        def demonitor() -> None:
            lst = self._monitors.get(group)
            if lst is not None and fn in lst:
                lst.remove(fn)
                if not lst:
                    del self._monitors[group]

        return demonitor

    def _notify(self, event: GroupEvent, group: str, member: Any) -> None:
        fns = self._monitors.get(group)
        if fns:
            for fn in list(fns):
                fn(event, group, member)

    def _member_exited(self, member: Any) -> None:
        for group in list(self._member_groups.get(member, ())):
            self.leave(group, member)
        self._member_groups.pop(member, None)
