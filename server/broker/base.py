"""The broker contract: per-guild sequencing, history and live feed.

A broker gives each guild one totally ordered log. ``append`` assigns the
next ``s`` values atomically (one writer per guild in memory mode; one Lua
script per batch in Redis mode), keeps the guild's history bounded by count
and age, and delivers every appended record to the nodes listening to that
guild, in ``s`` order. ``read`` returns stored records for recovery.

Consistency model: within an epoch, ``s`` grows by exactly one per event and
no two events share an ``s``. An epoch changes only when the guild's history
is lost; a reader seeing a new epoch must treat every old Position as lost.
Live feeds may repeat or skip records across a broker reconnect; listeners
dedupe by ``s`` and fill gaps with ``read`` (the guild actor does). A feed
record may carry the epoch it was sequenced under (``Record.epoch``; the
Redis broker's does): a listener must not forward a record of another epoch
as the continuation of its own. A broker that cannot bridge a feed outage
tells each listener :data:`FEED_LOST`: the listener must stop serving from
that feed (the guild actor closes its sessions with 4000).

Implementations: ``guildcast.broker.memory.MemoryBroker`` and
``guildcast.broker.disk.DiskBroker`` (one node), ``guildcast.broker.redis.RedisBroker``
(cluster). The shared contract suite, ``tests/broker/test_contract.py``, runs
against every implementation, and against a third-party one given a small
harness (how to make it and inject its faults: ``tests/broker/harness.py``)
named in ``GUILDCAST_BROKER_HARNESS=module:Class``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final, Literal, NamedTuple, Protocol, runtime_checkable

from guildcast.core.failures import Failure, Kind
from guildcast.core.failures import OutcomeUnknown as HostOutcomeUnknown
from guildcast.core.idempotency import Replayed
from guildcast.core.metrics import ReportsMetrics as ReportsMetrics


class Record(NamedTuple):
    """One stored event."""

    s: int
    t: str
    #: Publish wall time, seconds since the Unix epoch (for the age bound).
    ts: float
    #: The DISPATCH envelope as JSON: ``{"op":0,"t":…,"g":…,"s":…,"d":…}``.
    payload: bytes
    #: The epoch the record was sequenced under, where the feed carries it
    #: ("" where it does not: in-process brokers, whose epoch cannot change
    #: under a listener).
    epoch: str = ""


class BrokerUnavailable(Failure):
    """The broker cannot be reached; nothing was appended. Retry later."""

    kind = Kind.BROKER_UNAVAILABLE


class OutcomeUnknown(BrokerUnavailable, HostOutcomeUnknown):
    """The append was sent but no answer came (a timeout, a connection lost
    while waiting): the events may or may not have been sequenced. Never
    report it as "not published"."""

    kind = Kind.OUTCOME_UNKNOWN


class EpochChanged(Exception):
    """The guild's history was lost: its epoch is not the one the caller knew."""


#: Told to a listener when the broker's feed has been dead too long to bridge.
FEED_LOST: Final = "lost"

#: A listener gets records in ``s`` order (possibly repeated after a reconnect),
#: ``None`` to be told "you may have missed records: check with read()", or
#: :data:`FEED_LOST`: "records are not reaching you; stop serving from me".
Feed = Callable[[str, "list[Record] | Literal['lost'] | None"], None]

#: Presence changes of a listened guild: ``(gid, "join" | "leave", member,
#: version)``. ``version`` numbers the guild's presence changes (below);
#: None from a node of an earlier version, whose changes carry none.
PresenceFeed = Callable[[str, str, "Presence", "int | None"], None]


class Presence(NamedTuple):
    """A session in a guild's presence: who, which session, on which node."""

    user: str
    session: str
    node: str

    @property
    def key(self) -> str:
        return f"{self.node}/{self.session}"

    def as_dict(self) -> dict[str, str]:
        return {"user": self.user, "session": self.session, "node": self.node}


