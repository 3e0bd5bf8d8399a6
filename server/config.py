"""Node configuration: one dataclass, every setting with its default and reason.

``guildcast serve`` fills it from flags and ``GUILDCAST_*`` environment
variables (see ``guildcast.cli``); embedding applications build it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from guildcast.transport.listen import LISTEN_SOCKETS

#: Values of ``Config.compression`` (``--compression``).
COMPRESSION_MODES = ("on", "off")


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
    #: The most events a rewind (PROTOCOL.md "Rewind", protocol 1.1) replays
    #: to a fresh subscriber; 0 turns rewinds off (answered with none). 100:
    #: a rewind of the largest PUBLISHes (100 x ``max_payload`` 32 KiB = 3.2
    #: MiB) still fits in ``max_buffer`` (4 MiB), so a rewind alone never
    #: makes its client a slow consumer (4010); and a crowd of fresh clients
    #: (page loads) costs at most a tenth of the default history each.
    max_rewind: int = 100
    #: Sessions per partition actor: bounds the work of one fanout step.
    partition_size: int = 512
    #: A guild with no session and no message for this long stops (seconds).
    idle_timeout: float = 300.0
    #: Seconds between two GUILD_ACTIVITY notices of a guild to its passive
    #: subscribers (PROTOCOL.md "Passive subscriptions").
    passive_interval: float = 1.0
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
    #: permessage-deflate (docs/PROTOCOL.md "Compression"): "on" accepts a
    #: client's offer and sends it each message above the threshold
    #: compressed once per node for every such client; "off" declines every
    #: offer. On by default: measured, it saves 25-80% of the bytes of
    #: realistic events for a few percent of CPU (docs/BENCHMARKS.md "Compression").
    compression: str = "on"
    #: Payload bytes from which a message is compressed (smaller ones gain
    #: under 10%, docs/BENCHMARKS.md "Compression").
    compression_threshold: int = 128
    #: Seconds a graceful shutdown spreads its RECONNECTs over, at most (and
    #: at most half of ``drain_timeout``); fewer sessions than ``admit_rate``
    #: admits in that time are spread over less (transport/drain.py). None:
    #: 5 s on a node whose sessions have somewhere else to go (``redis``,
    #: ``reuse_port``), 0 on a lone node, where spreading would only delay
    #: the restart they wait for.
    drain_spread: float | None = None
    #: IDENTIFYs admitted per second (handshakes: twice that), resumes with
    #: a Position first; past it close 1013 with a retry hint
    #: (transport/admission.py). 0: no bound. The default is above what one
    #: node on this project's 2-core bench machine completes (the referee's
    #: 19,900 fresh connections in about 2.5 s with no bound, about 8,000 a
    #: second: docs/BENCHMARKS.md "s4-idle, the connect path"), so a burst
    #: the node can serve is never slowed by it; a storm beyond it is paced,
    #: and the loop-lag feedback lowers it further (docs/OPERATIONS.md
    #: "Deploying without a reconnect storm"). At 5,000 (until this default)
    #: the bound itself held s4 at 3.5 s.
    admit_rate: float = 10000.0
    #: Listening sockets of the gateway's port on Linux (SO_REUSEPORT), each
    #: its own accept queue (transport/listen.py). Four hold a reconnect
    #: storm of 19,000 clients without the kernel dropping connection
    #: attempts (one queue dropped 44,000-201,000, docs/OPERATIONS.md); they
    #: cost a node that never sees a storm about 8% more CPU per delivery in
    #: the steady 5,000-client latency scenario (docs/BENCHMARKS.md), so a
    #: node that only serves steady load may choose 1.
    listen_sockets: int = LISTEN_SOCKETS
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
    #: Members one PRESENCE_SNAPSHOT lists (docs/PROTOCOL.md "Presence"); past
    #: it the snapshot gives the count and says it is truncated. 0 lists none.
    #: Why 100: ``guildcast.actors.guild.PRESENCE_LIMIT``.
    presence_limit: int = 100
    #: Seconds a Redis command may take before it counts as failed (an
    #: append then answers "outcome unknown", docs/PROTOCOL.md "Publishing").
    redis_timeout: float = 5.0
    #: Seconds the Redis pub/sub feed may stay silent (its PING unanswered)
    #: before it is declared dead and resubscribed (docs/OPERATIONS.md).
    feed_deadline: float = 3.0

    # Operations (docs/OPERATIONS.md)
    #: Serve the demo board at ``/`` and ``/demo`` on the gateway port; a
    #: production gateway may turn it off (``--no-demo``: 404 instead).
    demo_page: bool = True
    #: A second HTTP API listener for this node alone (never shared with
    #: SO_REUSEPORT): under ``--workers N`` it is each worker's own scrape and
    #: readiness target. None: no such listener; 0 picks a free port.
    node_api_port: int | None = None
    #: Label every ``/metrics`` series with ``node="<node id>"`` (set for
    #: each worker of ``--workers N``, where several nodes serve one port).
    metrics_node_label: bool = False

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

    # Fair limits (docs/SECURITY.md "Resource limits"): what one token holder
    # can take of a node.
    #: Bytes of history one guild keeps in memory (its oldest events leave
    #: first past it), and the node's guilds together (the node's oldest
    #: events leave first). Single node brokers (memory, --data-dir).
    history_guild_bytes: int = 4 * 1024 * 1024
    history_node_bytes: int = 256 * 1024 * 1024
    #: PUBLISH bytes per second one user may send over all their connections
    #: on this node (burst: one second's worth); past it ERROR 4429. 0: no
    #: limit. Not for tokens with their own ``pub_rate`` (the issuer's choice).
    user_publish_bytes: int = 4 * 1024 * 1024
    #: Share of ``max_guilds`` the subscriptions of one user may start
    #: (ERROR 1013 for that guild past it); guild actors nobody subscribes
    #: to are stopped first when ``max_guilds`` is reached.
    user_guild_share: float = 0.25

    # Idempotent publish (docs/PROTOCOL.md "Idempotent publish",
    # docs/RELIABILITY.md "Retrying a publish")
    #: Seconds a publish's idempotency key is remembered: a retry with the
    #: same key within it gets the original ``s`` and epoch. 0 turns the
    #: window off (keys are accepted and ignored).
    idempotency_ttl: float = 300.0
    #: Keys remembered per guild (its oldest leave first past it), and per
    #: node for every guild together (single node brokers; the node's
    #: oldest leave first).
    idempotency_guild_keys: int = 10_000
    idempotency_node_keys: int = 200_000

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
