"""The Redis append script's age trim, with the script's clock (``now``, its
ARGV) chosen by the test, against a real redis-server.

- An append deletes the entries older than ``history_ttl`` and keeps the
  rest; it reads the oldest entry only once that can be too old (the trim
  key, ``redis.trim_key``), so appends in between cost no ``XRANGE``.
- More than 64 too-old entries: each append deletes 64, and the next one
  looks again.
- A new epoch drops the trim key with the log.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import redis.asyncio as aioredis

from guildcast.broker.redis import RedisBroker, guild_keys, trim_key
from tests.support.redis import RedisProc

TTL_MS = 60_000  # long in real time: the stream's PEXPIRE never fires in a test


async def _xranges(raw: aioredis.Redis) -> int:
    stats: Any = await raw.info("commandstats")
    return int(stats.get("cmdstat_xrange", {}).get("calls", 0))


async def _ids(raw: aioredis.Redis) -> list[int]:
    entries: Any = await raw.xrange(guild_keys("g")[2])
    return [int(e[0].split(b"-")[0]) for e in entries]


async def test_the_age_trim_reads_the_oldest_only_once_it_can_be_too_old(
    redis_proc: RedisProc,
) -> None:
    b = RedisBroker(redis_proc.url, history_size=1000, history_ttl=TTL_MS / 1000)
    await b.start()
    raw = aioredis.Redis(port=redis_proc.port)
    keys = [*guild_keys("g"), trim_key("g")]

    async def append_at(now: int, n: int = 1) -> list[Any]:
        args: list[Any] = [secrets.token_hex(8), "g", 1000, now, TTL_MS, n]
        for i in range(n):
            args += ["E", b"%d" % i]
        out: list[Any] = await b._append_script(keys=keys, args=args)
        return out

    try:
        t0 = int(time.time() * 1000)
        await append_at(t0)  # s 1
        assert int(await raw.get(trim_key("g"))) == t0 + TTL_MS
        assert 0 < await raw.pttl(trim_key("g")) <= TTL_MS  # gone once it means nothing

        before = await _xranges(raw)
        await append_at(t0 + 40_000)  # s 2: nothing can be too old yet
        await append_at(t0 + 50_000)  # s 3
        assert await _xranges(raw) == before, "appends read the oldest entry for nothing"
        assert await _ids(raw) == [1, 2, 3]

        await append_at(t0 + 80_000)  # s 4: s 1 is 80 s old, s 2 40 s
        assert await _ids(raw) == [2, 3, 4]
        assert int(await raw.get(trim_key("g"))) == t0 + 40_000 + TTL_MS  # s 2's turn next
        assert await _xranges(raw) > before

        # 100 entries, all too old later: 64 deleted per append, then the rest.
        t1 = t0 + 200_000
        await append_at(t1, 100)  # s 5..104 (s 2..4 deleted: older than 60 s)
        assert await _ids(raw) == list(range(5, 105))
        await append_at(t1 + 61_000)  # s 105
        assert await _ids(raw) == list(range(69, 106))
        assert await raw.get(trim_key("g")) is None  # "look again next time"
        await append_at(t1 + 61_001)  # s 106
        assert await _ids(raw) == [105, 106]
        assert int(await raw.get(trim_key("g"))) == t1 + 61_000 + TTL_MS

        # A lost log: a new epoch, and the trim key goes with it.
        await raw.delete(*guild_keys("g")[:2])
        epoch, s = (await append_at(t1 + 62_000))[0], (await _ids(raw))
        assert s == [1] and await raw.get(guild_keys("g")[0]) == epoch
        assert int(await raw.get(trim_key("g"))) == t1 + 62_000 + TTL_MS
    finally:
        await raw.aclose()
        await b.close()
