"""Node configuration: one dataclass, every setting with its default and reason.

``guildcast serve`` fills it from flags and ``GUILDCAST_*`` environment
variables (see ``guildcast.cli``); embedding applications build it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class Config:
    #: Gateway listen address. Loopback by default: exposing it is a choice.
    host: str = "127.0.0.1"
    #: Gateway port; 0 picks a free one (see ``Server.port``).
    port: int = 8080
    #: HS256 secret for tokens; None generates one for this run.
    secret: str | None = None
    #: Earlier secrets still accepted when verifying tokens (never used to
    #: sign): a secret rotation without refusing live tokens (docs/SECURITY.md).
    previous_secrets: tuple[str, ...] = ()

    # Session (PROTOCOL.md "Session flow", "Rate limits")
    heartbeat_interval_ms: int = 30_000
    identify_timeout: float = 10.0
    command_limit: int = 120
    command_window: float = 60.0
    #: Default PUBLISH rate per connection (events/s) for tokens without pub_rate.
    publish_rate: float = 50.0
    #: Largest PUBLISH message (bytes); larger ones get ERROR 4413.
    max_payload: int = 32 * 1024
    max_subscriptions: int = 1000
    #: PUBLISHes one session may have awaiting an answer; one more closes 4008.
    max_pending_publishes: int = 4096

    # Guilds and fanout
    #: Events kept per guild for recovery, by count and by age (seconds).
    history_size: int = 1000
    history_ttl: float = 300.0
    #: Sessions per partition actor: bounds the work of one fanout step.
    partition_size: int = 512
    #: A guild with no session and no message for this long stops (seconds).
    idle_timeout: float = 300.0
    #: Publishes queued per guild before publishers get "try again later".
    guild_mailbox: int = 10_000
    #: Guild actors alive at once; past it new guilds get "try again later".
    max_guilds: int = 100_000

    # Transport
    max_frame: int = 64 * 1024
    #: Unsent bytes per connection before it is closed with 4010.
    max_buffer: int = 4 * 1024 * 1024
    max_connections: int = 19_000
    handshake_timeout: float = 10.0
    close_timeout: float = 10.0
    #: Seconds a graceful shutdown waits for clients to finish closing.
    drain_timeout: float = 10.0
    #: Share the listening port with other processes (SO_REUSEPORT); set for
    #: every worker of ``--workers N``.
    reuse_port: bool = False

    # Cluster
    #: ``redis://host:port/db``: join the cluster that Redis ties together.
    #: None runs a single node with the in-process memory broker.
    redis: str | None = None
    #: This node's name in the cluster (presence); None picks host:pid.
    node_id: str | None = None
    #: Seconds after a node's last heartbeat before its sessions drop out
    #: of presence (a node beats every second).
    presence_timeout: float = 10.0
    #: Seconds a Redis command may take before it counts as failed (an
    #: append then answers "outcome unknown", docs/PROTOCOL.md "Publishing").
    redis_timeout: float = 5.0
    #: Seconds the Redis pub/sub feed may stay silent (its PING unanswered)
    #: before it is declared dead and resubscribed (docs/OPERATIONS.md).
    feed_deadline: float = 3.0

    # HTTP API (server/transport/http_api.py; README "Publish from your backend")
    #: API port on ``host``; 0 picks a free one (``Server.api_port``); None or
    #: -1 runs no API. ``guildcast serve`` defaults to 8081; an embedded
    #: server runs none unless asked (its application usually has its own).
    api_port: int | None = None
    #: Keys accepted as ``Authorization: Bearer KEY``; none: one is generated.
    api_keys: tuple[str, ...] = ()
    #: Serve /metrics without a key (for a scraper on a private network).
    metrics_open: bool = False
    #: Largest request body in bytes (413 past it): a batch of events.
    api_max_body: int = 1024 * 1024
    #: Events in one batch publish (400 past it): one guild mailbox takes it whole.
    api_max_batch: int = 1000
    #: Publish rate per API key, events/s with a burst of one second's worth
    #: (429 past it); 0 means unlimited.
    api_publish_rate: float = 1000.0
    #: Seconds an HTTP request body may take to arrive (408 past it).
    api_body_timeout: float = 10.0
    #: Seconds an HTTP connection may stay without a complete request
    #: (idle keep-alive, or headers sent slowly) before it is closed.
    api_idle_timeout: float = 60.0

    # Durability (server/broker/disk.py; README "Operations")
    #: Directory for guild journals; None keeps history in memory only (each
    #: start is a new epoch). Not with ``redis`` (Redis holds the history).
    data_dir: str | None = None
    #: When journals are fsynced: "always" (before every acknowledgement),
    #: "interval" (every ``fsync_interval`` s) or "never" (left to the OS).
    fsync: str = "interval"
    fsync_interval: float = 1.0

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
