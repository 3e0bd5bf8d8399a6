"""Redis broker: cluster-wide sequencing, history and live feed.

Per guild (``{gid}`` hash tag, so a Redis Cluster keeps them on one slot):

- ``gc:{gid}:epoch`` — the epoch; created on first use; a new one only when
  the guild's keys were lost (Redis lost its data).
- ``gc:{gid}:seq`` — the last ``s``.
- ``gc:{gid}:log`` — a stream holding the history, entry id ``s-0`` with
  fields ``t``, ``ts`` (ms) and ``p`` (the DISPATCH JSON); capped by count
  (``MAXLEN``) and by age (oldest entries deleted on each append; the whole
  stream expires after ``history_ttl`` without appends, when every entry
  would be too old anyway).
- channel ``gc:{gid}:ch`` — each appended record as ``s|t|ts_ms|payload``.

One Lua script per append batch does all of it atomically, so every node
sees one order. Appends from all guild actors of this node are queued and
sent in one pipeline per event-loop turn (one round trip for many guilds).

The live feed uses one pub/sub connection per node, subscribed only to the
channels of guilds with local subscribers. On a reconnect it resubscribes
and tells every listener to check for missed records (``feed(gid, None)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from guildcast.broker.base import Broker, BrokerUnavailable, Feed, Presence, PresenceFeed, Record

log = logging.getLogger("guildcast.broker.redis")

_APPEND = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
  redis.call('DEL', KEYS[2], KEYS[3])
end
local gid = ARGV[2]
local maxlen = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local n = tonumber(ARGV[6])
local out = {epoch}
for i = 1, n do
  local t = ARGV[5 + 2 * i]
  local d = ARGV[6 + 2 * i]
  local s = redis.call('INCR', KEYS[2])
  local p = '{"op":0,"t":"' .. t .. '","g":"' .. gid .. '","s":' .. s .. ',"d":' .. d .. '}'
  if maxlen > 0 then
    redis.call('XADD', KEYS[3], 'MAXLEN', maxlen, s .. '-0', 't', t, 'ts', now, 'p', p)
  end
  redis.call('PUBLISH', KEYS[4], s .. '|' .. t .. '|' .. now .. '|' .. p)
  out[#out + 1] = s
end
if maxlen > 0 then
  local cutoff = now - ttl
  for _ = 1, 64 do
    local first = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 1)
    if #first == 0 then break end
    local f = first[1][2]
    local ts = nil
    for j = 1, #f, 2 do if f[j] == 'ts' then ts = tonumber(f[j + 1]) end end
    if ts == nil or ts >= cutoff then break end
    redis.call('XDEL', KEYS[3], first[1][1])
  end
  if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
end
return out
"""

_HEAD = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
  redis.call('DEL', KEYS[2], KEYS[3])
end
return {epoch, tonumber(redis.call('GET', KEYS[2]) or '0')}
"""

# Presence: ``gc:pg:{gid}`` hash (member key -> member JSON), the node's own
# index ``gc:node:<id>:members`` (set of "gid NUL key") and the heartbeat
# sorted set ``gc:nodes`` (node id -> last beat, ms). Scripts touch keys they
# compute, so presence needs one Redis (not Redis Cluster).
_PRESENCE_JOIN = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3] .. '\\0' .. ARGV[1])
redis.call('PUBLISH', KEYS[3], 'P|join|' .. ARGV[2])
return 1
"""

_PRESENCE_LEAVE = """
local n = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[3] .. '\\0' .. ARGV[1])
if n > 0 then redis.call('PUBLISH', KEYS[3], 'P|leave|' .. ARGV[2]) end
return n
"""

# Remove every member of each node whose heartbeat is older than ARGV[1] (or
# of node ARGV[2] when given), telling listeners; returns members removed.
_REAP = """
local dead
if ARGV[2] ~= '' then dead = {ARGV[2]} else
  dead = redis.call('ZRANGEBYSCORE', 'gc:nodes', '-inf', ARGV[1]) end
local removed = 0
for _, node in ipairs(dead) do
  local idx = 'gc:node:' .. node .. ':members'
  for _, entry in ipairs(redis.call('SMEMBERS', idx)) do
    local sep = string.find(entry, '\\0', 1, true)
    local gid = string.sub(entry, 1, sep - 1)
    local key = string.sub(entry, sep + 1)
    local h = 'gc:pg:{' .. gid .. '}'
    local info = redis.call('HGET', h, key)
    if info then
      redis.call('HDEL', h, key)
      redis.call('PUBLISH', 'gc:{' .. gid .. '}:ch', 'P|leave|' .. info)
      removed = removed + 1
    end
  end
  redis.call('DEL', idx)
  redis.call('ZREM', 'gc:nodes', node)
end
return removed
"""

