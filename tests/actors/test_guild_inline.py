"""A publish taken by a parked guild in a step on the publisher's stack
(``Guild.publish_to``, ``Actor.step_now``): the same append, answer, emit
and fan-out as the guild's own batch, in the same order with queued
messages, and a crash in it handled as a crash in a batch."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from guildcast.actors.actor import ActorExited
from guildcast.actors.guild import Guild, PublishMsg
from guildcast.actors.hub import check_publish
from guildcast.protocol import wire
from guildcast.protocol.codes import Close
from tests.actors.test_guild import FakeSink, guild_env
from tests.support.wait import until

Answer = tuple[tuple[int, str] | None, BaseException | None]


def publish_to(guild: Guild, answers: list[Answer], d: Any) -> None:
    guild.publish_to(
        "E", check_publish(guild.gid, "E", d), None, lambda r, e: answers.append((r, e))
    )


async def answered(answers: list[Answer], n: int) -> None:
    await until(lambda: len(answers) >= n, f"{n} answers")


async def parked(guild: Guild) -> None:
    await until(lambda: guild.parked, "the guild parked")


async def test_a_parked_guild_sequences_at_once_and_answers_after_the_write() -> None:
    async with guild_env() as env:
        sink = FakeSink("a")
        env.subscribe(sink)
        epoch = (await sink.wait_count(1))[0]["d"]["epoch"]
        answers: list[Answer] = []
        written_at_answer: list[list[int]] = []

        def fn(r: tuple[int, str] | None, e: BaseException | None) -> None:
            answers.append((r, e))
            written_at_answer.append(sink.events_s())

        for n in range(1, 4):
            await parked(env.guild)
            env.guild.publish_to("E", check_publish("g-1", "E", n), None, fn)
            # No loop turn in between: sequenced already, the guild's task
            # not woken; written, then answered, at the end of this turn.
            assert (await env.broker.head("g-1")) == (epoch, n)
            assert env.guild.mailbox_depth == 0 and env.guild.parked
            assert sink.events_s() == list(range(1, n)) and len(answers) == n - 1
            await answered(answers, n)
            assert answers[-1] == ((n, epoch), None)
            # The DISPATCH went out before the ACK, as from a batch.
            assert written_at_answer[-1] == list(range(1, n + 1))
        # Queued publishes and inline ones share one sequence.
        assert await env.publish("E", 4) == (4, epoch)
        await parked(env.guild)
        env.guild.publish_to("E", check_publish("g-1", "E", 5), None, fn)
        msgs = await sink.wait_count(6)
        await answered(answers, 4)
        assert answers[-1] == ((5, epoch), None)
        assert [m["d"] for m in msgs[1:]] == [1, 2, 3, 4, 5]
        assert env.guild.published == 5 and env.guild.delivered == 5


async def test_the_publishes_of_one_turn_go_out_as_one_run() -> None:
    """Inline steps keep the batching a queue of publishes had: the events one
    read brings to a guild are one write per session, in order."""
    async with guild_env() as env:
        a, b = FakeSink("a"), FakeSink("b")
        env.subscribe(a)
        env.subscribe(b)
        await a.wait_count(1)
        epoch = (await b.wait_count(1))[0]["d"]["epoch"]
        before = (a.writes, b.writes)
        await parked(env.guild)
        answers: list[Answer] = []
        for n in range(1, 6):
            publish_to(env.guild, answers, n)
        await a.wait_count(6)
        await b.wait_count(6)
        await answered(answers, 5)
        assert answers == [((n, epoch), None) for n in range(1, 6)]
        assert a.events_s() == b.events_s() == [1, 2, 3, 4, 5]
        assert (a.writes, b.writes) == (before[0] + 1, before[1] + 1)


async def test_a_guild_with_mail_queues_the_publish_behind_it() -> None:
    """A Subscribe still in the mailbox comes first: the publish is not taken
    on the caller's stack, and the new session gets SUBSCRIBED at the head
    before it, then the event."""
    async with guild_env() as env:
        first, late = FakeSink("first"), FakeSink("late")
        env.subscribe(first)
        await first.wait_count(1)
        await parked(env.guild)
        env.subscribe(late)  # queued: the guild is no longer parked
        assert not env.guild.parked
        answers: list[Answer] = []
        publish_to(env.guild, answers, 1)
        assert answers == []  # queued as a call, answered in the guild's step
        msgs = await late.wait_count(2)
        assert [m.get("t") for m in msgs] == ["SUBSCRIBED", "E"]
        assert msgs[0]["d"]["s"] == 0 and late.events_s() == [1]
        assert answers == [((1, msgs[0]["d"]["epoch"]), None)]
        assert first.events_s() == [1]


async def test_a_guild_not_listening_takes_the_publish_in_its_own_step() -> None:
    async with guild_env() as env:
        await parked(env.guild)
        answers: list[Answer] = []
        publish_to(env.guild, answers, 1)
        assert answers == []
        await until_answered(answers)
        result, exc = answers[0]
        assert exc is None and result is not None and result[0] == 1


async def until_answered(answers: list[Answer]) -> None:
    await until(lambda: bool(answers), "an answer")


async def test_a_sink_failing_in_an_inline_step_crashes_the_guild(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As in the guild's own step: sequenced and answered first, the write
    fails, the guild crashes (logged), its other sessions are closed."""
    caplog.set_level(logging.ERROR, logger="guildcast.actors")
    async with guild_env() as env:
        bad, good = FakeSink("bad"), FakeSink("good")
        env.subscribe(bad)
        env.subscribe(good)
        await bad.wait_count(1)
        epoch = (await good.wait_count(1))[0]["d"]["epoch"]
        await parked(env.guild)
        bad.fail = True
        answers: list[Answer] = []
        publish_to(env.guild, answers, 1)
        await env.guild.wait()
        assert answers == [((1, epoch), None)]  # sequenced: answered in the crash
        assert isinstance(env.guild.exit_reason, RuntimeError)
        assert await good.wait_closed() == (Close.UNKNOWN_ERROR, "guild failed")
        assert any("crashed" in r.getMessage() for r in caplog.records)
        with pytest.raises(ActorExited):
            publish_to(env.guild, answers, 2)


