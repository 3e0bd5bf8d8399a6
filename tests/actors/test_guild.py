"""Guild and partition actors with an in-memory Sink (a test double of the socket).

The guild runs for real on the memory broker; only the connection is
replaced by :class:`FakeSink`, which records the bytes it is given.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from guildcast.actors.actor import CallTimeout
from guildcast.actors.groups import Groups
from guildcast.actors.guild import (
    HOLD_BYTES,
    Feed,
    Guild,
    GuildSettings,
    HistoryMsg,
    InfoMsg,
    PublishMsg,
    Subscribe,
    Unsubscribe,
)
from guildcast.actors.hub import check_publish
from guildcast.actors.partition import PARTITION_QUEUE_BYTES, Frames, Partition, Writer
from guildcast.broker.memory import MemoryBroker
from guildcast.protocol import wire
from guildcast.protocol.codes import Close
from guildcast.protocol.deflate import Deflater
from tests.actors.support import scope
from tests.protocol.framing import unframe
from tests.support.wait import until


class FakeSink:
    """Records what the fanout path writes; closes like a connection would."""

    def __init__(self, name: str, events: frozenset[str] | None = None) -> None:
        self.name = name
        self.events = events
        self.deflate: Deflater | None = None
        #: IDENTIFY ``activity_batch`` (Sink.activity_batch).
        self.activity_batch = False
        self.buf = bytearray()
        self.writes = 0
        self.closed_with: tuple[int, str] | None = None
        self.fail = False
        self._changed = asyncio.Event()
        self._hooks: list[Callable[[object], None]] = []

    def __repr__(self) -> str:
        return f"<FakeSink {self.name}>"

    def send(self, data: bytes) -> None:
        if self.fail:
            raise RuntimeError("socket exploded")
        if self.closed_with is not None:
            return
        self.buf += data
        self.writes += 1
        self._changed.set()

    def close(self, code: int, reason: str) -> None:
        if self.closed_with is None:
            self.closed_with = (code, reason)
            self._changed.set()

    @property
    def is_closed(self) -> bool:
        return self.closed_with is not None

    def add_exit_hook(self, hook: Callable[[object], None]) -> None:
        self._hooks.append(hook)

    def messages(self) -> list[dict[str, Any]]:
        return unframe(self.buf)

    def events_s(self) -> list[int]:
        return [m["s"] for m in self.messages() if "s" in m and m.get("t") != "SUBSCRIBED"]

    async def wait_for(self, pred: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
        while True:
            msgs = self.messages()
            if pred(msgs):
                return msgs
            self._changed.clear()
            await self._changed.wait()

    async def wait_count(self, n: int) -> list[dict[str, Any]]:
        return await self.wait_for(lambda m: len(m) >= n)

    async def wait_closed(self) -> tuple[int, str]:
        await self.wait_for(lambda _m: self.closed_with is not None)
        assert self.closed_with is not None
        return self.closed_with


@dataclass
class Env:
    guild: Guild
    broker: MemoryBroker
    groups: Groups

    async def publish(self, t: str, d: Any = None) -> tuple[int, str]:
        # Validated and encoded at the edge, as every entry point does.
        msg = PublishMsg(t, check_publish(self.guild.gid, t, d))
        result: tuple[int, str] = await self.guild.call(msg, timeout=10)
        return result

    def subscribe(self, sink: FakeSink, position: tuple[str, int] | None = None) -> None:
        self.groups.join(self.guild.gid, sink)
        self.guild.cast_system(Subscribe(sink, position))


@asynccontextmanager
async def guild_env(
    history_size: int = 1000,
    history_ttl: float = 300.0,
    partition_size: int = 512,
    idle_timeout: float = 300.0,
) -> AsyncIterator[Env]:
    async with scope() as tg:
        broker = MemoryBroker(history_size, history_ttl)
        groups = Groups("guilds")
        settings = GuildSettings(partition_size=partition_size, idle_timeout=idle_timeout)
        guild = Guild("g-1", settings, groups, tg, broker)
        broker.set_feed(lambda gid, recs: guild.cast_system(Feed(recs)))
        guild.start(tg)
        yield Env(guild, broker, groups)


def event(s: int, t: str = "E", d: Any = None) -> dict[str, Any]:
    return {"op": 0, "t": t, "g": "g-1", "s": s, "d": d}


def subscribed(epoch: str, head: int, recovered: bool) -> dict[str, Any]:
    return {
        "op": 0,
        "t": "SUBSCRIBED",
        "g": "g-1",
        "d": {"epoch": epoch, "s": head, "recovered": recovered},
    }


async def test_sequencing_and_fanout() -> None:
    async with guild_env() as env:
        sink = FakeSink("a")
        env.subscribe(sink)
        (first,) = await sink.wait_count(1)
        epoch = first["d"]["epoch"]
        assert first == subscribed(epoch, 0, False)
        replies = [await env.publish("E", {"i": i}) for i in range(3)]
        assert replies == [(1, epoch), (2, epoch), (3, epoch)]
        msgs = await sink.wait_count(4)
        assert msgs[1:] == [event(i + 1, d={"i": i}) for i in range(3)]


async def test_concurrent_publishes_get_distinct_consecutive_s() -> None:
    async with guild_env() as env:
        sink = FakeSink("a")
        env.subscribe(sink)
        await sink.wait_count(1)
        results = await asyncio.gather(*(env.publish("E", i) for i in range(500)))
        assert sorted(s for s, _e in results) == list(range(1, 501))
        msgs = await sink.wait_count(501)
        assert [m["s"] for m in msgs[1:]] == list(range(1, 501))
        # Each event carries the data of the publish that was given its s.
        by_s = {s: i for i, (s, _e) in enumerate(results)}
        assert all(m["d"] == by_s[m["s"]] for m in msgs[1:])


async def test_history_is_bounded_by_count() -> None:
    async with guild_env(history_size=5) as env:
        for i in range(20):
            await env.publish("E", i)
        epoch, recs = await env.guild.call(HistoryMsg(0, 100), timeout=10)
        assert [r.s for r in recs] == [16, 17, 18, 19, 20]
        _, head = await env.broker.head("g-1")
        assert epoch == (await env.broker.head("g-1"))[0] and head == 20
        # A Position inside the window recovers; one just outside does not.
        inside, outside = FakeSink("in"), FakeSink("out")
        env.subscribe(inside, (epoch, 15))
        env.subscribe(outside, (epoch, 14))
        msgs = await inside.wait_count(6)
        assert msgs == [subscribed(epoch, 20, True), *[event(s, d=s - 1) for s in range(16, 21)]]
        assert await outside.wait_count(1) == [subscribed(epoch, 20, False)]


async def test_history_is_bounded_by_age() -> None:
    async with guild_env(history_ttl=0.05) as env:
        _s, epoch = await env.publish("E")
        fresh = FakeSink("fresh")
        env.subscribe(fresh, (epoch, 0))
        assert (await fresh.wait_count(2))[0] == subscribed(epoch, 1, True)
        await asyncio.sleep(0.2)  # the event ages past history_ttl
        late = FakeSink("late")
        env.subscribe(late, (epoch, 0))
        assert (await late.wait_count(1))[0] == subscribed(epoch, 1, False)


async def test_subscribe_with_position_replays_then_live() -> None:
    async with guild_env() as env:
        epoch = ""
        for i in range(10):
            _s, epoch = await env.publish("E", i)
        sink = FakeSink("a")
        env.subscribe(sink, (epoch, 4))
        msgs = await sink.wait_count(7)
        assert msgs == [subscribed(epoch, 10, True), *[event(s, d=s - 1) for s in range(5, 11)]]
        await env.publish("LIVE", "x")
        msgs = await sink.wait_count(8)
        assert msgs[7] == event(11, "LIVE", "x")


async def test_position_at_head_recovers_nothing_missing() -> None:
    async with guild_env() as env:
        _s, epoch = await env.publish("E")
        sink = FakeSink("a")
        env.subscribe(sink, (epoch, 1))
        await env.publish("E", 2)
        assert await sink.wait_count(2) == [subscribed(epoch, 1, True), event(2, d=2)]


@pytest.mark.parametrize("position", [("another-epoch", 0), ("another-epoch", 1), (None, 5)])
async def test_unrecoverable_position_gets_recovered_false_and_no_replay(
    position: tuple[str | None, int],
) -> None:
    async with guild_env() as env:
        for _ in range(2):
            _s, epoch = await env.publish("E")
        # (None, 5): the right epoch but a position from the future.
        pos = (position[0] or epoch, position[1])
        sink = FakeSink("a")
        env.subscribe(sink, pos)
        await env.publish("E", "live")
        assert await sink.wait_count(2) == [subscribed(epoch, 2, False), event(3, d="live")]


async def test_events_filter_applies_to_replay_and_live() -> None:
    async with guild_env() as env:
        epoch = ""
        for t in ("A", "B", "A"):
            _s, epoch = await env.publish(t)
        picky, everyone = FakeSink("picky", frozenset({"A"})), FakeSink("all")
        env.subscribe(picky, (epoch, 0))
        env.subscribe(everyone, (epoch, 0))
        for t in ("B", "A", "C", "B"):
            await env.publish(t)
        msgs = await everyone.wait_count(8)
        assert [m.get("s") for m in msgs[1:]] == [1, 2, 3, 4, 5, 6, 7]
        # ``everyone`` shares picky's partition and is handled in the same
        # batches, so picky has been given everything it will get.
        assert [(m["s"], m["t"]) for m in picky.messages()[1:]] == [(1, "A"), (3, "A"), (5, "A")]


async def test_partition_size_is_respected() -> None:
    async with guild_env(partition_size=3) as env:
        sinks = [FakeSink(f"s{i}") for i in range(10)]
        for sink in sinks:
            env.subscribe(sink)
        for sink in sinks:
            await sink.wait_count(1)
        assert len(env.guild.partitions) == 4
        assert sorted(len(p) for p in env.guild.partitions) == [1, 3, 3, 3]
        assert sorted(env.guild.load.values()) == [1, 3, 3, 3]
        for p in env.guild.partitions:
            assert len(p.sinks()) <= 3
        await env.publish("E", "all")
        for sink in sinks:
            assert (await sink.wait_count(2))[1] == event(1, d="all")
        # Freed room is reused before a new partition is made.
        env.guild.cast_system(Unsubscribe(sinks[0]))
        await sinks[0].wait_count(3)
        extra = FakeSink("extra")
        env.subscribe(extra)
        await extra.wait_count(1)
        assert len(env.guild.partitions) == 4


async def test_unsubscribe_answers_last_and_stops_events() -> None:
    async with guild_env(partition_size=10) as env:
        leaver, stayer = FakeSink("leaver"), FakeSink("stayer")
        env.subscribe(leaver)
        env.subscribe(stayer)
        await env.publish("E", 1)
        await leaver.wait_count(2)
        env.guild.cast_system(Unsubscribe(leaver))
        env.groups.leave("g-1", leaver)
        await env.publish("E", 2)
        await stayer.wait_count(3)  # same partition: the Remove came first
        msgs = leaver.messages()
        assert [m["t"] for m in msgs] == ["SUBSCRIBED", "E", "UNSUBSCRIBED"]
        assert msgs[2] == {"op": 0, "t": "UNSUBSCRIBED", "g": "g-1", "d": None}


async def test_group_leave_removes_the_session() -> None:
    async with guild_env(partition_size=10) as env:
        gone, stayer = FakeSink("gone"), FakeSink("stayer")
        env.subscribe(gone)
        env.subscribe(stayer)
        await gone.wait_count(1)
        env.groups.leave("g-1", gone)  # what a disconnect does
        await env.publish("E")
        await stayer.wait_count(2)
        assert [m["t"] for m in gone.messages()] == ["SUBSCRIBED"]
        info = await env.guild.call(InfoMsg(), timeout=10)
        assert info["subscribers"] == 1


async def test_closed_sink_is_not_subscribed() -> None:
    async with guild_env() as env:
        dead = FakeSink("dead")
        dead.close(4000, "gone")
        env.subscribe(dead)
        assert (await env.guild.call(InfoMsg(), timeout=10))["subscribers"] == 0
        assert dead.buf == b""


async def test_idle_guild_stops_only_without_sessions() -> None:
    async with guild_env(idle_timeout=0.02) as env:
        sink = FakeSink("a")
        env.subscribe(sink)
        await sink.wait_count(1)
        # Many idle periods pass; a guild with a session must not stop.
        await asyncio.sleep(0.3)
        assert env.guild.alive
        env.groups.leave("g-1", sink)
        await env.guild.wait()
        assert env.guild.exit_reason is None


async def test_abandoned_call_does_not_crash_the_guild() -> None:
    async with guild_env() as env:
        with pytest.raises(CallTimeout):
            await env.guild.call(InfoMsg(), timeout=0)
        with pytest.raises(CallTimeout):
            await env.guild.call(HistoryMsg(0, 10), timeout=0)
        with pytest.raises(CallTimeout):
            await env.guild.call(PublishMsg("E", wire.encode(1)), timeout=0)
        assert await env.publish("E", 2) == (2, (await env.broker.head("g-1"))[0])
        assert env.guild.alive


async def test_non_json_data_is_refused_without_using_a_sequence_number() -> None:
    async with guild_env() as env:
        with pytest.raises(ValueError):
            await env.publish("E", {1, 2})
        s, _epoch = await env.publish("E", "ok")
        assert s == 1 and env.guild.alive


async def test_a_crashing_partition_takes_the_guild_down_and_closes_sessions() -> None:
    async with guild_env(partition_size=1) as env:
        bad, good = FakeSink("bad"), FakeSink("good")
        env.subscribe(bad)
        env.subscribe(good)
        await bad.wait_count(1)
        await good.wait_count(1)
        bad.fail = True
        await env.publish("E")
        await env.guild.wait()
        assert isinstance(env.guild.exit_reason, RuntimeError)
        assert await good.wait_closed() == (Close.UNKNOWN_ERROR, "guild failed")


async def test_stopped_guild_refuses_calls() -> None:
    async with guild_env() as env:
        env.guild.stop()
        await env.guild.wait()
        with pytest.raises(Exception) as info:
            await env.publish("E")
        assert type(info.value).__name__ == "ActorExited"


async def test_small_guild_writes_in_its_own_step() -> None:
    """A guild of at most ``partition_size`` sessions is written by the guild
    itself (placement), in the step that sequenced the event, so it is on
    the socket before the publisher's ACK is even seen (through a
    partition's mailbox it would come a step later)."""
    async with guild_env() as env:
        sink = FakeSink("a")
        env.subscribe(sink)
        await sink.wait_count(1)  # SUBSCRIBED
        (p,) = env.guild.partitions
        assert type(p) is Writer  # the guild's own writer: no actor, no mailbox
        for n in range(1, 4):
            fut = env.guild.call_nowait(PublishMsg("E", wire.encode(n)))
            s, _epoch = await fut
            assert s == n
            assert sink.events_s() == list(range(1, n + 1))
        assert p.deliveries == 3


