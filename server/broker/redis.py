"""Redis broker: cluster-wide sequencing, history and live feed.

Per guild (``{gid}`` hash tag, so a Redis Cluster keeps them on one slot):

- ``gc:{gid}:epoch`` — the epoch; created on first use (with ``seq`` at 0); a
  new one only when the guild's keys were lost (Redis lost its data, or one
  of the two keys is missing: an evicted ``seq`` never restarts ``s`` under
  the same epoch).
- ``gc:{gid}:seq`` — the last ``s``.
- ``gc:{gid}:log`` — a stream holding the history, entry id ``s-0`` with
  fields ``t``, ``ts`` (ms) and ``p`` (the DISPATCH JSON); capped by count
  (``MAXLEN``) and by age (on each append, the oldest entries older than
  ``history_ttl`` are deleted; the whole stream expires after
  ``history_ttl`` without appends, when every entry would be too old
  anyway).
- ``gc:{gid}:trim`` — when (ms) the log's oldest entry can first be too
  old: its ``ts`` + ``history_ttl``, as the last age check found it, and
  the key expires then. Until it does, an append knows no entry is too old
  without reading the oldest one (an ``XRANGE`` per append was a quarter of
  the script's cost); once it has, the append checks, trims and sets it
  again. Entries only leave the head and new ones carry a later ``ts``, so
  the oldest can only get newer: the check is never skipped when it would
  have deleted something (as before, up to clock differences between
  nodes). A lost key only costs one check.
- ``gc:pg:{gid}`` and ``gc:pg:{gid}:v`` — the guild's presence (member key ->
  member JSON) and its version (one INCR per change, kept for good); see
  "Presence" below.
- ``gc:{gid}:idem`` — the idempotency window: a hash of key ->
  ``s|epoch|digest`` (PROTOCOL.md "Idempotent publish"), and
  ``gc:{gid}:idemq``, a sorted set of the same keys by publish time (ms):
  the script drops keys older than the window's TTL before it looks one
  up, and the oldest past the window's count after it adds; both expire
  after the TTL without keyed appends. A key of another epoch is not in
  the window; a new epoch found by a keyed append deletes both. Only
  keyed appends name these keys (and pay for them): an unkeyed append
  names neither and sends the ARGV it did before keys existed.
- channel ``gc:{gid}:ch`` — each appended record as ``s|t|ts_ms|epoch|payload``
  (the epoch beside the DISPATCH bytes, never inside them: a listener checks
  it before forwarding a record; ``payload`` is exactly what ``read`` returns),
  and each presence change as ``P|join|`` or ``P|leave|`` and the member JSON
  with its version as ``"v"``.

One Lua script per append batch does all of it atomically, so every node
sees one order. Appends from all guild actors of this node are queued and
sent in one pipeline per event-loop turn (one round trip for many guilds),
one batch in flight at a time, on the pipeline's own connection
(``resp.py``: one write per batch, replies parsed by hiredis as they
arrive, one timeout per batch).

The live feed uses one pub/sub connection per node (also ``resp.py``),
subscribed only to the channels of guilds with local subscribers; what one
read of it brings is parsed in the read callback and reaches each guild as
one list of records (one ``Feed`` message per guild per read, a presence
change of the guild between two of its records kept between them). On a
reconnect it resubscribes and tells every listener to check for missed
records (``feed(gid, None)``).
A connection that stays open but delivers nothing (a black-holed link, a
zombie) is found by a PING on the pub/sub connection every
``feed_deadline / 3`` s: no answer, and no message, within ``feed_deadline``
and the feed is declared dead (logged, readiness fails), the connection is
dropped and a new one resubscribes and catches up. A feed dead for longer
than ``FEED_LOST_AFTER`` deadlines tells every listener ``FEED_LOST`` (its
sessions are closed with 4000 and recover on a node that can serve them).

Health (``healthy``, ``unhealthy_reason``; ``/readyz``): the command link
(heartbeat every ``health_interval``), the feed, and Redis's
``maxmemory-policy``: anything but ``noeviction`` can evict a guild's keys
(``allkeys-*`` any key, ``volatile-*`` the history streams, which carry a
TTL), so it is checked at start (refused), on every reconnect and every
``POLICY_CHECK_INTERVAL`` s (appends refused and not ready while it holds).

Outcomes: an append that fails before it was sent (no connection, refused)
raises ``BrokerUnavailable`` ("not published"); one whose answer did not
come (timeout, connection lost after sending) raises ``OutcomeUnknown``:
it may have been sequenced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.maint_notifications import MaintNotificationsConfig

from guildcast.broker import resp
from guildcast.broker.base import (
    FEED_LOST,
    AppendDone,
    AppendsQueued,
    Broker,
    BrokerUnavailable,
    Feed,
    OutcomeUnknown,
    Presence,
    PresenceFeed,
    PresenceSnapshot,
    Record,
    spawn,
)
from guildcast.broker.resp import ReplyError, RespConnection, bulks, pack, pack_after
from guildcast.core.idempotency import (
    IDEMPOTENCY_GUILD_KEYS,
    IDEMPOTENCY_TTL,
    Replayed,
    digest,
)
from guildcast.core.ids import HexIds
from guildcast.core.ratelog import RateLimitedLog

log = logging.getLogger("guildcast.broker.redis")
#: Pool exhaustion comes in floods (every command of a storm): one line per
#: few seconds, with a count of the ones left out.
_flood = RateLimitedLog(log)

_APPEND = """
-- KEYS: the guild's epoch, seq, log, channel; for a keyed append the
-- window's hash and order; last, the log's age-check time (trim_key).
local keyed = #KEYS > 5
local trim = KEYS[#KEYS]
local epoch = redis.call('GET', KEYS[1])
if not epoch or redis.call('EXISTS', KEYS[2]) == 0 then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
  redis.call('SET', KEYS[2], 0)
  redis.call('DEL', KEYS[3], trim)
  if keyed then redis.call('DEL', KEYS[5], KEYS[6]) end
end
local gid = ARGV[2]
local maxlen = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local n = tonumber(ARGV[6])
-- Keyed (the window's two keys given): ARGV[7], ARGV[8] are the window's
-- TTL (ms) and count, and each item is t, d, key ('' for none), digest;
-- unkeyed, each item is t, d from ARGV[7] on.
local first = 6
local stride = 2
local wttl = 0
local wmax = 0
if keyed then
  wttl = tonumber(ARGV[7])
  wmax = tonumber(ARGV[8])
  first = 8
  stride = 4
  local old = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', '(' .. (now - wttl))
  for _, k in ipairs(old) do redis.call('HDEL', KEYS[5], k) end
  if #old > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', '(' .. (now - wttl)) end
end
local out = {epoch}
for i = 1, n do
  local at = first + stride * (i - 1)
  local t = ARGV[at + 1]
  local d = ARGV[at + 2]
  local k = ''
  local h = ''
  local seen = nil
  if keyed then
    k = ARGV[at + 3]
    h = ARGV[at + 4]
    if k ~= '' then
      local v = redis.call('HGET', KEYS[5], k)
      if v then
        local a = string.find(v, '|', 1, true)
        local b = string.find(v, '|', a + 1, true)
        if string.sub(v, a + 1, b - 1) == epoch then
          seen = string.sub(v, 1, a - 1)
          if string.sub(v, b + 1) == h then seen = 'r' .. seen else seen = 'c' .. seen end
        end
      end
    end
  end
  if seen then
    out[#out + 1] = seen
  else
    local s = redis.call('INCR', KEYS[2])
    local p = '{"op":0,"t":"' .. t .. '","g":"' .. gid .. '","s":' .. s .. ',"d":' .. d .. '}'
    if maxlen > 0 then
      redis.call('XADD', KEYS[3], 'MAXLEN', maxlen, s .. '-0', 't', t, 'ts', now, 'p', p)
    end
    redis.call('PUBLISH', KEYS[4], s .. '|' .. t .. '|' .. now .. '|' .. epoch .. '|' .. p)
    out[#out + 1] = s
    if k ~= '' then
      redis.call('HSET', KEYS[5], k, s .. '|' .. epoch .. '|' .. h)
      redis.call('ZADD', KEYS[6], now, k)
    end
  end
end
if keyed then
  local c = redis.call('ZCARD', KEYS[6])
  if c > wmax then
    local drop = redis.call('ZRANGE', KEYS[6], 0, c - wmax - 1)
    for _, k in ipairs(drop) do redis.call('HDEL', KEYS[5], k) end
    redis.call('ZREMRANGEBYRANK', KEYS[6], 0, c - wmax - 1)
  end
  redis.call('PEXPIRE', KEYS[5], wttl)
  redis.call('PEXPIRE', KEYS[6], wttl)
end
if maxlen > 0 then
  -- The age trim reads the oldest entry only once it can be too old: the
  -- trim key holds when that is (the oldest's ts + ttl) and expires then.
  if now >= tonumber(redis.call('GET', trim) or '0') then
    local cutoff = now - ttl
    local due = now + ttl
    for _ = 1, 64 do
      local first = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 1)
      if #first == 0 then break end
      local f = first[1][2]
      local ts = nil
      for j = 1, #f, 2 do if f[j] == 'ts' then ts = tonumber(f[j + 1]) end end
      if ts == nil then due = now break end
      if ts >= cutoff then due = ts + ttl break end
      redis.call('XDEL', KEYS[3], first[1][1])
      due = now  -- 64 deleted and maybe more too old: the next append looks again
    end
    if due > now then redis.call('SET', trim, due, 'PX', due - now) else redis.call('DEL', trim) end
  end
  if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
end
return out
"""

_HEAD = """
local epoch = redis.call('GET', KEYS[1])
if not epoch or redis.call('EXISTS', KEYS[2]) == 0 then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
  redis.call('SET', KEYS[2], 0)
  redis.call('DEL', KEYS[3])
end
return {epoch, tonumber(redis.call('GET', KEYS[2]) or '0')}
"""

#: Seconds close() waits for a cancelled task before cancelling it again.
CANCEL_AGAIN = 0.5

# --- the key schema: every key and channel name, in this one place -------------

#: The heartbeat sorted set (node id -> last beat, ms).
NODES = "gc:nodes"


def guild_keys(gid: str) -> list[str]:
    """The guild's epoch, seq, log and channel (the append script's KEYS)."""
    return [f"gc:{{{gid}}}:epoch", f"gc:{{{gid}}}:seq", f"gc:{{{gid}}}:log", channel(gid)]


def trim_key(gid: str) -> str:
    """When (ms) the guild's log may first hold an entry older than
    ``history_ttl``: the append script's last KEY."""
    return f"gc:{{{gid}}}:trim"


def window_keys(gid: str) -> list[str]:
    """The guild's idempotency window, its hash and its order: the append
    script's KEYS[5] and KEYS[6], given for keyed appends only."""
    return [f"gc:{{{gid}}}:idem", f"gc:{{{gid}}}:idemq"]


def channel(gid: str) -> str:
    """The guild's pub/sub channel (records and presence changes)."""
    return f"gc:{{{gid}}}:ch"


def channel_guild(ch: str) -> str:
    """The guild id of a :func:`channel` name."""
    return ch[4:-4]  # "gc:{" gid "}:ch"


def presence_key(gid: str) -> str:
    """The guild's presence hash (member key -> member JSON)."""
    return f"gc:pg:{{{gid}}}"


def presence_version_key(gid: str) -> str:
    """The version of the guild's presence (``base.PresenceSnapshot``): one
    INCR per change, in the script that makes and announces the change."""
    return f"gc:pg:{{{gid}}}:v"


def node_members(node: str) -> str:
    """A node's index of its presence entries (set of "gid NUL key")."""
    return f"gc:node:{node}:members"


# The same names as Lua expressions, for the script that computes its keys.
def _lua_node_members(var: str) -> str:
    return f"'gc:node:' .. {var} .. ':members'"


def _lua_presence_key(var: str) -> str:
    return f"'gc:pg:{{' .. {var} .. '}}'"


def _lua_channel(var: str) -> str:
    return f"'gc:{{' .. {var} .. '}}:ch'"


def _lua_presence_version_key(var: str) -> str:
    return f"'gc:pg:{{' .. {var} .. '}}:v'"


# A presence announcement on the guild's channel: ``P|join|`` or ``P|leave|``
# and the member's JSON with the change's version added as ``"v"`` (a node of
# an earlier version reads the member and ignores ``v``). ``info`` is the
# member JSON as stored (an object: its closing brace is replaced).
def _lua_announce(kind: str, info: str, v: str) -> str:
    return f"'P|{kind}|' .. string.sub({info}, 1, -2) .. ',\"v\":' .. {v} .. '}}'"


# Presence: ``gc:pg:{gid}`` hash (member key -> member JSON), its version
# ``gc:pg:{gid}:v`` (one INCR per change, in the same script as the change
# and its PUBLISH: the feed carries changes in version order), the node's own
# index ``gc:node:<id>:members`` (set of "gid NUL key") and the heartbeat
# sorted set ``gc:nodes`` (node id -> last beat, ms). Scripts touch keys they
# compute, so presence needs one Redis (not Redis Cluster). The version key
# is kept for good, like the guild's epoch: a listener holding a version
# must never see it start again (a Redis that lost it also lost the feed,
# and every listener resynchronises, docs/RELIABILITY.md).
_PRESENCE_JOIN = f"""
redis.call('SADD', KEYS[2], ARGV[3] .. '\\0' .. ARGV[1])
if redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local v = redis.call('INCR', KEYS[4])
redis.call('PUBLISH', KEYS[3], {_lua_announce("join", "ARGV[2]", "v")})
return 1
"""

_PRESENCE_LEAVE = f"""
local n = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[3] .. '\\0' .. ARGV[1])
if n > 0 then
  local v = redis.call('INCR', KEYS[4])
  redis.call('PUBLISH', KEYS[3], {_lua_announce("leave", "ARGV[2]", "v")})
end
return n
"""

# The guild's presence at one version: {version, member count, at most
# ARGV[1] member JSONs} in one atomic step (HSCAN past the limit: the same
# members each time while the hash does not change).
_PRESENCE_SNAPSHOT = """
local v = tonumber(redis.call('GET', KEYS[2]) or '0')
local n = redis.call('HLEN', KEYS[1])
local limit = tonumber(ARGV[1])
local out = {}
if n <= limit then
  out = redis.call('HVALS', KEYS[1])
elseif limit > 0 then
  local cursor = '0'
  repeat
    local r = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', limit)
    cursor = r[1]
    local kv = r[2]
    for i = 2, #kv, 2 do
      if #out < limit then out[#out + 1] = kv[i] end
    end
  until cursor == '0' or #out >= limit
end
return {v, n, out}
"""

# Remove every member of each node whose heartbeat is older than ARGV[1] (or
# of node ARGV[2] when given), telling listeners; returns members removed.
_REAP = f"""
local dead
if ARGV[2] ~= '' then dead = {{ARGV[2]}} else
  dead = redis.call('ZRANGEBYSCORE', '{NODES}', '-inf', ARGV[1]) end
local removed = 0
for _, node in ipairs(dead) do
  local idx = {_lua_node_members("node")}
  for _, entry in ipairs(redis.call('SMEMBERS', idx)) do
    local sep = string.find(entry, '\\0', 1, true)
    local gid = string.sub(entry, 1, sep - 1)
    local key = string.sub(entry, sep + 1)
    local h = {_lua_presence_key("gid")}
    local info = redis.call('HGET', h, key)
    if info then
      redis.call('HDEL', h, key)
      local v = redis.call('INCR', {_lua_presence_version_key("gid")})
      redis.call('PUBLISH', {_lua_channel("gid")}, {_lua_announce("leave", "info", "v")})
      removed = removed + 1
    end
  end
  redis.call('DEL', idx)
  redis.call('ZREM', '{NODES}', node)
end
return removed
"""

#: Presence updates queued before they are dropped (with a warning): presence
#: is advisory, and a Redis outage must not grow memory without bound.
MAX_QUEUED_PRESENCE = 100_000

#: redis-py's connections per node to Redis (besides the append pipeline's
#: and the feed's own, ``resp.py``): reads, heads and presence in parallel.
MAX_REDIS_CONNECTIONS = 32

#: A feed dead for this many ``feed_deadline`` in a row is reported lost to
#: its listeners (they close their sessions, which recover elsewhere): short
#: blips are bridged by a resubscribe and a catch-up read, long ones are not
#: left silent.
FEED_LOST_AFTER = 2.0

#: Seconds between checks of Redis's ``maxmemory-policy`` (also checked at
#: start and on every reconnect): an operator may change it at run time.
POLICY_CHECK_INTERVAL = 5.0

#: The one ``maxmemory-policy`` under which Redis never evicts our keys.
SAFE_POLICY = "noeviction"

#: Appends queued across guilds before a pipeline is sent regardless.
MAX_PIPELINE = 512
#: Guilds whose append command head (EVALSHA, the script, its keys) is kept
#: packed; when full the cache starts again empty (packing one is a few us).
MAX_PACKED_HEADS = 10_000


class _Answer(Protocol):
    """Where the pipeliner puts a queued append's reply: the caller's
    future (:meth:`RedisBroker.append`), or a :class:`_Done` callback
    (:meth:`RedisBroker.append_queued`)."""

    def done(self) -> bool: ...
    def set_result(self, result: list[Any], /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...


class _Done:
    """A queued append answered through ``fn`` (``AppendDone``) in the
    pipeliner's step, once: no Future and no wake of the caller's task."""

    __slots__ = ("_done", "fn")

    def __init__(self, fn: AppendDone) -> None:
        self.fn = fn
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, result: list[Any]) -> None:
        self._done = True
        try:
            out = (result[0].decode(), [int(s) for s in result[1:]])
        except (AttributeError, IndexError, TypeError, ValueError) as e:
            self._call(None, OutcomeUnknown(f"redis: unexpected append reply ({e!r})"))
            return
        self._call(out, None)

    def set_exception(self, exception: BaseException) -> None:
        self._done = True
        self._call(None, exception)

    def _call(self, result: tuple[str, list[int]] | None, exc: BaseException | None) -> None:
        try:
            self.fn(result, exc)
        except Exception:
            log.exception("append callback failed")


#: An append script call for the pipeliner: its packed head (bytes, argument
#: count), the rest of its arguments, where its reply goes.
_Queued = tuple[tuple[bytes, int], list[Any], _Answer]
#: Bound on queued appends; past it appends fail at once (try again later).
MAX_QUEUED_APPENDS = 50_000


class _FeedSilent(Exception):
    """The pub/sub connection delivered nothing, not even a PONG, in time."""


def parse_record(data: bytes) -> Record:
    """A feed message ``s|t|ts_ms|epoch|payload`` (or, from a node of an
    earlier version, ``s|t|ts_ms|payload``: no epoch) as a Record."""
    s_b, t_b, ts_b, rest = data.split(b"|", 3)
    epoch = ""
    if not rest.startswith(b"{"):
        e_b, rest = rest.split(b"|", 1)
        epoch = e_b.decode()
    return Record(int(s_b), t_b.decode(), int(ts_b) / 1000.0, rest, epoch)


class RedisBroker:
    """Broker over one Redis (``redis://host:port/db``)."""

    #: The loop the broker was started on (its futures' loop; set in start()).
    _loop: asyncio.AbstractEventLoop

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
        feed_deadline: float = 3.0,
        idempotency_ttl: float = IDEMPOTENCY_TTL,
        idempotency_keys: int = IDEMPOTENCY_GUILD_KEYS,
    ) -> None:
        self.url = url
        self.op_timeout = op_timeout
        #: Seconds the pub/sub connection may stay silent (no message, no
        #: answer to its PING) before the feed is declared dead.
        self.feed_deadline = feed_deadline
        self.history_size = history_size
        self.history_ttl_ms = int(history_ttl * 1000)
        #: The idempotency window per guild: milliseconds and keys (both
        #: > 0, else keys are accepted and ignored).
        self.idempotency_ttl_ms = int(idempotency_ttl * 1000)
        self.idempotency_keys = idempotency_keys
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
            # redis-py skips its check of a pooled connection the server has
            # closed (EOF waiting) while maintenance notifications are on
            # (their default, "auto"): an append or catch-up read then failed
            # on the first stale connection after a Redis restart, as "no
            # answer" although nothing had been sent. Off: a stale pooled
            # connection is reconnected before use.
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )
        self._r: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        self._append_script = self._r.register_script(_APPEND)
        self._head_script = self._r.register_script(_HEAD)
        self._join_script = self._r.register_script(_PRESENCE_JOIN)
        self._leave_script = self._r.register_script(_PRESENCE_LEAVE)
        self._reap_script = self._r.register_script(_REAP)
        self._snapshot_script = self._r.register_script(_PRESENCE_SNAPSHOT)
        self.node_id = node_id
        self.presence_timeout = presence_timeout
        self._presence_q: deque[tuple[bool, str, Presence]] = deque()
        self._presence_feed: PresenceFeed | None = None
        self.presence_dropped = 0
        self._feed: Feed | None = None
        #: The command link answers (heartbeat, commands).
        self._healthy = False
        #: The pub/sub connection delivers (or nothing is subscribed).
        self._feed_ok = True
        #: When the feed was declared dead (monotonic), and whether its
        #: listeners were told FEED_LOST since.
        self._feed_down_since = 0.0
        self._feed_lost_told = False
        #: Why Redis may not be used (an evicting maxmemory-policy), or None.
        self._policy_error: str | None = None
        self._policy_checked = 0.0
        self._policy_unknown_logged = False
        #: Every member this node announced and has not withdrawn: announced
        #: again if another node's reaper removed them (this node was paused
        #: past presence_timeout). Bounded by sessions x their guilds.
        self._members: dict[tuple[str, str], Presence] = {}
        self._beaten = False
        #: Times the feed was found dead (a metric for tests and logs).
        self.feed_deaths = 0
        #: Queued appends: the script's KEYS, its ARGV, the caller's future.
        self._queue: deque[_Queued] = deque()
        #: (guild, keyed) -> its append command head, packed (MAX_PACKED_HEADS).
        self._heads: dict[tuple[str, bool], tuple[bytes, int]] = {}
        self._queue_ready = asyncio.Event()
        #: Wanted channels: a pending future until Redis confirms, then None.
        self._listening: dict[str, asyncio.Future[None] | None] = {}
        #: SUBSCRIBEs sent on the feed's connection and not yet confirmed, per
        #: guild: after listen, unlisten, listen the first confirmation is the
        #: old SUBSCRIBE's, followed by the UNSUBSCRIBE; only the last one
        #: proves the channel is subscribed. Bounded by the commands in flight
        #: on one connection; reset with it.
        self._unconfirmed: dict[str, int] = {}
        #: Listeners per guild: an old guild actor still stopping and its
        #: successor may overlap, so listen/unlisten are counted.
        self._listeners: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        #: A fresh epoch for each append should its guild need one (used once
        #: in a guild's life): random ids read many per system call (ids.py).
        self._epochs = HexIds(8)
        #: The append pipeline's connection and the feed's (``resp.py``).
        self._alink: RespConnection | None = None
        self._sub: RespConnection | None = None
        #: Guilds the feed's new connection owes a catch-up (``_reader``).
        self._owed: list[str] = []
        #: Channel name -> guild, for the feed's listened channels.
        self._gids: dict[bytes, str] = {}
        self.reconnects = 0

    # --- life cycle ------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Ready to serve: the link answers, the feed delivers, the policy is safe."""
        return self._healthy and self._feed_ok and self._policy_error is None

    @property
    def unhealthy_reason(self) -> str:
        """Why :attr:`healthy` is False ("" when it is not)."""
        if self._policy_error is not None:
            return f"broker unusable: {self._policy_error}"
        if not self._healthy:
            return "broker unavailable"
        if not self._feed_ok:
            return "broker feed dead"
        return ""

    @property
    def redis(self) -> aioredis.Redis:
        return self._r

    def set_feed(self, feed: Feed, presence: PresenceFeed | None = None) -> None:
        self._feed = feed
        self._presence_feed = presence

    async def start(self, tg: asyncio.TaskGroup | None = None) -> None:
        try:
            await self._r.ping()
            await self._check_policy()
        except (RedisError, OSError) as e:
            raise BrokerUnavailable(f"cannot reach {self.url}: {e}") from None
        if self._policy_error is not None:
            raise BrokerUnavailable(f"refusing {self.url}: {self._policy_error}")
        self._healthy = True
        self._loop = asyncio.get_running_loop()
        # In the node's task group; cancelled and awaited in close().
        self._tasks = [
            spawn(tg, self._pipeliner(), "redis-pipeliner"),
            spawn(tg, self._reader(), "redis-pubsub"),
            spawn(tg, self._health(), "redis-health"),
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
            # A cancel can be lost in the Redis client (its timeout firing at
            # that moment turns it into a TimeoutError, which the task's loop
            # survives): cancel again until the task has ended.
            while not t.done():
                await asyncio.wait([t], timeout=CANCEL_AGAIN)
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        while self._queue:
            _, _, fut = self._queue.popleft()
            if not fut.done():
                fut.set_exception(BrokerUnavailable("broker closed"))
        if self._alink is not None:
            self._alink.close()
            self._alink = None
        await self._r.aclose(close_connection_pool=True)

    # --- sequencing and history --------------------------------------------------

    def _append_argv(self, gid: str, n: int) -> list[Any]:
        """The append script's leading ARGV (a new epoch should it need one,
        the guild, the history bounds, now, the item count): one layout for
        the keyed and unkeyed appends."""
        return [
            self._epochs.next(),
            gid,
            self.history_size,
            int(time.time() * 1000),
            self.history_ttl_ms,
            n,
        ]

    async def append(self, gid: str, items: Sequence[tuple[str, bytes]]) -> tuple[str, list[int]]:
        args = self._append_argv(gid, len(items))
        for t, d in items:
            args.append(t)
            args.append(d)
        out = await self._queue_append(self._head(gid, False), args)
        return out[0].decode(), [int(s) for s in out[1:]]

    def append_queued(self, gid: str, items: Sequence[tuple[str, bytes]], done: AppendDone) -> None:
        """:meth:`append` answered through ``done`` by the pipeliner
        (``AppendsQueued``): the same script, queue and failures; queued
        behind every append queued before it (one connection, in order)."""
        args = self._append_argv(gid, len(items))
        for t, d in items:
            args.append(t)
            args.append(d)
        self._queue_item(self._head(gid, False), args, _Done(done))

    async def append_keyed(
        self, gid: str, items: Sequence[tuple[str, bytes]], keys: Sequence[str | None]
    ) -> tuple[str, list[int | Replayed]]:
        """The window lives in Redis beside the log: the one script looks
        each key up and records it as it sequences, atomically for every
        node (module docstring)."""
        if self.idempotency_ttl_ms <= 0 or self.idempotency_keys <= 0:
            epoch, ss = await self.append(gid, items)  # the window is off
            return epoch, list(ss)
        args = self._append_argv(gid, len(items))
        args += (self.idempotency_ttl_ms, self.idempotency_keys)
        for (t, d), key in zip(items, keys, strict=True):
            args.append(t)
            args.append(d)
            args.append(key or "")
            args.append(digest(t, d) if key is not None else b"")
        out = await self._queue_append(self._head(gid, True), args)
        res: list[int | Replayed] = []
        for v in out[1:]:
            # A number: sequenced now. "r<s>": the window's (same content),
            # "c<s>": the window's with other content (a conflict).
            if isinstance(v, bytes):
                res.append(Replayed(int(v[1:]), v[:1] == b"c"))
            else:
                res.append(int(v))
        return out[0].decode(), res

    def _head(self, gid: str, keyed: bool) -> tuple[bytes, int]:
        """The guild's append command up to its ARGV, packed (cached): the
        script's KEYS are the guild's, then for a keyed append its window's,
        then its trim key."""
        head = self._heads.get((gid, keyed))
        if head is None:
            window = window_keys(gid) if keyed else []
            keys = [*guild_keys(gid), *window, trim_key(gid)]
            if len(self._heads) >= MAX_PACKED_HEADS:
                self._heads.clear()
            cmd: list[resp.Arg] = ["EVALSHA", self._append_script.sha, len(keys), *keys]
            head = self._heads[gid, keyed] = (bulks(cmd), len(cmd))
        return head

    def _queue_append(self, head: tuple[bytes, int], args: list[Any]) -> asyncio.Future[list[Any]]:
        """Queue one append script call for the pipeliner; its future."""
        fut: asyncio.Future[list[Any]] = self._loop.create_future()
        self._queue_item(head, args, fut)
        return fut

    def _queue_item(self, head: tuple[bytes, int], args: list[Any], answer: _Answer) -> None:
        """Queue one append script call whose reply goes to ``answer``."""
        # Only the command link and the policy matter here: a feed reconnect
        # does not stop this node from sequencing.
        if not self._healthy:
            raise BrokerUnavailable("redis is unreachable")
        if self._policy_error is not None:
            raise BrokerUnavailable(self._policy_error)
        if len(self._queue) >= MAX_QUEUED_APPENDS:
            raise BrokerUnavailable("too many appends queued")
        self._queue.append((head, args, answer))
        self._queue_ready.set()

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
                batch: list[_Queued] = []
                while self._queue and len(batch) < MAX_PIPELINE:
                    batch.append(self._queue.popleft())
                try:
                    await self._send(batch)
                except asyncio.CancelledError:
                    # Stopped mid-batch (close): its callers are answered as
                    # any lost answer is, not left waiting for ever.
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(OutcomeUnknown("redis: broker closed"))
                    raise

    async def _append_link(self) -> RespConnection:
        """The append pipeline's own connection (``resp.py``), opened on
        first use and again after it was lost."""
        link = self._alink
        if link is None or not link.is_open:
            self._alink = None
            async with asyncio.timeout(self.op_timeout):
                link = await resp.connect(self._r.connection_pool)
            self._alink = link
        return link

    async def _send(self, batch: list[_Queued]) -> None:
        """One pipeline of append scripts (EVALSHA; on NOSCRIPT, nothing ran:
        load the script and send those again) and answer every future.

        The batch leaves in one write on the pipeline's own connection and
        its replies are parsed in that connection's read callback
        (``resp.py``): one timeout per batch, not per reply."""
        for attempt in (1, 2):
            # A connection first: failing to get one means nothing was sent
            # ("not published"); past it, a lost answer means the scripts may
            # have run ("outcome unknown").
            try:
                link = await self._append_link()
            except (RedisError, OSError, ReplyError, TimeoutError) as e:
                self._mark_down(e)
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(BrokerUnavailable(f"redis: {e or type(e).__name__}"))
                return
            data = b"".join([pack_after(head, n, args) for (head, n), args, _ in batch])
            try:
                async with asyncio.timeout(self.op_timeout):
                    results = await link.request(data, len(batch))
            except (OSError, TimeoutError) as e:
                link.close()  # its replies can no longer be paired with commands
                self._mark_down(e)
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(
                            OutcomeUnknown(f"redis: no answer ({e or type(e).__name__})")
                        )
                return
            again = []
            for item, res in zip(batch, results, strict=True):
                fut = item[2]
                if fut.done():
                    continue
                if type(res) is ReplyError:
                    if attempt == 1 and str(res).startswith("NOSCRIPT"):
                        again.append(item)
                    else:
                        # A script that failed part way may have sequenced some.
                        fut.set_exception(OutcomeUnknown(f"redis: {res}"))
                else:
                    fut.set_result(res)
            if not again:
                return
            try:
                await self._r.script_load(_APPEND)
            except (RedisError, OSError) as e:
                self._mark_down(e)
                for _, _, fut in again:
                    if not fut.done():
                        fut.set_exception(BrokerUnavailable(f"redis: {e}"))
                return
            batch = again

    # --- presence ------------------------------------------------------------------

    def presence_join(self, gid: str, member: Presence) -> None:
        self._members[(gid, member.key)] = member
        self._queue_presence(True, gid, member)

    def presence_leave(self, gid: str, member: Presence) -> None:
        self._members.pop((gid, member.key), None)
        self._queue_presence(False, gid, member)

    def _reannounce(self) -> None:
        """Another node reaped this one (it was paused or cut off longer than
        ``presence_timeout``): announce every live member again."""
        log.warning(
            "this node was dropped from presence (silent longer than %g s); "
            "announcing its %d members again",
            self.presence_timeout,
            len(self._members),
        )
        for (gid, _), m in list(self._members.items()):
            self._queue_presence(True, gid, m)

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
        idx = node_members(self.node_id)
        while q:
            batch = [q.popleft() for _ in range(min(len(q), MAX_PIPELINE))]
            try:
                async with self._r.pipeline(transaction=False) as pipe:
                    for join, gid, m in batch:
                        keys = [presence_key(gid), idx, channel(gid), presence_version_key(gid)]
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
                pipe.hgetall(presence_key(gid))
                pipe.zrangebyscore(NODES, now_ms - int(self.presence_timeout * 1000), "+inf")
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

    async def presence_snapshot(self, gid: str, limit: int) -> PresenceSnapshot:
        # Not filtered by node liveness, unlike presence(): the snapshot is
        # what the versioned changes apply to, and a dead node's members
        # leave it (with a version) when they are reaped.
        v, n, raw = await self._idempotent(
            lambda: self._snapshot_script(
                keys=[presence_key(gid), presence_version_key(gid)], args=[max(0, limit)]
            )
        )
        members = []
        for info in raw:
            d = orjson.loads(info)
            members.append(Presence(d["user"], d["session"], d["node"]))
        return PresenceSnapshot(int(v), int(n), members)

    async def head(self, gid: str) -> tuple[str, int]:
        # Retried once on a lost connection: it creates at most one epoch
        # (the script is atomic and a second run finds the first one's).
        epoch, s = await self._idempotent(
            lambda: self._head_script(keys=guild_keys(gid), args=[secrets.token_hex(8)])
        )
        return epoch.decode(), int(s)

    async def _idempotent(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """``await call()``, retried once on a connection error (a pooled
        connection Redis had closed, say): only for commands safe to repeat.
        Raises :class:`BrokerUnavailable` (and marks Redis down) otherwise."""
        for attempt in (1, 2):
            try:
                return await call()
            except RedisConnectionError as e:
                # A pool with no connection free: waiting again would only
                # double the wait (a stale connection is worth one retry).
                if attempt == 2 or pool_exhausted(e):
                    self._mark_down(e)
                    raise BrokerUnavailable(f"redis: {e}") from None
            except (RedisError, OSError) as e:
                self._mark_down(e)
                raise BrokerUnavailable(f"redis: {e}") from None
        raise AssertionError("unreachable")

    async def read(self, gid: str, after: int, limit: int) -> tuple[str, list[Record]]:
        k = guild_keys(gid)
        # A read is safe to repeat: retried once on a connection Redis had
        # closed (say, a pooled one after a Redis restart), so a catch-up
        # does not fail for a connection that was merely stale.

        async def fetch() -> list[Any]:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.get(k[0])
                pipe.exists(k[1])
                pipe.xrange(k[2], min=f"{after + 1}-0", max="+", count=limit)
                result: list[Any] = await pipe.execute()
                return result

        epoch, has_seq, entries = await self._idempotent(fetch)
        if epoch is None or not has_seq:
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
            e: Any = await self._r.xrange(guild_keys(gid)[2], min="-", max="+", count=1)
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
            ch = channel(gid)
            self._gids[ch.encode()] = gid
            if self._feed_write(pack("SUBSCRIBE", ch)):
                self._unconfirmed[gid] = self._unconfirmed.get(gid, 0) + 1
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
        ch = channel(gid)
        self._gids.pop(ch.encode(), None)
        self._feed_write(pack("UNSUBSCRIBE", ch))

    def _feed_write(self, data: bytes) -> bool:
        """A (UN)SUBSCRIBE or PING on the feed's connection, if it has one
        (else the reader subscribes every wanted channel when it connects);
        whether it was written."""
        sub = self._sub
        if sub is not None and sub.is_open:
            try:
                sub.write(data)
                return True
            except OSError as e:
                self._feed_down(e)  # the reader reconnects and subscribes it
        return False

    async def _reader(self) -> None:
        """Owns the pub/sub connection: (re)subscribes, and checks the feed
        is alive (a PING answered within ``feed_deadline``); the connection's
        read callback delivers what arrives (``_on_replies``).

        After any failure it starts a fresh connection with a bounded
        backoff and resubscribes every wanted channel. The first reply of any
        kind on the new connection proves its SUBSCRIBE took effect (Redis
        answers in order): then every guild that was listening before is
        told to catch up (``feed(gid, None)``), whichever reply it was.
        """
        # The first reconnect is immediate (a reset connection usually comes
        # back at once: the feed is "dead" for one round trip), then backs off.
        delay = 0.0
        every = self.feed_deadline / 3
        while True:
            sub: RespConnection | None = None
            try:
                async with asyncio.timeout(self.op_timeout):
                    # No SELECT: channels are the same in every database.
                    sub = await resp.connect(self._r.connection_pool, select_db=False)
                # Guilds confirmed on an earlier connection: owed a catch-up.
                self._owed = [g for g, fut in self._listening.items() if fut is None]
                sub.sink = self._on_replies
                self._sub = sub
                # One SUBSCRIBE per wanted channel on this connection, none else.
                self._unconfirmed = dict.fromkeys(self._listening, 1)
                if self._listening:
                    sub.write(pack("SUBSCRIBE", *[channel(g) for g in self._listening]))
                delay = 0.0
                next_ping = time.monotonic() + every
                # Pinged whether or not anything is subscribed: a feed found
                # dead stays "dead" (not ready) until a connection answers,
                # even once its guilds stopped listening.
                while True:
                    await asyncio.wait(
                        [sub.closed], timeout=max(0.01, next_ping - time.monotonic())
                    )
                    if not sub.is_open:
                        raise ConnectionError(f"feed connection lost: {sub.error}")
                    now = time.monotonic()
                    if now - sub.last_read > self.feed_deadline:
                        raise _FeedSilent(f"no answer to PING in {now - sub.last_read:.1f} s")
                    if now >= next_ping:
                        next_ping = now + every
                        sub.write(pack("PING"))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._feed_down(e)
                await asyncio.sleep(delay)
                delay = min(max(delay * 2, 0.05), 2.0)
            finally:
                self._sub = None
                self._owed = []
                self._unconfirmed = {}
                if sub is not None:
                    sub.close()

    def _feed_down(self, e: BaseException) -> None:
        self.feed_deaths += 1
        if self._feed_ok:
            log.warning("redis feed dead (%s); reconnecting and resubscribing", e or type(e))
            self._feed_ok = False
            self._feed_down_since = time.monotonic()
            self._feed_lost_told = False

    def _feed_up(self) -> None:
        if not self._feed_ok:
            log.warning("redis feed is live again")
            self._feed_ok = True

    def _check_feed_lost(self) -> None:
        """Tell every listener FEED_LOST once the feed has been dead too long."""
        if self._feed_ok or self._feed_lost_told or self._feed is None:
            return
        if time.monotonic() - self._feed_down_since < FEED_LOST_AFTER * self.feed_deadline:
            return
        self._feed_lost_told = True
        log.warning(
            "redis feed dead for %.1f s: closing the sessions of %d guilds so they recover",
            time.monotonic() - self._feed_down_since,
            len(self._listening),
        )
        for gid in list(self._listening):
            self._feed(gid, FEED_LOST)

    def _on_replies(self, replies: list[Any]) -> None:
        """Everything one read of the feed's connection brought, in order.

        A guild's records of one read reach it as one list (one ``Feed``
        message, not one per record); a presence change of that guild first
        sends the records before it, so its order is kept."""
        if self._owed:
            owed, self._owed = self._owed, []
            self._resync(owed)
        feed = self._feed
        records: dict[str, list[Record]] = {}
        for r in replies:
            if type(r) is list:
                kind = r[0]
                if kind == b"message":
                    ch: bytes = r[1]
                    gid = self._gids.get(ch) or channel_guild(ch.decode())
                    if gid not in self._listening or feed is None:
                        continue
                    data: bytes = r[2]
                    if data.startswith(b"P|"):
                        recs = records.pop(gid, None)
                        if recs:
                            feed(gid, recs)
                        self._on_presence(gid, data)
                        continue
                    recs = records.get(gid)
                    if recs is None:
                        records[gid] = [parse_record(data)]
                    else:
                        recs.append(parse_record(data))
                elif kind == b"subscribe":
                    self._feed_up()
                    gid = channel_guild(r[1].decode())
                    left = self._unconfirmed.pop(gid, 1) - 1
                    if left > 0:  # an earlier SUBSCRIBE's answer: not yet
                        self._unconfirmed[gid] = left
                        continue
                    fut = self._listening.get(gid, False)
                    if isinstance(fut, asyncio.Future):
                        if not fut.done():
                            fut.set_result(None)
                        self._listening[gid] = None
                elif kind == b"pong":
                    self._feed_up()
            elif r == b"PONG":  # a PING's answer while nothing is subscribed
                self._feed_up()
            elif isinstance(r, ReplyError):
                raise r  # the connection is dropped and a new one resubscribes
        if feed is not None:
            for gid, recs in records.items():
                feed(gid, recs)

    def _on_presence(self, gid: str, data: bytes) -> None:
        """A presence change ``P|join|`` / ``P|leave|`` + member JSON."""
        if self._presence_feed is not None:
            _, kind_b, info = data.split(b"|", 2)
            d = orjson.loads(info)
            m = Presence(d["user"], d["session"], d["node"])
            v = d.get("v")  # None from a node of an earlier version
            self._presence_feed(gid, kind_b.decode(), m, v if type(v) is int else None)

    def _resync(self, gids: list[str]) -> None:
        """A new feed connection delivers again: records sent while it was
        down may be missing; each guild still listening checks with read()."""
        if self._feed is None:
            return
        for gid in gids:
            if gid in self._listening:
                self._feed(gid, None)

    async def _check_policy(self) -> None:
        """Refuse a ``maxmemory-policy`` that can evict our keys (module docstring)."""
        self._policy_checked = time.monotonic()
        try:
            info: Any = await self._r.info("memory")
        except ResponseError as e:  # INFO renamed or refused (some managed Redis)
            if not self._policy_unknown_logged:
                self._policy_unknown_logged = True
                log.warning(
                    "cannot read redis maxmemory-policy (%s): it must be %s", e, SAFE_POLICY
                )
            return
        policy = info.get("maxmemory_policy", SAFE_POLICY)
        if isinstance(policy, bytes):
            policy = policy.decode()
        if policy == SAFE_POLICY:
            if self._policy_error is not None:
                log.warning("redis maxmemory-policy is %s again: usable", policy)
            self._policy_error = None
            return
        why = (
            f"redis maxmemory-policy is {policy}: it can evict guild keys and reuse (epoch, s); "
            f"configure maxmemory-policy {SAFE_POLICY} (docs/OPERATIONS.md)"
        )
        if self._policy_error != why:
            log.error("%s; refusing publishes until it is", why)
        self._policy_error = why

    async def _beat(self) -> None:
        """Heartbeat this node and reap nodes that stopped beating.

        The heartbeat adding this node anew (after its first) means another
        node reaped it: its members are announced again."""
        now_ms = int(time.time() * 1000)
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.zadd(NODES, {self.node_id: now_ms})
            await self._reap_script(
                keys=[], args=[now_ms - int(self.presence_timeout * 1000), ""], client=pipe
            )
            added, _ = await pipe.execute()
        if added and self._beaten and self._members:
            self._reannounce()
        self._beaten = True

    async def _health(self) -> None:
        while True:
            try:
                await self._beat()
                recovered = not self._healthy
                if recovered or time.monotonic() - self._policy_checked >= POLICY_CHECK_INTERVAL:
                    await self._check_policy()
            except (RedisError, OSError) as e:
                self._mark_down(e)
            else:
                if recovered:
                    log.warning("redis is reachable again")
                    self._healthy = True
                if self._presence_q:
                    self._queue_ready.set()  # send presence queued while down
            self._check_feed_lost()
            await asyncio.sleep(self.health_interval)

    def _mark_down(self, e: BaseException) -> None:
        if pool_exhausted(e):
            # This node's own load (every pooled connection busy past the
            # timeout: a reconnect storm's history reads), not Redis gone:
            # the command that waited fails, the node goes on sequencing.
            _flood.log(
                logging.WARNING,
                "redis_pool_exhausted",
                "redis: no pooled connection free within %.1f s (%d in use); "
                "a command failed, redis is not marked unreachable",
                self.op_timeout,
                MAX_REDIS_CONNECTIONS,
            )
            return
        if self._healthy:
            log.warning("redis unreachable: %s", e)
        self._healthy = False


def pool_exhausted(e: BaseException) -> bool:
    """``e`` is redis-py's blocking pool giving up waiting for a free
    connection ("No connection available.", from a timeout): every pooled
    connection was busy, which says nothing about whether Redis answers."""
    return (
        isinstance(e, RedisConnectionError)
        and isinstance(e.__cause__, TimeoutError)
        and "No connection available" in str(e)
    )


def _conforms() -> None:
    """mypy checks the implementation against the contract (docs/DESIGN.md house style)."""
    _: type[Broker] = RedisBroker
    _queued: type[AppendsQueued] = RedisBroker
