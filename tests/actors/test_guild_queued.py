"""A publish to a parked guild on the Redis broker, sent to the append
pipeline from the publisher's stack (``Guild.publish_to`` ->
``Guild._publish_queued``, ``AppendsQueued``): answered by callback when
Redis replies, with no mailbox message and no step of the guild's task;
at most one such append in flight per guild, the publishes behind it
queued and sequenced after it; failures answered as the awaited path's;
an answer under another epoch handled in the guild's own step. And the
feed's records to a parked guild as a step on the feed's read callback
(``Guild.feed``), a read-back it needs carried on in the guild's step.

Against a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from guildcast.actors.groups import Groups
from guildcast.actors.guild import Guild, GuildSettings, Subscribe
from guildcast.actors.hub import check_publish
from guildcast.broker.base import BrokerUnavailable, Record
from guildcast.broker.redis import RedisBroker
from guildcast.protocol.codes import Close
from tests.actors.support import scope
from tests.actors.test_guild import FakeSink
from tests.support.redis import RedisProc
from tests.support.wait import until

Answer = tuple[tuple[int, str] | None, BaseException | None]


@dataclass
class Env:
    guild: Guild
    broker: RedisBroker
    groups: Groups
    answers: list[Answer] = field(default_factory=list)
    #: False: the broker's feed reaches no guild (only the answers do).
    routed: list[bool] = field(default_factory=lambda: [True])

    def subscribe(self, sink: FakeSink) -> None:
        self.groups.join(self.guild.gid, sink)
        self.guild.cast_system(Subscribe(sink, None))

    def publish(self, d: Any, key: str | None = None) -> None:
        self.guild.publish_to(
            "E",
            check_publish(self.guild.gid, "E", d),
            key,
            lambda r, e: self.answers.append((r, e)),
        )

    async def answered(self, n: int) -> list[Answer]:
        await until(lambda: len(self.answers) >= n, f"{n} answers")
        return self.answers

    async def parked(self) -> None:
        await until(lambda: self.guild.parked, "the guild parked")


@asynccontextmanager
async def redis_env(redis: RedisProc) -> AsyncIterator[Env]:
    broker = RedisBroker(redis.url, 1000, 300, health_interval=0.1, op_timeout=2.0)
    await broker.start()
    try:
        async with scope() as tg:
            groups = Groups("guilds")
            guild = Guild("g-1", GuildSettings(), groups, tg, broker)
            env = Env(guild, broker, groups)

            def feed(gid: str, recs: list[Record] | str | None) -> None:
                if env.routed[0]:
                    guild.feed(recs)  # as FeedRouter.records does

            broker.set_feed(feed)
            guild.start(tg)
            yield env
            guild.stop()
            await guild.wait()
    finally:
        await broker.close()


async def subscribed(env: Env, sink: FakeSink) -> str:
    env.subscribe(sink)
    epoch: str = (await sink.wait_count(1))[0]["d"]["epoch"]
    return epoch


async def test_a_parked_guild_sends_the_append_from_the_publishers_stack(
    redis_proc: RedisProc,
) -> None:
    async with redis_env(redis_proc) as env:
        sink = FakeSink("a")
        epoch = await subscribed(env, sink)
        for n in range(1, 4):
            await env.parked()
            env.publish(n)
            # Queued on the pipeline at once; the guild's task not woken.
            assert env.guild._sending and env.guild.parked and env.guild.mailbox_depth == 0
            assert len(env.broker._queue) == 1
            answers = await env.answered(n)
            assert answers[-1] == ((n, epoch), None)
            assert not env.guild._sending
            # The records come back by the feed, as every Redis append's do.
            await sink.wait_count(n + 1)
        assert sink.events_s() == [1, 2, 3]
        assert env.guild.published == 3


async def test_publishes_behind_an_append_in_flight_are_sequenced_after_it(
    redis_proc: RedisProc,
) -> None:
    """The second publish finds an append in flight: it takes the mailbox
    (as does a keyed one), and the guild's batch waits for the first
    append's answer before it appends: one order, the publishers'."""
    async with redis_env(redis_proc) as env:
        sink = FakeSink("a")
        epoch = await subscribed(env, sink)
        await env.parked()
        env.publish("first")
        assert env.guild._sending
        env.publish("second")
        assert env.guild.mailbox_depth == 1  # queued: not sent beside the first
        env.publish("third", key="k-3")
        answers = await env.answered(3)
        assert answers == [((1, epoch), None), ((2, epoch), None), ((3, epoch), None)]
        msgs = await sink.wait_count(4)
        assert [m["d"] for m in msgs[1:]] == ["first", "second", "third"]
        # Inline again once nothing is in flight.
        await env.parked()
        env.publish("fourth")
        assert env.guild._sending and env.guild.mailbox_depth == 0
        assert (await env.answered(4))[-1] == ((4, epoch), None)


async def test_a_guild_not_listening_sends_it_too(redis_proc: RedisProc) -> None:
    async with redis_env(redis_proc) as env:
        await env.parked()
        env.publish(1)
        assert env.guild._sending and env.guild.mailbox_depth == 0
        (result, exc), *_ = await env.answered(1)
        assert exc is None and result is not None and result[0] == 1


async def test_redis_gone_answers_the_failure_and_the_guild_goes_on(
    redis_proc: RedisProc,
) -> None:
    async with redis_env(redis_proc) as env:
        sink = FakeSink("a")
        await subscribed(env, sink)
        await env.parked()
        redis_proc.stop()
        env.publish(1)
        (result, exc), *_ = await env.answered(1)
        # Not published, or outcome unknown (a subclass): the failure table's answer.
        assert result is None and isinstance(exc, BrokerUnavailable)
        assert not env.guild._sending and env.guild.alive
        # Refused at once while the broker knows Redis is down.
        await until(lambda: not env.broker.healthy, "redis marked down")
        await env.parked()
        env.publish(2)
        assert isinstance(env.answers[1][1], BrokerUnavailable)
        assert not env.guild._sending and env.guild.alive


async def test_an_answer_under_another_epoch_loses_the_guilds_history(
    redis_proc: RedisProc,
) -> None:
    """Redis lost the guild (flushed): the inline append starts a new epoch;
    the guild sees it in the answer, in its own step, and closes its
    sessions to recover (the feed is not routed here: the answer alone)."""
    async with redis_env(redis_proc) as env:
        sink = FakeSink("a")
        epoch = await subscribed(env, sink)
        env.routed[0] = False
        await env.broker.redis.flushall()
        await env.parked()
        env.publish(1)
        (result, exc), *_ = await env.answered(1)
        assert exc is None and result is not None and result[0] == 1 and result[1] != epoch
        assert (await sink.wait_closed())[0] == Close.UNKNOWN_ERROR
        await until(lambda: not env.guild.listening, "the guild unlistened")


class ParkedAtSend(FakeSink):
    """Notes, at each write, whether its guild was parked (a step run on
    another stack) or in its own task's batch."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.guild: Guild | None = None
        self.parked_at: list[bool] = []

    def send(self, data: bytes) -> None:
        if self.guild is not None:
            self.parked_at.append(self.guild.parked)
        super().send(data)