async def test_small_guild_queues_behind_a_pending_add() -> None:
    """An Add still in the partition's mailbox comes first: the new session
    gets SUBSCRIBED, then exactly the events after its head."""
    async with guild_env() as env:
        first, late = FakeSink("first"), FakeSink("late")
        env.subscribe(first)
        await first.wait_count(1)
        await env.publish("E", 1)
        env.subscribe(late)
        fut = env.guild.call_nowait(PublishMsg("E", wire.encode(2)))  # same guild batch as the Add
        await fut
        msgs = await late.wait_count(2)
        assert [m.get("t") for m in msgs] == ["SUBSCRIBED", "E"]
        assert msgs[0]["d"]["s"] == 1 and late.events_s() == [2]
        await first.wait_count(3)
        assert first.events_s() == [1, 2]


async def test_a_sink_failing_in_a_small_guilds_own_step_crashes_the_guild() -> None:
    async with guild_env() as env:
        bad, good = FakeSink("bad"), FakeSink("good")
        env.subscribe(bad)
        env.subscribe(good)
        await bad.wait_count(1)
        await good.wait_count(1)
        assert len(env.guild.partitions) == 1
        bad.fail = True
        # Sequenced (and answered) first, then written: the write fails.
        assert await env.publish("E") == (1, (await env.broker.head("g-1"))[0])
        await env.guild.wait()
        assert isinstance(env.guild.exit_reason, RuntimeError)
        assert await good.wait_closed() == (Close.UNKNOWN_ERROR, "guild failed")


