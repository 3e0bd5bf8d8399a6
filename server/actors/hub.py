"""Hub: the gateway's way into the guilds (implements ``GatewayHost``).

It joins sessions to their guild's process group, starts guild actors on
demand through the registry and forwards commands to them. It holds no
state of its own beyond references; guild state lives in the guild actors.
"""

from __future__ import annotations

import asyncio
from typing import Any

from guildcast.actors.actor import ActorExited, MailboxFull
from guildcast.actors.groups import Groups
from guildcast.actors.guild import (
    Guild,
    HistoryMsg,
    InfoMsg,
    PublishMsg,
    Subscribe,
    Unsubscribe,
)
from guildcast.actors.registry import Registry, RegistryFull
from guildcast.broker.base import Presence, Record
from guildcast.core.host import HistoryPage, Overloaded, Subscriber
from guildcast.protocol import wire
from guildcast.protocol.codes import RESERVED_EVENTS


class Hub:
    """Routes gateway and API commands to guild actors."""

    def __init__(self, registry: Registry[Guild], groups: Groups) -> None:
        self.registry = registry
        self.groups = groups

    def subscribe(self, sub: Subscriber, gid: str, position: tuple[str, int] | None) -> None:
        if sub.is_closed:
            return
        guild = self._guild(gid)
        self.groups.join(gid, sub)
        member = Presence(sub.user, sub.session_id, guild.broker.node_id)
        guild.cast_system(Subscribe(sub, position, member, sub.wants_presence))

    def unsubscribe(self, sub: Subscriber, gid: str) -> None:
        guild = self.registry.lookup(gid)
        if guild is not None:
            # Unsubscribe first: the guild then answers UNSUBSCRIBED in order;
            # the group leave that follows finds the session already gone.
            guild.cast_system(Unsubscribe(sub))
        self.groups.leave(gid, sub)

    def publish(self, gid: str, t: str, d: Any) -> asyncio.Future[tuple[int, str]]:
        """Sequence ``t``/``d`` in ``gid``; raises ValueError on a bad id or name,
        :class:`Overloaded` if the guild's mailbox is full."""
        if not wire.valid_guild(gid):
            raise ValueError(f"invalid guild id {gid!r}")
        if not wire.valid_event(t) or t in RESERVED_EVENTS:
            raise ValueError(f"invalid or reserved event name {t!r}")
        guild = self._guild(gid)
        try:
            return guild.call_nowait(PublishMsg(t, d))
        except (MailboxFull, ActorExited):
            raise Overloaded(f"guild {gid} is busy") from None

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

        Raises :class:`Overloaded` if the guild cannot answer now.
        """
        guild = self._guild(gid)
        try:
            # Queued back to back: the guild answers both before anything else.
            info_f = guild.call_nowait(InfoMsg())
            page_f = guild.call_nowait(HistoryMsg(after, limit))
        except (MailboxFull, ActorExited):
            raise Overloaded(f"guild {gid} is busy") from None
        try:
            async with asyncio.timeout(timeout):
                info = await info_f
                epoch, records = await page_f
        except (TimeoutError, ActorExited) as e:
            raise Overloaded(f"guild {gid} did not answer: {e!r}") from None
        finally:
            for f in (info_f, page_f):  # nothing left pending or unretrieved
                if not f.done():
                    f.cancel()
                elif not f.cancelled():
                    f.exception()
        return HistoryPage(
            gid, epoch, info["s"], info["history"]["first"], [r.payload for r in records]
        )

    def _guild(self, gid: str) -> Guild:
        try:
            return self.registry.lookup_or_start(gid)
        except RegistryFull:
            raise Overloaded("too many guilds alive") from None
