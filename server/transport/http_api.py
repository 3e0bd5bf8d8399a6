"""The HTTP API: publish from a backend, read guilds, watch the node.

Served with aiohttp (the only importer of aiohttp) on its own port, in the
node's event loop, next to the gateway. It reaches the guilds only through
:class:`~guildcast.core.host.ApiHost`. Routes (``openapi.py`` has the contract,
served at ``/openapi.json``):

==========================  =====  ==================================================
``POST /v1/publish``        key    one event or a batch (PROTOCOL.md "Publishing")
``GET /v1/guilds/{gid}``    key    head ``s``, epoch, local subscribers, history bounds
``GET /v1/guilds/{gid}/history?after=S&limit=N``  key  stored events after ``S``
``GET /healthz``            open   liveness
``GET /readyz``             open   readiness: 503 while draining
``GET /metrics``            key*   Prometheus text (*open with ``--metrics-open``)
``GET /openapi.json``       open   the OpenAPI 3.1 document
==========================  =====  ==================================================

Consistency: a publish is answered after every event in it is sequenced
(and stored, with a durable broker); a batch is handed to the guilds in its
order, so events of one guild get increasing ``s`` in batch order. A batch
is not atomic: when the node refuses an event midway (a guild busy), the
503 answer lists what became of each event. An event handed to its guild
whose answer never came (the broker's reply lost or late, or no answer in
``PUBLISH_TIMEOUT``) may have been sequenced: it is answered 504 with
``"outcome": "unknown"``, never 503 "not published".

Bounds and overflow policy: request bodies up to ``max_body`` bytes (413
past it, before reading when Content-Length says so); at most ``max_batch``
events per request (400); each event's ``d`` up to ``max_payload`` bytes as
JSON (413); publish rate per key by token bucket (429 with Retry-After), one
bucket per configured key; a publish waits at most ``PUBLISH_TIMEOUT`` for
its guild (then 503); a body must arrive within ``body_timeout`` (408) and
a connection without a complete request is closed after ``idle_timeout``
(slow or idle clients hold a socket for a bounded time). Errors are
``{"error": code, "detail": text}`` JSON; a client mistake is never a 500
(a 500 is a bug, logged with its traceback).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from guildcast.core import failures
from guildcast.core.failures import Failure, Kind
from guildcast.core.host import ApiHost
from guildcast.core.metrics import MetricsSnapshot
from guildcast.core.ratelog import DEFAULT_INTERVAL, RateLimitedLog
from guildcast.protocol import wire
from guildcast.protocol.bucket import TokenBucket
from guildcast.protocol.codes import RESERVED_EVENTS
from guildcast.transport import openapi

log = logging.getLogger("guildcast.api")
_flood = RateLimitedLog(log)

#: Seconds a publish waits for its guilds before 503: far above a healthy
#: answer (microseconds; an fsync with ``--fsync always``), short enough that
#: a stuck guild does not pile up requests.
PUBLISH_TIMEOUT = 30.0
#: Largest ``limit`` of a history page: one guild step, one response.
HISTORY_PAGE_MAX = 1000
HISTORY_PAGE_DEFAULT = 100
#: Seconds ``stop`` lets in-flight requests finish.
SHUTDOWN_TIMEOUT = 5.0
#: Digits of a non-negative 64-bit ``after``; ``int()`` alone would take "+1", " 1", "1_0".
_UINT = re.compile(r"[0-9]{1,19}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse at ERROR with a traceback. That
    is a client's mistake: one INFO line at most every few seconds instead.
    Other records pass unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self._last = -DEFAULT_INTERVAL
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        now = time.monotonic()
        if now - self._last < DEFAULT_INTERVAL or not log.isEnabledFor(logging.INFO):
            self.suppressed += 1
            return False
        self._last = now
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        record.msg = "HTTP API: malformed request: %s (%d more since the last line)"
        record.args = (first, self.suppressed)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.INFO, "INFO"
        self.suppressed = 0
        return True


#: aiohttp's protocol-level log (unparseable requests), filtered as above.
_protocol_log = logging.getLogger("guildcast.api.protocol")
_protocol_log.addFilter(_MalformedRequests())


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """The API's limits (``Config.api_*``, ``Config.max_payload``)."""

    #: Accepted bearer keys; must not be empty (the node generates one).
    keys: tuple[str, ...]
    metrics_open: bool = False
    max_body: int = 1024 * 1024
    max_batch: int = 1000
    #: Largest ``d`` of one event, as JSON bytes (the gateway's PUBLISH bound).
    max_payload: int = 32 * 1024
    #: Events/s per key with a burst of one second's worth; 0 = unlimited.
    publish_rate: float = 1000.0
    reuse_port: bool = False
    #: Seconds a request body may take to arrive (408 past it): a client
    #: trickling a body holds a connection and a task, never for long.
    body_timeout: float = 10.0
    #: Seconds a connection may stay without a complete request (idle
    #: keep-alive, or headers trickled slowly) before it is closed.
    idle_timeout: float = 60.0
    #: When set, every ``/metrics`` series carries ``node="<this>"``.
    node: str | None = None


