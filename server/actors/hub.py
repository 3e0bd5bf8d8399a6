"""Hub: the gateway's way into the guilds (implements ``GatewayHost``).

It joins sessions to their guild's process group, starts guild actors on
demand through the registry and forwards commands to them. Guild state
lives in the guild actors.

Its own state is the per-user share of guild actors (docs/SECURITY.md,
"Resource limits"): a guild is charged to the user whose subscription
started it, or made it subscribed while it had no subscriber and no owner;
a user charged ``user_guild_limit`` guilds gets ERROR 1013 for one more,
until some of theirs stop (an actor stops ``idle_timeout`` after its last
subscriber left, or earlier when ``max_guilds`` is reached and it has none).
Bound: one entry per alive guild with an owner, one per user owning any.
Guilds started by PUBLISH or the HTTP API have no owner: with no subscriber
they are the first stopped when the registry is full.
"""

from __future__ import annotations

import asyncio
from typing import Any

from guildcast.actors.actor import CallTimeout
from guildcast.actors.groups import Groups
from guildcast.actors.guild import (
    Guild,
    HistoryMsg,
    InfoMsg,
    PublishMsg,
    Subscribe,
    Unsubscribe,
)
from guildcast.actors.partition import Partition
from guildcast.actors.registry import Registry
from guildcast.broker.base import Presence, Record
from guildcast.core.failures import Failure, Overloaded
from guildcast.core.host import HistoryPage, PublishReply, Subscriber
from guildcast.core.metrics import MailboxDepth, MetricsSnapshot
from guildcast.protocol import wire
from guildcast.protocol.codes import RESERVED_EVENTS


def check_publish(gid: object, t: object, d: Any) -> bytes:
    """Validate an embedded publish (``Server.publish``) as the session and
    the HTTP API validate theirs; returns ``d`` encoded, once. Raises
    ValueError for a bad guild id, a bad or reserved event name, or a ``d``
    that is not JSON."""
    if not wire.valid_guild(gid):
        raise ValueError(f"invalid guild id {gid!r}")
    if not wire.valid_event(t) or t in RESERVED_EVENTS:
        raise ValueError(f"invalid or reserved event name {t!r}")
    try:
        return wire.encode(d)
    except TypeError as e:
        raise ValueError(f"d is not JSON: {e}") from None