async def test_a_session_subscribing_again_keeps_its_order_across_writers() -> None:
    """UNSUBSCRIBE then SUBSCRIBE while its partition still holds its last
    event and its UNSUBSCRIBED: it goes back to that partition, so it gets
    the old subscription's messages, then the new SUBSCRIBED, then only
    later events (placement would otherwise put it on the guild's own
    writer, which answers at once, ahead of the partition's queue)."""
    async with guild_env(partition_size=1) as env:
        a, b, c = FakeSink("a"), FakeSink("b"), FakeSink("c")
        for s in (a, b, c):
            env.subscribe(s)
            await s.wait_count(1)
        g = env.guild
        g.cast_system(Unsubscribe(a))  # the guild's own writer has room again
        await a.wait_count(2)
        fut = g.call_nowait(PublishMsg("E", check_publish(g.gid, "E", 1)))
        g.cast_system(Unsubscribe(b))
        env.groups.leave(g.gid, b)
        env.subscribe(b)
        await fut
        await env.publish("E", 2)
        msgs = await b.wait_for(lambda ms: any(m.get("s") == 2 for m in ms))
        kinds = [
            (m["t"], m.get("s") if m["t"] == "E" else m["d"] and m["d"].get("s")) for m in msgs
        ]
        assert kinds == [
            ("SUBSCRIBED", 0),
            ("E", 1),
            ("UNSUBSCRIBED", None),
            ("SUBSCRIBED", 1),
            ("E", 2),
        ], kinds
        assert not g._parted or all(s is not b for s in g._parted)