class PresenceSnapshot(NamedTuple):
    """A guild's presence at one ``version`` (``Broker.presence_snapshot``).

    Presence versions: every change of a guild's presence (a join of a
    member not present, a leave of one present) takes the next version,
    atomically with the change and with its announcement to the listening
    nodes, so the feed carries the changes in version order, one version
    apart. A snapshot at ``version`` holds exactly the changes up to it: a
    listener that subscribed to the guild's feed before taking it applies
    the changes after ``version`` and skips the ones at or before it (they
    may still be on their way) to stay exactly in step. A guild's versions
    never go back, even after the broker forgot an unused guild
    (docs/RELIABILITY.md, "Presence snapshot and diffs").
    """

    version: int
    #: Members in the guild's presence (all of them, the dead node's
    #: members not yet reaped included: those leave when reaped).
    total: int
    #: At most the ``limit`` asked for of them (which ones, when there are
    #: more, is the broker's choice).
    members: list[Presence]


class Broker(Protocol):
    """Sequencing, history and cross-node fanout for every guild."""

    #: This node's name in presence (``Presence.node``).
    node_id: str

    @property
    def healthy(self) -> bool:
        """False while the broker is unreachable (publishes then fail)."""

    async def start(self, tg: asyncio.TaskGroup | None = None) -> None:
        """Connect; raises :class:`BrokerUnavailable` if it cannot.

        Background tasks (a Redis reader, a journal syncer) are started in
        ``tg``, the node's task group; :meth:`close` cancels and awaits them.
        Without one (a broker used on its own) they are the loop's, owned by
        the broker until :meth:`close`.
        """

    async def close(self) -> None: ...

    async def append(self, gid: str, items: Sequence[tuple[str, bytes]]) -> tuple[str, list[int]]:
        """Sequence ``(t, d_json)`` items in order; returns ``(epoch, [s, …])``.

        ``t`` must be a valid event name and ``gid`` a valid guild id (both
        are put into the JSON envelope verbatim); ``d_json`` is valid JSON.
        Raises :class:`BrokerUnavailable`.
        """

    async def append_keyed(
        self, gid: str, items: Sequence[tuple[str, bytes]], keys: Sequence[str | None]
    ) -> tuple[str, list[int | Replayed]]:
        """:meth:`append` with an idempotency key (or None) per item.

        An item whose key is in the guild's window under the current epoch
        (or repeats an earlier item's key in ``items``) is not sequenced:
        its answer is ``Replayed(original s, conflict)``, ``conflict`` when
        its ``t``/``d`` differ from the original's; every other item gets
        its new ``s``. Sequencing and the window's update are one atomic
        step per guild (PROTOCOL.md "Publishing", "Idempotent publish").
        """

    async def head(self, gid: str) -> tuple[str, int]:
        """The guild's ``(epoch, last s)``, creating its epoch if it has none."""

    async def read(self, gid: str, after: int, limit: int) -> tuple[str, list[Record]]:
        """``(epoch, records with s > after)``, oldest first, at most ``limit``.

        Records older than the history bounds are gone: the first returned
        ``s`` may be greater than ``after + 1``.
        """

    async def first(self, gid: str) -> int | None:
        """The oldest ``s`` still in history, or None when it is empty."""

    async def listen(self, gid: str) -> None:
        """Start delivering ``gid``'s records to the feed; returns once every
        record appended after this call returns will be delivered.

        Calls are counted: delivery stops after as many :meth:`unlisten`
        (an actor that is stopping and its successor may overlap). A listen
        that raises needs no unlisten.
        """

    async def unlisten(self, gid: str) -> None: ...

    def set_feed(self, feed: Feed, presence: PresenceFeed | None = None) -> None:
        """Where live records go (``feed(gid, records)``) and presence changes."""

    # --- presence: distributed process groups of sessions ------------------------

    def presence_join(self, gid: str, member: Presence) -> None:
        """Record ``member`` in ``gid``'s presence and tell every listening node
        (a member already present is no change: nothing is told).

        Never waits: the write is queued (bounded; past the bound presence
        updates are dropped with a warning, never publishes).
        """

    def presence_leave(self, gid: str, member: Presence) -> None:
        """The reverse of :meth:`presence_join`."""

    async def presence(self, gid: str) -> list[Presence]:
        """Every live member of ``gid`` across the cluster.

        Members of a node that stopped heart-beating are left out once its
        ``presence_timeout`` has passed, and removed for good soon after.
        """

    async def presence_snapshot(self, gid: str, limit: int) -> PresenceSnapshot:
        """``gid``'s presence at its current version, at most ``limit`` members
        listed (see :class:`PresenceSnapshot`). Raises :class:`BrokerUnavailable`.
        """