async def test_feed_records_for_a_parked_guild_are_written_on_the_feeds_stack(
    redis_proc: RedisProc,
) -> None:
    async with redis_env(redis_proc) as env:
        sink = ParkedAtSend("a")
        await subscribed(env, sink)
        sink.guild = env.guild
        for n in range(1, 4):
            await env.parked()
            env.publish(n)
            await sink.wait_count(n + 1)
        assert sink.events_s() == [1, 2, 3]
        assert sink.parked_at == [True, True, True]  # no task step wrote them


async def test_a_gap_in_the_feed_is_read_back_in_the_guilds_own_step(
    redis_proc: RedisProc,
) -> None:
    """The feed skips 1 and 2 (not routed) and brings 3: the cursor's
    read-back is carried on in the guild's step (``Drive``), then 1..3 are
    delivered in order, each once."""
    async with redis_env(redis_proc) as env:
        sink = ParkedAtSend("a")
        epoch = await subscribed(env, sink)
        env.routed[0] = False
        for n in range(1, 4):
            await env.parked()
            env.publish(n)
            await env.answered(n)
        assert sink.events_s() == []
        got_epoch, recs = await env.broker.read("g-1", 2, 10)
        assert got_epoch == epoch and [r.s for r in recs] == [3]
        await env.parked()
        sink.guild = env.guild
        env.guild.feed(recs)
        assert env.guild.mailbox_depth == 1  # the read-back, queued
        msgs = await sink.wait_count(4)
        assert [m["d"] for m in msgs[1:]] == [1, 2, 3]
        assert sink.parked_at == [False]  # one write, from the guild's batch
        env.routed[0] = True
        await env.parked()
        env.publish(4)
        await sink.wait_count(5)
        assert sink.events_s() == [1, 2, 3, 4] and sink.parked_at == [False, True]