#: Body fields of an answer whose events may or may not have been sequenced.
_UNKNOWN: dict[str, Any] = {"outcome": "unknown"}
#: Fields of one event in a publish body (PROTOCOL.md "Idempotent publish"
#: for the key); any other is refused (400 ``bad_shape``).
_EVENT_FIELDS = frozenset({"guild", "t", "d", "idempotency_key"})
#: How a batch's answer is chosen from its events' failures: an unknown
#: outcome first (it must be checked or retried with the same keys), then
#: "not published, retry", then a conflict (only conflicts: 409).
_SEVERITY = {504: 3, 503: 2}


def _worse(a: ApiError, b: ApiError) -> bool:
    """True if failure ``a`` decides a batch's answer over ``b``."""
    return _SEVERITY.get(a.status, 1) > _SEVERITY.get(b.status, 1)


class ApiError(Exception):
    """An answer other than 200: ``status`` with ``{"error", "detail", ...}``."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
        outcome: str = failures.NOT_PUBLISHED,
        fields: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers
        self.extra = extra
        #: What became of the event, in a batch answer's entry.
        self.outcome = outcome
        #: The failure's own fields (``Failure.fields``: a key conflict's
        #: original ``s`` and ``epoch``), in the body and in a batch entry.
        self.fields = fields or {}

    def response(self) -> web.Response:
        body = {"error": self.error, "detail": self.detail, **self.fields, **(self.extra or {})}
        return _json(body, self.status, self.headers)


def _answer(a: failures.Answer, detail: str, fields: dict[str, Any] | None = None) -> ApiError:
    """The HTTP answer of the failure table's row ``a``."""
    extra = _UNKNOWN if a.outcome == failures.UNKNOWN else None
    return ApiError(
        a.status, a.error, detail, headers=a.headers, extra=extra, outcome=a.outcome, fields=fields
    )


def refusal(exc: BaseException) -> ApiError:
    """The HTTP answer to a runtime failure (``core/failures.py``); anything
    the table calls unexpected is re-raised (a bug: 500, logged)."""
    a = failures.answer(exc)
    if a.kind is Kind.UNEXPECTED:
        raise exc
    fields = exc.fields() if isinstance(exc, Failure) else None
    return _answer(a, str(exc) or type(exc).__name__, fields)


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=wire.encode(obj), status=status, headers=headers, content_type="application/json"
    )


