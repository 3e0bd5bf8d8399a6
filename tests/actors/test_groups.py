"""pg-style process groups (server/actors/groups.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from guildcast.actors.groups import GroupEvent, Groups
from tests.actors.support import Recorder, scope

JOIN, LEAVE = GroupEvent.JOIN, GroupEvent.LEAVE


class Member:
    """A group member that reports its own exit, like a connection does."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hooks: list[Callable[[object], None]] = []

    def __repr__(self) -> str:
        return f"<Member {self.name}>"

    def add_exit_hook(self, hook: Callable[[object], None]) -> None:
        self.hooks.append(hook)

    def exit(self) -> None:
        hooks, self.hooks = self.hooks, []
        for h in hooks:
            h(self)


def recorder(groups: Groups, group: str) -> list[tuple[GroupEvent, str, Any]]:
    seen: list[tuple[GroupEvent, str, Any]] = []
    groups.monitor(group, lambda ev, g, m: seen.append((ev, g, m)))
    return seen


def test_join_leave_members_which_groups() -> None:
    groups = Groups("scope-1")
    assert groups.scope == "scope-1"
    a, b, c = Member("a"), Member("b"), Member("c")
    groups.join("g1", a)
    groups.join("g1", b)
    groups.join("g2", a)
    groups.join("g1", a)  # already in: no-op
    assert groups.members("g1") == [a, b]
    assert groups.local_members("g1") == [a, b]
    assert groups.members("g2") == [a]
    assert groups.count("g1") == 2
    assert groups.members("nobody") == [] and groups.count("nobody") == 0
    assert groups.which_groups(a) == ["g1", "g2"]
    assert groups.which_groups(b) == ["g1"]
    assert groups.which_groups(c) == []
    assert sorted(groups.which_groups()) == ["g1", "g2"]
    assert groups.leave("g1", a) is True
    assert groups.leave("g1", a) is False
    assert groups.leave("never", c) is False
    assert groups.members("g1") == [b]
    assert groups.which_groups(a) == ["g2"]
    groups.leave("g2", a)
    assert groups.which_groups() == ["g1"]  # empty groups vanish
    # Each member registers one exit hook however often it joins.
    groups.join("g3", a)
    assert len(a.hooks) == 1


def test_monitor_sees_joins_and_leaves_in_order() -> None:
    groups = Groups()
    seen = recorder(groups, "g")
    other = recorder(groups, "other")
    a, b = Member("a"), Member("b")
    groups.join("g", a)
    groups.join("g", b)
    groups.join("g", a)  # no change, no notification
    groups.leave("g", a)
    groups.join("other", a)
    groups.leave("g", b)
    groups.join("g", a)
    assert seen == [
        (JOIN, "g", a),
        (JOIN, "g", b),
        (LEAVE, "g", a),
        (LEAVE, "g", b),
        (JOIN, "g", a),
    ]
    assert other == [(JOIN, "other", a)]


def test_demonitor() -> None:
    groups = Groups()
    seen: list[Any] = []
    stop = groups.monitor("g", lambda ev, g, m: seen.append(ev))
    a = Member("a")
    groups.join("g", a)
    stop()
    stop()  # idempotent
    groups.leave("g", a)
    assert seen == [JOIN]


def test_member_exit_leaves_every_group_with_notifications() -> None:
    groups = Groups()
    seen1, seen2 = recorder(groups, "g1"), recorder(groups, "g2")
    a, b = Member("a"), Member("b")
    for g in ("g1", "g2", "g3"):
        groups.join(g, a)
    groups.join("g1", b)
    a.exit()
    assert groups.which_groups(a) == []
    assert groups.members("g1") == [b] and groups.members("g2") == []
    assert sorted(groups.which_groups()) == ["g1"]
    assert seen1 == [(JOIN, "g1", a), (JOIN, "g1", b), (LEAVE, "g1", a)]
    assert seen2 == [(JOIN, "g2", a), (LEAVE, "g2", a)]
    # A member that rejoins after a leave-all is tracked afresh.
    c = Member("c")
    groups.join("g1", c)
    groups.leave("g1", c)
    c.exit()
    assert groups.which_groups(c) == []


async def test_actor_member_leaves_its_groups_when_it_exits() -> None:
    async with scope() as tg:
        groups = Groups()
        seen = recorder(groups, "g")
        a, b = Recorder("a"), Recorder("b")
        a.start(tg)
        b.start(tg)
        groups.join("g", a)
        groups.join("g", b)
        groups.join("h", a)
        a.cast("crash")
        await a.wait()
        b.stop()
        await b.wait()
        assert groups.which_groups() == []
        assert seen == [(JOIN, "g", a), (JOIN, "g", b), (LEAVE, "g", a), (LEAVE, "g", b)]
