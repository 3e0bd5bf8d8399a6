"""Measure the worst case of history memory (docs/SECURITY.md, "Resource
limits for one token holder"). Not a test: run it by hand,

    .venv/bin/python -m tests.hardening.history_cost --mib 1000 [--guilds 200] [serve flags]

It starts ``guildcast serve`` (memory history, defaults otherwise, the HTTP
API unthrottled) and publishes ``--mib`` MiB of 32 KiB events to ``--guilds`` guilds (10)
in batches of 30, the way the issue's attacker filled a node, sampling the
node's RSS and reading ``guildcast_history_bytes`` at the end. Bounded: the
given volume, then it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import psutil

from tests.support.api import Api
from tests.support.node import ServeProcess

EVENT = "x" * (32 * 1024 - 64)
BATCH = 30


async def main(mib: int, guilds: int, extra: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--api-publish-rate", "0", "--metrics-open", *extra]
        node = ServeProcess(args, Path(tmp) / "serve.log")
        await node.start()
        try:
            assert node.proc is not None
            ps = psutil.Process(node.proc.pid)
            rss0 = peak = ps.memory_info().rss
            batches = mib * 1024 // 32 // BATCH
            async with Api(node.api_url) as api:
                for i in range(batches):
                    events = [
                        {"guild": f"own-{(i * BATCH + k) % guilds}", "t": "N", "d": EVENT}
                        for k in range(BATCH)
                    ]
                    status, body, _ = await api.publish({"events": events})
                    assert status == 200, body
                    if i % 20 == 0:
                        peak = max(peak, ps.memory_info().rss)
                _, text, _ = await api.get("/metrics")
            peak = max(peak, ps.memory_info().rss)
            hist = [ln for ln in text.decode().splitlines() if ln.startswith("guildcast_history_")]
            print(
                f"published {batches * BATCH * 32 // 1024} MiB of 32 KiB events to {guilds} guilds"
            )
            print(f"rss start {rss0 / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB")
            print("\n".join(hist))
        finally:
            await node.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1000)
    ap.add_argument("--guilds", type=int, default=10)
    ns, rest = ap.parse_known_args()
    asyncio.run(main(ns.mib, ns.guilds, rest))