async def test_a_partition_behind_by_more_than_its_byte_bound_sheds_only_its_sessions() -> None:
    """A partition's queue is bounded in bytes (PARTITION_QUEUE_BYTES), not
    only in runs: one guild batch that casts it 600 runs of a 30 KB event
    (18 MB, far under the 4,096-run bound) before it can write one closes
    its sessions with 4010; the guild's own sessions get every event."""
    async with guild_env(partition_size=1) as env:
        own, lagging = FakeSink("own"), FakeSink("lagging")
        for sink in (own, lagging):
            env.subscribe(sink)
            await sink.wait_count(1)
        p = env.guild.partitions[1]
        assert isinstance(p, Partition) and p.sinks() == [lagging]
        n = PARTITION_QUEUE_BYTES // 30_000 + 60
        payload = check_publish("g-1", "BIG", "x" * 30_000)
        gone = FakeSink("gone")
        gone.close(1000, "never subscribed")
        calls = []
        for _ in range(n):
            # Each SUBSCRIBE (of a closed session: nothing else happens) makes
            # the guild send what it emitted so far: one run per event, all in
            # one guild batch, so the partition cannot write any in between.
            calls.append(env.guild.call_nowait(PublishMsg("BIG", payload)))
            env.guild.cast_system(Subscribe(gone, None))
        assert len([await c for c in calls]) == n
        assert await lagging.wait_closed() == (Close.SLOW_CONSUMER, "partition overflow")
        # Shed before it held much more than its bound.
        assert p.queued_bytes <= PARTITION_QUEUE_BYTES + 40_000
        assert own.closed_with is None
        msgs = await own.wait_count(1 + n)
        assert [m["s"] for m in msgs[1:]] == list(range(1, n + 1))
        # Drained, the guild serves a session subscribing after it.
        await until(lambda: not p.queued_bytes and not p.mailbox_depth, "the partition to drain")
        late = FakeSink("late")
        env.subscribe(late)
        await late.wait_count(1)
        await env.publish("E", "after")
        assert (await late.wait_count(2))[1] == event(n + 1, d="after")
        assert (await own.wait_count(n + 2))[-1] == event(n + 1, d="after")


