"""Node counters as plain ints, and the snapshot the HTTP API exports.

The hot path only ever adds to plain attributes of one :class:`NodeStats`
per node (a guild per fanout run, a partition per flush); nothing here
takes a lock or allocates per event. ``/metrics`` reads everything at
scrape time through :class:`MetricsSnapshot`, so the Prometheus library
stays out of the actors (docs/DESIGN.md, hot-path rules).

Consistency model: single event loop, single writer per attribute at a
time, so a snapshot is exact for its moment; counters only grow for the
life of the node (they are not persisted across restarts).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

#: Upper bounds (seconds) of the publish-to-write latency buckets: from well
#: under a millisecond (an idle node) to seconds (a node far behind).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class LatencyHistogram:
    """A fixed-bucket histogram of plain ints (one extra bucket for +Inf)."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        if list(bounds) != sorted(bounds):
            raise ValueError("bucket bounds must be sorted")
        self.bounds = bounds
        #: Non-cumulative counts; ``counts[len(bounds)]`` is the +Inf bucket.
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound falls in that bound's bucket (le).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= bound)`` pairs, +Inf last."""
        out: list[tuple[float, int]] = []
        acc = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            acc += n
            out.append((bound, acc))
        return out


class NodeStats:
    """Counters the actors add to; one per node, shared by reference."""

    __slots__ = (
        "bytes_out",
        "bytes_uncompressed",
        "deliveries",
        "deliveries_compressed",
        "journal_bytes",
        "journal_fsyncs",
        "journal_repairs",
        "latency",
        "publish_conflicts",
        "publish_replays",
        "published",
    )

    def __init__(self) -> None:
        #: Events sequenced by this node's guilds.
        self.published = 0
        #: Keyed publishes answered from the idempotency window (a retry:
        #: not sequenced again), and those refused as a conflict (4409/409).
        self.publish_replays = 0
        self.publish_conflicts = 0
        #: Events written to sessions (one per event per recipient).
        self.deliveries = 0
        #: Bytes of event frames written to sessions by partitions.
        self.bytes_out = 0
        #: What those bytes would have been with no compression (equal to
        #: ``bytes_out`` when no session negotiated permessage-deflate).
        self.bytes_uncompressed = 0
        #: Deliveries written as a compressed frame (RSV1 set).
        self.deliveries_compressed = 0
        #: Bytes appended to guild journals (``--data-dir``), and fsync calls.
        self.journal_bytes = 0
        self.journal_fsyncs = 0
        #: Journals found with a torn or corrupt tail and repaired on load.
        self.journal_repairs = 0
        #: Publish accepted by the node -> frames written by a partition.
        self.latency = LatencyHistogram()

    def report_metrics(self, m: MetricsSnapshot) -> None:
        """``ReportsMetrics``: the actors' counters and the latency histogram."""
        m.published = self.published
        m.publish_replays = self.publish_replays
        m.publish_conflicts = self.publish_conflicts
        m.deliveries = self.deliveries
        m.bytes_out = self.bytes_out
        m.bytes_uncompressed = self.bytes_uncompressed
        m.deliveries_compressed = self.deliveries_compressed
        m.latency_buckets = self.latency.cumulative()
        m.latency_sum = self.latency.total
        m.latency_count = self.latency.count


@dataclass(slots=True)
class MailboxDepth:
    """Messages waiting in the mailboxes of one kind of actor."""

    total: int = 0
    max: int = 0


@dataclass(slots=True)
class MetricsSnapshot:
    """Everything ``/metrics`` exports, read at one moment."""

    connections: int = 0
    connections_pending: int = 0
    connections_accepted: int = 0
    connections_refused: int = 0
    sessions_identified: int = 0
    subscriptions: int = 0
    guilds_alive: int = 0
    guilds_started: int = 0
    slow_consumers: int = 0
    close_codes: dict[int, int] = field(default_factory=dict)
    ready: bool = True
    #: False while the broker (Redis) is unreachable.
    broker_up: bool = True
    published: int = 0
    publish_replays: int = 0
    publish_conflicts: int = 0
    deliveries: int = 0
    bytes_out: int = 0
    #: Event bytes the deliveries would have taken uncompressed; deliveries
    #: sent compressed; and the node's compressor's work: messages compressed
    #: and their bytes before and after (once per message, not per recipient).
    bytes_uncompressed: int = 0
    deliveries_compressed: int = 0
    compressed_messages: int = 0
    compress_bytes_in: int = 0
    compress_bytes_out: int = 0
    #: Connections that negotiated permessage-deflate.
    connections_deflate: int = 0
    journal_bytes: int = 0
    journal_fsyncs: int = 0
    journal_repairs: int = 0
    #: Journal writes refused (a full disk), journals found cut below their
    #: high-water mark, journal descriptors open, journals deleted by the
    #: janitor (``guildcast.broker.disk``).
    journal_write_failures: int = 0
    journal_cuts: int = 0
    journal_open_files: int = 0
    journals_deleted: int = 0
    #: History bytes held in memory and events evicted by the byte bounds
    #: (``guildcast.broker.histbudget``; single node brokers).
    history_bytes: int = 0
    history_evictions: int = 0
    #: Guild actors stopped to make room at max_guilds; subscriptions refused
    #: by the per-user guild share; PUBLISHes refused by the per-user volume.
    guilds_evicted: int = 0
    user_guilds_refused: int = 0
    user_publish_refused: int = 0
    #: Probes that found no descriptor left (``guildcast.core.fdwatch``),
    #: descriptors open and the limit.
    descriptors_exhausted: int = 0
    open_descriptors: int = 0
    descriptor_limit: int = 0
    #: Admission control (``guildcast.transport.admission``): sessions admitted
    #: and queued by kind (``resume``, ``fresh``), refused with 1013 by kind
    #: (also ``handshake``), sweeps that found the loop late, the IDENTIFYs
    #: per second admitted now (after the loop-lag halving; 0: no bound) and
    #: the IDENTIFYs waiting in the queue.
    admission_admitted: dict[str, int] = field(default_factory=dict)
    admission_queued: dict[str, int] = field(default_factory=dict)
    admission_refused: dict[str, int] = field(default_factory=dict)
    admission_slowdowns: int = 0
    admission_rate: float = 0.0
    admission_waiting: int = 0
    #: Cumulative ``(upper bound, count)`` pairs, +Inf last, then sum and count.
    latency_buckets: list[tuple[float, int]] = field(default_factory=list)
    latency_sum: float = 0.0
    latency_count: int = 0
    #: Keyed by actor kind: ``"guild"``, ``"partition"``.
    mailboxes: dict[str, MailboxDepth] = field(default_factory=dict)
    #: Passive subscriptions (``guildcast.actors.passive``): guilds with
    #: passive sessions on this node and their passive subscriptions now;
    #: notice ticks run, notices built (once per moved guild per tick),
    #: notices delivered (per guild per passive session), the WebSocket
    #: messages and the writes that carried them and their bytes.
    passive_guilds: int = 0
    passive_subscriptions: int = 0
    notice_ticks: int = 0
    notices_built: int = 0
    notices_sent: int = 0
    notice_frames: int = 0
    notice_writes: int = 0
    notice_bytes: int = 0


@runtime_checkable
class ReportsMetrics(Protocol):
    """A part of the node with fields of its own in ``/metrics``: each layer
    (the gateway, the hub for the guild actors, the actors' counters, a
    broker) fills its own fields; the node only composes them."""

    def report_metrics(self, m: MetricsSnapshot) -> None:
        """Fill this part's fields of ``m`` (read at scrape time)."""