def spawn(
    tg: asyncio.TaskGroup | None, coro: Coroutine[Any, Any, None], name: str
) -> asyncio.Task[None]:
    """Start a broker's background task in ``tg`` (see :meth:`Broker.start`)."""
    if tg is not None:
        return tg.create_task(coro, name=name)
    return asyncio.get_running_loop().create_task(coro, name=name)


# --- optional capabilities, found by protocol (``isinstance``), never by class --


@runtime_checkable
class Sweeps(Protocol):
    """A broker holding per-guild state in process that must be forgotten
    from time to time (the node calls ``sweep`` every ``history_ttl``)."""

    def sweep(self) -> int:
        """Forget what no one uses any more; returns how many guilds."""


@runtime_checkable
class ExplainsHealth(Protocol):
    """A broker that says why it is unhealthy (``/readyz``)."""

    @property
    def unhealthy_reason(self) -> str:
        """ "" while healthy, else what is down, in a few words."""


@runtime_checkable
class LocalLog(Protocol):
    """A capability of an in-process broker (memory, disk): the log lives in
    this process, so the one appender of a guild (its actor; the registry
    never runs two) is also its only listener on this node.

    Found by protocol (``isinstance(broker, LocalLog)``), never by class.
    """

    async def append_local(
        self, gid: str, items: Sequence[tuple[str, bytes]]
    ) -> tuple[str, list[Record]]:
        """Like :meth:`Broker.append`, but the appended records are returned
        instead of being delivered to the feed: the caller emits them in the
        same step (one guild step per publish). Raises :class:`BrokerUnavailable`.
        """

    async def append_local_keyed(
        self, gid: str, items: Sequence[tuple[str, bytes]], keys: Sequence[str | None]
    ) -> tuple[str, list[Record], list[int | Replayed]]:
        """:meth:`Broker.append_keyed` returning the new records too (only
        those of items that were sequenced), like :meth:`append_local`."""


@runtime_checkable
class AppendsNow(Protocol):
    """A capability of an in-process log that never waits (memory): the
    :meth:`LocalLog.append_local` of a guild whose log is where its actor's
    cursor is, done synchronously, so that a guild can sequence and emit a
    publish in a step run on the publisher's stack (``Actor.step_now``).

    Found by protocol (``isinstance(broker, AppendsNow)``), never by class.
    """

    def append_local_now(
        self, gid: str, items: Sequence[tuple[str, bytes]], epoch: str, head: int
    ) -> list[Record] | None:
        """Append ``items`` and return their records if ``gid``'s log has
        epoch ``epoch`` and last ``s`` ``head``; else append nothing and
        return None (the caller takes the ordinary, awaited path)."""


#: ``done(result, error)``: an append's ``(epoch, [s])``, or the failure
#: (:class:`BrokerUnavailable`, :class:`OutcomeUnknown`) that ended it.
AppendDone = Callable[[tuple[str, list[int]] | None, BaseException | None], None]


@runtime_checkable
class AppendsQueued(Protocol):
    """A capability of a remote broker that queues appends for a pipeline
    of its own (Redis): :meth:`Broker.append` with its answer handed to a
    callback instead of awaited, so that a parked guild can send a publish
    from the publisher's stack (``Actor.step_now``) with no task step of
    its own, and be told ``(epoch, [s])`` when the broker answers.

    Appends queued by one caller are sequenced in the order queued.
    Found by protocol (``isinstance(broker, AppendsQueued)``), never by class.
    """

    def append_queued(self, gid: str, items: Sequence[tuple[str, bytes]], done: AppendDone) -> None:
        """Queue the append of ``items``; ``done`` is called exactly once,
        later (never on the caller's stack), with ``((epoch, [s]), None)``
        or ``(None, failure)``. Raises :class:`BrokerUnavailable`, with
        nothing queued, when the broker cannot take it now."""