async def test_a_credit_for_an_earlier_run_does_not_release_the_hold() -> None:
    """A partition's ``Written`` credit covers the runs it had when it wrote;
    a run the guild sent after them (a membership change forces one out)
    keeps the partition "writing", so the guild keeps holding (it used to
    take the earlier credit as one for every run: docs/ARCHITECTURE.md
    "Placement")."""
    async with guild_env(partition_size=1) as env:
        own, far = FakeSink("own"), FakeSink("far")
        for sink in (own, far):
            env.subscribe(sink)
            await sink.wait_count(1)
        guild = env.guild
        p = guild.partitions[1]
        assert isinstance(p, Partition)
        gone = FakeSink("gone")
        gone.close(1000, "never subscribed")
        credit, write = p.on_written, p.handle_batch
        assert credit is not None
        queued: list[asyncio.Future[tuple[int, str]]] = []
        #: Whether the guild counted the partition as writing when it began
        #: to write run 2 (after the guild had taken run 1's credit).
        writing_at_run_2: list[bool] = []

        def more() -> None:
            queued.append(guild.call_nowait(PublishMsg("E", check_publish("g-1", "E", 2))))
            guild.cast_system(Subscribe(gone, None))

        def written_then_more() -> None:
            # As the partition finishes run 1 (once): event 2 and a SUBSCRIBE
            # (which sends run 2 at once) reach the guild before the credit,
            # all three in one guild batch (the credit is cast a loop turn
            # later, so they are too).
            if not queued:
                asyncio.get_running_loop().call_soon(more)
            credit()

        async def spy(batch: Any) -> None:
            if queued and not writing_at_run_2:
                writing_at_run_2.append(p in guild._writing)
            await write(batch)

        p.on_written = written_then_more
        p.handle_batch = spy  # type: ignore[method-assign]
        await env.publish("E", 1)  # run 1
        await until(lambda: bool(writing_at_run_2), "run 2 to be written")
        assert writing_at_run_2 == [True]
        await far.wait_count(3)
        await until(lambda: not guild._writing, "run 2's credit")
        assert own.events_s() == far.events_s() == [1, 2]
        assert (await queued[0])[0] == 2