class _NodeCollector(Collector):
    """Reads the node's plain counters at scrape time (nothing on the hot path)."""

    def __init__(self, host: ApiHost) -> None:
        self._host = host

    def collect(self) -> Iterable[Metric]:
        m = self._host.metrics()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield gauge("guildcast_ready", "1 when accepting clients, 0 while draining", m.ready)
        yield gauge("guildcast_broker_up", "1 while the broker (Redis) is reachable", m.broker_up)
        yield gauge("guildcast_connections", "Open WebSocket connections", m.connections)
        yield gauge(
            "guildcast_connections_pending",
            "Connections still in the WebSocket handshake",
            m.connections_pending,
        )
        yield counter(
            "guildcast_connections_accepted",
            "WebSocket connections accepted",
            m.connections_accepted,
        )
        yield counter(
            "guildcast_connections_refused",
            "Connections refused with 1013 (max_connections)",
            m.connections_refused,
        )
        yield gauge(
            "guildcast_sessions_identified", "Sessions past IDENTIFY", m.sessions_identified
        )
        yield gauge(
            "guildcast_subscriptions", "Guild subscriptions of local sessions", m.subscriptions
        )
        yield gauge("guildcast_guild_actors", "Guild actors alive", m.guilds_alive)
        yield counter("guildcast_guild_actors_started", "Guild actors started", m.guilds_started)
        yield counter("guildcast_events_published", "Events sequenced by this node", m.published)
        yield counter(
            "guildcast_publish_replays",
            "Keyed publishes answered from the idempotency window, not sequenced again",
            m.publish_replays,
        )
        yield counter(
            "guildcast_publish_conflicts",
            "Keyed publishes refused: the key was used by an event of other content",
            m.publish_conflicts,
        )
        yield counter(
            "guildcast_deliveries", "Events written to sessions (per recipient)", m.deliveries
        )
        yield counter("guildcast_bytes_written", "Event bytes written to sessions", m.bytes_out)
        yield counter(
            "guildcast_bytes_written_uncompressed",
            "What the event bytes written would have been with no compression",
            m.bytes_uncompressed,
        )
        yield counter(
            "guildcast_deliveries_compressed",
            "Deliveries written as a permessage-deflate compressed frame",
            m.deliveries_compressed,
        )
        yield counter(
            "guildcast_compressed_messages",
            "Messages compressed (once per message for every session, not per recipient)",
            m.compressed_messages,
        )
        yield counter(
            "guildcast_compress_input_bytes",
            "Payload bytes compressed, before compression",
            m.compress_bytes_in,
        )
        yield counter(
            "guildcast_compress_output_bytes",
            "Payload bytes compressed, after compression",
            m.compress_bytes_out,
        )
        yield gauge(
            "guildcast_connections_deflate",
            "Connections that negotiated permessage-deflate",
            m.connections_deflate,
        )
        yield counter(
            "guildcast_slow_consumers",
            "Sessions closed with 4010 (unsent bytes over max_buffer)",
            m.slow_consumers,
        )
        closes = CounterMetricFamily(
            "guildcast_closes", "Connections closed by the server, by close code", labels=["code"]
        )
        for code, n in sorted(m.close_codes.items()):
            closes.add_metric([str(code)], n)
        yield closes
        yield counter(
            "guildcast_journal_bytes", "Bytes appended to guild journals", m.journal_bytes
        )
        yield counter("guildcast_journal_fsyncs", "Journal fsyncs", m.journal_fsyncs)
        yield counter(
            "guildcast_journal_repairs",
            "Journals found with a torn or corrupt tail and repaired",
            m.journal_repairs,
        )
        yield counter(
            "guildcast_journal_write_failures",
            "Journal writes refused by the disk (publishes answered 503)",
            m.journal_write_failures,
        )
        yield counter(
            "guildcast_journal_cuts",
            "Journals found cut below their high-water mark (new epoch)",
            m.journal_cuts,
        )
        yield gauge(
            "guildcast_journal_open_files", "Journal descriptors open", m.journal_open_files
        )
        yield counter(
            "guildcast_journals_deleted",
            "Journals deleted because their whole history aged out",
            m.journals_deleted,
        )
        yield gauge(
            "guildcast_history_bytes",
            "Bytes of guild history held in memory (bounded by history_node_bytes)",
            m.history_bytes,
        )
        yield counter(
            "guildcast_history_evictions",
            "History events evicted by the byte bounds (oldest first)",
            m.history_evictions,
        )
        yield counter(
            "guildcast_guild_actors_evicted",
            "Guild actors without subscribers stopped to make room at max_guilds",
            m.guilds_evicted,
        )
        yield counter(
            "guildcast_user_guilds_refused",
            "Subscriptions refused (1013) because the user holds user_guild_share of max_guilds",
            m.user_guilds_refused,
        )
        yield counter(
            "guildcast_user_publish_refused",
            "PUBLISHes refused (4429) by the per-user publish volume",
            m.user_publish_refused,
        )
        yield from _admission_metrics(m)
        yield counter(
            "guildcast_descriptors_exhausted",
            "Probes that found the process out of file descriptors (connections dropped)",
            m.descriptors_exhausted,
        )
        yield gauge("guildcast_open_descriptors", "File descriptors open", m.open_descriptors)
        yield gauge(
            "guildcast_descriptor_limit",
            "The file descriptor limit (ulimit -n)",
            m.descriptor_limit,
        )
        yield gauge(
            "guildcast_passive_guilds",
            "Guilds with passive sessions on this node",
            m.passive_guilds,
        )
        yield gauge(
            "guildcast_passive_subscriptions",
            "Passive guild subscriptions of local sessions (also in guildcast_subscriptions)",
            m.passive_subscriptions,
        )
        yield counter("guildcast_notice_ticks", "Passive notice ticks run", m.notice_ticks)
        yield counter(
            "guildcast_notices_built",
            "GUILD_ACTIVITY notices built (once per moved guild per tick, for all its sessions)",
            m.notices_built,
        )
        yield counter(
            "guildcast_notices_sent",
            "Guild heads delivered to passive sessions (one per moved guild per session)",
            m.notices_sent,
        )
        yield counter(
            "guildcast_notice_frames",
            "GUILD_ACTIVITY messages written (a batch carries several guilds)",
            m.notice_frames,
        )
        yield counter(
            "guildcast_notice_writes",
            "Writes carrying notices (at most one per passive session per tick)",
            m.notice_writes,
        )
        yield counter(
            "guildcast_notice_bytes", "Bytes of GUILD_ACTIVITY frames written", m.notice_bytes
        )
        if m.latency_buckets:
            yield HistogramMetricFamily(
                "guildcast_publish_to_write_seconds",
                "Seconds from an event's publish (sequencing) to a partition writing it "
                "to its sessions; one observation per event per partition",
                buckets=[(_le(b), n) for b, n in m.latency_buckets],
                sum_value=m.latency_sum,
            )
        depth = GaugeMetricFamily(
            "guildcast_mailbox_messages", "Messages waiting in actor mailboxes", labels=["actor"]
        )
        deepest = GaugeMetricFamily(
            "guildcast_mailbox_messages_max",
            "The deepest actor mailbox of each kind",
            labels=["actor"],
        )
        for kind, d in sorted(m.mailboxes.items()):
            depth.add_metric([kind], d.total)
            deepest.add_metric([kind], d.max)
        yield depth
        yield deepest