#: Presence updates queued before they are dropped (with a warning): presence
#: is advisory, and a Redis outage must not grow memory without bound.
MAX_QUEUED_PRESENCE = 100_000

#: Connections per node to Redis (plus one for pub/sub): appends share one
#: pipeline, so these serve reads, heads and presence queries in parallel.
MAX_REDIS_CONNECTIONS = 32

#: Appends queued across guilds before a pipeline is sent regardless.
MAX_PIPELINE = 512
#: Bound on queued appends; past it appends fail at once (try again later).
MAX_QUEUED_APPENDS = 50_000


def _keys(gid: str) -> list[str]:
    return [f"gc:{{{gid}}}:epoch", f"gc:{{{gid}}}:seq", f"gc:{{{gid}}}:log", f"gc:{{{gid}}}:ch"]


def channel(gid: str) -> str:
    return f"gc:{{{gid}}}:ch"


class RedisBroker:
    """Broker over one Redis (``redis://host:port/db``)."""

    def __init__(
        self,
        url: str,
        history_size: int,
        history_ttl: float,
        *,
        health_interval: float = 1.0,
        op_timeout: float = 5.0,
        node_id: str = "node",
        presence_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.history_size = history_size
        self.history_ttl_ms = int(history_ttl * 1000)
        self.health_interval = health_interval
        # A blocking pool: past MAX_REDIS_CONNECTIONS commands wait (up to
        # op_timeout) for a connection instead of failing, so a burst of
        # subscriptions to many guilds queues rather than looking like an outage.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_REDIS_CONNECTIONS,
            timeout=op_timeout,
            decode_responses=False,
            socket_timeout=op_timeout,
            socket_connect_timeout=op_timeout,
            retry_on_timeout=False,
        )
        self._r: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        self._append_script = self._r.register_script(_APPEND)
        self._head_script = self._r.register_script(_HEAD)
        self._join_script = self._r.register_script(_PRESENCE_JOIN)
        self._leave_script = self._r.register_script(_PRESENCE_LEAVE)
        self._reap_script = self._r.register_script(_REAP)
        self.node_id = node_id
        self.presence_timeout = presence_timeout
        self._presence_q: deque[tuple[bool, str, Presence]] = deque()
        self._presence_feed: PresenceFeed | None = None
        self.presence_dropped = 0
        self._feed: Feed | None = None
        self._healthy = False
        self._queue: deque[tuple[str, list[Any], asyncio.Future[list[Any]]]] = deque()
        self._queue_ready = asyncio.Event()
        #: Wanted channels: a pending future until Redis confirms, then None.
        self._listening: dict[str, asyncio.Future[None] | None] = {}
        #: Listeners per guild: an old guild actor still stopping and its
        #: successor may overlap, so listen/unlisten are counted.
        self._listeners: dict[str, int] = {}
        self._pubsub_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None
        self.reconnects = 0

    # --- life cycle ------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def redis(self) -> aioredis.Redis:
        return self._r

    def set_feed(self, feed: Feed, presence: PresenceFeed | None = None) -> None:
        self._feed = feed
        self._presence_feed = presence

    async def start(self) -> None:
        try:
            await self._r.ping()
        except (RedisError, OSError) as e:
            raise BrokerUnavailable(f"cannot reach {self.url}: {e}") from None
        self._healthy = True
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._pipeliner(), name="redis-pipeliner"),
            loop.create_task(self._reader(), name="redis-pubsub"),
            loop.create_task(self._health(), name="redis-health"),
        ]

    async def close(self) -> None:
        """Flush queued presence, take this node's members out, disconnect."""
        if self._healthy:
            with contextlib.suppress(RedisError, OSError):
                await self._flush_presence()
                await self._reap_script(keys=[], args=[0, self.node_id])
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        while self._queue:
            _, _, fut = self._queue.popleft()
            if not fut.done():
                fut.set_exception(BrokerUnavailable("broker closed"))
        await self._r.aclose(close_connection_pool=True)

    # --- sequencing and history --------------------------------------------------

    async def append(self, gid: str, items: Sequence[tuple[str, bytes]]) -> tuple[str, list[int]]:
        if not self._healthy:
            raise BrokerUnavailable("redis is unreachable")
        if len(self._queue) >= MAX_QUEUED_APPENDS:
            raise BrokerUnavailable("too many appends queued")
        args: list[Any] = [
            secrets.token_hex(8),
            gid,
            self.history_size,
            int(time.time() * 1000),
            self.history_ttl_ms,
            len(items),
        ]
        for t, d in items:
            args.append(t)
            args.append(d)
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((gid, args, fut))
        self._queue_ready.set()
        out = await fut
        return out[0].decode(), [int(s) for s in out[1:]]

    async def _pipeliner(self) -> None:
        """Sends queued appends, many guilds per round trip, in queue order."""
        while True:
            await self._queue_ready.wait()
            self._queue_ready.clear()
            if self._presence_q and self._healthy:
                try:
                    await self._flush_presence()
                except (RedisError, OSError) as e:
                    self._mark_down(e)
            while self._queue:
                batch: list[tuple[str, list[Any], asyncio.Future[list[Any]]]] = []
                while self._queue and len(batch) < MAX_PIPELINE:
                    batch.append(self._queue.popleft())
                try:
                    async with self._r.pipeline(transaction=False) as pipe:
                        for gid, args, _ in batch:
                            await self._append_script(keys=_keys(gid), args=args, client=pipe)
                        results = await pipe.execute(raise_on_error=False)
                except (RedisError, OSError) as e:
                    self._mark_down(e)
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(BrokerUnavailable(f"redis: {e}"))
                    continue
                for (_, _, fut), res in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(res, Exception):
                        fut.set_exception(BrokerUnavailable(f"redis: {res}"))
                    else:
                        fut.set_result(res)

    # --- presence ------------------------------------------------------------------

    def presence_join(self, gid: str, member: Presence) -> None:
        self._queue_presence(True, gid, member)

    def presence_leave(self, gid: str, member: Presence) -> None:
        self._queue_presence(False, gid, member)

    def _queue_presence(self, join: bool, gid: str, member: Presence) -> None:
        if len(self._presence_q) >= MAX_QUEUED_PRESENCE:
            self.presence_dropped += 1
            if self.presence_dropped in (1, 1000, 100_000):
                log.warning("presence queue full: %d updates dropped", self.presence_dropped)
            return
        self._presence_q.append((join, gid, member))
        self._queue_ready.set()

    async def _flush_presence(self) -> None:
        q = self._presence_q
        idx = f"gc:node:{self.node_id}:members"
        while q:
            batch = [q.popleft() for _ in range(min(len(q), MAX_PIPELINE))]
            try:
                async with self._r.pipeline(transaction=False) as pipe:
                    for join, gid, m in batch:
                        keys = [f"gc:pg:{{{gid}}}", idx, channel(gid)]
                        args: list[Any] = [m.key, orjson.dumps(m.as_dict()), gid]
                        script = self._join_script if join else self._leave_script
                        await script(keys=keys, args=args, client=pipe)
                    await pipe.execute()
            except (RedisError, OSError):
                q.extendleft(reversed(batch))  # keep order; retried when Redis is back
                raise

    async def presence(self, gid: str) -> list[Presence]:
        now_ms = int(time.time() * 1000)
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.hgetall(f"gc:pg:{{{gid}}}")
                pipe.zrangebyscore("gc:nodes", now_ms - int(self.presence_timeout * 1000), "+inf")
                raw, alive = await pipe.execute()
        except (RedisError, OSError) as e:
            self._mark_down(e)
            raise BrokerUnavailable(f"redis: {e}") from None
        live = {n.decode() for n in alive}
        out = []
        for v in raw.values():
            d = orjson.loads(v)
            if d["node"] in live:
                out.append(Presence(d["user"], d["session"], d["node"]))
        out.sort(key=lambda m: (m.node, m.session))
        return out

    async def head(self, gid: str) -> tuple[str, int]:
        try:
            epoch, s = await self._head_script(keys=_keys(gid), args=[secrets.token_hex(8)])
        except (RedisError, OSError) as e:
            self._mark_down(e)
            raise BrokerUnavailable(f"redis: {e}") from None
        return epoch.decode(), int(s)

    async def read(self, gid: str, after: int, limit: int) -> tuple[str, list[Record]]:
        k = _keys(gid)
        try:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.get(k[0])
                pipe.xrange(k[2], min=f"{after + 1}-0", max="+", count=limit)
                epoch, entries = await pipe.execute()
        except (RedisError, OSError) as e:
            self._mark_down(e)
            raise BrokerUnavailable(f"redis: {e}") from None
        if epoch is None:
            epoch_s, _ = await self.head(gid)
            return epoch_s, []
        out = []
        for eid, fields in entries:
            s = int(bytes(eid).split(b"-", 1)[0])
            out.append(Record(s, fields[b"t"].decode(), int(fields[b"ts"]) / 1000.0, fields[b"p"]))
        return epoch.decode(), out

    async def first(self, gid: str) -> int | None:
        """The oldest ``s`` still in history, or None."""
        try:
            e: Any = await self._r.xrange(_keys(gid)[2], min="-", max="+", count=1)
        except (RedisError, OSError) as exc:
            self._mark_down(exc)
            raise BrokerUnavailable(f"redis: {exc}") from None
        return int(e[0][0].split(b"-", 1)[0]) if e else None

    # --- live feed ---------------------------------------------------------------

    async def listen(self, gid: str, timeout: float = 5.0) -> None:
        """Subscribe to ``gid``'s channel; returns once Redis confirmed it.

        Raises :class:`BrokerUnavailable` if Redis does not confirm in time
        (the subscription stays wanted and is retried on reconnect).
        """
        self._listeners[gid] = self._listeners.get(gid, 0) + 1
        fut = self._listening.get(gid, False)
        if fut is None:
            return  # already confirmed
        if fut is False:
            fut = asyncio.get_running_loop().create_future()
            self._listening[gid] = fut
            ps = self._pubsub
            if ps is not None:
                try:
                    await ps.subscribe(channel(gid))
                except (RedisError, OSError) as e:
                    self._mark_down(e)
            self._pubsub_wake.set()
        assert isinstance(fut, asyncio.Future)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            await self.unlisten(gid)
            raise BrokerUnavailable(f"redis did not confirm a subscription to {gid}") from None

    async def unlisten(self, gid: str) -> None:
        n = self._listeners.get(gid, 0) - 1
        if n > 0:
            self._listeners[gid] = n
            return
        self._listeners.pop(gid, None)
        fut = self._listening.pop(gid, None)
        if isinstance(fut, asyncio.Future) and not fut.done():
            fut.cancel()
        ps = self._pubsub
        if ps is not None:
            try:
                await ps.unsubscribe(channel(gid))
            except (RedisError, OSError) as e:
                self._mark_down(e)

    async def _reader(self) -> None:
        """Owns the pub/sub connection: (re)subscribes and delivers records.

        After any failure it starts a fresh connection with a bounded
        backoff and resubscribes every wanted channel; each confirmation of
        an already confirmed channel tells its listener to catch up.
        """
        delay = 0.05
        while True:
            ps: Any = self._r.pubsub()
            try:
                await ps.connect()
                self._pubsub = ps
                if self._listening:
                    await ps.subscribe(*[channel(g) for g in self._listening])
                delay = 0.05
                while True:
                    if not ps.subscribed:
                        self._pubsub_wake.clear()
                        await self._pubsub_wake.wait()
                        continue
                    msg = await ps.get_message(timeout=1.0)
                    if msg is not None:
                        self._on_pubsub(msg)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._mark_down(e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await ps.aclose()

    def _on_pubsub(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        ch = msg["channel"]
        if isinstance(ch, bytes):
            ch = ch.decode()
        gid = ch[4:-4]  # "gc:{" gid "}:ch"
        if kind in (b"message", "message"):
            if gid not in self._listening or self._feed is None:
                return
            data: bytes = msg["data"]
            if data.startswith(b"P|"):
                if self._presence_feed is not None:
                    _, kind_b, info = data.split(b"|", 2)
                    d = orjson.loads(info)
                    m = Presence(d["user"], d["session"], d["node"])
                    self._presence_feed(gid, kind_b.decode(), m)
                return
            s_b, t_b, ts_b, payload = data.split(b"|", 3)
            self._feed(gid, [Record(int(s_b), t_b.decode(), int(ts_b) / 1000.0, payload)])
        elif kind in (b"subscribe", "subscribe"):
            self._healthy = True
            fut = self._listening.get(gid, False)
            if isinstance(fut, asyncio.Future):
                if not fut.done():
                    fut.set_result(None)
                self._listening[gid] = None
            elif fut is None and self._feed is not None:
                # A resubscription after a reconnect: records may be missing.
                self._feed(gid, None)

    async def _beat(self) -> None:
        """Heartbeat this node and reap nodes that stopped beating."""
        now_ms = int(time.time() * 1000)
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.zadd("gc:nodes", {self.node_id: now_ms})
            await self._reap_script(
                keys=[], args=[now_ms - int(self.presence_timeout * 1000), ""], client=pipe
            )
            await pipe.execute()

    async def _health(self) -> None:
        while True:
            try:
                await self._beat()
            except (RedisError, OSError) as e:
                self._mark_down(e)
            else:
                if not self._healthy:
                    log.warning("redis is reachable again")
                    self._healthy = True
                    self._queue_ready.set()  # send presence queued while down
            await asyncio.sleep(self.health_interval)

    def _mark_down(self, e: BaseException) -> None:
        if self._healthy:
            log.warning("redis unreachable: %s", e)
        self._healthy = False


def _conforms() -> None:
    """mypy checks the implementation against the contract (DESIGN.md house style)."""
    _: type[Broker] = RedisBroker