async def test_the_hold_for_a_writing_partition_is_bounded_in_bytes() -> None:
    """While a partition still writes, the guild holds the next run, but at
    most HOLD_BYTES of it (not only HOLD_FRAMES events): 40 events of 30 KB
    go out at once, in the batch that sequenced them."""
    async with guild_env(partition_size=1) as env:
        own, far = FakeSink("own"), FakeSink("far")
        for sink in (own, far):
            env.subscribe(sink)
            await sink.wait_count(1)
        guild = env.guild
        p = guild.partitions[1]
        assert isinstance(p, Partition)
        write = p.handle_batch
        runs: list[int] = []

        async def spy(batch: Any) -> None:
            runs.append(sum(1 for item in batch if isinstance(item, Frames)))
            await write(batch)

        p.handle_batch = spy  # type: ignore[method-assign]
        gone = FakeSink("gone")
        gone.close(1000, "never subscribed")
        n = HOLD_BYTES // 30_000 + 5
        big = check_publish("g-1", "BIG", "x" * 30_000)
        # One guild batch: event 1 sent at once (the SUBSCRIBE forces it out:
        # the partition is now writing), then n large events.
        calls = [guild.call_nowait(PublishMsg("E", check_publish("g-1", "E", 1)))]
        guild.cast_system(Subscribe(gone, None))
        calls += [guild.call_nowait(PublishMsg("BIG", big)) for _ in range(n)]
        for c in calls:
            await c
        await far.wait_count(2 + n)
        # The partition's first batch after it had both runs: not held back.
        assert runs[0] == 2, runs
        assert own.events_s() == far.events_s() == list(range(1, n + 2))


async def test_events_published_while_partitions_write_go_out_in_one_run() -> None:
    """A partition's credit reaches the guild after the loop's next turn, so
    a guild step queued right behind the partition in the same turn (by a
    publish read just before it) holds that publish, and the next run also
    carries what was read while the partition wrote. Cast at once, the
    credit let that step send the one publish as a run of its own and hold
    the rest behind it: three runs where two do (docs/ARCHITECTURE.md
    "Placement")."""
    async with guild_env(partition_size=1) as env:
        own, far = FakeSink("own"), FakeSink("far")
        for sink in (own, far):
            env.subscribe(sink)
            await sink.wait_count(1)
        guild = env.guild
        p = guild.partitions[1]
        assert isinstance(p, Partition)
        loop = asyncio.get_running_loop()
        calls: list[asyncio.Future[tuple[int, str]]] = []

        def publish(d: int) -> None:
            calls.append(guild.call_nowait(PublishMsg("E", check_publish("g-1", "E", d))))

        write = p.handle_batch
        runs: list[list[int]] = []

        async def spy(batch: Any) -> None:
            frames = [f for item in batch if isinstance(item, Frames) for f in item.frames]
            runs.append([m["s"] for m in unframe(b"".join(frames))])
            if len(runs) == 1:
                # Event 3 is published while the partition writes run 1: the
                # loop reads it after this turn.
                loop.call_soon(publish, 3)
            await write(batch)

        p.handle_batch = spy  # type: ignore[method-assign]
        # Event 1; then event 2 reaches the guild after the step that sends
        # run 1 to the partition, so the guild's next step is queued right
        # behind the partition's, in the same loop turn.
        publish(1)
        loop.call_soon(publish, 2)
        await until(lambda: len(calls) == 3, "three publishes")
        for c in calls:
            await c
        await far.wait_count(4)
        await until(lambda: not guild._writing, "the last credit")
        assert runs == [[1], [2, 3]], runs
        assert own.events_s() == far.events_s() == [1, 2, 3]