def _admission_metrics(m: MetricsSnapshot) -> Iterable[Metric]:
    """Admission control's families (``transport/admission.py``;
    docs/OPERATIONS.md "Deploying without a reconnect storm")."""
    for name, doc, values in (
        (
            "guildcast_admission_admitted",
            "IDENTIFYs admitted by admission control, by kind (resume: with a Position)",
            m.admission_admitted,
        ),
        (
            "guildcast_admission_queued",
            "IDENTIFYs that waited in the admission queue for their turn, by kind",
            m.admission_queued,
        ),
        (
            "guildcast_admission_refused",
            "Sessions closed 1013 with a retry hint by admission control, by kind "
            "(handshake: the upgrade was refused)",
            m.admission_refused,
        ),
    ):
        family = CounterMetricFamily(name, doc, labels=["kind"])
        for kind, n in sorted(values.items()):
            family.add_metric([kind], n)
        yield family
    yield CounterMetricFamily(
        "guildcast_admission_slowdowns",
        "Sweeps that found the event loop late and halved the admitted rate",
        value=m.admission_slowdowns,
    )
    yield GaugeMetricFamily(
        "guildcast_admission_rate",
        "IDENTIFYs per second admitted now, after the loop-lag halving (0: no bound)",
        value=m.admission_rate,
    )
    yield GaugeMetricFamily(
        "guildcast_admission_queue_depth",
        "IDENTIFYs waiting in the admission queue",
        value=m.admission_waiting,
    )


