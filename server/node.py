"""The node: composition root. Wires protocol, actors and transport together
and runs them in one task group, in the caller's event loop.

    async with Server(Config(port=0, secret="s")) as srv:
        s = await srv.publish("guild-1", "HELLO", {"x": 1})

Start order: task group, process groups, guild registry, hub, gateway.
Stop order (graceful): stop accepting, RECONNECT + 1001 to every session,
wait for them (``drain_timeout``), stop every guild, cancel the sweeper.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from typing import Any

from server.actors.groups import Groups
from server.actors.guild import Feed, Guild, GuildSettings
from server.actors.hub import Hub
from server.actors.registry import Registry
from server.broker.base import Broker, Record
from server.broker.memory import MemoryBroker
from server.config import Config
from server.core.tokens import TokenVerifier, make_token
from server.protocol.session import Limits
from server.transport.gateway import Gateway, GatewayLimits

log = logging.getLogger("guildcast.node")


class Server:
    """One Guildcast node. Use as ``async with Server(config) as srv``."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self.secret = self.config.secret or secrets.token_urlsafe(32)
        self.port = 0
        self._tg: asyncio.TaskGroup | None = None
        self._started = False
        self.groups: Groups
        self.registry: Registry[Guild]
        self.hub: Hub
        self.gateway: Gateway
        self.broker: Broker

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """The gateway's WebSocket URL."""
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"ws://{host}:{self.port}/gateway"

    async def start(self) -> None:
        """Start the node; on return the gateway is listening on ``self.port``."""
        if self._started:
            raise RuntimeError("server already started")
        cfg = self.config
        tg = self._tg = asyncio.TaskGroup()
        await tg.__aenter__()
        settings = GuildSettings(
            partition_size=cfg.partition_size,
            idle_timeout=cfg.idle_timeout,
            mailbox_bound=cfg.guild_mailbox,
        )
        self.broker = self._make_broker()
        await self.broker.start()
        self.broker.set_feed(self._feed)
        self.groups = Groups("guilds")
        broker = self.broker
        self.registry = Registry(
            lambda gid: Guild(gid, settings, self.groups, tg, broker),
            tg,
            max_actors=cfg.max_guilds,
        )
        self.hub = Hub(self.registry, self.groups)
        self.gateway = Gateway(
            self.hub,
            TokenVerifier(self.secret),
            Limits(
                heartbeat_interval_ms=cfg.heartbeat_interval_ms,
                identify_timeout=cfg.identify_timeout,
                command_limit=cfg.command_limit,
                command_window=cfg.command_window,
                publish_rate=cfg.publish_rate,
                max_payload=cfg.max_payload,
                max_subscriptions=cfg.max_subscriptions,
            ),
            GatewayLimits(
                max_frame=cfg.max_frame,
                max_buffer=cfg.max_buffer,
                max_connections=cfg.max_connections,
                handshake_timeout=cfg.handshake_timeout,
                close_timeout=cfg.close_timeout,
            ),
        )
        try:
            self.port = await self.gateway.start(cfg.host, cfg.port, tg, cfg.reuse_port)
        except BaseException:
            await tg.__aexit__(None, None, None)
            raise
        self._started = True
        log.info("gateway listening on %s", self.url)

    def _make_broker(self) -> Broker:
        cfg = self.config
        if cfg.redis:
            from server.broker.redis import RedisBroker

            return RedisBroker(cfg.redis, cfg.history_size, cfg.history_ttl)
        return MemoryBroker(cfg.history_size, cfg.history_ttl)

    def _feed(self, gid: str, records: list[Record] | None) -> None:
        """Broker feed -> the guild's mailbox (a system message: never dropped)."""
        guild = self.registry.lookup(gid)
        if guild is not None:
            guild.cast_system(Feed(records))

    async def stop(self, drain: bool = True) -> None:
        """Stop the node. With ``drain`` every session gets RECONNECT then 1001."""
        if not self._started:
            return
        self._started = False
        assert self._tg is not None
        try:
            if drain:
                await self.gateway.drain(self.config.drain_timeout)
            else:
                await self.gateway.drain(0)
            await self.registry.stop_all()
            await self.gateway.close()
            await self.broker.close()
        finally:
            await self._tg.__aexit__(None, None, None)
        log.info("node stopped")

    # --- embedded API --------------------------------------------------------

    async def publish(self, gid: str, t: str, d: Any = None) -> int:
        """Publish event ``t`` with data ``d`` to guild ``gid``; returns its ``s``.

        Raises ValueError for a bad guild id, event name or non-JSON ``d``, and
        :class:`server.core.host.Overloaded` when the guild is busy.
        """
        s, _epoch = await self.hub.publish(gid, t, d)
        return s

    async def publish_ex(self, gid: str, t: str, d: Any = None) -> tuple[int, str]:
        """Like :meth:`publish` but returns ``(s, epoch)``."""
        return await self.hub.publish(gid, t, d)

    def token(
        self,
        sub: str,
        guilds: Sequence[str] = ("*",),
        pub: Sequence[str] = (),
        pub_rate: float | None = None,
        ttl: float | None = 3600,
    ) -> str:
        """A token signed with this node's secret (for tests and embedding apps)."""
        return make_token(self.secret, sub, guilds, pub, pub_rate, ttl)

    def disconnect_all(self, code: int, reason: str = "") -> int:
        """Close every session with ``code``; returns how many were closed."""
        conns = list(self.gateway.connections)
        for c in conns:
            c.close(code, reason)
        return len(conns)

    def stats(self) -> dict[str, Any]:
        return {**self.gateway.stats(), "guilds": len(self.registry)}