class Hub:
    """Routes gateway and API commands to guild actors."""

    def __init__(
        self, registry: Registry[Guild], groups: Groups, user_guild_limit: int | None = None
    ) -> None:
        self.registry = registry
        self.groups = groups
        #: Guilds one user's subscriptions may hold started; None: no limit.
        self.user_guild_limit = user_guild_limit
        #: gid -> (the user charged for it, the actor charged); user -> how many.
        self._owner: dict[str, tuple[str, Guild]] = {}
        self._owned: dict[str, int] = {}
        #: Subscriptions refused by the share (``guildcast_user_guilds_refused_total``).
        self.share_refused = 0
        registry.evictable = self._evictable

    def _evictable(self, guild: Guild) -> bool:
        """No subscriber, nothing queued, between batches: stopping it loses
        nothing (its history is the broker's)."""
        return guild.parked and not guild.has_sessions and self.groups.count(guild.name) == 0

    def subscribe(
        self,
        sub: Subscriber,
        gid: str,
        position: tuple[str, int] | None,
        rewind: int | None = None,
        passive: bool = False,
    ) -> None:
        if sub.is_closed:
            return
        limit = self.user_guild_limit
        charge = limit is not None and gid not in self._owner and self.groups.count(gid) == 0
        if charge and self._owned.get(sub.user, 0) >= (limit or 0):
            self.share_refused += 1
            raise Overloaded(f"your subscriptions hold {limit} guilds: the most one user may")
        guild = self._guild(gid)
        if charge:
            self._charge(sub.user, gid, guild)
        self.groups.join(gid, sub)
        member = Presence(sub.user, sub.session_id, guild.broker.node_id)
        guild.cast_system(Subscribe(sub, position, member, sub.wants_presence, rewind, passive))

    def unsubscribe(self, sub: Subscriber, gid: str) -> None:
        guild = self.registry.lookup(gid)
        if guild is not None:
            # Unsubscribe first: the guild then answers UNSUBSCRIBED in order;
            # the group leave that follows finds the session already gone.
            guild.cast_system(Unsubscribe(sub))
        self.groups.leave(gid, sub)

    def publish(
        self, gid: str, t: str, d_json: bytes, key: str | None = None
    ) -> asyncio.Future[tuple[int, str]]:
        """Sequence ``t``/``d_json`` in ``gid``, validated at the edge (the
        session, the HTTP API, ``Server.publish``: ``check_publish``), with
        an idempotency ``key`` or None. Raises the runtime's failures as they
        are (``MailboxFull``, ``RegistryFull``, ``ActorExited``; the future:
        ``BrokerUnavailable``, ``OutcomeUnknown``, ``KeyConflict``): the
        transports answer them from one table, ``core/failures.py``."""
        return self._guild(gid).call_nowait(PublishMsg(t, d_json, key))

    def publish_to(
        self,
        gid: str,
        t: str,
        d_json: bytes,
        key: str | None,
        reply: PublishReply,
    ) -> None:
        """:meth:`publish` answered by ``reply(result, error)`` in the
        guild's step instead of through a Future (``Guild.publish_to``; a
        parked guild takes it in a step on this stack): the gateway's
        PUBLISH path. Raises as :meth:`publish` does."""
        self._guild(gid).publish_to(t, d_json, key, reply)

    async def info(self, gid: str, timeout: float = 5.0) -> dict[str, Any]:
        """Head, epoch, subscribers and history bounds of ``gid`` (starts it if needed)."""
        result: dict[str, Any] = await self._guild(gid).call(InfoMsg(), timeout)
        return result

    async def history(
        self, gid: str, after: int, limit: int, timeout: float = 5.0
    ) -> tuple[str, list[Record]]:
        """``(epoch, stored records with s > after)``, at most ``limit``."""
        result: tuple[str, list[Record]] = await self._guild(gid).call(
            HistoryMsg(after, limit), timeout
        )
        return result

    async def history_page(
        self, gid: str, after: int, limit: int, timeout: float = 5.0
    ) -> HistoryPage:
        """Stored events with ``s > after`` (at most ``limit``) with the head and
        history bounds read in the same guild step (``GET .../history``).

        Raises a runtime :class:`Failure` if the guild cannot answer now.
        """
        guild = self._guild(gid)
        # Queued back to back: the guild answers both before anything else.
        info_f = guild.call_nowait(InfoMsg())
        try:
            page_f = guild.call_nowait(HistoryMsg(after, limit))
        except Failure:
            info_f.cancel()
            raise
        try:
            async with asyncio.timeout(timeout):
                info = await info_f
                epoch, records = await page_f
        except TimeoutError:
            raise CallTimeout(f"guild {gid}: no answer within {timeout} s") from None
        finally:
            for f in (info_f, page_f):  # nothing left pending or unretrieved
                if not f.done():
                    f.cancel()
                elif not f.cancelled():
                    f.exception()
        return HistoryPage(
            gid, epoch, info["s"], info["history"]["first"], [r.payload for r in records]
        )

    def _charge(self, user: str, gid: str, guild: Guild) -> None:
        """Charge ``gid`` to ``user`` until this guild actor exits."""
        self._owner[gid] = (user, guild)
        self._owned[user] = self._owned.get(user, 0) + 1

        def release(_: object) -> None:
            owner = self._owner.get(gid)
            if owner is None or owner[1] is not guild:
                return
            del self._owner[gid]
            n = self._owned.get(user, 0) - 1
            if n > 0:
                self._owned[user] = n
            else:
                self._owned.pop(user, None)

        guild.add_exit_hook(release)

    def report_metrics(self, m: MetricsSnapshot) -> None:
        """``ReportsMetrics``: the guild actors (alive, started, evicted,
        subscriptions, guild and partition mailboxes) and the per-user share
        (O(guilds + partitions): scrape time only)."""
        registry = self.registry
        m.guilds_alive = len(registry)
        m.guilds_started = registry.started
        m.guilds_evicted = registry.evicted
        m.user_guilds_refused = self.share_refused
        guilds = m.mailboxes["guild"] = MailboxDepth()
        parts = m.mailboxes["partition"] = MailboxDepth()
        for guild in registry:
            m.subscriptions += guild.subscribers  # passive ones too
            depth = guild.mailbox_depth
            guilds.total += depth
            guilds.max = max(guilds.max, depth)
            for p in guild.partitions:
                if type(p) is not Partition:
                    continue  # the guild's own writer has no mailbox
                depth = p.mailbox_depth
                parts.total += depth
                parts.max = max(parts.max, depth)

    def owned(self, user: str) -> int:
        """Guilds charged to ``user`` now."""
        return self._owned.get(user, 0)

    def _guild(self, gid: str) -> Guild:
        """The guild actor of ``gid``, started if needed; raises
        ``RegistryFull`` (an :class:`Overloaded`) past ``max_guilds``."""
        return self.registry.lookup_or_start(gid)
