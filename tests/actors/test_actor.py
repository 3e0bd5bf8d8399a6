"""The actor runtime (server/actors/actor.py): cast, call, bounds, crash, idle."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from guildcast.actors.actor import Actor, ActorExited, CallTimeout, MailboxFull
from guildcast.actors.groups import GroupEvent, Groups
from guildcast.actors.registry import Registry
from tests.actors.support import Boom, Recorder, scope
from tests.support.wait import until


async def test_cast_and_call_are_handled_in_order() -> None:
    async with scope() as tg:
        a = Recorder()
        a.start(tg)
        for i in range(5):
            a.cast(i)
        assert await a.call("last") == ("reply", "last")
        assert a.seen == [0, 1, 2, 3, 4, "last"]
        a.stop()
        await a.wait()
        assert not a.alive and a.exit_reason is None
        assert a.stop_reasons == [None]


async def test_start_twice_is_an_error() -> None:
    async with scope() as tg:
        a = Recorder()
        a.start(tg)
        with pytest.raises(RuntimeError):
            a.start(tg)


async def test_call_timeout() -> None:
    async with scope() as tg:
        a = Recorder()
        a.start(tg)
        with pytest.raises(CallTimeout) as info:
            await a.call("block", timeout=0.05)
        assert isinstance(info.value, TimeoutError)
        # The actor is fine: it answers the next call once unblocked, and the
        # late reply to the abandoned call goes nowhere.
        a.gate.set()
        assert await a.call("after", timeout=10) == ("reply", "after")
        assert a.seen == ["block", "after"]
        assert a.alive


async def test_mailbox_bound_and_overflow_policy() -> None:
    async with scope() as tg:
        a = Recorder(mailbox_bound=3)
        a.start(tg)
        a.cast("block")
        await a.handling.wait()  # the actor is busy; its mailbox fills
        for i in range(3):
            a.cast(i)
        assert a.mailbox_depth == 3
        with pytest.raises(MailboxFull):
            a.cast(99)
        with pytest.raises(MailboxFull):
            a.call_nowait(99)
        # Control messages ignore the bound and are never dropped.
        mark = asyncio.Event()
        a.cast_system(mark)
        assert a.mailbox_depth == 4
        a.gate.set()
        await mark.wait()
        assert await a.call("end", timeout=10) == ("reply", "end")
        assert a.seen == ["block", 0, 1, 2, "mark", "end"]


async def test_exited_actor_drops_casts_and_refuses_calls() -> None:
    async with scope() as tg:
        a = Recorder()
        a.start(tg)
        a.stop()
        await a.wait()
        a.cast("ignored")
        a.cast_system("ignored")
        assert a.mailbox_depth == 0
        with pytest.raises(ActorExited):
            a.call_nowait("x")
        with pytest.raises(ActorExited):
            await a.call("x")
        assert a.seen == []


async def test_stop_handles_what_was_queued_and_fails_later_calls() -> None:
    async with scope() as tg:
        a = Recorder()
        a.start(tg)
        a.cast("block")
        await a.handling.wait()
        first = a.call_nowait("before-stop")
        a.stop()
        late = a.call_nowait("after-stop")
        a.gate.set()
        assert await first == ("reply", "before-stop")
        with pytest.raises(ActorExited):
            await late
        await a.wait()
        assert a.seen == ["block", "before-stop"]


async def test_kill_exits_with_the_reason() -> None:
    async with scope() as tg:
        a = Recorder()
        a.start(tg)
        told: list[BaseException | None] = []
        a.monitor(lambda _a, reason: told.append(reason))
        why = Boom("killed")
        a.kill(why)
        await a.wait()
        assert told == [why] and a.exit_reason is why and a.stop_reasons == [why]


async def test_crash_is_logged_unregistered_ungrouped_and_monitored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="guildcast.actors")
    async with scope() as tg:
        reg: Registry[Recorder] = Registry(Recorder, tg)
        groups = Groups("test")
        a = reg.lookup_or_start("worker")
        await a.started.wait()
        groups.join("g1", a)
        groups.join("g2", a)
        changes: list[tuple[GroupEvent, str, Any]] = []
        groups.monitor("g1", lambda ev, g, m: changes.append((ev, g, m)))
        told: list[tuple[Actor, BaseException | None, Any, list[str]]] = []

        def monitor(actor: Actor, reason: BaseException | None) -> None:
            # By the time monitors run, the registry and groups have let go.
            told.append((actor, reason, reg.lookup("worker"), groups.which_groups(actor)))

        a.monitor(monitor)
        # One batch: the crash, then calls queued behind it.
        crashing = a.call_nowait("crash")
        behind = [a.call_nowait(i) for i in range(3)]
        with pytest.raises(Boom):
            await crashing
        for fut in behind:
            with pytest.raises(ActorExited):
                await fut
        await a.wait()
        assert not a.alive
        assert isinstance(a.exit_reason, Boom)
        assert told == [(a, a.exit_reason, None, [])]
        assert a.stop_reasons == [a.exit_reason]
        assert reg.lookup("worker") is None and len(reg) == 0
        assert groups.which_groups(a) == [] and groups.members("g1") == []
        assert groups.which_groups() == []
        assert changes == [(GroupEvent.LEAVE, "g1", a)]
        assert a.seen == []
        crashed = [r for r in caplog.records if "crashed" in r.getMessage()]
        assert len(crashed) == 1 and crashed[0].levelno == logging.ERROR
        assert crashed[0].exc_info is not None and crashed[0].exc_info[1] is a.exit_reason


async def test_calls_queued_during_a_crashing_handler_fail_with_actor_exited() -> None:
    async with scope() as tg:
        a = Recorder()
        a.start(tg)
        crashing = a.call_nowait(("slow-crash",))
        await a.handling.wait()
        queued = [a.call_nowait(i) for i in range(3)]
        a.gate.set()
        with pytest.raises(Boom):
            await crashing
        for fut in queued:
            with pytest.raises(ActorExited):
                await fut


async def test_cast_crash_fails_calls_behind_it() -> None:
    async with scope() as tg:
        a = Recorder()
        a.start(tg)
        a.cast("crash")
        fut = a.call_nowait("x")
        with pytest.raises(ActorExited):
            await fut
        await a.wait()
        assert isinstance(a.exit_reason, Boom)


async def test_monitor_and_exit_hook_after_exit_run_at_once() -> None:
    async with scope() as tg:
        a = Recorder()
        a.start(tg)
        a.cast("crash")
        await a.wait()
        told: list[Any] = []
        a.monitor(lambda actor, reason: told.append(("monitor", actor, reason)))
        a.add_exit_hook(lambda actor: told.append(("hook", actor)))
        assert told == [("monitor", a, a.exit_reason), ("hook", a)]


async def test_idle_actor_stops_itself() -> None:
    async with scope() as tg:
        reg: Registry[Recorder] = Registry(lambda n: Recorder(n, idle_timeout=0.05), tg)
        a = reg.lookup_or_start("idle")
        told: list[BaseException | None] = []
        a.monitor(lambda _a, reason: told.append(reason))
        assert await a.call("hi") == ("reply", "hi")
        await a.wait()
        assert told == [None] and a.exit_reason is None
        assert reg.lookup("idle") is None


class Stubborn(Recorder):
    """Refuses to stop when idle; counts how often it was asked."""

    def __init__(self) -> None:
        super().__init__("stubborn", idle_timeout=0.01)
        self.idle_calls = 0
        self.asked = asyncio.Event()

    def on_idle(self) -> bool:
        self.idle_calls += 1
        if self.idle_calls >= 3:
            self.asked.set()
        return False


async def test_on_idle_may_keep_the_actor_alive() -> None:
    async with scope() as tg:
        a = Stubborn()
        a.start(tg)
        await a.asked.wait()
        assert a.alive
        assert await a.call("still here") == ("reply", "still here")
        a.stop()
        await a.wait()


async def test_parked_only_while_waiting_with_an_empty_mailbox() -> None:
    async with scope() as tg:
        a = Recorder()
        assert not a.parked  # not started
        a.start(tg)
        await asyncio.sleep(0)
        assert a.parked
        a.cast("x")
        assert not a.parked  # mail queued
        assert await a.call("y") == ("reply", "y")
        await asyncio.sleep(0)
        assert a.parked
        a.stop()
        await a.wait()
        assert not a.parked  # exited


async def test_call_with_answers_in_the_actors_step_and_survives_a_bad_callback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``call_with``: the reply reaches the callback during the actor's own
    step (before the next message is handled), once; a callback that raises
    is logged and the actor goes on; calls left at exit get ActorExited."""
    caplog.set_level(logging.ERROR, logger="guildcast.actors")
    async with scope() as tg:
        a = Recorder()
        a.start(tg)
        got: list[tuple[Any, BaseException | None, list[Any]]] = []

        def reply(result: Any, exc: BaseException | None) -> None:
            got.append((result, exc, list(a.seen)))

        def bad(result: Any, exc: BaseException | None) -> None:
            raise RuntimeError("callback bug")

        a.cast("block")
        await a.handling.wait()
        a.call_with("one", reply)
        a.call_with("two", bad)
        a.call_with("three", reply)
        a.call_with("crash", reply)
        a.call_with("behind", reply)
        a.gate.set()
        await a.wait()
        # "one"'s reply came before "three" was handled: in the same step.
        assert got[0] == (("reply", "one"), None, ["block", "one"])
        assert got[1] == (("reply", "three"), None, ["block", "one", "two", "three"])
        assert got[2][0] is None and isinstance(got[2][1], Boom)
        assert got[3][0] is None and isinstance(got[3][1], ActorExited)
        assert len(got) == 4
        assert isinstance(a.exit_reason, Boom)  # the crash, not the bad callback
        assert any("reply callback failed" in r.getMessage() for r in caplog.records)
        with pytest.raises(ActorExited):
            a.call_with("late", reply)


