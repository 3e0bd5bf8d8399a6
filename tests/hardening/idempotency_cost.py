"""Measure what idempotency keys cost an append (docs/RELIABILITY.md,
"Outcome unknown: retry with the same key"). Not a test: run it by hand,
under the shared benchmark lock,

    flock /work/bench.lock .venv/bin/python -m tests.hardening.idempotency_cost [--rounds 7]

Redis: 64 guilds appending one event at a time in parallel (the
pipeline's shape), unkeyed and keyed, against a throwaway redis-server;
memory: one guild's keyed and unkeyed ``append_local``. Rounds alternate
the variants; medians are printed in microseconds per append. Bounded:
5,000 Redis appends and 50,000 memory appends per variant and round.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from guildcast.broker.memory import MemoryBroker
from guildcast.broker.redis import RedisBroker
from tests.support.redis import RedisProc

REDIS_APPENDS = 5000
GUILDS = 64
MEMORY_APPENDS = 50_000
DATA = b'{"i":1}'


async def redis_round(url: str, keyed: bool) -> float:
    b = RedisBroker(url, history_size=1000, history_ttl=300)
    await b.start()
    try:
        await b.redis.flushall()
        per = REDIS_APPENDS // GUILDS

        async def guild(g: int) -> None:
            for i in range(per):
                if keyed:
                    await b.append_keyed(f"g{g}", [("E", DATA)], [f"k-{g}-{i}"])
                else:
                    await b.append(f"g{g}", [("E", DATA)])

        t = time.perf_counter()
        await asyncio.gather(*(guild(g) for g in range(GUILDS)))
        return (time.perf_counter() - t) / (per * GUILDS) * 1e6
    finally:
        await b.close()


async def memory_round(keyed: bool) -> float:
    m = MemoryBroker(1000, 300)
    t = time.perf_counter()
    for i in range(MEMORY_APPENDS):
        if keyed:
            await m.append_local_keyed("g", [("E", DATA)], [f"k{i}"])
        else:
            await m.append_local("g", [("E", DATA)])
    return (time.perf_counter() - t) / MEMORY_APPENDS * 1e6


async def main(rounds: int) -> None:
    res: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        proc = RedisProc(Path(tmp))
        proc.start()
        try:
            for _ in range(rounds):
                for keyed in (False, True):
                    name = "redis keyed" if keyed else "redis unkeyed"
                    res.setdefault(name, []).append(await redis_round(proc.url, keyed))
        finally:
            proc.stop()
    for _ in range(rounds):
        for keyed in (False, True):
            name = "memory keyed" if keyed else "memory unkeyed"
            res.setdefault(name, []).append(await memory_round(keyed))
    for name, runs in res.items():
        print(f"{name:15s} median {statistics.median(runs):6.1f} us/append  {runs!r}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    asyncio.run(main(ap.parse_args().rounds))
