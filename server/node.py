"""The node: composition root. Wires protocol, actors and transport together
and runs them in one task group, in the caller's event loop.

    async with Server(Config(port=0, secret="s")) as srv:
        s = await srv.publish("guild-1", "HELLO", {"x": 1})

Start order: task group, broker, process groups, guild registry, hub,
gateway, HTTP API (when ``api_port`` is set). A Redis that does not answer
yet is waited for (``_start_broker``) with the HTTP API already up and not
ready; the gateway listens once Redis answers.
Stop order (graceful): not ready (``/readyz`` 503, HTTP publishes 503), stop
accepting, RECONNECT + 1001 to every session, wait for them
(``drain_timeout``), stop the HTTP API (in-flight requests finish), stop
every guild, cancel the sweeper, close the broker (a durable one fsyncs
and closes its journals).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from guildcast.actors.feed import FeedRouter
from guildcast.actors.groups import Groups
from guildcast.actors.guild import Guild, GuildSettings
from guildcast.actors.hub import Hub, check_publish
from guildcast.actors.passive import PassiveBoard
from guildcast.actors.registry import Registry
from guildcast.broker.base import (
    Broker,
    BrokerUnavailable,
    ExplainsHealth,
    ReportsMetrics,
    Sweeps,
)
from guildcast.broker.disk import DiskBroker
from guildcast.broker.memory import MemoryBroker
from guildcast.config import COMPRESSION_MODES, Config
from guildcast.core.failures import Overloaded
from guildcast.core.host import HistoryPage
from guildcast.core.idempotency import KeyWindows
from guildcast.core.journal import FSYNC_POLICIES
from guildcast.core.metrics import MetricsSnapshot, NodeStats
from guildcast.core.stopclock import StopClock
from guildcast.core.tokens import TokenVerifier, make_token
from guildcast.protocol.deflate import Deflater
from guildcast.protocol.session import Limits
from guildcast.protocol.wire import IDEMPOTENCY_KEY_RULE, valid_guild, valid_idempotency_key
from guildcast.transport.drain import PEER_DRAIN_SPREAD
from guildcast.transport.gateway import Gateway, GatewayLimits

if TYPE_CHECKING:
    # Imported when the API is started (``_start_api``): aiohttp and the
    # API's modules were 0.3-0.6 s of every start, a restart's included,
    # and a node without ``--api-port`` never needs them.
    from guildcast.transport.http_api import HttpApi

log = logging.getLogger("guildcast.node")
#: Longest pause between two broker sweeps (seconds): a sweep walks every
#: guild log, so not more often than the history can age out, and at least
#: once a minute so forgotten guilds do not pile up.
BROKER_SWEEP_MAX = 60.0
#: Seconds between attempts to reach a Redis that did not answer at start:
#: quick enough that a node is ready soon after its Redis, rare enough to
#: cost nothing while it waits.
BROKER_RETRY = 0.5
#: Seconds between two "still waiting for Redis" log lines.
BROKER_WAIT_LOG = 10.0


class Server:
    """One Guildcast node. Use as ``async with Server(config) as srv``."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        cfg = self.config
        if cfg.fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}")
        if cfg.compression not in COMPRESSION_MODES:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSION_MODES)}")
        if cfg.data_dir and cfg.redis:
            raise ValueError("data_dir and redis exclude each other: Redis holds the history")
        if not cfg.passive_interval > 0:
            raise ValueError("passive_interval must be > 0 seconds")
        if cfg.listen_sockets < 1:
            raise ValueError("listen_sockets must be 1 or more")
        if cfg.secret == "" or "" in cfg.api_keys:
            # An empty GUILDCAST_SECRET is a mistake, never "generate one".
            raise ValueError("the secret and API keys must not be empty")
        self.secret = self.config.secret or secrets.token_urlsafe(32)
        #: This node's name in the cluster (presence, logs).
        self.node_id = self.config.node_id or f"{socket.gethostname()}:{os.getpid()}"
        #: Keys the HTTP API accepts; one is generated when none is configured.
        self.api_keys: tuple[str, ...] = tuple(cfg.api_keys) or (secrets.token_urlsafe(24),)
        self.port = 0
        #: The HTTP API's port (0 while it does not run).
        self.api_port = 0
        self.api: HttpApi | None = None
        #: This node's own API port (``node_api_port``; 0 while none).
        self.node_api_port = 0
        #: Why the broker could not start yet ("" once it runs; ``_start_broker``).
        self._waiting_broker = ""
        #: True once the gateway, hub and registry exist (the API may run before).
        self._gateway_up = False
        #: Counters the actors add to, read by ``/metrics``.
        self.stats_counters = NodeStats()
        self.draining = False
        self._tg: asyncio.TaskGroup | None = None
        self._stack = contextlib.AsyncExitStack()
        self._started = False
        #: Forgets aged-out guild logs of an in-process broker (``_sweep_broker``).
        self._broker_sweeper: asyncio.Task[None] | None = None
        #: The passive subscriptions' notice ticker (``PassiveBoard.run``).
        self._passive_ticker: asyncio.Task[None] | None = None
        self.passive: PassiveBoard
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
        # The node's one task group, left in stop(); every task of the node
        # (actors, the gateway's sweeper, the broker's tasks) is started in it.
        self._stack = contextlib.AsyncExitStack()
        tg = self._tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        # What start() has started, undone in reverse if a later step fails.
        unwind = contextlib.AsyncExitStack()
        try:
            await self._start_parts(tg, unwind)
        except BaseException:
            self._gateway_up = False
            await unwind.aclose()
            await self._stack.aclose()
            raise
        unwind.pop_all()  # from here on stop() stops the parts, in its order
        self._started = True
        log.info("gateway listening on %s", self.url, extra={"url": self.url})

    async def _start_parts(self, tg: asyncio.TaskGroup, unwind: contextlib.AsyncExitStack) -> None:
        cfg = self.config
        settings = GuildSettings(
            partition_size=cfg.partition_size,
            idle_timeout=cfg.idle_timeout,
            mailbox_bound=cfg.guild_mailbox,
            max_rewind=cfg.max_rewind,
            presence_limit=cfg.presence_limit,
        )
        self.broker = self._make_broker()
        if cfg.redis:  # even never started: its client to let go of
            unwind.push_async_callback(self.broker.close)
        unwind.push_async_callback(self._stop_api)
        await self._start_broker()
        if not cfg.redis:
            unwind.push_async_callback(self.broker.close)
        self.groups = Groups("guilds")
        broker = self.broker
        counters = self.stats_counters
        # Passive subscriptions' notices: one board and one ticker per node.
        board = self.passive = PassiveBoard(cfg.passive_interval)
        self._passive_ticker = tg.create_task(board.run(), name="passive-notices")
        unwind.callback(self._passive_ticker.cancel)
        self.registry = Registry(
            lambda gid: Guild(gid, settings, self.groups, tg, broker, counters, board),
            tg,
            max_actors=cfg.max_guilds,
        )
        # Only a remote feed (Redis) arrives as messages; in-process logs hand
        # appended records back to the appending guild (actors/feed.py).
        FeedRouter(self.registry).attach(broker)
        share = cfg.user_guild_share
        self.hub = Hub(
            self.registry,
            self.groups,
            max(1, int(cfg.max_guilds * share)) if 0 < share < 1 else None,
        )
        self.gateway = Gateway(
            self.hub,
            TokenVerifier(self.secret, previous=cfg.previous_secrets),
            Limits(
                heartbeat_interval_ms=cfg.heartbeat_interval_ms,
                identify_timeout=cfg.identify_timeout,
                command_limit=cfg.command_limit,
                command_window=cfg.command_window,
                publish_rate=cfg.publish_rate,
                max_payload=cfg.max_payload,
                max_subscriptions=cfg.max_subscriptions,
                max_pending_publishes=cfg.max_pending_publishes,
            ),
            GatewayLimits(
                max_frame=cfg.max_frame,
                max_buffer=cfg.max_buffer,
                max_connections=cfg.max_connections,
                handshake_timeout=cfg.handshake_timeout,
                close_timeout=cfg.close_timeout,
                user_publish_bytes=cfg.user_publish_bytes,
                admit_rate=cfg.admit_rate,
            ),
            # One compressor per node: every event compressed once for all.
            Deflater(cfg.compression_threshold) if cfg.compression == "on" else None,
        )
        self.gateway.demo_page = cfg.demo_page
        self.gateway.readiness = lambda: "" if self.ready else self.not_ready_reason
        self._gateway_up = True
        unwind.push_async_callback(self.gateway.close)
        self.port = await self.gateway.start(
            cfg.host, cfg.port, tg, cfg.reuse_port, cfg.listen_sockets
        )
        if self.api is None:
            await self._start_api()
        if isinstance(self.broker, Sweeps):
            self._broker_sweeper = tg.create_task(
                self._sweep_broker(self.broker), name="broker-sweeper"
            )

    async def _start_api(self) -> None:
        """Start the HTTP API (and the per-node listener) when configured."""
        cfg = self.config
        if cfg.api_port is None or cfg.api_port < 0:
            return
        from guildcast.transport.http_api import ApiSettings, HttpApi

        api = HttpApi(
            NodeApi(self),
            ApiSettings(
                keys=self.api_keys,
                metrics_open=cfg.metrics_open,
                max_body=cfg.api_max_body,
                max_batch=cfg.api_max_batch,
                max_payload=cfg.max_payload,
                publish_rate=cfg.api_publish_rate,
                body_timeout=cfg.api_body_timeout,
                idle_timeout=cfg.api_idle_timeout,
                reuse_port=cfg.reuse_port,
                node=self.node_id if cfg.metrics_node_label else None,
            ),
        )
        self.api_port = await api.start(cfg.host, cfg.api_port)
        self.api = api  # from here on ``_stop_api`` stops it
        # Logged here: while waiting for Redis the API runs before the gateway.
        log.info("HTTP API listening on %s", self.api_url, extra={"url": self.api_url})
        if cfg.node_api_port is not None and cfg.node_api_port >= 0:
            self.node_api_port = await api.add_listener(cfg.host, cfg.node_api_port)

    async def _stop_api(self) -> None:
        if self.api is not None:
            await self.api.stop()
            self.api = None

    async def _start_broker(self) -> None:
        """Start the broker. Redis that does not answer yet (it starts after
        us: a container, a reboot) is waited for, retrying every
        ``BROKER_RETRY`` s and logging at most every ``BROKER_WAIT_LOG`` s,
        with the HTTP API already up answering ``/readyz`` 503 "waiting for
        the broker"; the gateway listens once Redis answers. Other brokers
        fail at once."""
        try:
            await self.broker.start(self._tg)
            return
        except BrokerUnavailable as e:
            if not self.config.redis:
                raise
            self._waiting_broker = str(e)
        log.warning("waiting for Redis: %s", self._waiting_broker)
        await self._start_api()
        last_log = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(BROKER_RETRY)
            try:
                await self.broker.start(self._tg)
            except BrokerUnavailable as e:
                self._waiting_broker = str(e)
                now = asyncio.get_running_loop().time()
                if now - last_log >= BROKER_WAIT_LOG:
                    last_log = now
                    log.warning("still waiting for Redis: %s", e)
                continue
            self._waiting_broker = ""
            log.info("Redis answers: starting the gateway")
            return

    def _make_broker(self) -> Broker:
        cfg = self.config
        if cfg.redis:
            from guildcast.broker.redis import RedisBroker

            return RedisBroker(
                cfg.redis,
                cfg.history_size,
                cfg.history_ttl,
                node_id=self.node_id,
                presence_timeout=cfg.presence_timeout,
                op_timeout=cfg.redis_timeout,
                feed_deadline=cfg.feed_deadline,
                idempotency_ttl=cfg.idempotency_ttl,
                idempotency_keys=cfg.idempotency_guild_keys,
            )
        keys = KeyWindows(
            cfg.idempotency_ttl, cfg.idempotency_guild_keys, cfg.idempotency_node_keys
        )
        if cfg.data_dir:
            disk = DiskBroker(
                cfg.data_dir,
                cfg.history_size,
                cfg.history_ttl,
                cfg.fsync,
                cfg.fsync_interval,
                history_guild_bytes=cfg.history_guild_bytes,
                history_node_bytes=cfg.history_node_bytes,
                idempotency=keys,
            )
            disk.node_id = cfg.node_id or "local"
            return disk
        # Without Redis, presence names the node by --node-id, else "local".
        return MemoryBroker(
            cfg.history_size,
            cfg.history_ttl,
            node_id=cfg.node_id or "local",
            history_guild_bytes=cfg.history_guild_bytes,
            history_node_bytes=cfg.history_node_bytes,
            idempotency=keys,
        )

    async def _sweep_broker(self, broker: Sweeps) -> None:
        """Every ``history_ttl`` (1 s to ``BROKER_SWEEP_MAX``), forget the guild
        logs whose history has aged out and that no guild listens to
        (``MemoryBroker.sweep``): without it every guild id ever used keeps
        its log for the life of the process, a leak one client can drive."""
        interval = min(BROKER_SWEEP_MAX, max(1.0, self.config.history_ttl))
        while True:
            await asyncio.sleep(interval)
            if n := broker.sweep():
                log.debug("forgot %d idle guild logs", n)

    def _drain_spread(self) -> float:
        """``drain_spread``, or its default: spread only where other nodes
        can take the sessions (transport/drain.py)."""
        cfg = self.config
        if cfg.drain_spread is not None:
            return cfg.drain_spread
        return PEER_DRAIN_SPREAD if cfg.redis or cfg.reuse_port else 0.0

    async def stop(self, drain: bool = True) -> None:
        """Stop the node. With ``drain`` every session gets RECONNECT then 1001."""
        if not self._started:
            return
        self._started = False
        self.draining = True
        assert self._tg is not None
        phases = StopClock()
        try:
            log.info("draining: %d sessions", len(self.gateway.connections))
            if drain:
                await self.gateway.drain(self.config.drain_timeout, self._drain_spread())
            else:
                await self.gateway.drain(0)
            phases.mark("drain")
            if self.api is not None:
                await self.api.stop()
            phases.mark("api")
            await self.registry.stop_all()
            phases.mark("guilds")
            await self.gateway.close()
            if self._broker_sweeper is not None:
                self._broker_sweeper.cancel()
            if self._passive_ticker is not None:
                self._passive_ticker.cancel()
            await self.broker.close()
            phases.mark("broker")
        finally:
            await self._stack.aclose()
        log.info(
            "node stopped", extra={"stop_seconds": phases.total, "stop_phases": phases.seconds}
        )

    # --- embedded API --------------------------------------------------------

    async def publish(
        self, gid: str, t: str, d: Any = None, *, idempotency_key: str | None = None
    ) -> int:
        """Publish event ``t`` with data ``d`` to guild ``gid``; returns its ``s``.

        With ``idempotency_key``, a publish repeating a key of the guild's
        window returns the original's ``s`` (PROTOCOL.md "Idempotent publish").
        Raises ValueError for a bad guild id, event name, key or non-JSON
        ``d``, :class:`guildcast.core.failures.Overloaded` when the guild is
        busy (``MailboxFull``) or too many guilds are alive (``RegistryFull``),
        :class:`guildcast.core.failures.KeyConflict` for a key used by another
        event, and another runtime ``Failure`` (``BrokerUnavailable``,
        ``OutcomeUnknown``, ``ActorExited``) as ``core/failures.py`` lists them.
        """
        s, _epoch = await self.publish_ex(gid, t, d, idempotency_key=idempotency_key)
        return s

    async def publish_ex(
        self, gid: str, t: str, d: Any = None, *, idempotency_key: str | None = None
    ) -> tuple[int, str]:
        """Like :meth:`publish` but returns ``(s, epoch)``."""
        if idempotency_key is not None and not valid_idempotency_key(idempotency_key):
            raise ValueError(f"idempotency_key must be {IDEMPOTENCY_KEY_RULE}")
        return await self.hub.publish(gid, t, check_publish(gid, t, d), idempotency_key)

    async def head(self, gid: str) -> tuple[str, int]:
        """``(epoch, s)`` of guild ``gid``'s last event (``s`` is 0 if none):
        the Position a client subscribes with to get every event after it.

        Raises ValueError for a bad guild id and a runtime
        :class:`guildcast.core.failures.Failure` (``CallTimeout``,
        ``MailboxFull``, ...) when the guild cannot answer now.
        """
        if not valid_guild(gid):
            raise ValueError(f"invalid guild id {gid!r}")
        info = await self.hub.info(gid)
        return str(info["epoch"]), int(info["s"])

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

    @property
    def api_url(self) -> str:
        """The HTTP API's base URL (``http://host:port``)."""
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.api_port}"

    @property
    def api_key(self) -> str:
        """The first HTTP API key (the generated one when none was configured)."""
        return self.api_keys[0]

    @property
    def ready(self) -> bool:
        """True while started, not draining and with a reachable broker (``/readyz``)."""
        return self._started and not self.draining and self.broker.healthy

    @property
    def not_ready_reason(self) -> str:
        if self.draining:
            return "draining"
        if self._waiting_broker:
            return f"waiting for the broker: {self._waiting_broker}"
        if not self._started:
            return "not started"
        if not self.broker.healthy:
            broker = self.broker
            # Disk: "cannot persist to DIR: No space left..."; Redis: which
            # part is down (link, feed, policy).
            if isinstance(broker, ExplainsHealth) and broker.unhealthy_reason:
                return broker.unhealthy_reason
            return "broker unavailable"
        return ""

    def metrics(self) -> MetricsSnapshot:
        """Everything ``/metrics`` exports, read now: each layer fills its own
        fields (``ReportsMetrics``: the gateway, the hub for the guild
        actors, the actors' counters, the broker); the node adds readiness."""
        if not self._gateway_up:  # the API runs while waiting for Redis
            return MetricsSnapshot(ready=False, broker_up=False)
        m = MetricsSnapshot(ready=self.ready, broker_up=self.broker.healthy)
        parts: tuple[object, ...] = (
            self.gateway,
            self.hub,
            self.stats_counters,
            self.broker,
            self.passive,
        )
        for part in parts:
            if isinstance(part, ReportsMetrics):
                part.report_metrics(m)
        return m