async def test_step_now_runs_only_on_a_parked_actor_and_counts_as_activity(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="guildcast.actors")
    async with scope() as tg:
        a = Recorder(idle_timeout=0.3)
        a.start(tg)
        await a.started.wait()
        loop = asyncio.get_running_loop()
        await until(lambda: a.parked, "the actor parked")
        ran: list[str] = []

        def note(what: str) -> bool:
            ran.append(what)
            return True

        def step() -> bool:
            ran.append("outer")
            # No step inside a step: the nested one is refused.
            assert not a.step_now(lambda: note("inner"))
            return True

        assert a.step_now(step) and ran == ["outer"]
        assert not a.step_now(lambda: False)  # fn's own verdict is returned
        # Steps keep an actor that only gets them from idling out (0.3 s).
        end = loop.time() + 0.9
        while loop.time() < end:
            assert a.step_now(lambda: True)
            await asyncio.sleep(0.05)
        assert a.alive
        # A busy actor (in a batch) takes no step on the caller's stack.
        a.cast("block")
        await a.handling.wait()
        assert not a.step_now(lambda: note("busy")) and "busy" not in ran
        a.gate.set()
        await until(lambda: a.parked, "the actor parked again")

        def crash() -> bool:
            raise Boom("in a step")

        assert a.step_now(crash)  # not re-raised: the actor crashes
        await a.wait()
        assert isinstance(a.exit_reason, Boom) and a.stop_reasons == [a.exit_reason]
        assert any("crashed" in r.getMessage() for r in caplog.records)
        assert not a.step_now(lambda: True)