class HttpApi:
    """The API server. ``await start(host, port)``, later ``await stop()``."""

    def __init__(self, host: ApiHost, settings: ApiSettings) -> None:
        if not settings.keys:
            raise ValueError("the HTTP API needs at least one API key")
        self.host = host
        self.settings = settings
        #: sha256(key) -> its publish bucket. Digests, so lookups do not leak
        #: how much of a key matched through timing.
        now = time.monotonic()
        self._keys: dict[bytes, TokenBucket | None] = {
            _digest(k): (TokenBucket(settings.publish_rate, now) if settings.publish_rate else None)
            for k in settings.keys
        }
        #: One registry per node: several embedded nodes in a process never clash.
        self.registry = CollectorRegistry(
            auto_describe=False,
            target_info=None if settings.node is None else {"node": settings.node},
        )
        self.registry.register(_NodeCollector(host))
        self._requests = Counter(
            "guildcast_http_requests",
            "HTTP API requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        #: What ``/metrics`` exposes: the registry, or with ``settings.node``
        #: the registry with every sample labelled ``node``.
        self._exposed: CollectorRegistry | _NodeLabelled = (
            self.registry if settings.node is None else _NodeLabelled(self.registry, settings.node)
        )
        self._openapi = wire.encode(
            openapi.document(max_batch=settings.max_batch, history_limit=HISTORY_PAGE_MAX)
        )

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await self._middleware(request, handler)

        app = web.Application(middlewares=[middleware], client_max_size=settings.max_body)
        app.router.add_post("/v1/publish", self._publish)
        app.router.add_get("/v1/guilds/{gid}", self._guild_info)
        app.router.add_get("/v1/guilds/{gid}/history", self._guild_history)
        app.router.add_get("/v1/guilds/{gid}/presence", self._guild_presence)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/openapi.json", self._openapi_json)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            logger=_protocol_log,
            # aiohttp's default (an hour) would let idle or slow-header
            # connections pile up; it also bounds the wait for the first request.
            keepalive_timeout=settings.idle_timeout,
        )
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: a free port); returns the bound port."""
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, host, port, backlog=1024, reuse_port=self.settings.reuse_port or None
        )
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def add_listener(self, host: str, port: int) -> int:
        """Also serve on ``host:port`` (0: a free port), never shared with
        SO_REUSEPORT: this node's own address when several share ``start``'s
        port (``--workers``). Returns the bound port."""
        before = set(map(tuple, self._runner.addresses))
        await web.TCPSite(self._runner, host, port, backlog=128).start()
        new = [a for a in self._runner.addresses if tuple(a) not in before]
        return int(new[0][1])

    async def stop(self) -> None:
        """Stop listening; requests in flight get ``SHUTDOWN_TIMEOUT`` s to finish."""
        await self._runner.cleanup()

    # --- plumbing ----------------------------------------------------------------

    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            resp = await handler(request)
        except ApiError as e:
            resp = e.response()
        except web.HTTPException as e:
            # aiohttp's own answers (no route, wrong method, body too large),
            # in our error shape; keep their headers (Allow for 405).
            code = _HTTP_ERRORS.get(e.status, "http_error")
            headers = {k: v for k, v in e.headers.items() if k.lower() == "allow"}
            resp = _json({"error": code, "detail": e.reason}, e.status, headers)
        except Exception:
            log.exception("HTTP API: %s %s failed", request.method, request.path)
            resp = _json({"error": "internal_error", "detail": "see the server log"}, 500)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        self._requests.labels(route, str(resp.status)).inc()
        return resp

    def _authorize(self, request: web.Request) -> TokenBucket | None:
        """The caller's publish bucket; raises 401/403 (RFC 6750 section 3)."""
        header = request.headers.get("Authorization")
        if header is None:
            self._auth_failed(request, "no Authorization header")
            raise ApiError(
                401,
                "unauthorized",
                "send Authorization: Bearer <API key>",
                headers={"WWW-Authenticate": 'Bearer realm="guildcast"'},
            )
        scheme, _, key = header.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            self._auth_failed(request, "not a Bearer credential")
            raise ApiError(
                401,
                "unauthorized",
                "the Authorization scheme must be Bearer",
                headers={"WWW-Authenticate": 'Bearer realm="guildcast", error="invalid_request"'},
            )
        digest = _digest(key)
        if digest not in self._keys:
            self._auth_failed(request, "unknown API key")
            raise ApiError(403, "forbidden", "unknown API key")
        return self._keys[digest]

    def _auth_failed(self, request: web.Request, why: str) -> None:
        _flood.log(
            logging.INFO,
            "api_auth_failed",
            "HTTP API: authentication failed from %s: %s",
            request.remote,
            why,
            extra={"peer": request.remote, "path": request.path},
        )

    # --- routes ------------------------------------------------------------------

    async def _publish(self, request: web.Request) -> web.StreamResponse:
        bucket = self._authorize(request)
        if not self.host.ready():
            why = self.host.not_ready_reason()
            raise _answer(
                failures.ANSWERS[Kind.OVERLOADED],
                f"the node is not ready ({why}); retry or use another",
            )
        if request.content_type != "application/json":
            raise ApiError(
                415,
                "unsupported_media_type",
                f"the body must be application/json, not {request.content_type}",
            )
        limit = self.settings.max_body
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, "payload_too_large", f"the body is over {limit} bytes")
        try:
            async with asyncio.timeout(self.settings.body_timeout):
                body = await request.read()
        except TimeoutError:
            raise ApiError(
                408,
                "request_timeout",
                f"the body did not arrive within {self.settings.body_timeout:g} s",
            ) from None
        try:
            doc = wire.decode(body)
        except wire.JSONDecodeError as e:
            raise ApiError(400, "bad_json", f"the body is not JSON: {e}") from None
        events, batch = self._events(doc)
        if bucket is not None:
            wait = bucket.take(len(events), time.monotonic())
            if wait > 0:
                raise ApiError(
                    429,
                    "rate_limited",
                    f"this key may publish {self.settings.publish_rate:g} events/s",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        results = await self._sequence(events)
        out: list[dict[str, Any]] = []
        failed: ApiError | None = None
        for (gid, *_), r in zip(events, results, strict=True):
            if isinstance(r, ApiError):
                if failed is None or _worse(r, failed):
                    failed = r
                entry = {"g": gid, "error": r.error, "detail": r.detail, "outcome": r.outcome}
                entry.update(r.fields)  # a key conflict: the original's s and epoch
                out.append(entry)
            else:
                out.append({"g": gid, "s": r[0], "epoch": r[1]})
        if failed is None:
            return _json(out if batch else out[0])
        if not batch:
            raise failed
        if failed.status == 409:
            raise ApiError(
                409,
                "idempotency_conflict",
                "some events reuse an idempotency key of another event; see results",
                extra={"results": out},
            )
        if failed.status == 504:
            raise ApiError(
                504,
                "outcome_unknown",
                "some events may or may not have been published; see results",
                extra={"results": out, **_UNKNOWN},
            )
        raise ApiError(
            503,
            "unavailable",
            "some events were not published; see results",
            headers=failed.headers,
            extra={"results": out},
        )

    def _events(self, doc: Any) -> tuple[list[tuple[str, str, bytes, str | None]], bool]:
        """Validated ``(guild, t, d, idempotency_key)`` of a publish body and
        whether it was a batch."""
        if type(doc) is not dict:
            raise ApiError(400, "bad_shape", 'the body must be an event or {"events": [...]}')
        if "events" not in doc:
            return [self._event(doc, "")], False
        if len(doc) != 1:
            extra = sorted(set(doc) - {"events"})
            raise ApiError(400, "bad_shape", f"unknown fields beside events: {extra}")
        evs = doc["events"]
        if type(evs) is not list or not evs:
            raise ApiError(400, "bad_shape", "events must be a non-empty list of events")
        if len(evs) > self.settings.max_batch:
            raise ApiError(
                400, "batch_too_large", f"at most {self.settings.max_batch} events per batch"
            )
        return [self._event(e, f"events[{i}]: ") for i, e in enumerate(evs)], True

    def _event(self, e: Any, where: str) -> tuple[str, str, bytes, str | None]:
        if type(e) is not dict:
            raise ApiError(400, "bad_shape", f'{where}an event is {{"guild", "t", "d"}}')
        unknown = set(e) - _EVENT_FIELDS
        if unknown:
            raise ApiError(400, "bad_shape", f"{where}unknown fields {sorted(unknown)}")
        gid, t, d = e.get("guild"), e.get("t"), e.get("d")
        key = e.get("idempotency_key")
        if key is not None and not wire.valid_idempotency_key(key):
            raise ApiError(
                400,
                "invalid_idempotency_key",
                f"{where}idempotency_key must be {wire.IDEMPOTENCY_KEY_RULE}",
            )
        if not wire.valid_guild(gid):
            raise ApiError(400, "invalid_guild", f"{where}guild must be {wire.GUILD_RULE}")
        if not wire.valid_event(t):
            raise ApiError(400, "invalid_event", f"{where}t must be {wire.EVENT_RULE}")
        if t in RESERVED_EVENTS:
            raise ApiError(400, "reserved_event", f"{where}{t} is a reserved event name")
        try:
            d_json = wire.encode(d)  # once: these bytes go to the broker
        except TypeError as e:  # decodable but not encodable: nested past 254 levels
            raise ApiError(400, "bad_shape", f"{where}d cannot be re-encoded: {e}") from None
        size = len(d_json)
        if size > self.settings.max_payload:
            raise ApiError(
                413,
                "payload_too_large",
                f"{where}d is {size} bytes of JSON, over {self.settings.max_payload}",
            )
        return gid, t, d_json, key

    async def _sequence(
        self, events: list[tuple[str, str, bytes, str | None]]
    ) -> list[tuple[int, str] | ApiError]:
        """Hand the events to their guilds in order; each one's ``(s, epoch)`` or error."""
        futs: list[asyncio.Future[tuple[int, str]]] = []
        refused: ApiError | None = None
        for gid, t, d, key in events:
            try:
                if key is None:
                    futs.append(self.host.publish(gid, t, d))
                else:
                    futs.append(self.host.publish(gid, t, d, key))
            except (Failure, ValueError) as e:
                refused = refusal(e)
                break
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                done = await asyncio.gather(*futs, return_exceptions=True)
        except TimeoutError:
            # Handed to their guilds: each may have been sequenced since.
            late = _answer(
                failures.ANSWERS[Kind.OUTCOME_UNKNOWN], f"no answer in {PUBLISH_TIMEOUT:g} s"
            )
            done = [
                (f.exception() or f.result()) if f.done() and not f.cancelled() else late
                for f in futs
            ]
        out: list[tuple[int, str] | ApiError] = []
        for r in done:
            if isinstance(r, ApiError):
                out.append(r)
            elif isinstance(r, BaseException):
                out.append(refusal(r))
            else:
                out.append(r)
        skipped = ApiError(
            503,
            "not_published",
            "not queued: an earlier event was refused",
            headers=failures.ANSWERS[Kind.OVERLOADED].headers,
        )
        while len(out) < len(events):
            out.append(refused if len(out) == len(futs) and refused is not None else skipped)
        return out

    def _gid(self, request: web.Request) -> str:
        gid = request.match_info["gid"]
        if not wire.valid_guild(gid):
            raise ApiError(
                400, "invalid_guild", "guild ids are 1-128 characters of [A-Za-z0-9_.:-]"
            )
        return gid

    async def _guild_info(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        gid = self._gid(request)
        try:
            info = await self.host.info(gid)
        except Failure as e:
            raise refusal(e) from None
        return _json(info)

    async def _guild_presence(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        gid = self._gid(request)
        try:
            members = await self.host.presence(gid)
        except Failure as e:
            raise refusal(e) from None
        return _json({"guild": gid, "members": members})

    async def _guild_history(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        gid = self._gid(request)
        after = _query_int(request, "after", 0, 0, 2**63 - 1)
        limit = _query_int(request, "limit", HISTORY_PAGE_DEFAULT, 1, HISTORY_PAGE_MAX)
        try:
            page = await self.host.history(gid, after, limit)
        except Failure as e:
            raise refusal(e) from None
        if after >= page.head:
            complete = after == page.head
        else:
            complete = page.first is not None and page.first <= after + 1
        head = wire.encode(
            {
                "guild": page.guild,
                "epoch": page.epoch,
                "s": page.head,
                "first": page.first,
                "complete": complete,
            }
        )
        # The stored envelopes go out as they are: no decode, no re-encode.
        body = b"".join([head[:-1], b',"events":[', b",".join(page.events), b"]}"])
        return web.Response(body=body, content_type="application/json")

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        return _json({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.StreamResponse:
        if self.host.ready():
            return _json({"ready": True})
        return _json({"ready": False, "detail": self.host.not_ready_reason()}, 503)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        if not self.settings.metrics_open:
            self._authorize(request)
        resp = web.Response(body=generate_latest(self._exposed))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def _openapi_json(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self._openapi, content_type="application/json")


#: aiohttp's own error statuses -> our error codes.
_HTTP_ERRORS = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (``le`` label)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class _NodeLabelled:
    """``registry``'s metrics with ``node="<name>"`` on every sample
    (prometheus_client has no constant labels); ``generate_latest`` takes
    anything with ``collect``."""

    def __init__(self, registry: CollectorRegistry, node: str) -> None:
        self._registry = registry
        self._node = node

    def collect(self) -> Iterable[Metric]:
        for fam in self._registry.collect():
            out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            out.samples = [s._replace(labels={**s.labels, "node": self._node}) for s in fam.samples]
            yield out


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if _UINT.fullmatch(raw) is None or not low <= int(raw) <= high:
        raise ApiError(400, "bad_query", f"{name} must be an integer from {low} to {high}")
    return int(raw)
