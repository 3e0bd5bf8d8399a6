"""Measure what idle guilds cost a ``--data-dir`` node (docs/OPERATIONS.md,
"Disk, descriptors and idle guilds"). Not a test: run it by hand,

    .venv/bin/python -m tests.hardening.idle_cost --guilds 20000 [--republish N]

It starts ``guildcast serve --data-dir`` (``--idle-timeout 5`` unless told), publishes one
small event to each of N new guilds over the HTTP API, waits until every
guild actor has stopped, then republishes to more guilds than the open
journal bound, and prints the node's RSS, descriptors, files and bytes on
disk at each step. Bounded: N publishes, then waits of at most a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

import psutil

from guildcast.broker.disk import GUILDS_DIR, MAX_OPEN_JOURNALS
from tests.support.api import Api
from tests.support.node import ServeProcess

CONCURRENCY = 32


def disk_usage(data: Path) -> tuple[int, int, int]:
    """(files, bytes of content, bytes allocated) under ``data``."""
    files = size = blocks = 0
    for d, _, names in os.walk(data):
        for n in names:
            st = os.stat(os.path.join(d, n))
            files += 1
            size += st.st_size
            blocks += st.st_blocks * 512
    return files, size, blocks


async def publish_all(api_url: str, guilds: list[str], concurrency: int = CONCURRENCY) -> None:
    queue = list(reversed(guilds))

    async def worker() -> None:
        async with Api(api_url) as api:
            while queue:
                g = queue.pop()
                status, body, _ = await api.publish({"guild": g, "t": "N", "d": {"n": 1}})
                assert status == 200, body

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def main(n: int, republish: int, idle_timeout: float, concurrency: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        args = [
            "--data-dir",
            str(data),
            "--api-publish-rate",
            "0",
            "--idle-timeout",
            str(idle_timeout),
        ]
        node = ServeProcess(args, Path(tmp) / "serve.log")
        await node.start()
        try:
            assert node.proc is not None
            ps = psutil.Process(node.proc.pid)

            def report(what: str) -> int:
                rss = ps.memory_info().rss
                files, size, blocks = disk_usage(data)
                print(
                    f"{what:40s} rss {rss / 2**20:7.1f} MiB  fds {ps.num_fds():5d}  "
                    f"files {files:6d}  bytes {size:10d}  allocated {blocks:10d}"
                )
                return rss

            rss0 = report("started")
            guilds = [f"idle-{i}" for i in range(n)]
            await publish_all(node.api_url, guilds, concurrency)
            report(f"{n} guilds published once")
            async with Api(node.api_url) as api:
                for _ in range(60):
                    _, text, _ = await api.get("/metrics")
                    alive = [
                        ln
                        for ln in text.decode().splitlines()
                        if ln.startswith("guildcast_guild_actors ")
                    ]
                    if alive and float(alive[0].split()[1]) == 0:
                        break
                    await asyncio.sleep(1)
            rss1 = report("after waiting for the actors to stop (<= 60 s)")
            files, size, blocks = disk_usage(data / GUILDS_DIR)
            print(
                f"per idle guild: {(rss1 - rss0) / n:.0f} bytes of RSS, {size / files:.0f} bytes "
                f"in its journal ({blocks / files:.0f} allocated)"
            )
            again = guilds[: republish or 2 * MAX_OPEN_JOURNALS + 200]
            await publish_all(node.api_url, again, concurrency)
            report(f"{len(again)} of them republished")
        finally:
            await node.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--guilds", type=int, default=20_000)
    ap.add_argument("--republish", type=int, default=0, help="default: 2 x MAX_OPEN_JOURNALS + 200")
    ap.add_argument("--idle-timeout", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=CONCURRENCY, help="HTTP publishers")
    ns = ap.parse_args()
    asyncio.run(main(ns.guilds, ns.republish, ns.idle_timeout, ns.concurrency))