async def test_a_step_that_fails_before_answering_answers_actor_exited() -> None:
    async with guild_env() as env:
        sink = FakeSink("a")
        env.subscribe(sink)
        await sink.wait_count(1)
        await parked(env.guild)
        answers: list[Answer] = []

        def broken(*_a: Any) -> None:
            raise RuntimeError("log exploded")

        env.guild._now.append_local_now = broken  # type: ignore[union-attr,method-assign]
        publish_to(env.guild, answers, 1)
        (result, exc), *_ = answers
        assert result is None and isinstance(exc, ActorExited)
        await env.guild.wait()
        assert isinstance(env.guild.exit_reason, RuntimeError)


async def test_the_message_form_is_unchanged() -> None:
    """``call_nowait(PublishMsg)`` (HTTP API, embedded) still answers a Future."""
    async with guild_env() as env:
        sink = FakeSink("a")
        env.subscribe(sink)
        await sink.wait_count(1)
        s, _epoch = await env.guild.call_nowait(PublishMsg("E", wire.encode(1)))
        assert s == 1 and sink.events_s() == [1]


async def test_a_guild_stopping_writes_what_inline_steps_held() -> None:
    async with guild_env() as env:
        sink = FakeSink("a")
        env.subscribe(sink)
        await sink.wait_count(1)
        await parked(env.guild)
        answers: list[Answer] = []
        publish_to(env.guild, answers, 1)
        env.guild.stop()  # before the turn's fan-out
        await env.guild.wait()
        assert answers[0][1] is None and sink.events_s() == [1]


async def test_a_write_failing_at_stop_is_a_crash_and_the_stop_completes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An inline publish held for the turn's fan-out, then ``stop()`` before
    that fan-out, and a sink that raises: the stop's own fan-out fails as a
    batch would, so the sequenced publish is still answered, the other
    sessions are closed to recover, and the guild stops listening."""
    caplog.set_level(logging.CRITICAL)
    async with guild_env() as env:
        bad, good = FakeSink("bad"), FakeSink("good")
        env.subscribe(bad)
        env.subscribe(good)
        await bad.wait_count(1)
        await good.wait_count(1)
        await parked(env.guild)
        answers: list[Answer] = []
        publish_to(env.guild, answers, 1)
        bad.fail = True
        env.guild.stop()  # before the turn's fan-out
        await env.guild.wait()
        await answered(answers, 1)
        assert answers[0][1] is None and answers[0][0] is not None
        assert (await good.wait_closed())[0] == Close.UNKNOWN_ERROR
        assert not env.guild.listening