class NodeApi:
    """The HTTP API's way into a node (implements ``guildcast.core.host.ApiHost``).

    The actors' and brokers' failures (full mailbox, actor gone, call
    timeout, broker unavailable, outcome unknown) pass through as they are:
    each is a ``core.failures.Failure`` and the transport answers it from
    the one table there.
    """

    def __init__(self, srv: Server) -> None:
        self._srv = srv

    def publish(
        self, gid: str, t: str, d_json: bytes, key: str | None = None
    ) -> asyncio.Future[tuple[int, str]]:
        if not self._srv._gateway_up:
            raise Overloaded(self._srv.not_ready_reason)
        return self._srv.hub.publish(gid, t, d_json, key)

    def _broker(self) -> Broker:
        if not self._srv._gateway_up:
            raise Overloaded(self._srv.not_ready_reason)
        return self._srv.broker

    async def info(self, gid: str) -> dict[str, Any]:
        """A guild's head and history bounds. A guild alive on this node
        answers itself (with its subscriber count); any other is read from
        the broker without starting a guild actor, so reads never hold a
        ``max_guilds`` slot or live for ``idle_timeout``."""
        cfg = self._srv.config
        broker = self._broker()
        if self._srv.registry.lookup(gid) is not None:
            info = await self._srv.hub.info(gid)
        else:
            epoch, head = await broker.head(gid)
            first = await broker.first(gid)
            info = {
                "guild": gid,
                "epoch": epoch,
                "s": head,
                "subscribers": 0,
                "history": {"first": first, "last": head if first is not None else None},
            }
        info["history"] = {
            **info["history"],
            "max_count": cfg.history_size,
            "max_age": cfg.history_ttl,
        }
        return info

    async def history(self, gid: str, after: int, limit: int) -> HistoryPage:
        """Stored events after ``after``; like :meth:`info`, a guild not alive
        here is read from the broker without starting its actor."""
        broker = self._broker()
        if self._srv.registry.lookup(gid) is not None:
            return await self._srv.hub.history_page(gid, after, limit)
        # Records first: the head read after them is at or past their last s.
        epoch2, records = await broker.read(gid, after, limit)
        epoch, head = await broker.head(gid)
        first = await broker.first(gid)
        if epoch2 != epoch:  # the history restarted between the reads
            raise Overloaded(f"guild {gid}: its history changed; try again")
        return HistoryPage(gid, epoch, head, first, [r.payload for r in records])

    def ready(self) -> bool:
        return self._srv.ready

    def not_ready_reason(self) -> str:
        return self._srv.not_ready_reason

    async def presence(self, gid: str) -> list[dict[str, str]]:
        members = await self._broker().presence(gid)
        return [m.as_dict() for m in members]

    def metrics(self) -> MetricsSnapshot:
        return self._srv.metrics()
